"""Primal heuristics for the MILP (issue #18): a portfolio of greedy starts, a local search on the
linear memory model, and a large-neighbourhood search (LNS) that re-solves windows of the MILP with
every decision outside the window fixed to the incumbent.

Why: at tight budgets (30%) on graphs of 500+ ops the plain greedy found no schedule at all and
HiGHS, started cold, ended 50% and more above its bound; a recompute that cascades (recomputing a
block's output needs the previous block's output, itself recomputed) is what the greedy's one-move
rounds and the LP relaxation both get wrong. The LNS sub-MILPs are small (a window of 40 decidable
tensors, the rest fixed) and exact for what they leave free, so every improvement is a schedule the
full MILP accepts; each is limited by a node count and a wall-clock cap, and the whole phase by the
caller's deadline. Every schedule is still checked by the simulator in the parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..plan import Limits
from ..schedule import Decision
from .problem import Problem, ProfileEvaluator

# the greedy variants tried for a start: (rule, extended). "extended" (page a recomputed tensor when
# stalled) is the only one that found a start at ResNet-50-CIFAR 30% (see docs/benchmarks.md)
GREEDY_PORTFOLIO = (("cheapest", False), ("capuchin", False), ("capuchin", True), ("cheapest", True))
LNS_WINDOW = 40  # decidable tensors left free per sub-MILP (consecutive by producer position)
LNS_NODES = 200  # branch-and-bound nodes per sub-MILP


def objective_of(limits: Limits, ev) -> float:
    return ev.time_s if limits.objective == "time" else ev.energy_j


def _fits(limits: Limits, ev) -> bool:
    return (ev.peak_bytes <= limits.activation_budget_bytes and ev.time_s <= limits.overhead_time_s
            and ev.flash_bytes <= limits.flash_bytes)


def local_search(problem: Problem, limits: Limits, choice: list[Decision], *, deadline: float | None = None,
                 max_sweeps: int = 20) -> list[Decision]:
    """First-improvement single moves (one tensor to another mode) on the linear memory model: sweep
    the tensors in index order, modes in the order keep, recompute, page, and take every move that
    fits and lowers the objective; repeat until a sweep changes nothing. Deterministic (the deadline
    only cuts it short). Returns `choice` itself when nothing improves it."""
    evaluate = ProfileEvaluator(problem)
    cands = problem.candidates
    cur = list(choice)
    cur_obj = objective_of(limits, evaluate(cur))
    modes = []
    for i, c in enumerate(cands):
        if c.fixed:
            continue
        modes.append((i, Decision.KEEP))
        if c.recomputable and limits.allow_recompute:
            modes.append((i, Decision.RECOMPUTE))
        if c.pageable and limits.allow_page:
            modes.append((i, Decision.PAGE))
    for _ in range(max_sweeps):
        changed = False
        for i, d in modes:
            if cur[i] is d:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                return cur
            trial = list(cur)
            trial[i] = d
            ev = evaluate(trial)
            obj = objective_of(limits, ev)
            if obj < cur_obj * (1 - 1e-12) - 1e-18 and _fits(limits, ev):
                cur, cur_obj, changed = trial, obj, True
        if not changed:
            break
    return cur


def page_first(problem: Problem, limits: Limits, *, deadline: float | None = None) -> list[Decision] | None:
    """The greedy from the other side: page every pageable tensor (the least memory a schedule of
    keeps and pages can have), then give back what the deadline needs, one pass in decreasing paging
    time per byte: keep the tensor if that still fits the budget, else recompute it if that is faster
    than paging it and fits. None if paging everything does not fit the budget, or the pass ends above
    the deadline (or `deadline`, time.perf_counter(), passes first).
    Why: at 30% of keep-all on ResNet-200-CIFAR every forward greedy (recompute or page at the peak
    until it fits) stalls, because recomputing one block's output there materializes the blocks it
    reads (9.7x the budget with everything recomputed), and none found a schedule in 190 s; paging
    everything fits (0.18x the budget, 5.9x the time the deadline leaves), and this pass finds a
    schedule in 2 s (10.6% overhead energy, 9.9% after local_search; docs/benchmarks.md)."""
    if not limits.allow_page:
        return None
    evaluate = ProfileEvaluator(problem)
    cands = problem.candidates
    cur = [Decision.PAGE if not c.fixed and c.pageable else Decision.KEEP for c in cands]
    ev = evaluate(cur)
    if ev.peak_bytes > limits.activation_budget_bytes or ev.flash_bytes > limits.flash_bytes:
        return None
    order = sorted((i for i, d in enumerate(cur) if d is Decision.PAGE),
                   key=lambda i: (-cands[i].page_time_s / max(cands[i].nbytes, 1), i))
    for i in order:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        c = cands[i]
        moves = [Decision.KEEP]
        if c.recomputable and limits.allow_recompute and c.rec_time_s + c.alias_time_s < c.page_time_s:
            moves.append(Decision.RECOMPUTE)
        for d in moves:
            trial = list(cur)
            trial[i] = d
            ev_t = evaluate(trial)
            if ev_t.peak_bytes <= limits.activation_budget_bytes and ev_t.flash_bytes <= limits.flash_bytes:
                cur, ev = trial, ev_t
                break
    return cur if _fits(limits, ev) else None


def best_start(problem: Problem, limits: Limits, greedy: Callable, *, deadline: float | None = None,
               search_s: float | None = None) -> tuple[list[Decision] | None, list[str]]:
    """The best of the two plain greedy rules (`greedy`: strategies.greedy) and page_first (which
    gets the last fifth of the time to `deadline` even when the plain rules use theirs up: at load 5
    ResNet-200-CIFAR at 50% got no other start), or if none fits, the better of the extended rules;
    improved by local_search until `search_deadline`. (None, notes) if no variant fits before
    `deadline`."""
    evaluate = ProfileEvaluator(problem)
    best = None
    notes = []
    # the plain rules leave page_first a fifth of the share (it took 2 s on ResNet-200-CIFAR, and 0.1 s
    # where it does not fit); at load 10 page_first run first cost ResNet-200-CIFAR at 70% the plain
    # rule's 1.03% start (2.95% instead)
    plain_deadline = None if deadline is None else deadline - 0.2 * max(deadline - time.perf_counter(), 0.0)
    tiers = [[(lambda rule=rule, extended=extended: greedy(problem, limits, rule=rule, extended=extended,
                                                             deadline=plain_deadline),
               f"{rule}{' extended' if extended else ''}") for rule, extended in GREEDY_PORTFOLIO[:2]]
             + [(lambda: page_first(problem, limits, deadline=deadline), "page first")],
             [(lambda rule=rule, extended=extended: greedy(problem, limits, rule=rule, extended=extended,
                                                             deadline=deadline),
               f"{rule}{' extended' if extended else ''}") for rule, extended in GREEDY_PORTFOLIO[2:]]]
    for tier in tiers:
        for run, name in tier:
            if deadline is not None and time.perf_counter() > deadline:
                break
            s = run()
            if s is None:
                continue
            obj = objective_of(limits, evaluate(s))
            if best is None or obj < best[0]:
                best = (obj, s, name)
        if best is not None:
            break
    if best is None:
        return None, notes
    ends = [t for t in (deadline, None if search_s is None else time.perf_counter() + search_s) if t is not None]
    improved = local_search(problem, limits, best[1], deadline=min(ends) if ends else None)
    obj = objective_of(limits, evaluate(improved))
    notes.append(f"warm start: greedy ({best[2]}), {(1 - obj / best[0]) * 100 if best[0] > 0 else 0:.1f}% "
                 f"lower by local search")
    return improved, notes


@dataclass
class LnsSpec:
    """What the solver child needs for the LNS phase: per window, the decision columns left free (all
    other decision columns are fixed to the incumbent's values), and the phase's limits."""
    windows: list[list[int]]  # column indices free in each window
    decision_cols: list[int]  # every keep/rec/page column
    nodes: int = LNS_NODES
    window_s: float = 10.0  # wall-clock cap per sub-MILP (its root cut rounds are what take the time)
    main_share: float = 0.5  # of the time left after the build: the full MILP's, before the LNS
    gap: float = 0.01  # the full MILP is stopped for the LNS only above this gap
    passes: int = 2  # over all windows; a pass that improves nothing ends the phase
    # after the LP relaxation, only while the start is more than `gap` above the LP bound:
    branch_nodes: int = 12  # child LPs of bound.branch_bound (a deterministic limit) ...
    branch_share: float = 0.1  # ... within this share of the time left (a cap: it only cuts it short)
    rens_nodes: int = 500  # branch-and-bound nodes of the RENS sub-MILP (rens) ...
    rens_share: float = 0.5  # ... within this share of the time left
    # the columns the projection bound keeps (projection.py: decisions, group runs, page-in-again,
    # windows, bookkeeping), and its time cap as a share of the time left; empty: no projection bound
    bound_cols: list[int] = field(default_factory=list)
    projection_share: float = 0.2

    @property
    def triples(self) -> list[tuple[int, int, int]]:
        """(keep, rec, page) columns per decidable tensor."""
        c = self.decision_cols
        return [(c[j], c[j + 1], c[j + 2]) for j in range(0, len(c), 3)]


def lns_windows(problem: Problem, keep: dict[int, int], rec: dict[int, int], page: dict[int, int],
                window: int = LNS_WINDOW) -> LnsSpec:
    """Windows of `window` decidable tensors consecutive by producer position, overlapping by half."""
    order = sorted(keep, key=lambda i: (problem.candidates[i].prod, i))
    cols = {i: [keep[i], rec[i], page[i]] for i in order}
    step = max(window // 2, 1)
    windows = []
    for a in range(0, max(len(order) - window + step, 1), step):
        windows.append([col for i in order[a:a + window] for col in cols[i]])
    return LnsSpec(windows, [col for i in order for col in cols[i]])


def _sub_highs(lp, lo: np.ndarray, hi: np.ndarray, *, nodes: int, time_s: float, seed: int,
               start: np.ndarray | None):
    """A fresh single-thread HiGHS on `lp` with column bounds lo/hi, presolve off (HiGHS's presolve
    took 12.7 s of a 13 s window solve on ResNet-50-CIFAR, without it 0.7 s), run."""
    import highspy
    lp.col_lower_, lp.col_upper_ = lo, hi
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(lp)
    h.setOptionValue("random_seed", seed)
    h.setOptionValue("threads", 1)
    h.setOptionValue("presolve", "off")
    h.setOptionValue("mip_max_nodes", nodes)
    h.setOptionValue("mip_rel_gap", 1e-4)
    h.setOptionValue("time_limit", max(time_s, 0.05))
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    return h


def rens(model, x_lp: np.ndarray, spec: LnsSpec, deadline: float, seed: int = 0) -> np.ndarray | None:
    """Relaxation-enforced neighbourhood search: every decision column the LP relaxation has integral
    is fixed there, the tensors it has fractional and all other columns stay free, and that sub-MILP
    is solved (spec.rens_nodes nodes, until `deadline`). Its solutions are the full MILP's. On the
    24-layer encoder at 50% the LP has 3 of 582 tensors fractional and this found a schedule 0.5%
    below every other heuristic's (docs/benchmarks.md); where the LP's integral part admits no
    schedule (ResNet-50-CIFAR at 30%) it is proven infeasible in seconds. None if nothing is found."""
    dec = np.array(spec.decision_cols, dtype=np.int64)
    lo, hi = np.array(model.col_lb, dtype=np.float64), np.array(model.col_ub, dtype=np.float64)
    vals = x_lp[dec]
    whole = np.abs(vals - np.round(vals)) <= 1e-6
    lo[dec[whole]] = hi[dec[whole]] = np.round(vals[whole])
    left = deadline - time.perf_counter()
    if left <= 0.05:
        return None
    h = _sub_highs(model.to_highs().getLp(), lo, hi, nodes=spec.rens_nodes, time_s=left, seed=seed, start=None)
    if h.getInfo().primal_solution_status != 2:  # kSolutionStatusFeasible
        return None
    return np.asarray(h.getSolution().col_value).copy()


def run_lns(model, objective: Callable[[np.ndarray], float], x: np.ndarray, spec: LnsSpec, deadline: float,
            on_improve: Callable[[np.ndarray, float], None], seed: int = 0) -> np.ndarray:
    """Re-solve each window with the other decision columns fixed to x; keep any better solution.
    `model`: the formulation.LinearModel; each window is a fresh HiGHS model with the changed column
    bounds, solved with presolve off (HiGHS's presolve took 12.7 s of a 13 s window solve on
    ResNet-50-CIFAR, without it 0.7 s). `on_improve(x, objective)` is called at every improvement.
    Returns the best x."""
    best = objective(x)
    dec = np.array(spec.decision_cols, dtype=np.int64)
    lb, ub = np.array(model.col_lb, dtype=np.float64), np.array(model.col_ub, dtype=np.float64)
    lp = model.to_highs().getLp()
    for _ in range(spec.passes):
        improved = False
        for free in spec.windows:
            left = deadline - time.perf_counter()
            if left <= 0.05:
                return x
            lo, hi = lb.copy(), ub.copy()
            lo[dec], hi[dec] = np.round(x[dec]), np.round(x[dec])
            free = np.array(free, dtype=np.int64)
            lo[free], hi[free] = lb[free], ub[free]
            h = _sub_highs(lp, lo, hi, nodes=spec.nodes, time_s=min(left, spec.window_s), seed=seed, start=x)
            if h.getInfo().primal_solution_status != 2:
                continue
            x_new = np.asarray(h.getSolution().col_value).copy()
            obj = objective(x_new)
            if obj < best * (1 - 1e-9) - 1e-15:
                x, best, improved = x_new, obj, True
                on_improve(x, obj)
        if not improved:
            break
    return x
