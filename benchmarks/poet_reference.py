"""A direct implementation of POET's MILP (Patil et al., ICML 2022), to check poetc's own model against.

POET decides, for every stage t and node i (t, i = 0..n-1, node i first computed in stage t = i):
  R[t,i]      node i is (re)computed in stage t            S_RAM[t,i]  its output is in RAM at the start of t
  S_SD[t,i]   its output is on flash at the start of t     M_in[t,i]   it is paged in during t (in RAM from t+1)
  M_out[t,i]  it is paged out during t
plus Checkmate's FREE[t,(i,k)] (output of i freed after node k ran in stage t) and the memory U[t,k]
while node k runs in stage t. Constraints, as in ShishirPatil/poet `poet_solver.py` and Checkmate:
  R[t,t] = 1;  R[t,k] <= R[t,i] + S_RAM[t,i] for every edge (i,k)
  S_RAM[t+1,i] <= S_RAM[t,i] + R[t,i] + M_in[t,i];   S_SD[t+1,i] <= S_SD[t,i] + M_out[t,i]
  M_in <= S_SD;  M_out <= S_RAM
  U[t,0] = R[t,0] m_0 + sum_i S_RAM[t,i] m_i;  U[t,k+1] = U[t,k] + R[t,k+1] m_{k+1} - sum_{(i,k)} m_i FREE[t,(i,k)]
  hazards h = 1 - R[t,k] + S_RAM[t+1,i] + sum_{j in succ(i), j>k} R[t,j];  1 - FREE <= h;  kappa (1 - FREE) >= h
  U[t,k] (+ w_k R[t,k]) <= activation budget
  sum R time + sum M_in t_in + sum M_out t_out <= deadline     (paging time included, unlike POET's code)
  minimise  sum_{i<t} R[t,i] e_i + sum M_in e_in + sum M_out e_out   (the first computation, R[t,t], is a
                                                                       constant and left out)
Only exact eliminations are applied: variables POET's code pins to 0 are not created (the upper
triangle, R[t,t], S_RAM[t,t], S_SD[t,t], M_in/M_out[t,t] which their preconditions force to 0), FREE is
created only for edges (i,k) with k < t (a free after the stage's last node changes no U), and the
hazard sum and kappa only count successors j <= t (R[t,j] = 0 for j > t). FREE stays a binary with the
two-sided big-M, U stays a variable: this is the formulation notes/solver-scaling.md calls `exact`.

The instance is built from poetc's own objects so both models price the same thing:
  nodes       the ops of a TrainGraph, in its (fixed) execution order; stage t computes op t
  edges       (producer of x, k) for every non-persistent input x of op k, and also (producer of each
              tensor x aliases, k): an alias output shares its root's buffer, so the root stays alive
              while the alias is read (the alias node itself has m = 0)
  m_i         bytes of op i's outputs that some op reads or that are graph outputs (alias outputs: 0)
  w_i         bytes only present while op i runs: its outputs nobody reads (freed right after the op in
              ONNX Runtime) plus Op.workspace_bytes when the IR has it; POET has no such term, it is an
              addition that is zero on graphs without dead outputs or workspace
  e_i, time_i poetc's StepCosts for op i;  page costs StepCosts.page_out / page_in of m_i
Semantic differences with poetc's model (poetc.solver.formulation), all visible in `compare`:
  * Granularity. POET keeps, recomputes and pages a whole node; poetc decides per tensor. A
    multi-output op (BatchNormInternal: output, saved mean, saved inv-std) must be kept whole by POET
    when only a small output is needed later, so POET over-counts such graphs' memory and can be
    infeasible where poetc is not (CNN at 60 %). Both rerun a multi-output op once for all the outputs
    they regenerate (poetc: one run per group, see poetc.solver.problem).
  * Policy. POET may drop and regenerate any node, gradients too, in any stage and several times
    (recompute it again, page it in twice); poetc decides about saved forward activations and about
    gradients read across a gap (TrainGraph.decidable_tensors), regenerates each at most once, after
    its one gap, and keeps it until its last reader. POET's space is the larger one: on the tiny
    residual block at 80 % it pages a forward activation in twice, which poetc cannot express. Variant
    "poet-fwd" (decide_backward=False) pins every decision about backward and accumulate nodes;
    "poet" is the faithful model.
  * Page-out timing. POET pages out a tensor that is resident at the start of a stage, so a tensor is in
    RAM during the whole stage after its producer; poetc spills right after the producer and frees the
    tensor after its last forward reader. Equivalent when that reader is the next op; poetc is cheaper
    in memory otherwise.
  * Memory. Checkmate counts per (stage, node) the checkpoints resident at the stage start plus what the
    stage computes, freeing after last use in the stage: with poetc's fixed order and one node per stage
    this is ONNX Runtime's free-after-last-use accounting, except that poetc keeps graph outputs (the loss,
    accumulator flags: a few bytes) to the end of the step and reserves 16 bytes per candidate for spill
    handles. `compare` takes those bytes (`unmodelled_bytes`) off POET's budget; without that, budgets
    at an exact multiple of the tensor sizes (MLP at 80 %) let POET fit where poetc is 22 bytes over.
  * Fixed state (parameters, gradient buffers, optimizer state, inputs) is outside both activation
    budgets: poetc subtracts it from the RAM budget, POET never counted it.
  * Random ops (Dropout) are never recomputed here either, as in poetc (recomputing would change values).
To compare on poetc's terms, `map_to_decisions` reads POET's solution as one keep / recompute / page
decision per saved activation and poetc's simulator prices it; `compare` reports both.

Benchmark: `python -m benchmarks.poet_reference [--graphs tiny-chain,tiny-residual,mlp-example,mlp,cnn]
[--budgets 0.9,0.8,0.6] [--deadline 1.3] [--time-limit 30] [--target rpi4]` prints a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mip
import numpy as np

from poetc.ir.graph import Role, TrainGraph
from poetc.plan import Budget, limits_for
from poetc.schedule import SPILL_HANDLE_BYTES, Decision, StepCosts
from poetc.solver.child import run_once_in_child
from poetc.solver.problem import RANDOM_OPS, Problem
from poetc.solver.strategies import evaluate_choice, run_strategy
from poetc.units import Deadline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoetInstance:
    """POET's input: a DAG in execution order with per-node memory and costs."""

    names: list[str]
    mem_bytes: list[int]
    transient_bytes: list[int]  # w_i: present only while node i runs
    edges: list[tuple[int, int]]  # (i, k): k reads i; i < k
    time_s: list[float]
    energy_j: list[float]
    page_out: list[tuple[float, float]]  # (time_s, energy_j) of paging node i's output out
    page_in: list[tuple[float, float]]
    recomputable: list[bool]
    forward: list[bool]  # forward or loss op (poetc decides only about forward activations)

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def base_time_s(self) -> float:
        return float(sum(self.time_s))

    @property
    def base_energy_j(self) -> float:
        return float(sum(self.energy_j))


