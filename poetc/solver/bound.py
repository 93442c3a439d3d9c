"""A proven lower bound from a few branching steps on the LP relaxation (issue #18).

On the largest models (a 24-layer encoder: 305k rows) HiGHS's MILP reports no bound beyond the root
LP within a minute: its root cut rounds take the time. The LP itself is nearly integral there (3 of
582 decidable tensors fractional at 50% of keep-all), so branching on those few tensors, each child
an LP re-solved from its parent's basis, lifts the bound in seconds.

Branching is on a tensor's decision: a node where tensor i is fractional has up to three children,
keep_i = 1, rec_i = 1 and page_i = 1 (the other two columns of i fixed to 0). Every integer solution
of the node lies in one child, so the least LP value over the open leaves (children never branched
further) is a lower bound on every integer solution: the bound returned. A child whose LP is proven
infeasible holds no integer solution and is dropped; a child whose LP is not solved to optimality
(the time cap) keeps its parent's value, which is still a lower bound for it. A leaf whose decisions
are all integral is not branched further (its other integer columns are the MILP's business): its
value stays in the minimum, so the search stops when it is the least.
"""

from __future__ import annotations

import heapq
import time

import numpy as np


def branch_bound(h, col_lb, col_ub, triples: list[tuple[int, int, int]], *, max_nodes: int, deadline: float,
                 cutoff: float = float("inf")) -> float | None:
    """The least LP value over the open leaves after at most `max_nodes` child LPs, best first.
    `h`: a highspy.Highs holding the model with solve_relaxation on, solved to optimality (the root);
    `col_lb`, `col_ub`: the model's column bounds, restored on `h` before returning; `triples`: the
    (keep, rec, page) columns of each decidable tensor. Nodes whose LP reaches `cutoff` (an incumbent's
    objective) are not branched: no better solution is in them, so the bound is min(leaves, cutoff).
    None if the root is not an optimal LP or every child is infeasible (left to the MILP to decide)."""
    import highspy
    optimal, infeasible = highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kInfeasible
    if h.getModelStatus() != optimal:
        return None
    lb = np.asarray(col_lb, dtype=np.float64)
    ub = np.asarray(col_ub, dtype=np.float64)
    root = float(h.getInfo().objective_function_value)
    heap = [(root, 0, (), np.asarray(h.getSolution().col_value).copy())]  # (value, tie, fixed-to-0 cols, x or None)
    tie = 1
    nodes = 0
    current: set[int] = set()  # columns whose upper bound is 0 on h now

    def solve(fixed: tuple[int, ...], parent: float):
        nonlocal current
        changed = np.array(sorted(current.symmetric_difference(fixed)), dtype=np.int32)
        if changed.size:
            new_ub = ub[changed].copy()
            new_ub[np.isin(changed, fixed)] = 0.0
            h.changeColsBounds(changed.size, changed, lb[changed], new_ub)
        current = set(fixed)
        h.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.01))
        h.run()
        status = h.getModelStatus()
        if status == infeasible:
            return None
        if status != optimal:
            return parent, None  # unsolved: its parent's value is still a bound on it
        return float(h.getInfo().objective_function_value), np.asarray(h.getSolution().col_value).copy()

    try:
        while heap and nodes < max_nodes and time.perf_counter() < deadline:
            value, _, fixed, x = heap[0]
            if x is None or value >= cutoff:
                break  # the least leaf cannot be branched (unsolved, or integral, or past the incumbent)
            most = None
            for k, r, p in triples:
                f = 1.0 - max(x[k], x[r], x[p])
                if f > 1e-6 and (most is None or f > most[0]):
                    most = (f, (k, r, p))
            if most is None:
                break  # integral decisions: no branching on them left here
            heapq.heappop(heap)
            trio = most[1]
            for col in trio:
                if ub[col] == 0.0 or col in fixed:
                    continue
                child = tuple(sorted(set(fixed) | {c for c in trio if c != col}))
                # past the deadline a child is not solved but kept, at its parent's value
                out = solve(child, value) if time.perf_counter() < deadline else (value, None)
                nodes += 1
                if out is not None:
                    heapq.heappush(heap, (out[0], tie, child, out[1]))
                    tie += 1
    finally:
        if current:
            cols = np.array(sorted(current), dtype=np.int32)
            h.changeColsBounds(cols.size, cols, lb[cols], ub[cols])
    if not heap:
        return None
    return min(heap[0][0], cutoff)
