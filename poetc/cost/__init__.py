"""Cost model: per-op time and energy of a training step on a target, and paging costs.

`build_cost_table(graph, target)` prices every op (analytically from FLOP and byte counts, or from
measured times for the `host` target); `profile_host` measures per-op times on this machine;
`save_costs` / `load_costs` keep measured times in a JSON file tied to the graph's fingerprint.
"""

from .flops import TRANSCENDENTAL_FLOPS, count_flops, is_known_op_type
from .model import MIN_MEASURED_OP_TIME_S, CostTable, OpCost, analytic_time_s, build_cost_table
from .profile import (SavedCosts, graph_fingerprint, load_costs, measure_storage, profile_host,
                      random_feeds, save_costs)

__all__ = [
    "CostTable", "MIN_MEASURED_OP_TIME_S", "OpCost", "SavedCosts", "TRANSCENDENTAL_FLOPS",
    "analytic_time_s", "build_cost_table", "count_flops", "graph_fingerprint", "is_known_op_type",
    "load_costs", "measure_storage", "profile_host", "random_feeds", "save_costs",
]