def instance_from_graph(graph: TrainGraph, costs: StepCosts) -> PoetInstance:
    """Nodes = ops of `graph` in order; memory and costs from poetc's graph and cost model."""
    outputs = {o.name for o in graph.model.graph.output}
    mem, data, transient, edges = [], [], [], set()
    for op in graph.ops:
        kept = dead = moved = 0
        for name in op.outputs:
            t = graph.tensors.get(name)
            if not name or t is None or t.alias_of is not None or t.kind.is_persistent:
                continue
            if t.consumers or name in outputs:  # heap allocations, as poetc's simulator counts them
                kept += t.alloc_bytes
                moved += t.nbytes  # what paging writes and reads
            else:
                dead += t.alloc_bytes
        mem.append(kept)
        data.append(moved)
        transient.append(dead + int(getattr(op, "workspace_bytes", 0) or 0))
        for x in op.inputs:
            while x and x in graph.tensors:
                t = graph.tensors[x]
                if t.producer is None or t.kind.is_persistent:
                    break
                if t.producer != op.index:
                    edges.add((t.producer, op.index))
                x = t.alias_of
    page_out = [costs.page_out(m) if m else (0.0, 0.0) for m in data]
    page_in = [costs.page_in(m) if m else (0.0, 0.0) for m in data]
    return PoetInstance([op.name for op in graph.ops], mem, transient, sorted(edges),
                        [float(x) for x in costs.op_time_s], [float(x) for x in costs.op_energy_j],
                        page_out, page_in, [op.op_type not in RANDOM_OPS for op in graph.ops],
                        [op.role in (Role.FORWARD, Role.LOSS) for op in graph.ops])


