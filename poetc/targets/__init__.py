"""Device targets (RAM, compute, storage figures) packaged as TOML files next to this module."""

from .loader import COST_MODELS, Target, known_target_names, list_targets, load_target, parse_target

__all__ = ["COST_MODELS", "Target", "known_target_names", "list_targets", "load_target", "parse_target"]
