"""The MILP's overlap rows (issue #19): paging that runs on the storage channel next to compute.

For every pageable tensor i the model may make its Spill asynchronous (an "out" window: a SpillAsync
right after its producer, a Flush before slot `end`) and its first Restore asynchronous (an "in"
window: a Prefetch before slot `start`, the Await where the Restore was), among a few candidate windows
per tensor and direction (`candidate_windows`: the shortest window whose compute covers the transfer,
and two shorter ones). A binary `win_w` per window:

  sum of i's out windows <= page_i;  sum of i's in windows <= page_i
  sum of i's in windows + y[i, last stage of its gap] <= 1      (the Restore is where the window ends)
Memory: `win_w` adds the staging bytes (poetc.overlap.Window.op_positions / stage_positions) to the
memory rows, so the budget holds with every staging buffer counted.
The channel: a window open over slots S_w = [start, end) holds the channel; no other transfer may be
issued in those slots. With T_q the transfers that may be issued in slot q (every Spill after its
producer, every blocking first Restore page_i - sum of i's in windows, every Prefetch, every early or
repeated page-in and every StateRead/StateWrite, each counted conservatively as at most 1), n_q their
number and A_q the windows with q in S_w, one row per slot:

  T_q - sum_{w in A_q issued at q} win_w + n_q * sum_{w in A_q} win_w <= n_q
(at most one open window, and then nothing else issued in its slots), and an in window's Await slot is
no other in window's issue slot (the read would queue behind it). Under those rows the channel is free
whenever a window is issued, so the step's time is exactly the blocking time plus, per window, its
staging copy plus the part of its transfer the compute inside it does not hide (Window.delta_s < 0):
a linear term in the deadline row. A recompute inside a window only hides more: the MILP's time is an
upper bound of the channel model's then, and equal otherwise (tests/test_overlap.py). Energy adds the
staging copies: overlap saves time, not joules.
"""

from __future__ import annotations

import numpy as np

from ..overlap import OverlapCosts, Window
from .problem import Problem

#: candidate windows per tensor and direction: the covering one and at most this many shorter ones
SHORTER_WINDOWS = 2
#: the longest window considered, in ops
MAX_WINDOW_OPS = 64


