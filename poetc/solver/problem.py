"""The scheduling problem extracted from a TrainGraph: candidates, their lifetimes and regeneration
chains, decision-independent memory per position, and costs. Shared by every strategy.

Positions are indices into graph.ops (the execution order). Candidates are the decidable tensors
(TrainGraph.decidable_tensors: saved forward activations, and gradients read across a gap). For one:
  prod  its producer;  last_before_gap (lf)  its last reader before its gap (for an activation, its
  last forward/loss reader; prod if none);  first_after_gap (fb)  its first reader after the gap;
  last_read (lb)  its last reader overall (aliases
  included).
Under KEEP, t is resident over [prod, lb]. Otherwise it is resident over [prod, lf] (plus the
Spill right after prod), and again over [fb, lb] once regenerated — or from an earlier "stage" in its
gap when a recomputation of another tensor needs it (see schedule.py for the policy this mirrors).
Paged state (fused optimizer mode, issue #17): the parameters and AdamW moments are candidates too
(Candidate.state, appended after the activations and gradients; they have no gap and no stage). Kept,
one is resident for the whole step (the keep-all simulation, hence const_bytes, counts it); paged, it
is resident only over its groups of uses (its copy's allocation) and costs its reads and write. A
recompute that reads a parameter needs it resident (the MILP: rec_u + page_s <= 1).

Stages are the distinct fb positions: the only places where regeneration happens; first_stage (s0)
is the earliest stage at which a candidate may have to be materialized.
A PAGE candidate may also be dropped between two of its backward readers far apart and paged in
again from its flash copy before the second (`inner`: those reader pairs; Schedule.repage_at).

A multi-output op (MaxPool: output and mask; BatchNormalization: output and statistics) is rerun once
for all its saved outputs that are recomputed: its recomputable candidates form a `group`, whose
recomputed members are all materialized at the earliest stage any of them is needed, by one run of
the shared chain. That run also writes the members that are not recomputed (kept or paged): transient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Role, TensorKind, TrainGraph
from ..schedule import (SPILL_HANDLE_BYTES, STATE_TOKEN_BYTES, Decision, SimResult, StepCosts, simulate_keep_all,
                        state_session_bytes)

# Ops whose output differs between two runs on the same inputs: never recomputed.
RANDOM_OPS = {"Dropout", "BitmaskDropout", "RandomNormal", "RandomNormalLike", "RandomUniform",
              "RandomUniformLike", "Multinomial", "BiasDropout", "BitmaskBiasDropout"}


@dataclass
class Candidate:
    name: str
    nbytes: int  # data size: what paging moves
    mem_bytes: int  # heap it occupies (allocation_bytes): what memory rows count
    prod: int
    last_before_gap: int
    first_after_gap: int
    last_read: int
    boundary: list[int] = field(default_factory=list)  # candidate indices a recompute needs resident
    chain_ops: list[int] = field(default_factory=list)  # op indices a recompute runs (producer last)
    transient_bytes: int = 0  # intermediates a recompute creates on the way (group members excluded)
    group: int = -1  # index into Problem.groups when its producer has other recomputable outputs
    gradient: bool = False  # produced by a backward op (see TrainGraph.decidable_tensors)
    fixed: bool = False  # always kept (a graph output, or too small to matter); counted in const_bytes
    recomputable: bool = True
    pageable: bool = True
    why_not_recomputable: str = ""
    rec_time_s: float = 0.0
    rec_energy_j: float = 0.0  # rec_*: one run of the chain (shared by a group)
    alias_time_s: float = 0.0  # alias ops (Flatten, Reshape) rerun to rebuild aliases backward ops read,
    alias_energy_j: float = 0.0  # once per regeneration, recompute or page-in alike
    page_time_s: float = 0.0  # out + in (+ alias ops)
    page_energy_j: float = 0.0
    first_stage: int = 0  # earliest stage at which it may have to be materialized
    # (a, b): consecutive backward readers with ops between them, across which a PAGE candidate may be
    # dropped and paged in again before b (resident over (a, b) otherwise); at one page-in's cost each
    inner: list[tuple[int, int]] = field(default_factory=list)
    # per inner gap: recomputable candidates whose recompute may read this one inside it (as a boundary
    # tensor, at a stage in first_stage..first_after_gap of theirs): not recomputed if it is dropped there
    inner_conflicts: list[list[int]] = field(default_factory=list)
    repage_time_s: float = 0.0
    repage_energy_j: float = 0.0
    # paged state (fused mode, issue #17): a parameter or moment the schedule may keep on flash between
    # its groups of uses ("parameter" | "frozen" | "moment"; "" for an activation or gradient). Its
    # decision is KEEP (resident for the whole step: counted in const_bytes) or PAGE (read before each
    # group in `state_groups`, (first, last) positions, dropped after it; a trainable one written once
    # after its update). page_* are the step's reads and write; nbytes is what one read moves.
    state: str = ""
    state_groups: list[tuple[int, int]] = field(default_factory=list)
    state_reads: int = 0  # StateReads per step when paged
    state_writes: int = 0  # StateWrites per step when paged (1 if trainable)
    state_update: int = -1  # position of its update (trainable)
    reads_state: list[int] = field(default_factory=list)  # recomputable: state candidates its chain reads
    # ONNX Runtime's per-step bookkeeping a decision adds (decision_bookkeeping). The execution frame
    # is allocated when the step starts: its values count at every position (bookkeeping_bytes) ...
    rec_frame_bytes: int = 0  # the values one run of the chain writes (a group's run: once for the group)
    rec_own_frame_bytes: int = 0  # ... and this member's own (rebuilt views, StateRead copies)
    page_frame_bytes: int = 0  # handle, restored copies, rebuilt views (state: StateRead copies, tokens)
    # ... the rest is held from where the simulator writes it to the step's end (held_profile):
    run_held_bytes: int = 0  # from the chain's run: its outputs nothing reads, its view/in-place objects
    gap_held_bytes: int = 0  # from last_before_gap, not kept: the object of an in-place op it dies at
    fb_held_bytes: int = 0  # from first_after_gap, not kept: the objects of its rebuilt views
    orig_held_bytes: int = 0  # from prod + 1, recomputed: the original, when no reader precedes the gap


@dataclass
class Problem:
    graph: TrainGraph
    costs: StepCosts
    candidates: list[Candidate]
    stages: list[int]  # sorted fb positions
    const_bytes: np.ndarray  # per position: resident bytes not controlled by any decision, while its op runs
    backward_start: int
    fixed_bytes: int
    base_time_s: float
    base_energy_j: float
    keep_all_peak_bytes: int  # activation peak with every candidate kept (simulated)
    keep_all: SimResult | None = None  # that simulation (schedule.simulate_keep_all), with the costs
    groups: list[list[int]] = field(default_factory=list)  # recomputable candidates sharing a producer (>= 2)
    # recomputable candidates by producer, latest producer first. A recompute materializes its boundary
    # tensors, produced before it: in this order whatever can pull a tensor early comes before it
    regen_order: list[list[int]] = field(default_factory=list)
    # per stage: const_bytes before the stage's op writes anything (its outputs and workspace are not
    # there yet): the memory the regeneration steps inserted before that op run on top of
    pre_const_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # the bookkeeping the step adds when it runs as a StateSession (any paged state: schedule.state_session_bytes)
    state_session_bytes: int = 0

    @property
    def positions(self) -> int:
        return len(self.graph.ops)

    def stage_of(self, p: int) -> int | None:
        """Index into `stages` of the last stage at or before position p (None before the first)."""
        k = int(np.searchsorted(self.stages, p, side="right")) - 1
        return k if k >= 0 else None

    def decisions_from(self, choice: dict[int, Decision]) -> dict[str, Decision]:
        return {self.candidates[i].name: d for i, d in choice.items() if d is not Decision.KEEP}

    def regenerate_at_from(self, early: dict[int, int]) -> dict[str, int]:
        """Schedule.regenerate_at from {candidate: stage index}."""
        return {self.candidates[i].name: self.stages[k] for i, k in early.items()}

    def repage_at_from(self, repage: dict[int, list[int]]) -> dict[str, list[int]]:
        """Schedule.repage_at from {candidate: indices into its `inner`}."""
        return {self.candidates[i].name: sorted(self.candidates[i].inner[j][1] for j in js)
                for i, js in repage.items() if js}


def _materialization_order(candidates: list[Candidate], stages: list[int]) -> tuple[dict[int, list[int]], list[int]]:
    """Set every candidate's s0, the earliest stage it may be materialized at, and group the
    recomputable ones by producer. A recompute of u materializes its boundary tensors wherever u
    itself is materialized, which may be before u's own first read after its gap (u pulled early by a
    later tensor's recompute, or by a sibling: one run of the producer materializes them all); a
    boundary tensor still before its gap there is read as it is. Boundary tensors are produced before
    u, so in decreasing producer order every s0 is final before it is passed on. Returns the groups
    and the members a sibling's run could reach before their own gap (StepBuilder would not register
    them there and would rerun the producer later: the caller makes them not recomputable)."""
    by_producer: dict[int, list[int]] = {}
    for i, cand in enumerate(candidates):
        cand.first_stage = cand.first_after_gap
        if cand.recomputable:
            by_producer.setdefault(cand.prod, []).append(i)
    bad = []
    for p in sorted(by_producer, reverse=True):
        group = by_producer[p]
        s0 = min(candidates[i].first_stage for i in group)
        for i in group:
            u = candidates[i]
            u.first_stage = s0
            if s0 <= u.last_before_gap:
                bad.append(i)
            for b in u.boundary:
                t = candidates[b]
                at = max(s0, next(s for s in stages if s > t.last_before_gap)) if not t.fixed else t.first_after_gap
                t.first_stage = min(t.first_stage, at)
    return by_producer, bad


def _alias_closure(graph: TrainGraph) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for name in graph.tensors:
        members.setdefault(graph.storage_root(name), []).append(name)
    return members


# parameters and moments smaller than this stay resident: paging them would add a column to every
# memory row for almost nothing (BatchNorm scales and biases: a few KiB)
MIN_STATE_BYTES = 16 * 1024


def build_problem(graph: TrainGraph, costs: StepCosts, *, min_candidate_bytes: int = 0,
                  page_state: bool = True) -> Problem:
    held = graph.decidable_tensors()
    members = _alias_closure(graph)
    outputs = {o.name for o in graph.model.graph.output}
    backward_start = next((op.index for op in graph.ops if op.role in (Role.BACKWARD, Role.ACCUMULATE)),
                          len(graph.ops))

    candidates: list[Candidate] = []
    for h in held:
        t = graph.tensors[h.name]
        cand = Candidate(h.name, t.nbytes, t.alloc_bytes, h.prod, h.lf, h.lb if h.fb is None else h.fb, h.lb,
                         gradient=h.gradient)
        if h.fb is None or any(name in outputs for name in members[t.name]) or t.nbytes < min_candidate_bytes:
            cand.fixed = True
            cand.recomputable = cand.pageable = False
        candidates.append(cand)
    # a gradient read by the producer of a gradient candidate must stay resident until that producer
    # reruns: a fixed candidate, so that extension can be charged
    index_of = {c.name: i for i, c in enumerate(candidates)}
    for h in held:
        if not h.gradient:
            continue
        for x in graph.ops[h.prod].inputs:
            root = graph.storage_root(x) if x else ""
            if x and graph.tensors[root].kind is TensorKind.GRADIENT and root not in index_of:
                r = graph.tensors[root]
                lb = max(c for name in members[root] for c in graph.tensors[name].consumers)
                index_of[root] = len(candidates)
                candidates.append(Candidate(root, r.nbytes, r.alloc_bytes, r.producer, lb, lb, lb, fixed=True,
                                            recomputable=False, pageable=False, gradient=True))

    # alias ops that rerun when a tensor is regenerated: views of it made before the gap that are read
    # after it (StepBuilder materializes such a view once, from the regenerated root)
    alias_ops: list[set[int]] = []
    for cand in candidates:
        ops: set[int] = set()
        for name in members[cand.name]:
            t = graph.tensors[name]
            if name != cand.name and t.producer <= cand.last_before_gap and any(c >= cand.first_after_gap for c in t.consumers):
                while name != cand.name:
                    ops.add(graph.tensors[name].producer)
                    name = graph.tensors[name].alias_of
        alias_ops.append(ops)
        cand.alias_time_s = float(sum(costs.op_time_s[i] for i in ops))
        cand.alias_energy_j = float(sum(costs.op_energy_j[i] for i in ops))

    # regeneration chains (mirror StepBuilder.materialize)
    updated_at = graph.parameter_updates()  # fused optimizer mode: parameter -> position of its update
    from ..ir.fused import parameter_views
    view_param = {v: p for p in updated_at for v in parameter_views(graph, p)}  # p's views -> p (and p -> p)
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
                if not x or graph.tensors[x].kind.is_persistent:
                    continue
                root = graph.storage_root(x)
                if root in index_of and root != cand.name:
                    b = index_of[root]
                    boundary.add(b)
                    if x != root and graph.tensors[x].producer <= candidates[b].last_before_gap:
                        stack.append(graph.tensors[x].producer)  # a view of it: its alias op reruns (no bytes)
                elif root == cand.name and x != root:
                    problem = "it reads its own alias"
                elif graph.tensors[x].kind is TensorKind.ACTIVATION:  # a forward intermediate nobody saved
                    stack.append(graph.tensors[x].producer)
                else:  # e.g. a Shape the backward computes early and nothing holds as a decision
                    problem = f"its recomputation would read {x!r}, which no decision keeps or regenerates"
        # fused optimizer mode: a recompute runs before fb at the latest and must not read an updated weight
        # (or a view of one: Reshape/Unsqueeze of a parameter share its buffer in ONNX Runtime; issue #15)
        late = sorted({view_param[x] for i in ops for x in graph.ops[i].inputs
                       if x in view_param and updated_at[view_param[x]] < cand.first_after_gap})
        if late and not problem:
            problem = f"its recomputation would read parameter {late[0]!r} after its in-graph update"
        if problem:
            cand.recomputable, cand.why_not_recomputable = False, problem
            continue
        cand.chain_ops = sorted(ops)
        cand.boundary = sorted(boundary)
        # an alias op of a boundary tensor reruns only if that tensor is regenerated; when a backward op
        # reads the alias it is charged there, otherwise here (an over-charge when the tensor is kept)
        charged = set(ops).difference(*(alias_ops[b] for b in boundary))
        cand.rec_time_s = float(sum(costs.op_time_s[i] for i in charged))
        cand.rec_energy_j = float(sum(costs.op_energy_j[i] for i in charged))
    for cand in candidates:
        to, eo = costs.page_out(cand.nbytes)
        ti, ei = costs.page_in(cand.nbytes)
        cand.page_time_s, cand.page_energy_j = to + ti + cand.alias_time_s, eo + ei + cand.alias_energy_j
        cand.repage_time_s, cand.repage_energy_j = ti, ei
        # page in again: only a tensor whose backward readers all read it directly (no view to rebuild)
        if cand.pageable and not any(name != cand.name and any(r >= cand.first_after_gap for r in graph.tensors[name].consumers)
                                     for name in members[cand.name]):
            readers = sorted({r for r in graph.tensors[cand.name].consumers if r >= cand.first_after_gap})
            cand.inner = [(a, b) for a, b in zip(readers, readers[1:]) if b - a > 1]
    stages = sorted({c.first_after_gap for c in candidates if not c.fixed})
    while True:
        by_producer, bad = _materialization_order(candidates, stages)
        if not bad:
            break
        for i in bad:  # see _materialization_order
            candidates[i].recomputable = False
            candidates[i].why_not_recomputable = ("its producer may rerun for another of its outputs while "
                                                  "it is still read before its gap")
    # a recompute reads its boundary tensors at stages first_stage..first_after_gap of the recomputed tensor: never while a
    # boundary tensor is dropped between two of its readers (the MILP excludes the pair)
    for t in candidates:
        t.inner_conflicts = [[] for _ in t.inner]
    for ui, u in enumerate(candidates):
        if u.recomputable:
            for b in u.boundary:
                t = candidates[b]
                for j, (a, z) in enumerate(t.inner):
                    if u.first_stage < z and u.first_after_gap > a:
                        t.inner_conflicts[j].append(ui)
    groups = [group for _, group in sorted(by_producer.items()) if len(group) > 1]
    for g, group in enumerate(groups):
        for i in group:
            candidates[i].group = g
    for cand in candidates:
        if not cand.recomputable:
            continue
        # every other output the chain's ops write that a later op of the chain reads (the intermediates
        # nobody saved: freed after that reader), plus the largest kernel workspace of the chain. The
        # outputs nothing reads (siblings that are not candidates, BN's running statistics) are held to
        # the step's end (run_held_bytes); group members are counted by the decisions (resident when
        # recomputed, held otherwise)
        own = {candidates[i].name for i in by_producer[cand.prod]}
        read_in_chain = {x for i in cand.chain_ops for x in graph.ops[i].inputs}
        others = sum(graph.tensors[o].alloc_bytes for i in cand.chain_ops for o in graph.ops[i].outputs
                     if o and o not in own and graph.tensors[o].alias_of is None and o in read_in_chain)
        cand.transient_bytes = others + max((graph.ops[i].workspace_bytes for i in cand.chain_ops), default=0)
    regen_order = [by_producer[p] for p in sorted(by_producer, reverse=True)]
    if page_state:
        _add_state_candidates(graph, costs, candidates)

    # decision-independent memory: keep-all simulation minus every candidate's keep-all lifetime
    sim = simulate_keep_all(graph, costs)
    const = np.array(sim.live_bytes, dtype=np.float64)
    before = np.array(sim.before_bytes, dtype=np.float64)
    for cand in candidates:
        if not cand.fixed and not cand.state:
            const[cand.prod: cand.last_read + 1] -= cand.mem_bytes
            before[cand.prod + 1: cand.last_read + 1] -= cand.mem_bytes
    decision_bookkeeping(graph, candidates, alias_ops, by_producer)
    return Problem(graph, costs, candidates, stages, const, backward_start, sim.fixed_bytes,
                   sim.time_s, sim.energy_j, sim.peak_bytes, sim, groups, regen_order, before[stages],
                   state_session_bytes(graph) if any(c.state for c in candidates) else 0)


def decision_bookkeeping(graph: TrainGraph, candidates: list[Candidate], alias_ops: list[set[int]],
                         by_producer: dict[int, list[int]]) -> None:
    """Set what each candidate's decision adds to ONNX Runtime's per-step bookkeeping, as the
    simulator counts it. The execution frame grows by FRAME_PER_VALUE_BYTES per value the rewrite adds
    (recomputed outputs, rebuilt views, restored copies, Spill handles, StateRead copies and StateWrite
    tokens), from the step's start (*_frame_bytes). Every view or in-place output a recompute or a
    page-in creates holds a Tensor object (TENSOR_OBJECT_BYTES) to the step's end, and so does every
    write nothing reads: those are held from where they are written (run_/gap_/fb_/orig_held_bytes,
    see Candidate and held_profile)."""
    from ..ir.graph import TENSOR_OBJECT_BYTES
    from ..schedule import (FRAME_PER_VALUE_BYTES, INPLACE_OPS, STATE_SESSION_PER_INPUT_BYTES,
                            STATE_SESSION_PER_OUTPUT_BYTES)

    for i, cand in enumerate(candidates):
        views = alias_ops[i] if i < len(alias_ops) else set()
        if cand.fixed:
            continue
        if cand.state:  # its StateRead copies and token, the token's output; no longer a graph input
            cand.page_frame_bytes = (FRAME_PER_VALUE_BYTES * (cand.state_reads + cand.state_writes)
                                     + STATE_SESSION_PER_OUTPUT_BYTES * cand.state_writes
                                     - STATE_SESSION_PER_INPUT_BYTES)
            continue
        # dropped after its last reader before the gap, it may die at an in-place op there, whose output's
        # object then outlives the output
        last = graph.ops[cand.last_before_gap] if cand.last_before_gap >= 0 else None
        dies_in_place = int(last is not None and last.op_type in INPLACE_OPS and bool(last.inputs)
                            and graph.storage_root(last.inputs[0]) == cand.name)
        cand.gap_held_bytes = TENSOR_OBJECT_BYTES * dies_in_place
        cand.fb_held_bytes = TENSOR_OBJECT_BYTES * len(views)
        if cand.pageable:
            cand.page_frame_bytes = FRAME_PER_VALUE_BYTES * (2 + len(cand.inner) + len(views))
        if not cand.recomputable:
            continue
        outs = [o for j in cand.chain_ops for o in graph.ops[j].outputs if o]
        cand.rec_frame_bytes = FRAME_PER_VALUE_BYTES * len(outs)
        cand.rec_own_frame_bytes = FRAME_PER_VALUE_BYTES * (len(views) + len(cand.reads_state))
        objects = sum(1 for j in cand.chain_ops if graph.ops[j].op_type in INPLACE_OPS
                      or any(graph.tensors[o].alias_of for o in graph.ops[j].outputs if o))
        # writes nothing reads are held to the step's end: outputs of the chain it does not read (the
        # producer's outputs that are not recomputable candidates, a MaxPool's mask, BN's statistics;
        # a group's members are the decisions' own), and the original when no reader precedes the gap
        own = {candidates[j].name for j in by_producer[cand.prod]}
        read_in_chain = {x for j in cand.chain_ops for x in graph.ops[j].inputs}
        cand.run_held_bytes = TENSOR_OBJECT_BYTES * objects + sum(
            graph.tensors[o].alloc_bytes for j in cand.chain_ops for o in graph.ops[j].outputs
            if o and o not in own and graph.tensors[o].alias_of is None and o not in read_in_chain)
        cand.orig_held_bytes = cand.mem_bytes if cand.last_before_gap <= cand.prod else 0


def bookkeeping_bytes(problem: "Problem", choice: list[Decision]) -> float:
    """The execution frame's values the decisions add (decision_bookkeeping), at every position: a
    group's producer reruns once for all its recomputed members; a paged parameter or moment makes the
    step a StateSession (Problem.state_session_bytes)."""
    total, runs = 0, set()
    if any(c.state and d is Decision.PAGE for c, d in zip(problem.candidates, choice)):
        total += problem.state_session_bytes
    for c, d in zip(problem.candidates, choice):
        if c.fixed or d is Decision.KEEP:
            continue
        if d is Decision.PAGE:
            total += c.page_frame_bytes
            continue
        total += c.rec_own_frame_bytes
        if c.group < 0 or c.group not in runs:
            total += c.rec_frame_bytes
            runs.add(c.group)
    return float(max(total, 0))  # (paging state takes inputs away; the MILP's column is not negative)


def held_profile(problem: "Problem", choice: list[Decision], first) -> np.ndarray:
    """Per position: the bytes the decisions make ONNX Runtime hold to the step's end, from where the
    simulator writes them (decision_bookkeeping). `first[i]`: the stage index a recomputed candidate
    is materialized at (materialization_stage). A group's run holds, besides the chain's unread
    outputs, the copies it writes of its members that are not recomputed."""
    cands = problem.candidates
    stages = problem.stages
    d = np.zeros(problem.positions + 1)
    runs: dict[int, int] = {}
    for i, c in enumerate(cands):
        if c.fixed or c.state or choice[i] is Decision.KEEP:
            continue
        d[c.last_before_gap] += c.gap_held_bytes
        d[c.first_after_gap] += c.fb_held_bytes
        if choice[i] is not Decision.RECOMPUTE:
            continue
        d[c.prod + 1] += c.orig_held_bytes
        if c.group < 0:
            d[stages[first[i]]] += c.run_held_bytes
        else:
            runs[c.group] = first[i]
    for g, k in runs.items():
        members = problem.groups[g]
        d[stages[k]] += cands[members[0]].run_held_bytes + sum(
            cands[m].mem_bytes for m in members if choice[m] is not Decision.RECOMPUTE)
    return np.cumsum(d)[:problem.positions]


def _add_state_candidates(graph: TrainGraph, costs: StepCosts, candidates: list[Candidate]) -> None:
    """Append the pageable parameters and moments (ir.fused.state_tensors) as state candidates and
    record, for every recomputable candidate, the state candidates its chain reads."""
    from ..ir.fused import state_tensors
    n = len(graph.ops)
    index: dict[str, int] = {}
    for st in state_tensors(graph):
        if not st.pageable or st.nbytes < MIN_STATE_BYTES:
            continue
        ti, ei = costs.page_in(st.nbytes)
        to, eo = costs.page_out(st.nbytes)
        writes = 1 if st.trainable else 0
        cand = Candidate(st.name, st.nbytes, st.alloc_bytes, 0, -1, n, n - 1, fixed=False, recomputable=False,
                         why_not_recomputable="a parameter or optimizer moment", first_stage=n, state=st.role,
                         state_groups=list(st.groups), state_reads=len(st.groups), state_writes=writes,
                         state_update=st.update if st.update is not None else -1)
        cand.page_time_s = len(st.groups) * ti + writes * to
        cand.page_energy_j = len(st.groups) * ei + writes * eo
        index[st.name] = len(candidates)
        candidates.append(cand)
    for cand in candidates:
        if cand.recomputable and not cand.state:
            cand.reads_state = sorted({index[x] for i in cand.chain_ops for x in graph.ops[i].inputs if x in index})


def state_delta(problem: Problem, i: int) -> np.ndarray:
    """Per position: memory of state candidate i paged minus kept (its copy over its groups, nothing
    elsewhere, instead of its resident buffer everywhere; after its update, its StateWrite's token,
    a graph output that lives to the end of the step)."""
    c = problem.candidates[i]
    d = np.full(problem.positions, -float(c.nbytes))
    for a, b in c.state_groups:
        d[a: b + 1] += c.mem_bytes
    if c.state_writes:
        d[c.state_update + 1:] += STATE_TOKEN_BYTES
    return d


# ---------------------------------------------------------------------------------------------------
# Fast evaluation of the linear memory model (used by heuristics and to build MILP starts)


@dataclass
class LinearEval:
    peak_bytes: float
    peak_position: int
    profile: np.ndarray  # per position: the larger of its op row and (at a stage) its regeneration row
    time_s: float  # overhead time
    energy_j: float  # overhead energy
    flash_bytes: int
    y: dict[tuple[int, int], float]  # (candidate, stage index) -> early-resident indicator
    ext: dict[tuple[int, int], float]  # (candidate, position) -> extension indicator
    tau: dict[tuple[int, int], float]  # (candidate, stage index) -> recompute event indicator
    group_stage: dict[int, int]  # group -> stage index of its one recompute (groups with a recomputed member)
    op_profile: np.ndarray  # per position: memory while its op runs
    pre_profile: np.ndarray  # per stage: memory while the regeneration steps before its op run


def materialization_stage(problem: Problem, choice: list[Decision],
                          early: dict[int, int] | None = None) -> list[int | None]:
    """Stage index at which each non-kept candidate is first materialized (None if kept). `early`:
    candidate -> stage index in its gap it is regenerated at ahead of need (Schedule.regenerate_at)."""
    cands = problem.candidates
    stage_index = {s: k for k, s in enumerate(problem.stages)}
    first: list[int | None] = [None if choice[i] is Decision.KEEP or c.state else stage_index[c.first_after_gap]
                               for i, c in enumerate(cands)]
    for i, k in (early or {}).items():
        if first[i] is not None:
            first[i] = min(first[i], k)
    for members in problem.regen_order:
        rec = [u for u in members if choice[u] is Decision.RECOMPUTE]
        if not rec:
            continue
        at = min(first[u] for u in rec)  # one run of the producer materializes every recomputed output
        for u in rec:
            first[u] = at
        for b in cands[rec[0]].boundary:  # (one still before its gap there is read as it is)
            b_cand = cands[b]
            if (choice[b] is Decision.KEEP or at >= stage_index[b_cand.first_after_gap]
                    or problem.stages[at] <= b_cand.last_before_gap):
                continue
            first[b] = min(first[b], at)
    return first


def evaluate_linear(problem: Problem, choice: list[Decision], early: dict[int, int] | None = None,
                    repage: dict[int, list[int]] | None = None) -> LinearEval:
    """The MILP's memory, time and energy accounting of one decision vector, and its variable values.
    `repage`: PAGE candidate -> indices into its `inner` it is dropped across and paged in again.
    Memory has a row per position (while its op runs) and one per stage (while the regeneration steps
    before the stage's op run: the op's outputs and workspace are not there yet, the transient
    intermediates of recomputes are); `profile` is the larger of the two at each position."""
    cands = problem.candidates
    stages = problem.stages
    res = np.zeros(problem.positions)  # decision-dependent resident bytes per position
    trans = np.zeros(len(stages))  # transient bytes of recomputes per stage
    first = materialization_stage(problem, choice, early)
    y: dict[tuple[int, int], float] = {}
    ext: dict[tuple[int, int], float] = {}
    tau: dict[tuple[int, int], float] = {}
    group_stage: dict[int, int] = {}
    time_s = energy = 0.0
    flash = 0
    for i, c in enumerate(cands):
        if c.fixed:
            continue
        if c.state:
            if choice[i] is Decision.PAGE:
                res += state_delta(problem, i)
                time_s += c.page_time_s
                energy += c.page_energy_j
            continue
        res[c.prod: c.last_before_gap + 1] += c.mem_bytes
        res[c.first_after_gap: c.last_read + 1] += c.mem_bytes
        if choice[i] is Decision.KEEP:
            res[c.last_before_gap + 1: c.first_after_gap] += c.mem_bytes
            continue
        res[stages[first[i]]: c.first_after_gap] += c.mem_bytes  # materialized in its gap (after lf), at its own fb or earlier
        for k in range(first[i], stages.index(c.first_after_gap)):
            y[(i, k)] = 1.0
        if choice[i] is Decision.PAGE:
            time_s += c.page_time_s
            energy += c.page_energy_j
            flash += c.nbytes
            again = [c.inner[j] for j in (repage or {}).get(i, ())]
            for a, b in again:
                res[a + 1: b] -= c.mem_bytes
                time_s += c.repage_time_s
                energy += c.repage_energy_j
            res[c.prod + 1: max([c.first_after_gap] + [b for _, b in again]) + 1] += SPILL_HANDLE_BYTES
            continue
        time_s += c.alias_time_s
        energy += c.alias_energy_j
        if c.group < 0:
            tau[(i, first[i])] = 1.0
            trans[first[i]] += c.transient_bytes
            time_s += c.rec_time_s
            energy += c.rec_energy_j
        elif c.group not in group_stage:  # the group's one run: its members that are not recomputed are transient
            group_stage[c.group] = first[i]  # (its members that are not recomputed: held_profile)
            trans[first[i]] += c.transient_bytes
            time_s += c.rec_time_s
            energy += c.rec_energy_j
    for u, c in enumerate(cands):
        if choice[u] is not Decision.RECOMPUTE:
            continue
        for b in c.boundary:
            t = cands[b]
            if c.first_after_gap > t.last_read:
                for p in range(t.last_read + 1, c.first_after_gap + 1):
                    if (b, p) not in ext:
                        ext[(b, p)] = 1.0
                        res[p] += t.mem_bytes
    res += bookkeeping_bytes(problem, choice) + held_profile(problem, choice, first)
    op_rows = problem.const_bytes + res
    pre = problem.pre_const_bytes + res[stages] + trans
    prof = op_rows.copy()
    prof[stages] = np.maximum(prof[stages], pre)
    k = int(np.argmax(prof))
    return LinearEval(float(prof[k]), k, prof, time_s, energy, flash, y, ext, tau, group_stage, op_rows, pre)


class ProfileEvaluator:
    """evaluate_linear's peak, profile, time, energy and flash for many decision vectors of one
    problem (no early regeneration, no paging in again), vectorized over candidates with interval
    sums as difference arrays: what the greedy heuristics call thousands of times. Agrees with
    evaluate_linear (tests/test_solver.py checks it on random vectors)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        cands = problem.candidates
        stage_index = {s: k for k, s in enumerate(problem.stages)}
        n = problem.positions
        self.live = np.array([i for i, c in enumerate(cands) if not c.fixed and not c.state], dtype=np.int64)
        # paged state: a dense delta per state candidate (state_delta), its costs, the recomputes it bars
        self.state = [i for i, c in enumerate(cands) if c.state]
        self.state_delta = np.array([state_delta(problem, i) for i in self.state]).reshape(len(self.state), n)
        self.state_t = np.array([cands[i].page_time_s for i in self.state])
        self.state_e = np.array([cands[i].page_energy_j for i in self.state])
        live = [cands[i] for i in self.live]
        self.last_before_gap = np.array([c.last_before_gap for c in live], dtype=np.int64)
        self.first_after_gap = np.array([c.first_after_gap for c in live], dtype=np.int64)
        self.prod = np.array([c.prod for c in live], dtype=np.int64)
        self.mem = np.array([c.mem_bytes for c in live], dtype=np.float64)
        self.fb_stage = np.array([stage_index[c.first_after_gap] for c in live], dtype=np.int64)
        self.page_t = np.array([c.page_time_s for c in live])
        self.page_e = np.array([c.page_energy_j for c in live])
        self.nbytes = np.array([c.nbytes for c in live], dtype=np.int64)
        d = np.zeros(n + 1)
        np.add.at(d, self.prod, self.mem)
        np.add.at(d, self.last_before_gap + 1, -self.mem)
        np.add.at(d, self.first_after_gap, self.mem)
        np.add.at(d, np.array([c.last_read for c in live], dtype=np.int64) + 1, -self.mem)
        self.base = problem.const_bytes + np.cumsum(d)[:n]  # every candidate's own reads, whatever the choice
        self.stages = np.array(problem.stages, dtype=np.int64)
        self.fb_stage_of = {i: stage_index[cands[i].first_after_gap] for i in self.live.tolist()}
        # recomputable candidates: their producer's rank in problem.regen_order
        self.regen_rank = {u: r for r, members in enumerate(problem.regen_order) for u in members}
        self.code = {Decision.KEEP: 0, Decision.RECOMPUTE: 1, Decision.PAGE: 2}

    def first_stage(self, choice: list[Decision], rec: list[int]) -> dict[int, int]:
        """materialization_stage for the non-kept candidates (only those a recompute pulls early differ
        from their own stage): {candidate: stage index} for the ones pulled early."""
        cands = self.problem.candidates
        stages = self.problem.stages
        first: dict[int, int] = {}
        by_rank: dict[int, list[int]] = {}
        for u in rec:
            by_rank.setdefault(self.regen_rank[u], []).append(u)
        for r in sorted(by_rank):
            members = by_rank[r]
            at = min(first.get(u, self.fb_stage_of[u]) for u in members)
            for u in members:
                if at < self.fb_stage_of[u]:
                    first[u] = at
            for b in cands[members[0]].boundary:
                t = cands[b]
                if choice[b] is Decision.KEEP or at >= self.fb_stage_of[b] or stages[at] <= t.last_before_gap:
                    continue
                if at < first.get(b, self.fb_stage_of[b]):
                    first[b] = at
        return first

    def __call__(self, choice: list[Decision]) -> LinearEval:
        problem = self.problem
        cands = problem.candidates
        n = problem.positions
        code = np.array([self.code[choice[i]] for i in self.live.tolist()], dtype=np.int8)
        keep, page = code == 0, code == 2
        rec = self.live[code == 1].tolist()
        first = self.fb_stage.copy()
        early = self.first_stage(choice, rec)
        if early:
            pos = np.searchsorted(self.live, np.array(list(early)))
            first[pos] = list(early.values())
        d = np.zeros(n + 1)
        np.add.at(d, self.last_before_gap[keep] + 1, self.mem[keep])
        np.add.at(d, self.first_after_gap[keep], -self.mem[keep])
        gone = ~keep
        np.add.at(d, self.stages[first[gone]], self.mem[gone])
        np.add.at(d, self.first_after_gap[gone], -self.mem[gone])
        np.add.at(d, self.prod[page] + 1, SPILL_HANDLE_BYTES)
        np.add.at(d, self.first_after_gap[page] + 1, -SPILL_HANDLE_BYTES)
        time_s = float(self.page_t[page].sum())
        energy = float(self.page_e[page].sum())
        flash = int(self.nbytes[page].sum())
        trans = np.zeros(len(problem.stages))
        groups_done: set[int] = set()
        ext_to: dict[int, int] = {}
        for i in rec:
            c = cands[i]
            k = early.get(i, self.fb_stage_of[i])
            time_s += c.alias_time_s
            energy += c.alias_energy_j
            if c.group < 0 or c.group not in groups_done:
                trans[k] += c.transient_bytes
                if c.group >= 0:
                    groups_done.add(c.group)
                time_s += c.rec_time_s
                energy += c.rec_energy_j
            for b in c.boundary:
                if c.first_after_gap > cands[b].last_read:
                    ext_to[b] = max(ext_to.get(b, 0), c.first_after_gap)
        for b, to in ext_to.items():
            d[cands[b].last_read + 1] += cands[b].mem_bytes
            d[to + 1] -= cands[b].mem_bytes
        first_of = {i: early.get(i, self.fb_stage_of[i]) for i in rec}
        op_rows = self.base + np.cumsum(d)[:n] + bookkeeping_bytes(problem, choice) + held_profile(problem, choice, first_of)
        barred = False
        if self.state:
            paged = np.array([choice[i] is Decision.PAGE for i in self.state])
            if paged.any():
                op_rows = op_rows + self.state_delta[paged].sum(axis=0)
                time_s += float(self.state_t[paged].sum())
                energy += float(self.state_e[paged].sum())
                barred = any(choice[s] is Decision.PAGE for i in rec for s in cands[i].reads_state)
        pre = problem.pre_const_bytes + (op_rows - problem.const_bytes)[self.stages] + trans
        prof = op_rows.copy()
        prof[self.stages] = np.maximum(prof[self.stages], pre)
        k = int(np.argmax(prof))
        # a recompute reading a paged parameter is not a schedule the MILP has (rec_u + page_s <= 1)
        peak = float("inf") if barred else float(prof[k])
        return LinearEval(peak, k, prof, time_s, energy, flash, {}, {}, {}, {}, op_rows, pre)


def chen_checkpoints(problem: Problem) -> list[Decision]:
    """Chen et al.'s sqrt(n) checkpointing: keep every ceil(sqrt(n))-th saved forward activation,
    recompute the rest (gradients are kept, as in the paper)."""
    order = sorted((i for i, c in enumerate(problem.candidates) if not c.gradient and not c.state),
                   key=lambda i: problem.candidates[i].prod)
    k = max(1, math.ceil(math.sqrt(len(order))))
    choice = [Decision.KEEP] * len(problem.candidates)
    for rank, i in enumerate(order):
        if rank % k != 0 and problem.candidates[i].recomputable:
            choice[i] = Decision.RECOMPUTE
    return choice