# ---------------------------------------------------------------------------------------------------
# The model


@dataclass
class PoetVars:
    R: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # noqa: N815 (the paper's names)
    S_ram: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    S_sd: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    M_in: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    M_out: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    free: dict[tuple[int, int, int], mip.Var] = field(default_factory=dict)  # (t, i, k)
    U: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # noqa: N815


def build_poet_model(inst: PoetInstance, activation_budget_bytes: float, overhead_time_s: float, *,
                     flash_bytes: float | None = None, decide_backward: bool = True,
                     solver_name: str = mip.HIGHS) -> tuple[mip.Model, PoetVars]:
    """Build (not solve) POET's MILP. Pure. Memory rows are in units of the budget.

    decide_backward=False pins R[t,i] (t > i), S_SD, M_in and M_out to 0 for backward and accumulate
    nodes: POET restricted to the tensors poetc decides about (forward activations). True is POET."""
    n = inst.n
    B = max(float(activation_budget_bytes), 1.0)  # noqa: N806
    m_ = [x / B for x in inst.mem_bytes]
    w_ = [x / B for x in inst.transient_bytes]
    succ: dict[int, list[int]] = {i: [] for i in range(n)}
    pred: dict[int, list[int]] = {k: [] for k in range(n)}
    for i, k in inst.edges:
        succ[i].append(k)
        pred[k].append(i)
    model = mip.Model(name="poet-reference", sense=mip.MINIMIZE, solver_name=solver_name)
    model.verbose = 0
    v = PoetVars()
    one = 1  # R[t,t] is the constant 1

    def R(t, i):  # noqa: N802
        if i == t:
            return one
        return v.R.get((t, i), 0)

    def S(t, i):  # noqa: N802
        return v.S_ram.get((t, i), 0)

    for t in range(n):
        for i in range(t):
            decidable = decide_backward or inst.forward[i]
            v.R[(t, i)] = model.add_var(f"R_{t}_{i}", var_type=mip.BINARY,
                                        ub=1.0 if inst.recomputable[i] and decidable else 0.0)
            v.S_ram[(t, i)] = model.add_var(f"Sram_{t}_{i}", var_type=mip.BINARY)
            pageable = 1.0 if inst.mem_bytes[i] > 0 and decidable else 0.0  # paging 0 bytes is a no-op
            v.S_sd[(t, i)] = model.add_var(f"Ssd_{t}_{i}", var_type=mip.BINARY, ub=pageable)
            v.M_in[(t, i)] = model.add_var(f"Min_{t}_{i}", var_type=mip.BINARY, ub=pageable)
            v.M_out[(t, i)] = model.add_var(f"Mout_{t}_{i}", var_type=mip.BINARY, ub=pageable)
    # dependencies
    for i, k in inst.edges:
        for t in range(k, n):
            model += R(t, k) <= R(t, i) + S(t, i), f"dep_{t}_{i}_{k}"
    # residency (RAM and flash) and paging preconditions
    for t in range(n - 1):
        for i in range(t + 1):
            model += v.S_ram[(t + 1, i)] <= S(t, i) + R(t, i) + v.M_in.get((t, i), 0), f"ram_{t}_{i}"
            model += v.S_sd[(t + 1, i)] <= v.S_sd.get((t, i), 0) + v.M_out.get((t, i), 0), f"sd_{t}_{i}"
    for (t, i), var in v.M_in.items():
        model += var <= v.S_sd[(t, i)], f"minpre_{t}_{i}"
    for (t, i), var in v.M_out.items():
        model += var <= v.S_ram[(t, i)], f"moutpre_{t}_{i}"
    # memory (Checkmate's accounting)
    for t in range(n):
        for k in range(t):  # FREE[t,(i,k)] for edges into k < t
            for i in pred[k]:
                later = [j for j in succ[i] if k < j <= t]
                hazards = (1 - R(t, k)) + (S(t + 1, i) if t + 1 < n else 0) + mip.xsum(R(t, j) for j in later)
                kappa = (2 if t + 1 < n else 1) + len(later)
                f = v.free[(t, i, k)] = model.add_var(f"free_{t}_{i}_{k}", var_type=mip.BINARY)
                model += 1 - f <= hazards, f"freelo_{t}_{i}_{k}"
                model += kappa * (1 - f) >= hazards, f"freehi_{t}_{i}_{k}"
        for k in range(t + 1):
            v.U[(t, k)] = model.add_var(f"U_{t}_{k}", lb=0.0, ub=1.0)
        model += v.U[(t, 0)] == m_[0] * R(t, 0) + mip.xsum(m_[i] * S(t, i) for i in range(t)), f"u0_{t}"
        for k in range(t):
            freed = mip.xsum(m_[i] * v.free[(t, i, k)] for i in pred[k])
            model += v.U[(t, k + 1)] == v.U[(t, k)] + m_[k + 1] * R(t, k + 1) - freed, f"u_{t}_{k + 1}"
        for k in range(t + 1):
            if w_[k] > 0:
                model += v.U[(t, k)] + w_[k] * R(t, k) <= 1, f"ws_{t}_{k}"
    # deadline (overhead part: the first computations are the constant base time), flash, objective
    overhead_t = (mip.xsum(inst.time_s[i] * var for (t, i), var in v.R.items())
                  + mip.xsum(inst.page_in[i][0] * var for (t, i), var in v.M_in.items())
                  + mip.xsum(inst.page_out[i][0] * var for (t, i), var in v.M_out.items()))
    model += overhead_t <= max(float(overhead_time_s), 0.0), "deadline"
    if flash_bytes is not None:
        for t in range(1, n):
            model += mip.xsum(inst.mem_bytes[i] / max(flash_bytes, 1.0) * v.S_sd[(t, i)] for i in range(t)) <= 1, \
                f"flash_{t}"
    model.objective = mip.minimize(mip.xsum(inst.energy_j[i] * var for (t, i), var in v.R.items())
                                   + mip.xsum(inst.page_in[i][1] * var for (t, i), var in v.M_in.items())
                                   + mip.xsum(inst.page_out[i][1] * var for (t, i), var in v.M_out.items()))
    return model, v