def _lengths(times: list[float], transfer_s: float, copy_s: float) -> list[tuple[int, float]]:
    """(ops, hidden compute) of the candidate windows over `times` (the compute they could span, nearest
    first): the shortest covering `transfer_s` (the hideable part of the transfer: less its CPU work) or
    the longest allowed, and up to SHORTER_WINDOWS halvings of it, each hiding more than its staging
    copy costs."""
    acc = np.cumsum(times[:MAX_WINDOW_OPS]) if times else np.zeros(0)
    if not len(acc):
        return []
    cover = int(np.searchsorted(acc, transfer_s)) + 1
    cover = min(cover, len(acc))
    out: list[tuple[int, float]] = []
    length = cover
    for _ in range(SHORTER_WINDOWS + 1):
        hidden = float(acc[length - 1])
        if min(hidden, transfer_s) > copy_s and all(length != k for k, _ in out):
            out.append((length, hidden))
        if length == 1:
            break
        length = max(1, length // 2)
    return out


def candidate_windows(problem: Problem, costs: OverlapCosts, allow_page: bool = True) -> list[Window]:
    """The windows the MILP may choose (see the module docstring), in a fixed order."""
    if not allow_page:
        return []
    op_t = problem.costs.op_time_s
    out: list[Window] = []
    for i, c in enumerate(problem.candidates):
        if c.fixed or c.state or not c.pageable:
            continue
        copy_s = costs.copy_s(c.nbytes)
        copy_e = costs.copy_power_w * copy_s
        t_out = problem.costs.page_out(c.nbytes)[0]
        t_in = problem.costs.page_in(c.nbytes)[0]
        cpu_out, cpu_in = costs.cpu_s("out", t_out), costs.cpu_s("in", t_in)  # not hideable (OverlapCosts)
        fb = c.first_after_gap
        # out: the Spill after op prod, hidden by ops prod+1 .. end-1, flushed before slot end <= fb
        for length, hidden in _lengths([op_t[p] for p in range(c.prod + 1, fb)], t_out - cpu_out, copy_s):
            out.append(Window("out", i, c.name, c.nbytes, c.prod, c.prod + 1 + length, t_out, hidden, copy_s, copy_e,
                              cpu_out))
        # in: the Prefetch before slot start >= prod + 1, hidden by ops start .. fb-1, awaited in slot fb
        for length, hidden in _lengths([op_t[p] for p in range(fb - 1, c.prod, -1)], t_in - cpu_in, copy_s):
            out.append(Window("in", i, c.name, c.nbytes, fb - length, fb, t_in, hidden, copy_s, copy_e, cpu_in))
    return out


def add_windows(problem: Problem, costs: OverlapCosts, m, v, allow_page: bool = True) -> None:
    """Columns and rows of the windows (module docstring); memory terms are added by `memory_terms`,
    time and energy by `cost_terms`. `m`: the LinearModel; `v`: its MilpVars (v.windows, v.win)."""
    cands = problem.candidates
    v.windows = [w for w in candidate_windows(problem, costs, allow_page) if w.cand in v.page]
    for k, w in enumerate(v.windows):
        v.win[k] = m.add_var(f"win_{w.kind}_{w.cand}_{w.start}_{w.end}", integer=True)
    by_cand: dict[tuple[int, str], list[int]] = {}
    for k, w in enumerate(v.windows):
        by_cand.setdefault((w.cand, w.kind), []).append(k)
    last_y: dict[int, int] = {}
    for (i, k) in v.y:
        last_y[i] = max(last_y.get(i, k), k)
    for (i, kind), ks in sorted(by_cand.items()):
        m.add_row({**{v.win[k]: 1.0 for k in ks}, v.page[i]: -1.0}, ub=0.0)
        if kind == "in":
            last = last_y.get(i)
            if last is not None:
                m.add_row({**{v.win[k]: 1.0 for k in ks}, v.y[(i, last)]: 1.0}, ub=1.0)
    # T_q: what may be issued in slot q, as (column, coefficient) terms and a count of units
    issued: dict[int, dict[int, float]] = {}
    units: dict[int, int] = {}

    def issue(q: int, terms: dict[int, float]) -> None:
        row = issued.setdefault(q, {})
        for col, coef in terms.items():
            row[col] = row.get(col, 0.0) + coef
        units[q] = units.get(q, 0) + 1

    for i, col in v.page.items():
        c = cands[i]
        if c.state:
            for a, _ in c.state_groups:
                issue(a, {col: 1.0})
            if c.state_writes:
                issue(c.state_update, {col: 1.0})
            continue
        issue(c.prod, {col: 1.0})  # its Spill (asynchronous or not)
        issue(c.first_after_gap, {col: 1.0, **{v.win[k]: -1.0 for k in by_cand.get((i, "in"), ())}})
    for (i, k), col in v.y.items():  # an early page-in (a recompute's early regeneration: counted too)
        if cands[i].pageable:
            issue(problem.stages[k], {col: 1.0})
    for (i, j), col in v.drop.items():
        issue(cands[i].inner[j][1], {col: 1.0})
    for k, w in enumerate(v.windows):
        if w.kind == "in":
            issue(w.start, {v.win[k]: 1.0})
    covering: dict[int, list[int]] = {}
    for k, w in enumerate(v.windows):
        for q in w.exclusive_slots():
            covering.setdefault(q, []).append(k)
    for q, ks in sorted(covering.items()):
        n_q = units.get(q, 0)
        terms = dict(issued.get(q, {}))
        for k in ks:
            col = v.win[k]
            own = 1.0 if v.windows[k].start == q else 0.0
            terms[col] = terms.get(col, 0.0) - own + max(n_q, 1)
        m.add_row(terms, ub=float(max(n_q, 1)))
    # an in window's Await slot is no other in window's issue slot
    ends: dict[int, list[int]] = {}
    for k, w in enumerate(v.windows):
        if w.kind == "in":
            ends.setdefault(w.end, []).append(k)
    for q, ks in sorted(ends.items()):
        starting = [k for k, w in enumerate(v.windows) if w.kind == "in" and w.start == q]
        if starting:
            m.add_row({v.win[k]: 1.0 for k in ks + starting}, ub=1.0)


def memory_terms(problem: Problem, v, terms: list[dict], pre_terms: list[dict]) -> None:
    """Add each window's staging bytes to the memory rows: `terms` per position, `pre_terms` per stage."""
    stage_index = {s: k for k, s in enumerate(problem.stages)}
    for k, w in enumerate(v.windows):
        for p in w.op_positions():
            terms[p][("win", k)] = float(w.nbytes)
        for p in w.stage_positions():
            if p in stage_index:
                pre_terms[stage_index[p]][("win", k)] = float(w.nbytes)


def cost_terms(v, what: str) -> dict[int, float]:
    """{column: coefficient} of the windows in the overhead time ("time": delta_s < 0) or energy
    ("energy": the staging copy's)."""
    if what == "time":
        return {v.win[k]: w.delta_s for k, w in enumerate(v.windows)}
    return {v.win[k]: w.copy_energy_j for k, w in enumerate(v.windows)}


def read_windows(v, x) -> list[Window]:
    """The windows solution x chose."""
    return [w for k, w in enumerate(v.windows) if x[v.win[k]] > 0.5]


def window_bytes(windows: list[Window], positions: int, stages: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What the memory rows add for `windows`: (per position, per stage) staging bytes."""
    op = np.zeros(positions)
    pre = np.zeros(len(stages))
    stage_index = {s: k for k, s in enumerate(stages)}
    for w in windows:
        for p in w.op_positions():
            op[p] += w.nbytes
        for p in w.stage_positions():
            if p in stage_index:
                pre[stage_index[p]] += w.nbytes
    return op, pre


__all__ = ["add_windows", "candidate_windows", "cost_terms", "memory_terms", "read_windows", "window_bytes"]
