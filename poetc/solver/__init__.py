"""Choosing keep / recompute / page per saved activation: problem extraction, MILP, baselines."""

from .formulation import RESERVE_BYTES, RESERVE_FRACTION, Limits, activation_budget
from .problem import Problem, build_problem
from .strategies import STRATEGIES, StrategyResult, check_lower_bound, run_strategy

__all__ = ["Limits", "RESERVE_BYTES", "RESERVE_FRACTION", "activation_budget", "Problem", "STRATEGIES", "StrategyResult", "build_problem", "check_lower_bound", "run_strategy"]