@dataclass
class PoetSolution:
    status: str  # optimal / feasible / infeasible / no-solution-in-time / error
    objective_j: float | None  # overhead energy
    bound_j: float | None
    overhead_time_s: float | None
    R: np.ndarray | None  # noqa: N815  (n x n, bool; diagonal set)
    S_ram: np.ndarray | None
    S_sd: np.ndarray | None
    M_in: np.ndarray | None
    M_out: np.ndarray | None
    solve_time_s: float
    num_vars: int = 0
    num_int_vars: int = 0
    num_rows: int = 0
    message: str = ""

    @property
    def solved(self) -> bool:
        return self.R is not None


def _worker(inst, budget, overhead_time_s, flash_bytes, decide_backward, time_limit_s, seed) -> tuple:
    """Runs in a child (run_in_child): build, solve, return (status, objective, bound, matrices, sizes)."""
    model, v = build_poet_model(inst, budget, overhead_time_s, flash_bytes=flash_bytes,
                                decide_backward=decide_backward)
    model.seed = seed
    model.threads = 1
    model.max_mip_gap = 1e-4
    status = model.optimize(max_seconds=time_limit_s)
    sizes = (model.num_cols, model.num_int, model.num_rows)
    if model.num_solutions:
        n = inst.n

        def mat(d, diag=False):
            a = np.zeros((n, n), dtype=bool)
            for (t, i), var in d.items():
                a[t, i] = var.x is not None and var.x > 0.5
            if diag:
                np.fill_diagonal(a, True)
            return a
        return (status.name, model.objective_value, model.objective_bound,
                [mat(v.R, True), mat(v.S_ram), mat(v.S_sd), mat(v.M_in), mat(v.M_out)], sizes)
    return (status.name, None, model.objective_bound, None, sizes)


