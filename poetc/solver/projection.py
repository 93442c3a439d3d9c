"""A quick proven bound: the LP of the MILP projected onto its decision columns (issue #18).

On the largest graphs (ResNet-200-CIFAR: 281k rows, 168k columns) HiGHS's dual simplex needs
minutes for the LP relaxation, so `highs-lns` had no bound at all within 60 s. Most of those rows
and columns are the bookkeeping of *when* a regenerated tensor is materialized (y, tau, ext, z, gtau,
w): thousands per tensor. This module drops those columns and relaxes every row to what the kept
columns alone must satisfy, which leaves an LP of a few thousand rows that solves in about a second.

Validity (every integer solution of the MILP keeps its objective or more in the projection):
a row lb <= sum_j a_j x_j <= ub with a dropped column j (bounds l_j <= x_j <= u_j) holds for some
x_j in [l_j, u_j], so  sum_{kept} a_k x_k <= ub - min(a_j l_j, a_j u_j)  and
sum_{kept} a_k x_k >= lb - max(a_j l_j, a_j u_j): these relaxed rows hold for the kept part of
every feasible point, so the projected feasible set contains the projection of the MILP's, and the
LP over it is at most the MILP's LP over the kept columns. A dropped column's objective term c_j x_j
is at least min(c_j l_j, c_j u_j), added to the bound as a constant. Rows whose relaxed bounds the
kept columns' own bounds already imply are left out (they cut nothing). Hence
projected LP value + sum of those constants <= the LP relaxation <= the MILP optimum.
(tests/test_solver_heuristics.py checks it against the full LP and HiGHS's optimum on small graphs.)
"""

from __future__ import annotations

import numpy as np

from .formulation import LinearModel


def project(model: LinearModel, keep_cols) -> tuple[LinearModel, float]:
    """(the projected model over `keep_cols`, in that order, its objective's constant): see the module
    docstring. Integrality is dropped (it is for an LP bound)."""
    keep_cols = np.asarray(sorted(set(int(c) for c in keep_cols)), dtype=np.int64)
    n = model.num_cols
    lb = np.asarray(model.col_lb, dtype=np.float64)
    ub = np.asarray(model.col_ub, dtype=np.float64)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[keep_cols] = np.arange(keep_cols.size)
    start = np.asarray(model.row_start, dtype=np.int64)
    index = np.asarray(model.row_index, dtype=np.int64)
    value = np.asarray(model.row_value, dtype=np.float64)
    row_of = np.repeat(np.arange(model.num_rows), np.diff(start))
    kept = new_index[index] >= 0
    # the dropped terms' least and greatest values, summed per row
    lo_term = np.where(kept, 0.0, np.minimum(value * lb[index], value * ub[index]))
    hi_term = np.where(kept, 0.0, np.maximum(value * lb[index], value * ub[index]))
    row_lb = np.asarray(model.row_lb, dtype=np.float64) - np.bincount(row_of, hi_term, model.num_rows)
    row_ub = np.asarray(model.row_ub, dtype=np.float64) - np.bincount(row_of, lo_term, model.num_rows)
    # the kept terms' own activity range: a row it always satisfies is left out
    k_lo = np.where(kept, np.minimum(value * lb[index], value * ub[index]), 0.0)
    k_hi = np.where(kept, np.maximum(value * lb[index], value * ub[index]), 0.0)
    act_lo = np.bincount(row_of, k_lo, model.num_rows)
    act_hi = np.bincount(row_of, k_hi, model.num_rows)
    n_kept = np.bincount(row_of, kept.astype(np.float64), model.num_rows)
    useful = (n_kept > 0) & ((act_lo < row_lb - 1e-12) | (act_hi > row_ub + 1e-12))
    out = LinearModel()
    for c in keep_cols.tolist():
        out.add_var(model.col_names[c], float(lb[c]), float(ub[c]), False)
    constant = 0.0
    for j, c in model.obj.items():
        if new_index[j] >= 0:
            out.obj[int(new_index[j])] = c
        else:
            constant += min(c * lb[j], c * ub[j])
    for r in np.flatnonzero(useful).tolist():
        a, b = start[r], start[r + 1]
        sel = kept[a:b]
        terms = dict(zip(new_index[index[a:b][sel]].tolist(), value[a:b][sel].tolist()))
        lo = row_lb[r] if row_lb[r] > -np.inf else -np.inf
        hi = row_ub[r] if row_ub[r] < np.inf else np.inf
        if act_lo[r] >= lo - 1e-12:
            lo = -np.inf  # that side is implied
        if act_hi[r] <= hi + 1e-12:
            hi = np.inf
        out.add_row(terms, float(lo), float(hi))
    return out, float(constant)


def projection_bound(model: LinearModel, keep_cols, *, time_limit_s: float) -> float | None:
    """The bound of the module docstring: the projected LP's optimum plus the dropped objective
    terms' least values; None if HiGHS does not solve it to optimality within `time_limit_s`
    (an infeasible projection would prove the MILP infeasible, but that is left to the full LP)."""
    import highspy
    small, constant = project(model, keep_cols)
    h = small.to_highs()
    h.setOptionValue("time_limit", max(time_limit_s, 0.05))
    h.setOptionValue("threads", 1)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    return float(h.getInfo().objective_function_value) + constant
