"""Running a LinearModel on a solver, in a forked child, under a hard time limit.

HiGHS is driven through highspy directly: the model goes in as arrays in one call, the warm start
with setSolution, and callbacks stream every improving solution (decoded by the caller's `decode`)
and the dual bound to the parent as they appear. The parent stops waiting at the time limit and
kills the child if it has not finished, keeping the last incumbent and bound it received: the
limit holds even while HiGHS is inside presolve or a cut round, where its own limit is not checked.
CBC goes through python-mip (no callbacks: a killed CBC solve has no incumbent).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .child import run_in_child
from .formulation import LinearModel
from .bound import branch_bound
from .heuristics import LnsSpec, rens, run_lns
from .projection import projection_bound

BOUND_EVERY_S = 1.0  # how often the child reports the dual bound while solving
# HiGHS's presolve took 34 s of a 60 s limit on a 24-layer encoder (305k rows) and reduced little;
# without it the root LP bound came after 7 s instead of 49 s, and on MobileNetV2 (97k rows) after
# 2.6 s instead of 7.4 s with the same bound and incumbent (one run each, shared 2-core machine).
# Small models keep HiGHS's default.
PRESOLVE_OFF_ROWS = 20_000


@dataclass
class SolveReport:
    status: str  # OPTIMAL / FEASIBLE / INFEASIBLE / NO_SOLUTION / TIME_LIMIT_KILLED / ERROR
    payload: object = None  # decode(x) of the best solution, None if none
    objective: float | None = None
    bound: float | None = None
    num_cols: int = 0
    num_rows: int = 0
    num_int: int = 0
    build_s: float = 0.0
    error: str = ""
    killed: bool = False  # stopped from outside at the time limit
    from_start: bool = False  # payload is the warm start the caller passed, nothing better came back
    # (seconds since the start, objective, bound) at every incumbent or bound update the parent saw
    trace: list[tuple[float, float | None, float | None]] = field(default_factory=list)

    def time_to_gap(self, gap: float) -> float | None:
        """First time the reported gap was within `gap` (None if never)."""
        for t, obj, bound in self.trace:
            if obj is not None and bound is not None and (obj <= 1e-18 or (obj - bound) / obj <= gap + 1e-12):
                return t
        return None


def _highs_child(model: LinearModel, start: np.ndarray | None, decode: Callable, deadline: float, seed: int,
                 threads: int, gap: float, send, lns: LnsSpec | None = None,
                 get_start: Callable[[], np.ndarray | None] | None = None) -> None:
    """`get_start`: the start is not known yet (the parent is still computing it): called, blocking,
    after the LP relaxation (with `lns`) or before the MILP, and it replaces `start`."""
    import highspy
    if get_start is not None and lns is None:
        start = get_start()
    main_deadline = deadline  # with an LNS phase, when the full MILP may be stopped for it (below)
    h = model.to_highs()
    h.setOptionValue("random_seed", seed)
    h.setOptionValue("threads", threads)
    h.setOptionValue("mip_rel_gap", gap)
    h.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.1))
    if model.num_rows >= PRESOLVE_OFF_ROWS:
        h.setOptionValue("presolve", "off")
    if lns is not None:
        if lns.bound_cols:
            # a bound in about a second where the LP below takes minutes (ResNet-200-CIFAR: 281k rows)
            left = deadline - time.perf_counter()
            b = projection_bound(model, lns.bound_cols, time_limit_s=lns.projection_share * left)
            if b is not None:
                send(("bound", b))
        # the LP relaxation's value is a proven bound, sent at once: on the largest models HiGHS's
        # MILP reports no bound until its root cut rounds end, which can take the whole limit
        h.setOptionValue("solve_relaxation", True)
        h.setOptionValue("presolve", "off")
        h.run()
        if h.getModelStatus() == highspy.HighsModelStatus.kOptimal:
            send(("bound", float(h.getInfo().objective_function_value)))
        elif h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:  # then so is the MILP
            send(("done", "INFEASIBLE", None, None, None))
            return
        if get_start is not None:
            start = get_start()
        start = _from_the_relaxation(h, model, start, decode, deadline, seed, send, lns)
        h.setOptionValue("solve_relaxation", False)
        if model.num_rows < PRESOLVE_OFF_ROWS:
            h.setOptionValue("presolve", "choose")
        # the full MILP gets `main_share` of the time left; it is stopped there only if it has a
        # solution and its gap is above `lns.gap`, and the LNS improves that solution after
        main_deadline = time.perf_counter() + lns.main_share * (deadline - time.perf_counter())
        h.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.1))
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    ncols = model.num_cols
    last = [0.0, None]  # time of the last bound report, last bound sent

    def on_solution(e) -> None:
        x = np.asarray(e.data_out.mip_solution)
        if x.shape[0] == ncols:
            send(("incumbent", decode(x), float(e.data_out.objective_function_value),
                       float(e.data_out.mip_dual_bound)))

    def on_interrupt(e) -> None:
        now = time.perf_counter()
        if now >= deadline:
            e.data_in.user_interrupt = True
        elif now >= main_deadline and e.callback_type == highspy.cb.HighsCallbackType.kCallbackMipInterrupt:
            primal, dual = float(e.data_out.mip_primal_bound), float(e.data_out.mip_dual_bound)
            if np.isfinite(primal) and (primal <= 0 or not np.isfinite(dual) or (primal - dual) / primal > lns.gap):
                e.data_in.user_interrupt = True
        if e.callback_type == highspy.cb.HighsCallbackType.kCallbackMipInterrupt and now - last[0] >= BOUND_EVERY_S:
            bound = float(e.data_out.mip_dual_bound)
            if bound != last[1] and np.isfinite(bound):
                send(("bound", bound))
                last[0], last[1] = now, bound

    h.cbMipImprovingSolution.subscribe(on_solution)
    h.cbMipInterrupt.subscribe(on_interrupt)
    h.cbSimplexInterrupt.subscribe(on_interrupt)
    h.cbIpmInterrupt.subscribe(on_interrupt)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has = info.primal_solution_status == 2  # kSolutionStatusFeasible
    name = {highspy.HighsModelStatus.kOptimal: "OPTIMAL", highspy.HighsModelStatus.kInfeasible: "INFEASIBLE"}.get(
        status, "FEASIBLE" if has else "NO_SOLUTION")
    payload = objective = None
    if has:
        x = np.asarray(h.getSolution().col_value)
        payload, objective = decode(x), model.objective_of(x)
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    if (lns is not None and has and name != "OPTIMAL" and deadline - time.perf_counter() > 0.5
            and (bound is None or objective <= 0 or (objective - bound) / objective > lns.gap)):
        def on_improve(x_new, obj) -> None:
            send(("incumbent", decode(x_new), obj, None))
        x = run_lns(model, model.objective_of, np.asarray(h.getSolution().col_value).copy(), lns, deadline,
                    on_improve, seed=seed)
        payload, objective = decode(x), model.objective_of(x)
    send(("done", name, payload, objective, bound))


def _from_the_relaxation(h, model: LinearModel, start: np.ndarray | None, decode: Callable, deadline: float,
                         seed: int, send, lns: LnsSpec) -> np.ndarray | None:
    """While the start is more than lns.gap above the LP bound (h: the relaxation, solved): branch on
    the LP's fractional tensors for a better bound (bound.branch_bound), then, if still above, look
    for a better schedule near the LP's solution (heuristics.rens). Sends what each proves or finds;
    returns the start for the full MILP (the RENS schedule if it beats `start`)."""
    import highspy
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return start
    bound = float(h.getInfo().objective_function_value)
    x_lp = np.asarray(h.getSolution().col_value).copy()
    best = model.objective_of(start) if start is not None else float("inf")

    def above() -> bool:
        return not np.isfinite(best) or (best > 0 and (best - bound) / best > lns.gap)
    if above() and lns.branch_nodes > 0:
        now = time.perf_counter()
        b = branch_bound(h, model.col_lb, model.col_ub, lns.triples, max_nodes=lns.branch_nodes,
                         deadline=now + lns.branch_share * (deadline - now), cutoff=best)
        if b is not None and b > bound:
            bound = b
            send(("bound", bound))
    if above() and lns.rens_nodes > 0:
        now = time.perf_counter()
        x = rens(model, x_lp, lns, now + lns.rens_share * (deadline - now), seed)
        if x is not None and model.objective_of(x) < best:
            best, start = model.objective_of(x), x
            send(("incumbent", decode(x), best, None))
    return start


def _cbc_child(model: LinearModel, start: np.ndarray | None, decode: Callable, deadline: float, seed: int,
               threads: int, gap: float, send) -> None:
    import mip
    m, xs = model.to_mip(mip.CBC)
    m.seed, m.threads, m.max_mip_gap = seed, threads, gap
    if start is not None:
        m.start = [(x, float(val)) for x, val in zip(xs, start)]
    status = m.optimize(max_seconds=max(deadline - time.perf_counter(), 0.5))
    if m.num_solutions:
        x = np.array([var.x for var in xs])
        send(("done", status.name if status.name in ("OPTIMAL", "INFEASIBLE") else "FEASIBLE", decode(x),
                   m.objective_value, m.objective_bound))
    else:
        name = "INFEASIBLE" if status.name == "INFEASIBLE" else "NO_SOLUTION"
        send(("done", name, None, None, m.objective_bound))


def _child(build: Callable, solver: str, deadline: float, seed: int, threads: int, gap: float, send,
           receive: Callable | None = None) -> None:
    t0 = time.perf_counter()
    model, start, decode, *rest = build()
    send(("built", model.num_cols, model.num_rows, model.num_int, time.perf_counter() - t0))
    lns = rest[0] if rest else None
    def receive_start() -> np.ndarray | None:  # the parent sends it when it has it; rest[1] makes it a vector
        sent = receive()
        return None if sent is None else rest[1](sent)
    get_start = None if receive is None else receive_start
    if solver == "highs":
        _highs_child(model, start, decode, deadline, seed, threads, gap, send, lns, get_start)
    else:
        _cbc_child(model, start if get_start is None else get_start(), decode, deadline, seed, threads, gap, send)


def solve_in_child(build: Callable[[], tuple], *, solver: str,
                   time_limit_s: float, t0: float, seed: int = 0, threads: int = 1, gap: float = 1e-4,
                   incumbent: tuple[object, float] | None = None,
                   meanwhile: Callable[[], tuple[object, tuple[object, float] | None]] | None = None) -> SolveReport:
    """Fork, run build() there (model, start vector or None, decode(x) -> payload[, LnsSpec or None:
    a large-neighbourhood search after the full MILP, heuristics.run_lns]), solve, and collect
    what comes back until t0 + time_limit_s (perf_counter clock), when the child is killed if still
    running. The child aims to end a little earlier, leaving time to send its final answer.
    `incumbent`: (payload, objective) of the warm start, the solution to beat (solvers do not report
    a start they accept as an improving solution); report.from_start says the result is still it.
    `meanwhile`: the warm start computed in the parent while the child builds the model (and solves
    the LP relaxation): it returns (what build's fifth item turns into the start vector in the child,
    or None; the incumbent as above), and build's start (second item) is then None."""
    hard = t0 + time_limit_s
    margin = min(1.0, 0.03 * time_limit_s)
    report = SolveReport("NO_SOLUTION")
    if incumbent is not None:
        report.payload, report.objective, report.from_start = incumbent[0], incumbent[1], True

    def on_message(msg: tuple) -> bool:
        t = time.perf_counter() - t0
        kind = msg[0]
        if kind == "built":
            report.num_cols, report.num_rows, report.num_int, report.build_s = msg[1:]
        elif kind == "incumbent":
            _, payload, obj, bound = msg
            if report.objective is None or obj < report.objective:
                report.payload, report.objective, report.from_start = payload, obj, False
            report.status = "FEASIBLE"
            if bound is not None:  # (an LNS improvement comes without a bound)
                report.bound = max(report.bound, bound) if report.bound is not None else bound
            report.trace.append((t, report.objective, report.bound))
        elif kind == "bound":
            report.bound = max(report.bound, msg[1]) if report.bound is not None else msg[1]
            report.trace.append((t, report.objective, report.bound))
        elif kind == "done":
            _, status, payload, obj, bound = msg
            report.status = status
            # never worse than what it had (a start HiGHS rejected, then a worse solution of its own)
            if payload is not None and (report.objective is None
                                        or obj <= report.objective + 1e-9 * max(abs(report.objective), 1e-12)):
                report.payload, report.objective, report.from_start = payload, obj, False
            if bound is not None:
                report.bound = max(report.bound, bound) if report.bound is not None else bound
            report.trace.append((t, report.objective, report.bound))
            return True
        elif kind == "error":
            report.status, report.error = "ERROR", msg[1]
            return True
        return False

    def parent_side():
        for_child, start = meanwhile()
        if start is not None:
            report.payload, report.objective, report.from_start = start[0], start[1], True
        return for_child

    done = run_in_child(_child, (build, solver, hard - margin, seed, threads, gap), hard, on_message,
                        None if meanwhile is None else parent_side)
    if not done:
        report.killed = True
        report.status = "FEASIBLE" if report.payload is not None else "NO_SOLUTION"
    return report