def solve_poet(inst: PoetInstance, activation_budget_bytes: float, overhead_time_s: float, *,
               time_limit_s: float = 60.0, seed: int = 0, flash_bytes: float | None = None,
               decide_backward: bool = True) -> PoetSolution:
    """Solve POET's MILP with HiGHS (one thread, seeded) in a child process whose wall clock is
    enforced from outside (HiGHS does not interrupt presolve or the root LP)."""
    args = (inst, activation_budget_bytes, overhead_time_s, flash_bytes, decide_backward, time_limit_s, seed)
    message, elapsed = run_once_in_child(_worker, args, time_limit_s + 5.0 + 0.1 * time_limit_s)
    if message is None:
        return PoetSolution("no-solution-in-time", None, None, None, None, None, None, None, None, elapsed,
                            message=f"killed after {elapsed:.1f} s")
    if message[0] == "error":
        return PoetSolution("error", None, None, None, None, None, None, None, None, elapsed, 0, 0, 0,
                            message=message[1])
    name, objective, bound, mats, sizes = message
    if mats is None:
        status = "infeasible" if name == "INFEASIBLE" else "no-solution-in-time"
        return PoetSolution(status, None, bound, None, None, None, None, None, None, elapsed, *sizes, message=name)
    R, S_ram, S_sd, M_in, M_out = mats  # noqa: N806
    over_t = overhead_time(inst, R, M_in, M_out)
    return PoetSolution("optimal" if name == "OPTIMAL" else "feasible", objective, bound, over_t,
                        R, S_ram, S_sd, M_in, M_out, elapsed, *sizes, message=name)


# ---------------------------------------------------------------------------------------------------
# Independent evaluation of a POET schedule (Checkmate's accounting), without a solver


def overhead_energy(inst: PoetInstance, R, M_in, M_out) -> float:  # noqa: N803
    rec = R.copy()
    np.fill_diagonal(rec, False)
    e = np.asarray(inst.energy_j)
    return float((rec.sum(axis=0) * e).sum() + M_in.sum(axis=0) @ np.array([c[1] for c in inst.page_in])
                 + M_out.sum(axis=0) @ np.array([c[1] for c in inst.page_out]))


def overhead_time(inst: PoetInstance, R, M_in, M_out) -> float:  # noqa: N803
    rec = R.copy()
    np.fill_diagonal(rec, False)
    return float((rec.sum(axis=0) * np.asarray(inst.time_s)).sum()
                 + M_in.sum(axis=0) @ np.array([c[0] for c in inst.page_in])
                 + M_out.sum(axis=0) @ np.array([c[0] for c in inst.page_out]))


def checkmate_peak_bytes(inst: PoetInstance, R, S_ram) -> int:  # noqa: N803
    """Peak of U[t,k] (+ w_k while k runs) under Checkmate's accounting, with FREE at its exact value;
    raises ValueError if a dependency is not resident."""
    n = inst.n
    succ: dict[int, list[int]] = {i: [] for i in range(n)}
    pred: dict[int, list[int]] = {k: [] for k in range(n)}
    for i, k in inst.edges:
        succ[i].append(k)
        pred[k].append(i)
    peak = 0
    for t in range(n):
        for i, k in inst.edges:
            if R[t, k] and not (R[t, i] or S_ram[t, i]):
                raise ValueError(f"stage {t}: node {k} reads node {i}, which is neither resident nor recomputed")
        u = int(inst.mem_bytes[0]) * int(R[t, 0]) + sum(inst.mem_bytes[i] for i in range(n) if S_ram[t, i])
        peak = max(peak, u + inst.transient_bytes[0] * int(R[t, 0]))
        for k in range(n - 1):
            freed = 0
            for i in pred[k]:
                keep = (t + 1 < n and S_ram[t + 1, i]) or any(R[t, j] for j in succ[i] if j > k)
                if R[t, k] and not keep:
                    freed += inst.mem_bytes[i]
            u += inst.mem_bytes[k + 1] * int(R[t, k + 1]) - freed
            peak = max(peak, u + inst.transient_bytes[k + 1] * int(R[t, k + 1]))
    return peak


def keep_all_schedule(inst: PoetInstance) -> tuple[np.ndarray, np.ndarray]:
    """R = identity, S_RAM[t,i] = 1 while a later stage still reads i."""
    n = inst.n
    R = np.eye(n, dtype=bool)  # noqa: N806
    S = np.zeros((n, n), dtype=bool)  # noqa: N806
    last = {i: max((k for j, k in inst.edges if j == i), default=i) for i in range(n)}
    for i in range(n):
        S[i + 1: last[i] + 1, i] = True
    return R, S


