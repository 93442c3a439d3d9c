"""The scheduling problem extracted from a TrainGraph: candidates, their lifetimes and regeneration
chains, decision-independent memory per position, and costs. Shared by every strategy.

Positions are indices into graph.ops (the execution order). For a saved activation t:
  prod  its producer;  lf  its last forward/loss reader (prod if none);
  fb    its first backward reader;  lb  its last reader overall (aliases included).
Under KEEP, t is resident over [prod, lb]. Otherwise it is resident over [prod, lf] (plus the
Spill right after prod), and again over [fb, lb] once regenerated — or from an earlier "stage" when a
recomputation of another tensor needs it (see schedule.py for the policy this mirrors).
Stages are the distinct fb positions: the only places where regeneration happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Role, TensorKind, TrainGraph
from ..schedule import SPILL_HANDLE_BYTES, Decision, StepCosts, build_steps, simulate

# Ops whose output differs between two runs on the same inputs: never recomputed.
RANDOM_OPS = {"Dropout", "BitmaskDropout", "RandomNormal", "RandomNormalLike", "RandomUniform",
              "RandomUniformLike", "Multinomial", "BiasDropout", "BitmaskBiasDropout"}


@dataclass
class Candidate:
    name: str
    nbytes: int  # data size: what paging moves
    mem_bytes: int  # heap it occupies (allocation_bytes): what memory rows count
    prod: int
    lf: int
    fb: int
    lb: int
    boundary: list[int] = field(default_factory=list)  # candidate indices a recompute needs resident
    chain_ops: list[int] = field(default_factory=list)  # op indices a recompute runs (producer last)
    transient_bytes: int = 0  # non-saved intermediates a recompute creates on the way
    fixed: bool = False  # always kept (a graph output, or too small to matter); counted in const_bytes
    recomputable: bool = True
    pageable: bool = True
    why_not_recomputable: str = ""
    rec_time_s: float = 0.0
    rec_energy_j: float = 0.0
    page_time_s: float = 0.0  # out + in
    page_energy_j: float = 0.0
    s0: int = 0  # earliest stage at which it may have to be materialized
    extend_to: int = -1  # last position a recompute chain may read it at (beyond lb)


@dataclass
class Problem:
    graph: TrainGraph
    costs: StepCosts
    candidates: list[Candidate]
    stages: list[int]  # sorted fb positions
    const_bytes: np.ndarray  # per position: resident bytes not controlled by any decision
    backward_start: int
    fixed_bytes: int
    base_time_s: float
    base_energy_j: float
    keep_all_peak_bytes: int  # activation peak with every candidate kept (simulated)

    @property
    def positions(self) -> int:
        return len(self.graph.ops)

    def stage_of(self, p: int) -> int | None:
        """Index into `stages` of the last stage at or before position p (None before the first)."""
        k = int(np.searchsorted(self.stages, p, side="right")) - 1
        return k if k >= 0 else None

    def decisions_from(self, choice: dict[int, Decision]) -> dict[str, Decision]:
        return {self.candidates[i].name: d for i, d in choice.items() if d is not Decision.KEEP}


def _alias_closure(graph: TrainGraph) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for name in graph.tensors:
        members.setdefault(graph.storage_root(name), []).append(name)
    return members


def build_problem(graph: TrainGraph, costs: StepCosts, *, min_candidate_bytes: int = 0) -> Problem:
    saved = graph.saved_activations()
    members = _alias_closure(graph)
    outputs = {o.name for o in graph.model.graph.output}
    index_of = {t.name: i for i, t in enumerate(saved)}
    backward_start = next((op.index for op in graph.ops if op.role in (Role.BACKWARD, Role.ACCUMULATE)),
                          len(graph.ops))

    candidates: list[Candidate] = []
    for t in saved:
        readers = sorted({c for name in members[t.name] for c in graph.tensors[name].consumers})
        fwd = [c for c in readers if graph.ops[c].role in (Role.FORWARD, Role.LOSS)]
        bwd = [c for c in readers if graph.ops[c].role in (Role.BACKWARD, Role.ACCUMULATE)]
        cand = Candidate(t.name, t.nbytes, t.alloc_bytes, t.producer, max(fwd, default=t.producer), bwd[0],
                         readers[-1])
        if any(name in outputs for name in members[t.name]) or t.nbytes < min_candidate_bytes:
            cand.fixed = True
            cand.recomputable = cand.pageable = False
        candidates.append(cand)

    # regeneration chains (mirror StepBuilder.materialize)
    for cand in candidates:
        if not cand.recomputable:
            continue
        ops: list[int] = []
        boundary: set[int] = set()
        problem = ""
        stack = [graph.tensors[cand.name].producer]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            op = graph.ops[i]
            if op.op_type in RANDOM_OPS:
                problem = f"its recomputation would rerun {op.op_type} {op.name}, which is random"
                break
            ops.append(i)
            for x in op.inputs:
                if not x or graph.tensors[x].kind is not TensorKind.ACTIVATION:
                    continue
                root = graph.storage_root(x)
                if root in index_of and root != cand.name:
                    boundary.add(index_of[root])
                    if x != root:  # an alias of a saved tensor: its alias op reruns too (no bytes)
                        stack.append(graph.tensors[x].producer)
                elif root == cand.name and x != root:
                    problem = "it reads its own alias"
                else:
                    stack.append(graph.tensors[x].producer)
        if problem:
            cand.recomputable, cand.why_not_recomputable = False, problem
            continue
        cand.chain_ops = sorted(ops)
        cand.boundary = sorted(boundary)
        # every other output the chain's ops write (the intermediates nobody saved, and siblings such as
        # MaxPool's mask, written and dropped), plus the largest kernel workspace of the chain
        others = sum(graph.tensors[o].alloc_bytes for i in ops for o in graph.ops[i].outputs
                     if o != cand.name and graph.tensors[o].alias_of is None)
        cand.transient_bytes = others + max((graph.ops[i].workspace_bytes for i in ops), default=0)
        cand.rec_time_s = float(sum(costs.op_time_s[i] for i in ops))
        cand.rec_energy_j = float(sum(costs.op_energy_j[i] for i in ops))
    for cand in candidates:
        to, eo = costs.page_out(cand.nbytes)
        ti, ei = costs.page_in(cand.nbytes)
        cand.page_time_s, cand.page_energy_j = to + ti, eo + ei

    # earliest materialization stage. A recompute of u materializes its boundary tensors wherever u
    # itself is materialized, which may be before u's own first backward read (u pulled early by a
    # later tensor's recompute). Boundary tensors are produced before u, so in decreasing producer
    # order every u's s0 is final before it is passed on.
    for cand in candidates:
        cand.s0 = cand.fb
    for u in sorted(candidates, key=lambda c: -c.prod):
        if not u.recomputable:
            continue
        for b in u.boundary:
            t = candidates[b]
            if u.s0 < t.fb:
                t.s0 = min(t.s0, u.s0)
            if u.fb > t.lb:
                t.extend_to = max(t.extend_to, u.fb)
    stages = sorted({c.fb for c in candidates})

    # decision-independent memory: keep-all simulation minus every candidate's keep-all lifetime
    keep_steps, origin = build_steps(graph, {})
    sim = simulate(graph, keep_steps, origin, costs)
    const = np.array(sim.live_bytes, dtype=np.float64)
    for cand in candidates:
        if not cand.fixed:
            const[cand.prod: cand.lb + 1] -= cand.mem_bytes
    return Problem(graph, costs, candidates, stages, const, backward_start, sim.fixed_bytes,
                   sim.time_s, sim.energy_j, sim.peak_bytes)


# ---------------------------------------------------------------------------------------------------
# Fast evaluation of the linear memory model (used by heuristics and to build MILP starts)


@dataclass
class LinearEval:
    peak_bytes: float
    peak_position: int
    profile: np.ndarray
    time_s: float  # overhead time
    energy_j: float  # overhead energy
    flash_bytes: int
    y: dict[tuple[int, int], float]  # (candidate, stage index) -> early-resident indicator
    ext: dict[tuple[int, int], float]  # (candidate, position) -> extension indicator
    tau: dict[tuple[int, int], float]  # (candidate, stage index) -> recompute event indicator


def materialization_stage(problem: Problem, choice: list[Decision]) -> list[int | None]:
    """Stage index at which each non-kept candidate is first materialized (None if kept)."""
    cands = problem.candidates
    stage_index = {s: k for k, s in enumerate(problem.stages)}
    first: list[int | None] = [None if choice[i] is Decision.KEEP else stage_index[c.fb]
                               for i, c in enumerate(cands)]
    order = sorted(range(len(cands)), key=lambda i: -cands[i].prod)
    for u in order:  # dependents (later producers) are final before their boundary tensors
        if choice[u] is not Decision.RECOMPUTE or first[u] is None:
            continue
        for b in cands[u].boundary:
            if choice[b] is Decision.KEEP or first[u] >= stage_index[cands[b].fb]:
                continue
            first[b] = min(first[b], first[u])
    return first


def evaluate_linear(problem: Problem, choice: list[Decision]) -> LinearEval:
    cands = problem.candidates
    prof = problem.const_bytes.copy()
    first = materialization_stage(problem, choice)
    y: dict[tuple[int, int], float] = {}
    ext: dict[tuple[int, int], float] = {}
    tau: dict[tuple[int, int], float] = {}
    time_s = energy = 0.0
    flash = 0
    stages = problem.stages
    for i, c in enumerate(cands):
        if c.fixed:
            continue
        prof[c.prod: c.lf + 1] += c.mem_bytes
        prof[c.fb: c.lb + 1] += c.mem_bytes
        if choice[i] is Decision.KEEP:
            prof[c.lf + 1: c.fb] += c.mem_bytes
        else:
            start = stages[first[i]]
            prof[max(start, c.lf + 1): c.fb] += c.mem_bytes
            for k in range(first[i], stages.index(c.fb)):
                y[(i, k)] = 1.0
            if choice[i] is Decision.RECOMPUTE:
                tau[(i, first[i])] = 1.0
                prof[start] += c.transient_bytes
                time_s += c.rec_time_s
                energy += c.rec_energy_j
            else:
                time_s += c.page_time_s
                energy += c.page_energy_j
                flash += c.nbytes
                prof[c.prod + 1: c.fb + 1] += SPILL_HANDLE_BYTES
    for u, c in enumerate(cands):
        if choice[u] is not Decision.RECOMPUTE:
            continue
        for b in c.boundary:
            t = cands[b]
            if c.fb > t.lb:
                for p in range(t.lb + 1, c.fb + 1):
                    if (b, p) not in ext:
                        ext[(b, p)] = 1.0
                        prof[p] += t.mem_bytes
    k = int(np.argmax(prof))
    return LinearEval(float(prof[k]), k, prof, time_s, energy, flash, y, ext, tau)


def chen_checkpoints(problem: Problem) -> list[Decision]:
    """Chen et al.'s sqrt(n) checkpointing: keep every ceil(sqrt(n))-th saved activation, recompute the rest."""
    n = len(problem.candidates)
    k = max(1, math.ceil(math.sqrt(n)))
    order = sorted(range(n), key=lambda i: problem.candidates[i].prod)
    choice = [Decision.KEEP] * n
    for rank, i in enumerate(order):
        if rank % k != 0 and problem.candidates[i].recomputable:
            choice[i] = Decision.RECOMPUTE
    return choice
