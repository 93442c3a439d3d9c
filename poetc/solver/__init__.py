"""Choosing keep / recompute / page per decidable tensor: problem extraction, MILP, baselines.
The limits a strategy respects (Limits) are built from a poetc.plan.Budget."""

from ..plan import Limits
from .problem import Problem, build_problem
from .strategies import StrategyResult, run_strategy

__all__ = ["Limits", "Problem", "StrategyResult", "build_problem", "run_strategy"]