def describe(inst: PoetInstance, sol: PoetSolution) -> list[str]:
    """POET's non-trivial actions, stage by stage: recomputations, page-ins, page-outs."""
    out = []
    for t in range(inst.n):
        acts = [f"recompute {inst.names[i]}" for i in range(t) if sol.R[t, i]]
        acts += [f"page in {inst.names[i]}" for i in range(t) if sol.M_in[t, i]]
        acts += [f"page out {inst.names[i]}" for i in range(t) if sol.M_out[t, i]]
        if acts:
            out.append(f"stage {t} ({inst.names[t]}): " + ", ".join(acts))
    return out


# ---------------------------------------------------------------------------------------------------
# POET's solution in poetc's terms


@dataclass
class Mapping:
    choice: list[Decision]
    outside_policy: list[str]  # POET actions poetc's policy cannot express
    repage: dict[int, list[int]] = field(default_factory=dict)  # PAGE candidate -> inner gaps paged in again


def map_to_decisions(problem: Problem, sol: PoetSolution) -> Mapping:
    """One decision per candidate: how POET makes its producer available at the first reader after the
    candidate's gap (the latest of: first computation -> KEEP, a recomputation -> RECOMPUTE, a page-in
    -> PAGE); a later page-in of a PAGE candidate within one of its `inner` gaps -> paged in again
    there (poetc does it just before the gap's second reader).
    Every other regeneration or page-out is listed in `outside_policy`."""
    choice = [Decision.KEEP] * len(problem.candidates)
    repage: dict[int, list[int]] = {}
    used: set[tuple[str, int, int]] = set()
    for ci, c in enumerate(problem.candidates):
        if c.fixed:
            continue
        p, fb = c.prod, c.first_after_gap
        events = [(t, "R") for t in range(p, fb + 1) if sol.R[t, p]]
        events += [(t + 1, "in") for t in range(p, fb) if sol.M_in[t, p]]
        t, kind = max(events)
        if kind == "in":
            choice[ci] = Decision.PAGE
            used.add(("in", t - 1, p))
            used.update(("out", s, p) for s in range(p, t) if sol.M_out[s, p])
            for j, (a, b) in enumerate(c.inner):
                again = [s for s in range(max(a, t), b) if sol.M_in[s, p]]
                if again:  # poetc pages it in just before b, holding it no longer than POET does
                    repage.setdefault(ci, []).append(j)
                    used.update(("in", s, p) for s in again)
        elif t > p:
            choice[ci] = Decision.RECOMPUTE
            used.add(("R", t, p))
    outside = []
    n = sol.R.shape[0]
    names = [problem.graph.ops[i].name for i in range(n)]
    poetc_recomputes = {i for ci, c in enumerate(problem.candidates) if choice[ci] is Decision.RECOMPUTE
                        for i in c.chain_ops}
    for t in range(n):
        for i in range(t):
            if sol.R[t, i] and ("R", t, i) not in used and i not in poetc_recomputes:
                outside.append(f"recompute {names[i]} in stage {t}")
            if sol.M_in[t, i] and ("in", t, i) not in used:
                outside.append(f"page in {names[i]} in stage {t}")
            if sol.M_out[t, i] and ("out", t, i) not in used:
                outside.append(f"page out {names[i]} in stage {t}")
    return Mapping(choice, outside, repage)


# ---------------------------------------------------------------------------------------------------
# Tiny graphs and the benchmark


