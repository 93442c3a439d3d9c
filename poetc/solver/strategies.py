"""Strategies: keep-all, Chen sqrt(n), Capuchin-like greedy, and the MILPs (poet, remat-only,
paging-only). Every strategy returns a `StrategyResult` whose numbers come from the simulator.
Heuristics double as warm starts for the MILPs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from ..errors import UsageError
from ..plan import STRATEGIES, Limits
from ..schedule import Decision, Schedule, SimResult, simulate
from .child import run_in_child
from .formulation import build_model, read_choice, read_early, read_repage, start_values
from .problem import Problem, chen_checkpoints, evaluate_linear

log = logging.getLogger(__name__)

SOLVERS = {"highs": "HiGHS", "cbc": "CBC"}


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
    bound: float | None = None  # lower bound on the overhead objective (MILPs)
    gap: float | None = None  # (objective - bound) / objective, on the overhead
    solve_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def evaluate_choice(problem: Problem, strategy: str, choice: list[Decision], limits: Limits, status: str,
                    early: dict[int, int] | None = None, repage: dict[int, list[int]] | None = None,
                    **kw) -> StrategyResult:
    """The result of a choice of decisions: its schedule, simulated, and whether it fits `limits`."""
    early = early or {}
    repage = {i: js for i, js in (repage or {}).items() if js and choice[i] is Decision.PAGE}
    schedule = Schedule.from_decisions(problem.graph, problem.decisions_from(dict(enumerate(choice))), strategy,
                                       solver={"status": status, "granularity": "op"},
                                       regenerate_at=problem.regenerate_at_from(early),
                                       repage_at=problem.repage_at_from(repage))
    sim = simulate(problem.graph, schedule.steps, schedule.origin, problem.costs)
    over_t, over_e = sim.time_s - problem.base_time_s, sim.energy_j - problem.base_energy_j
    fits = (sim.peak_bytes <= limits.activation_budget_bytes
            and over_t <= limits.overhead_time_s * (1 + 1e-9) + 1e-12
            and sim.max_flash_bytes <= limits.flash_bytes)
    schedule.solver.update({k: v for k, v in kw.items() if k in ("bound", "gap")})
    return StrategyResult(strategy, choice, schedule, sim, fits, status, over_t, over_e, early, repage, **kw)


# ---------------------------------------------------------------------------------------------------


def greedy(problem: Problem, limits: Limits, *, rule: str = "cheapest", max_options: int = 16) -> list[Decision] | None:
    """Free memory at the peak until it fits. Each round tries the `max_options` most promising
    (tensor, mode) moves at the peak position and takes the one that lowers the peak most per unit of
    cost. rule="capuchin": forward activations only (as Capuchin's feature maps), a tensor's preferred
    mode is paging when it is compute-heavy (recompute time above paging time), recompute otherwise;
    rule="cheapest": every candidate, the mode with the lower objective cost.
    Then give back (keep) whatever still fits, most expensive first. None if nothing fits."""
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

    ev = evaluate_linear(problem, choice)
    while ev.peak_bytes > limits.activation_budget_bytes:
        p = ev.peak_position
        options = []
        for i, c in enumerate(cands):
            if choice[i] is not Decision.KEEP or c.fixed or not (c.lf < p < c.fb) or (rule == "capuchin" and c.gradient):
                continue
            for rank, d in enumerate(modes(c)):
                options.append((rank, -c.nbytes / (metric(c, d) + 1e-15), i, d))
        options.sort()
        best = None
        for rank, neg_ratio, i, d in options[:max_options]:
            trial = list(choice)
            trial[i] = d
            ev_t = evaluate_linear(problem, trial)
            if ev_t.time_s > limits.overhead_time_s or ev_t.flash_bytes > limits.flash_bytes:
                continue
            gain = (ev.peak_bytes - ev_t.peak_bytes, ev.profile[p] - ev_t.profile[p])
            if gain[0] < 0 or gain[1] <= 0:
                continue
            cost = metric(cands[i], d) + 1e-15
            key = (gain[0] / cost, gain[1] / cost)
            if best is None or key > best[0]:
                best = (key, trial, ev_t)
        if best is None:
            return None
        _, choice, ev = best
    # give back
    order = sorted((i for i, d in enumerate(choice) if d is not Decision.KEEP),
                   key=lambda i: -metric(cands[i], choice[i]))
    for i in order:
        trial = list(choice)
        trial[i] = Decision.KEEP
        if evaluate_linear(problem, trial).peak_bytes <= limits.activation_budget_bytes:
            choice = trial
    return choice


def _milp_worker(problem: Problem, limits: Limits, start: list[Decision] | None, time_limit_s: float,
                 seed: int, threads: int, solver: str) -> tuple:
    """Runs in a child (run_in_child): build, solve, return (status, choice, objective, bound, sizes)."""
    t0 = time.perf_counter()
    model, v = build_model(problem, limits, solver_name=SOLVERS[solver])
    model.seed = seed
    model.threads = threads
    model.max_mip_gap = 1e-4
    if start is not None:
        model.start = start_values(problem, v, start, evaluate_linear(problem, start))
    # what is left after building, less a margin for reading the solution back
    status = model.optimize(max_seconds=max(time_limit_s - (time.perf_counter() - t0) - 1.0, 0.5))
    if model.num_solutions:
        choice = read_choice(problem, v)
        return (status.name, ([d.value for d in choice], read_early(problem, v, choice), read_repage(v, choice)),
                model.objective_value, model.objective_bound, model.num_cols, model.num_rows)
    return (status.name, None, None, model.objective_bound, model.num_cols, model.num_rows)


def solve_milp(problem: Problem, limits: Limits, strategy: str, *, time_limit_s: float, seed: int = 0,
               threads: int = 1, solver: str = "highs") -> StrategyResult:
    """The MILP from a greedy warm start. `time_limit_s` covers all of it (warm starts, building the
    model, solving); solve_time_s reports the whole."""
    t0 = time.perf_counter()
    starts = [greedy(problem, limits, rule="cheapest"), greedy(problem, limits, rule="capuchin")]
    starts = [s for s in starts if s is not None]
    start = None
    if starts:
        start = min(starts, key=lambda s: _objective(problem, s, limits))
    remaining = max(time_limit_s - (time.perf_counter() - t0), 1.0)
    message, _ = run_in_child(_milp_worker, (problem, limits, start, remaining, seed, threads, solver),
                              remaining + 5.0 + 0.1 * time_limit_s)
    elapsed = time.perf_counter() - t0
    notes = []
    if message is None or message[0] == "ERROR" or message[1] is None:
        if message is None:
            why = f"the solver found no solution within {time_limit_s:g} s"
        elif message[0] == "ERROR":
            why = f"the solver failed ({message[1]})"
        elif message[0] == "INFEASIBLE":
            why = "the MILP is infeasible: no schedule meets the budget, deadline and flash limits"
        else:
            why = f"the solver stopped with status {message[0]} and no solution"
        if start is None:
            return evaluate_choice(problem, strategy, [Decision.KEEP] * len(problem.candidates), limits, "infeasible",
                                   solve_time_s=elapsed, notes=[why + "; no heuristic schedule fits either"])
        notes.append(why + "; falling back to the best heuristic schedule that fits")
        return evaluate_choice(problem, strategy, start, limits, "heuristic-fallback", solve_time_s=elapsed, notes=notes)
    status_name, (values, early, repage), objective, bound, ncols, nrows = message
    choice = [Decision(x) for x in values]
    bound = max(bound, 0.0) if bound is not None else None
    gap = (objective - bound) / objective if objective and bound is not None and objective > 1e-18 else 0.0
    status = "optimal" if status_name == "OPTIMAL" else "feasible"
    notes.append(f"MILP: {ncols} variables, {nrows} rows, {len(problem.candidates)} candidates")
    result = evaluate_choice(problem, strategy, choice, limits, status, early, repage, bound=bound, gap=gap,
                             solve_time_s=elapsed, notes=notes)
    if start is not None and not result.fits:  # never worse than the start: the simulator decides
        fallback = evaluate_choice(problem, strategy, start, limits, "heuristic-fallback", solve_time_s=elapsed,
                                   notes=notes + ["the MILP solution failed simulation; using the heuristic start"])
        if fallback.fits:
            return fallback
    return result


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
