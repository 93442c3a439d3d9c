"""Strategies: keep-all, Chen sqrt(n), Capuchin-like greedy, and the MILPs (poet, remat-only,
paging-only). Every strategy returns a `StrategyResult` whose numbers come from the simulator.
Heuristics double as warm starts for the MILPs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import UsageError
from ..plan import STRATEGIES, Limits
from ..schedule import Decision, Schedule, SimResult, simulate
from .backend import solve_in_child
from . import overlap_rows
from .formulation import build_model, read_choice, read_early, read_repage, start_values
from .heuristics import best_start, lns_windows
from .problem import Problem, ProfileEvaluator, chen_checkpoints, evaluate_linear

log = logging.getLogger(__name__)

# highs-lns: HiGHS from the greedy portfolio + local search start (heuristics.best_start), then a
# large-neighbourhood search on the MILP's windows when the full MILP stalls above a 1% gap
SOLVERS = {"highs": "HiGHS", "highs-lns": "HiGHS + LNS", "cbc": "CBC"}


@dataclass
class StrategyResult:
    strategy: str
    choice: list[Decision]
    schedule: Schedule
    sim: SimResult
    fits: bool  # peak within budget and time within deadline, per the simulator
    status: str  # optimal / feasible / heuristic / infeasible / no-solution-in-time
    overhead_time_s: float
    overhead_energy_j: float
    early: dict[int, int] = field(default_factory=dict)  # candidate -> stage index, regenerated ahead of need
    repage: dict[int, list[int]] = field(default_factory=dict)  # PAGE candidate -> inner gaps paged in again
    overlap: object = None  # poetc.overlap.OverlapPlan of the MILP's asynchronous windows (in `sim` already)
    bound: float | None = None  # lower bound on the overhead objective (MILPs)
    gap: float | None = None  # (objective - bound) / objective, on the overhead
    solve_time_s: float = 0.0
    time_to_1pct_s: float | None = None  # MILPs: when the gap on the overhead first reached 1%
    notes: list[str] = field(default_factory=list)


def evaluate_choice(problem: Problem, strategy: str, choice: list[Decision], limits: Limits, status: str,
                    early: dict[int, int] | None = None, repage: dict[int, list[int]] | None = None,
                    windows: list | None = None, **kw) -> StrategyResult:
    """The result of a choice of decisions: its schedule, simulated, and whether it fits `limits`.
    `windows` (poetc.overlap.Window, the MILP's): made asynchronous, their staging bytes and the
    overlapped time in the simulation the fit is judged on."""
    early = early or {}
    repage = {i: js for i, js in (repage or {}).items() if js and choice[i] is Decision.PAGE}
    schedule = Schedule.from_decisions(problem.graph, problem.decisions_from(dict(enumerate(choice))), strategy,
                                       solver={"status": status, "granularity": "op"},
                                       regenerate_at=problem.regenerate_at_from(early),
                                       repage_at=problem.repage_at_from(repage))
    sim = simulate(problem.graph, schedule.steps, schedule.origin, problem.costs)
    overlap = None
    if windows and limits.overlap is not None:  # issue #19
        from ..overlap import plan_from_windows
        moved = {s.tensor for s in schedule.steps if s.tensor is not None}
        overlap = plan_from_windows(schedule.steps, sim, problem.costs,
                                    {t: problem.graph.tensors[t].nbytes for t in moved}, windows, limits.overlap)
        sim = overlap.adjusted(sim)
    over_t, over_e = sim.time_s - problem.base_time_s, sim.energy_j - problem.base_energy_j
    fits = (sim.peak_bytes <= limits.activation_budget_bytes
            and over_t <= limits.overhead_time_s * (1 + 1e-9) + 1e-12
            and sim.max_flash_bytes <= limits.flash_bytes)
    schedule.solver.update({k: v for k, v in kw.items() if k in ("bound", "gap")})
    return StrategyResult(strategy, choice, schedule, sim, fits, status, over_t, over_e, early, repage, overlap, **kw)


# ---------------------------------------------------------------------------------------------------


def greedy(problem: Problem, limits: Limits, *, rule: str = "cheapest", max_options: int = 16,
           deadline: float | None = None, extended: bool = False) -> list[Decision] | None:
    """Free memory at the peak until it fits. Each round tries the `max_options` most promising
    (tensor, mode) moves at the peak position and takes the one that lowers the peak most per unit of
    cost. rule="capuchin": forward activations only (as Capuchin's feature maps), a tensor's preferred
    mode is paging when it is compute-heavy (recompute time above paging time), recompute otherwise;
    rule="cheapest": every candidate, the mode with the lower objective cost.
    When no such move lowers the peak (`extended`): try the next options at the peak, and paging
    instead of recomputing any recomputed tensor, before giving up (only then, so wherever the plain
    rounds succeed the result is theirs). Off by default: in one run on a loaded machine it gave
    ResNet-101-CIFAR at 30% a start (5.5% vs 6.4% overhead) but cost encoder24 at 30% the time HiGHS
    needed to beat its poor start (12.7% vs 3.1% from a cold start).
    Then give back (keep) whatever still fits, most expensive first. None if nothing fits, or if
    time.perf_counter() passes `deadline` first."""
    cands = problem.candidates
    choice = [Decision.KEEP] * len(cands)
    metric = (lambda c, d: c.rec_time_s + c.alias_time_s if d is Decision.RECOMPUTE else c.page_time_s) \
        if limits.objective == "time" else \
        (lambda c, d: c.rec_energy_j + c.alias_energy_j if d is Decision.RECOMPUTE else c.page_energy_j)

    def modes(c):
        out = []
        if c.recomputable and limits.allow_recompute:
            out.append(Decision.RECOMPUTE)
        if c.pageable and limits.allow_page:
            out.append(Decision.PAGE)
        if rule == "capuchin" and len(out) == 2:
            heavy = c.rec_time_s + c.alias_time_s > c.page_time_s
            out.sort(key=lambda d: (d is not (Decision.PAGE if heavy else Decision.RECOMPUTE)))
        else:
            out.sort(key=lambda d: metric(c, d))
        return out

    evaluate = ProfileEvaluator(problem)
    ev = evaluate(choice)
    while ev.peak_bytes > limits.activation_budget_bytes:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        p = ev.peak_position
        options = []
        for i, c in enumerate(cands):
            in_gap = c.last_before_gap < p < c.first_after_gap
            if choice[i] is not Decision.KEEP or c.fixed or not in_gap or (rule == "capuchin" and c.gradient):
                continue
            for rank, d in enumerate(modes(c)):
                options.append((rank, -c.nbytes / (metric(c, d) + 1e-15), i, d))
        options.sort()

        def best_of(moves):
            best = None
            for _, _, i, d in moves:
                trial = list(choice)
                trial[i] = d
                ev_t = evaluate(trial)
                if ev_t.time_s > limits.overhead_time_s or ev_t.flash_bytes > limits.flash_bytes:
                    continue
                gain = (ev.peak_bytes - ev_t.peak_bytes, ev.profile[p] - ev_t.profile[p])
                if gain[0] < 0 or gain[1] <= 0:
                    continue
                cost = abs(metric(cands[i], d) - metric(cands[i], choice[i]) if choice[i] is not Decision.KEEP
                           else metric(cands[i], d)) + 1e-15
                key = (gain[0] / cost, gain[1] / cost)
                if best is None or key > best[0]:
                    best = (key, trial, ev_t)
            return best
        best = best_of(options[:max_options])
        if best is None and extended:
            # stalled: what is left at the peak may be a recompute's transients or the boundary tensors
            # it holds, so also try paging a recomputed tensor instead, and every remaining option
            switches = sorted((abs(metric(c, Decision.PAGE) - metric(c, Decision.RECOMPUTE)), 0.0, i, Decision.PAGE)
                              for i, c in enumerate(cands)
                              if choice[i] is Decision.RECOMPUTE and c.pageable and limits.allow_page)
            best = best_of(options[max_options: 4 * max_options] + switches)
        if best is None:
            return None
        _, choice, ev = best
    # give back
    order = sorted((i for i, d in enumerate(choice) if d is not Decision.KEEP),
                   key=lambda i: -metric(cands[i], choice[i]))
    for i in order:
        if deadline is not None and time.perf_counter() > deadline:
            break  # what it has fits
        trial = list(choice)
        trial[i] = Decision.KEEP
        if evaluate(trial).peak_bytes <= limits.activation_budget_bytes:
            choice = trial
    return choice


def _build_for_child(problem: Problem, limits: Limits, start: list[Decision] | None, lns: bool = False):
    """What the solver child runs first: the model, the start as a column vector, the decoder,
    (`lns`) the LNS windows, and the function that turns a start (decision values) into a vector."""
    def build():
        model, v = build_model(problem, limits)

        def to_x0(values) -> np.ndarray:
            choice = [Decision(d) for d in values]
            x0 = np.zeros(model.num_cols)
            for col, val in start_values(problem, v, choice, evaluate_linear(problem, choice)):
                x0[col] = val
            return x0

        def decode(x):
            choice = read_choice(problem, v, x)
            return ([d.value for d in choice], read_early(problem, v, choice, x), read_repage(v, choice, x),
                    overlap_rows.read_windows(v, x))
        spec = None
        if lns:
            spec = lns_windows(problem, v.keep, v.rec, v.page)
            spec.bound_cols = [*v.keep.values(), *v.rec.values(), *v.page.values(), *v.run.values(),
                               *v.drop.values(), *v.win.values(), *v.bk.values(), *v.held.values(),
                               *v.state_session.values()]
        return model, None if start is None else to_x0([d.value for d in start]), decode, spec, to_x0
    return build


@dataclass(frozen=True)
class TimeBudget:
    """How solve_milp splits its time limit (seconds, all from its start t0). The warm starts end by
    `warm_start_s` (local search included, at most `local_search_s` of it); the solver child is killed
    at `solver_s`, build and solve included; `simulation_s` is left for simulating the result (and the
    fallback start) after it, so that solver_s + simulation_s is the limit and the reported solve time
    (which includes the simulation) stays within it."""
    warm_start_s: float
    local_search_s: float
    solver_s: float
    simulation_s: float

    @classmethod
    def of(cls, time_limit_s: float) -> "TimeBudget":
        # simulating a schedule took 0.23 s on the 2,553-op encoder24 (quiet machine): 2% of the limit, at most 1 s
        simulation_s = min(0.02 * time_limit_s, 1.0)
        return cls(0.5 * time_limit_s, 0.1 * time_limit_s, time_limit_s - simulation_s, simulation_s)


def solve_milp(problem: Problem, limits: Limits, strategy: str, *, time_limit_s: float, seed: int = 0,
               threads: int = 1, solver: str = "highs", gap: float = 1e-4) -> StrategyResult:
    """The MILP from a greedy warm start. `time_limit_s` covers all of it (warm starts, building the
    model, solving, simulating the result; split by TimeBudget) and is hard: the solver runs in a
    child process that is stopped at its share, keeping its best solution so far. solve_time_s
    reports the whole, simulation included."""
    t0 = time.perf_counter()
    result = _solve_milp(problem, limits, strategy, t0, TimeBudget.of(time_limit_s), time_limit_s, seed, threads,
                         solver, gap)
    result.solve_time_s = time.perf_counter() - t0
    return result


def _solve_milp(problem: Problem, limits: Limits, strategy: str, t0: float, budget: TimeBudget, time_limit_s: float,
                seed: int, threads: int, solver: str, gap: float) -> StrategyResult:
    # the warm starts may use at most half the limit; past that the MILP starts cold
    greedy_deadline = t0 + budget.warm_start_s
    lns = solver == "highs-lns"
    found: dict = {"start": None, "notes": []}

    def warm_start():
        if lns:
            found["start"], found["notes"] = best_start(problem, limits, greedy, deadline=greedy_deadline,
                                                        search_s=budget.local_search_s)
        else:
            starts = [s for s in (greedy(problem, limits, rule=rule, deadline=greedy_deadline)
                                  for rule in ("cheapest", "capuchin")) if s is not None]
            found["start"] = min(starts, key=lambda s: _objective(problem, s, limits)) if starts else None
        found["ran_out"] = time.perf_counter() > greedy_deadline
        start = found["start"]
        if start is None:
            return None, None
        return [d.value for d in start], (([d.value for d in start], {}, {}), _objective(problem, start, limits))

    if lns and _a_core_is_free():
        # the child builds the model and solves the LP relaxation while the parent computes the start
        report = solve_in_child(_build_for_child(problem, limits, None, lns), solver="highs",
                                time_limit_s=budget.solver_s, t0=t0, seed=seed, threads=threads, gap=gap,
                                meanwhile=warm_start)
    else:
        _, incumbent = warm_start()
        report = solve_in_child(_build_for_child(problem, limits, found["start"], lns),
                                solver="highs" if lns else solver,
                                time_limit_s=budget.solver_s, t0=t0, seed=seed, threads=threads, gap=gap,
                                incumbent=incumbent)
    start, start_notes, ran_out = found["start"], found["notes"], found.get("ran_out", True)
    starts = [start] if start is not None else []
    elapsed = time.perf_counter() - t0
    notes = []
    if report.num_cols:
        notes.append(f"MILP: {report.num_cols} variables ({report.num_int} integer), {report.num_rows} rows, "
                     f"{len(problem.candidates)} candidates, built in {report.build_s:.1f} s")
    notes += [n for n in start_notes if not n.startswith("the greedy warm starts ran out")]
    if ran_out:
        notes.append("the greedy warm starts ran out of their share of the time limit")
    elif not starts:
        notes.append("no greedy warm start fits: the MILP started cold")
    if report.payload is None or (report.from_start and (report.status in ("ERROR", "INFEASIBLE")
                                                          or report.bound is None)):
        if report.status == "ERROR":
            why = f"the solver failed ({report.error})"
        elif report.status == "INFEASIBLE":
            why = "the MILP is infeasible: no schedule meets the budget, deadline and flash limits"
        else:
            why = f"the solver found no solution within {time_limit_s:g} s"
        if start is None:
            return evaluate_choice(problem, strategy, [Decision.KEEP] * len(problem.candidates), limits, "infeasible",
                                   solve_time_s=elapsed, notes=notes + [why + "; no heuristic schedule fits either"])
        notes.append(why + "; falling back to the best heuristic schedule that fits")
        return evaluate_choice(problem, strategy, start, limits, "heuristic-fallback", solve_time_s=elapsed, notes=notes)
    values, early, repage, *more = report.payload  # (the warm start has no windows)
    windows = more[0] if more else []
    choice = [Decision(x) for x in values]
    objective = report.objective
    bound = max(report.bound, 0.0) if report.bound is not None and math.isfinite(report.bound) else None
    if bound is None:  # stopped before the solver proved any bound: no gap to report
        gap_now = None
    elif objective is not None and objective > 1e-18:
        gap_now = max((objective - bound) / objective, 0.0)
    else:
        gap_now = 0.0
    status = "optimal" if report.status == "OPTIMAL" else "feasible"
    if bound is None:
        notes.append("no bound was proven within the limit: the gap is unknown")
    if report.killed:
        notes.append(f"the solver was stopped at the {time_limit_s:g} s limit; its best solution is kept")
    if report.from_start:
        notes.append("the MILP found nothing better than its warm start (the gap is against its bound)")
    if bound is not None and objective is not None and bound > objective * (1 + 1e-6) + 1e-15:
        # the warm start is judged by the linear memory model, the MILP by its rows, which are more
        # cautious (Spill handles reserved for every decidable tensor at every position, every
        # decision's bookkeeping charged at every row): ResNet-200-CIFAR at 70% (docs/benchmarks.md)
        notes.append(f"the schedule costs {100 * (1 - objective / bound):.2f}% less than the MILP's proven bound: "
                     f"it fits the simulator but not the MILP's more cautious memory rows, so the bound (and the "
                     f"gap of 0) is the MILP's, not a bound on every schedule")
    result = evaluate_choice(problem, strategy, choice, limits, status, early, repage, windows, bound=bound, gap=gap_now,
                             solve_time_s=elapsed, time_to_1pct_s=report.time_to_gap(0.01), notes=notes)
    if start is not None and not result.fits:  # never worse than the start: the simulator decides
        fallback = evaluate_choice(problem, strategy, start, limits, "heuristic-fallback", solve_time_s=elapsed,
                                   notes=notes + ["the MILP solution failed simulation; using the heuristic start"])
        if fallback.fits:
            return fallback
    return result


def _a_core_is_free() -> bool:
    """Whether the child may build the model while the parent runs the greedy: only if a core is idle
    (1-minute load average at most the core count less one). On a shared 2-core machine at load 9 the
    child took enough of the parent's share that encoder32 at 30% lost the greedy start it otherwise
    found just within its 30 s (one run each; docs/benchmarks.md)."""
    import os
    try:
        return os.getloadavg()[0] <= (os.cpu_count() or 1) - 1
    except OSError:  # no load average on this platform
        return False


def _objective(problem: Problem, choice: list[Decision], limits: Limits) -> float:
    ev = evaluate_linear(problem, choice)
    return ev.time_s if limits.objective == "time" else ev.energy_j


def run_strategy(problem: Problem, limits: Limits, strategy: str, *, time_limit_s: float = 120.0, seed: int = 0,
                 threads: int = 1, solver: str = "highs") -> StrategyResult:
    t0 = time.perf_counter()
    if strategy == "keep-all":
        return evaluate_choice(problem, strategy, [Decision.KEEP] * len(problem.candidates), limits, "heuristic")
    if strategy == "chen":
        return evaluate_choice(problem, strategy, chen_checkpoints(problem), limits, "heuristic",
                               solve_time_s=time.perf_counter() - t0)
    if strategy == "capuchin":
        choice = greedy(problem, limits, rule="capuchin")
        if choice is None:
            return evaluate_choice(problem, strategy, [Decision.KEEP] * len(problem.candidates), limits, "infeasible",
                                   notes=["the greedy found no schedule within the limits"])
        return evaluate_choice(problem, strategy, choice, limits, "heuristic", solve_time_s=time.perf_counter() - t0)
    if strategy == "poet":
        return solve_milp(problem, limits, strategy, time_limit_s=time_limit_s, seed=seed, threads=threads, solver=solver)
    if strategy == "remat-only":
        return solve_milp(problem, replace(limits, allow_page=False), strategy, time_limit_s=time_limit_s,
                          seed=seed, threads=threads, solver=solver)
    if strategy == "paging-only":
        return solve_milp(problem, replace(limits, allow_recompute=False), strategy, time_limit_s=time_limit_s,
                          seed=seed, threads=threads, solver=solver)
    raise UsageError(f"unknown strategy {strategy!r}", hint=f"strategies: {', '.join(STRATEGIES)}")