def tiny_onnx(kind: str, path: Path, *, batch: int = 256, width: int = 256, layers: int = 3, seed: int = 0) -> Path:
    """A small forward model: kind "chain" (layers x (Gemm, Relu), then a Gemm to 10 logits) or
    "residual" (Gemm, Relu, then a block Gemm -> Relu -> Add(skip), then the classifier Gemm)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def gemm(name, x, fan_in, fan_out):
        inits.append(numpy_helper.from_array((rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in))
                                             .astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array(np.zeros(fan_out, np.float32), f"{name}.bias"))
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name,
                                      transB=1))
        return f"{name}_out"

    def relu(name, x):
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    x = relu("relu0", gemm("fc0", "input", width, width))
    if kind == "chain":
        for k in range(1, layers):
            x = relu(f"relu{k}", gemm(f"fc{k}", x, width, width))
    elif kind == "residual":
        h = relu("relu1", gemm("fc1", x, width, width))
        nodes.append(helper.make_node("Add", [gemm("fc2", h, width, width), x], ["add_out"], name="add"))
        x = "add_out"
    else:
        raise ValueError(f"unknown tiny graph kind {kind!r}")
    inits.append(numpy_helper.from_array((rng.standard_normal((10, width)) / np.sqrt(width)).astype(np.float32),
                                         "head.weight"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "head.bias"))
    nodes.append(helper.make_node("Gemm", [x, "head.weight", "head.bias"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(nodes, f"tiny_{kind}", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [batch, width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


VARIANTS = {"poet": True, "poet-fwd": False}  # reference name -> decide_backward


@dataclass
class ComparisonRow:
    graph: str
    nodes: int
    candidates: int
    budget_frac: float
    activation_budget_bytes: int
    deadline_factor: float
    poetc_keep_all_bytes: int
    poet_keep_all_bytes: int
    poetc_status: str
    poetc_fits: bool
    poetc_objective_j: float | None  # overhead energy, simulated (None if nothing fits)
    poetc_bound_j: float | None
    poetc_time_s: float
    reference: str  # "poet" (faithful) or "poet-fwd" (no decisions about backward nodes)
    poet_status: str
    poet_objective_j: float | None  # overhead energy in POET's own accounting
    poet_bound_j: float | None
    poet_time_s: float
    poet_vars: int
    poet_int_vars: int
    mapped_fits: bool | None  # POET's decisions read per tensor and replayed in poetc's simulator
    mapped_objective_j: float | None
    outside_policy: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return self.poet_time_s / self.poetc_time_s if self.poetc_time_s > 0 else None


def unmodelled_bytes(problem: Problem) -> int:
    """Bytes poetc's simulator counts and POET's accounting does not, whatever the decisions: a 16-byte
    spill handle per decidable candidate (poetc's MILP reserves them all), the graph outputs (loss,
    accumulator flags) ONNX Runtime keeps to the end of the step, and ONNX Runtime's execution frame
    of the keep-all graph (docs/memory-model.md). `compare` takes them off POET's budget. What a
    decision adds (problem.decision_bookkeeping) has no constant equivalent: POET's schedules are
    checked against it by simulating them (ComparisonRow.mapped_fits)."""
    from poetc.schedule import build_steps, frame_bytes, graph_inputs, graph_values
    graph = problem.graph
    outputs = {o.name for o in graph.model.graph.output}
    held = sum(graph.tensors[x].alloc_bytes for x in outputs
               if x in graph.tensors and graph.tensors[x].producer is not None and graph.tensors[x].alias_of is None
               and not graph.tensors[x].kind.is_persistent)
    steps = build_steps(graph, {})[0]
    frame = frame_bytes(graph_values(graph, steps), graph_inputs(graph, steps))
    return SPILL_HANDLE_BYTES * sum(not c.fixed for c in problem.candidates) + held + frame


def compare_problem(name: str, problem: Problem, budget_fracs, *, deadline_factor: float = 1.3,
                    time_limit_s: float = 60.0, seed: int = 0, variants=tuple(VARIANTS)) -> list[ComparisonRow]:
    """Solve poetc's `poet` strategy and POET's MILP on the same graph, costs and limits."""
    inst = instance_from_graph(problem.graph, problem.costs)
    poet_keep = checkmate_peak_bytes(inst, *keep_all_schedule(inst))
    reserve = unmodelled_bytes(problem)
    rows = []
    for frac in budget_fracs:
        budget = int(problem.keep_all_peak_bytes * frac)
        limits, _ = limits_for(problem, Budget.activations_only(budget), Deadline(factor=deadline_factor), 1e15)
        ours = run_strategy(problem, limits, "poet", time_limit_s=time_limit_s, seed=seed)
        for variant in variants:
            ref = solve_poet(inst, budget - reserve, limits.overhead_time_s, time_limit_s=time_limit_s, seed=seed,
                             decide_backward=VARIANTS[variant])
            mapped_fits = mapped_obj = None
            outside: list[str] = []
            if ref.solved:
                mapping = map_to_decisions(problem, ref)
                sim = evaluate_choice(problem, "poet-reference", mapping.choice, limits, ref.status, repage=mapping.repage)
                mapped_fits, mapped_obj, outside = sim.fits, sim.overhead_energy_j, mapping.outside_policy
            rows.append(ComparisonRow(name, inst.n, len(problem.candidates), frac, budget, deadline_factor,
                                      problem.keep_all_peak_bytes, poet_keep, ours.status, ours.fits,
                                      ours.overhead_energy_j if ours.fits else None, ours.bound, ours.solve_time_s,
                                      variant, ref.status, ref.objective_j, ref.bound_j, ref.solve_time_s,
                                      ref.num_vars, ref.num_int_vars, mapped_fits, mapped_obj, outside))
    return rows


def load_problem(model_path: Path, work_dir: Path, target: str = "rpi4") -> Problem:
    from poetc.api import open_graph, step_costs_for
    from poetc.importer import ImportOptions
    from poetc.solver import build_problem
    from poetc.targets import load_target
    _, graph = open_graph(Path(model_path), Path(work_dir), ImportOptions())
    return build_problem(graph, step_costs_for(graph, load_target(target), None))


def compare(graphs=("tiny-chain", "tiny-residual", "mlp-example", "mlp", "cnn"), budget_fracs=(0.9, 0.8, 0.6), *,
            deadline_factor: float = 1.3, time_limit_s: float = 60.0, seed: int = 0, target: str = "rpi4",
            variants=tuple(VARIANTS), work_dir: Path | None = None) -> list[ComparisonRow]:
    """The benchmark: both solvers on each graph at each budget (a fraction of poetc's keep-all
    activation peak). Graphs: "tiny-chain", "tiny-residual", "mlp-example" (examples/mlp.onnx), and any
    model of `models.zoo` at batch 2 ("mlp", "cnn", ...)."""
    import tempfile
    rows: list[ComparisonRow] = []
    with tempfile.TemporaryDirectory(prefix="poetc-poetref-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        for name in graphs:
            gdir = work / name
            gdir.mkdir(parents=True, exist_ok=True)
            if name.startswith("tiny-"):
                path = tiny_onnx(name[5:], gdir / "model.onnx")
            elif name == "mlp-example":
                path = Path(__file__).resolve().parents[1] / "examples" / "mlp.onnx"
            else:
                from models.zoo import export_onnx
                path = export_onnx(name, gdir / "model.onnx", batch=2, seed=seed)
            problem = load_problem(path, gdir / "import", target)
            rows += compare_problem(name, problem, budget_fracs, deadline_factor=deadline_factor,
                                    time_limit_s=time_limit_s, seed=seed, variants=variants)
    return rows


def format_table(rows: list[ComparisonRow]) -> str:
    def mj(x):
        return "-" if x is None else f"{x * 1e3:.4g}"
    head = ("graph", "n", "cand", "budget", "keep-all KiB poetc/POET", "poetc", "poetc mJ", "poetc s", "reference",
            "ref status", "ref mJ", "ref bound mJ", "ref s", "ref vars (int)", "mapped: fits, mJ", "outside policy",
            "speed-up")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r.graph, str(r.nodes), str(r.candidates),
            f"{r.budget_frac:.2f} = {r.activation_budget_bytes / 1024:.0f} KiB",
            f"{r.poetc_keep_all_bytes / 1024:.1f}/{r.poet_keep_all_bytes / 1024:.1f}",
            r.poetc_status if r.poetc_fits else f"{r.poetc_status} (none fits)", mj(r.poetc_objective_j),
            f"{r.poetc_time_s:.2f}", r.reference, r.poet_status, mj(r.poet_objective_j), mj(r.poet_bound_j),
            f"{r.poet_time_s:.2f}", f"{r.poet_vars} ({r.poet_int_vars})",
            "-" if r.mapped_fits is None else f"{'yes' if r.mapped_fits else 'no'}, {mj(r.mapped_objective_j)}",
            str(len(r.outside_policy)), "-" if r.speedup is None else f"{r.speedup:.1f}x"]) + " |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - benchmark entry point
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="tiny-chain,tiny-residual,mlp-example,mlp,cnn")
    ap.add_argument("--budgets", default="0.9,0.8,0.6")
    ap.add_argument("--deadline", type=float, default=1.3)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--target", default="rpi4")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = compare(tuple(args.graphs.split(",")), tuple(float(x) for x in args.budgets.split(",")),
                   deadline_factor=args.deadline, time_limit_s=args.time_limit, target=args.target)
    print(format_table(rows))
    for r in rows:
        if r.outside_policy:
            print(f"{r.graph} @ {r.budget_frac}: POET actions outside poetc's policy: {'; '.join(r.outside_policy[:6])}"
                  + (" ..." if len(r.outside_policy) > 6 else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
