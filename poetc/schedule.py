"""Schedules: per-activation decisions, the explicit step list they imply, and the simulator.

A `Schedule` holds one `Decision` (keep, recompute, page) per decidable tensor
(`TrainGraph.decidable_tensors`: saved forward activations, and gradients read across a gap). Each
has a gap, after its last reader before the gap (lf) and up to its first reader after it (fb).
`build_steps` turns the decisions into the exact step list the rewritten training graph executes
(compute, recompute, page-out, page-in), and `simulate` replays a step list with ONNX Runtime's
allocation rules under poetc's runtime contract (no arena, no memory pattern, no buffer reuse): a
buffer is allocated when its step runs and freed after its last reader; alias ops (Reshape, Identity,
...) share their input's buffer; an op's kernel workspace (`Op.workspace_bytes`) is live while the op
runs. The simulator is the single source of truth for peak RAM, time and energy; solvers and reports
quote it.

Fused optimizer mode (`poetc/ir/fused.py`): each parameter's update is an op of the step (Role.UPDATE)
that reads the parameter, its gradient and its persistent optimizer state; the gradient dies there like
any tensor at its last reader. `simulate` rejects a step that reads a parameter after its update (a
recompute, for instance); the problem never makes such a recompute a candidate.

Paged state (fused mode, issue #17): the parameters and AdamW moments (`ir.fused.state_tensors`) are
counted in the step, not in the fixed state. A resident one is live from the start to the end of the
step (its graph input's buffer); a PAGE decision on one reads it from the state directory (STATE_READ,
poet.StateRead: a new copy) right before the first use of each of its groups of uses, the copy is freed
after the group's last reader, and a trainable one is written back (STATE_WRITE, poet.StateWrite, after
its update, reading the update's flag) once. A recompute that needs a paged parameter outside a group
reads a transient copy. `simulate` rejects a read of a paged tensor's graph input and a StateRead of a
parameter after its update.

Regeneration policy (the solver's formulation mirrors it exactly):
- readers up to lf read the original, which is freed after lf;
- a PAGE tensor is spilled right after its producer and restored just before fb;
- a RECOMPUTE tensor is recomputed just before fb (its producer reruns: a forward op, or a backward
  op for a gradient) from the nearest resident tensors: decidable tensors it needs are materialized
  too (unless still before their own gap) and stay resident until their own last reader; other
  forward intermediates on the way are recomputed transiently; a gradient no decision is about is
  read as it is (kept alive for it);
- that run of its producer also regenerates the producer's other RECOMPUTE outputs (MaxPool's mask,
  BatchNormalization's statistics) that are past their own lf, which stay resident until their own
  last reader;
- a view (Flatten, Reshape) of a regenerated tensor made before its gap is rebuilt from the
  regenerated tensor, once, when a reader after the gap needs it;
- `regenerate_at` may move a tensor's regeneration earlier, to a stage in its gap (the MILP does so
  to keep a recompute's transient intermediates away from the peak): it is regenerated there,
  before that op, exactly as if a recompute needed it there;
- `repage_at` lists, for a PAGE tensor, backward readers before which it is paged in again from its
  flash copy: the restored copy before it is freed after the previous reader, so the tensor is not
  resident between the two (POET's page-in at any stage). Every Restore but the last of a tensor
  keeps the spill file.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field

from .errors import InternalError
from .ir.fused import state_read_name, state_tensors, state_token_name
from .ir.graph import TENSOR_OBJECT_BYTES, Role, TensorKind, TrainGraph, allocation_bytes

SPILL_HANDLE_BYTES = allocation_bytes(16)  # Spill returns an int64[2] handle (a tensor: data block and object)
STATE_TOKEN_BYTES = allocation_bytes(8)  # StateWrite returns an int64[1] token (a graph output: never freed)

# ONNX Runtime's per-step bookkeeping (measured with tools/memtrace.py, docs/memory-model.md "per-step
# bookkeeping"), allocated when a step starts and freed when it ends: the execution frame's OrtValue
# per value of the graph (one block of 24 B x values: 3,672 B for 153 values, 25,784 B for 1,074), and
# about 152 B per graph input (the feeds and their names, vectors sized by them: fitted on lenet,
# squeezenet and mobilenet_v3 traces, within 1.1 KB of each).
FRAME_PER_VALUE_BYTES = 24
FRAME_PER_INPUT_BYTES = 152
# A paged step (StateRead/StateWrite in the graph) runs as InferenceSession.run_with_ort_values
# (poetc.runtime.session.StateSession), whose per-step blocks are larger: 218 B per graph input and 113 B
# per graph output beyond the output's own buffer and frame value (one-op graphs of 10-410 inputs and
# outputs under the heap counter, docs/memory-model.md "The paged step")
STATE_SESSION_PER_INPUT_BYTES = 218
STATE_SESSION_PER_OUTPUT_BYTES = 113

# Ops ONNX Runtime 1.19.2's CPU kernels run in place (KernelDef MayInplace(0, 0)): when their first
# input's buffer has no reader after the op and is not a graph input, and the output has its size, the
# output takes over that buffer (also with memory reuse off). Measured one by one (a 1 MiB input that
# dies at the op: peak 1x, against 2x for Neg, Add, Mul, Exp, Erf, Transpose, the *Grad ops, Gelu,
# Dropout, ...): tests/test_measure.py.
INPLACE_OPS = frozenset({"Relu", "LeakyRelu", "Tanh", "Sigmoid", "Elu", "Selu", "ThresholdedRelu", "Clip",
                         "HardSigmoid", "Softplus", "Softsign", "Softmax", "LogSoftmax"})


def frame_bytes(values: int, inputs: int, outputs: int = 0, *, state_session: bool = False) -> int:
    """The per-step bookkeeping of a graph with `values` values, `inputs` graph inputs and `outputs`
    graph outputs; `state_session`: run as a paged step (StateSession), else through the training API."""
    if state_session:
        return (FRAME_PER_VALUE_BYTES * values + STATE_SESSION_PER_INPUT_BYTES * inputs
                + STATE_SESSION_PER_OUTPUT_BYTES * outputs)
    return FRAME_PER_VALUE_BYTES * values + FRAME_PER_INPUT_BYTES * inputs


def state_session_bytes(graph: TrainGraph) -> int:
    """What the first paged parameter or moment adds to the keep-all step's bookkeeping: the step then
    runs as a StateSession (frame_bytes), whatever else the schedule does (the paged tensors' own
    inputs, reads and tokens are counted by their decisions)."""
    steps = build_steps(graph, {})[0]
    inputs = graph_inputs(graph, steps)
    return ((STATE_SESSION_PER_INPUT_BYTES - FRAME_PER_INPUT_BYTES) * inputs
            + STATE_SESSION_PER_OUTPUT_BYTES * len(graph.model.graph.output))


def graph_values(graph: TrainGraph, steps: list["Step"]) -> int:
    """Values of the graph a step list runs as: the lowered graph's tensors and every new version the
    steps write (recomputed copies, restored copies, Spill handles, StateRead copies and tokens)."""
    return len(graph.tensors) + len({w for step in steps for w in step.writes if w and w not in graph.tensors})


def graph_inputs(graph: TrainGraph, steps: list["Step"]) -> int:
    """Graph inputs of the graph a step list runs as: the lowered graph's, less the paged parameters and
    moments (read by StateRead instead)."""
    paged = {step.tensor for step in steps if step.kind is StepKind.STATE_READ}
    return sum(1 for i in graph.model.graph.input if i.name not in paged)


class Decision(str, enum.Enum):
    KEEP = "keep"
    RECOMPUTE = "recompute"
    PAGE = "page"


class StepKind(str, enum.Enum):
    COMPUTE = "compute"
    RECOMPUTE = "recompute"
    PAGE_OUT = "page_out"
    PAGE_IN = "page_in"
    STATE_READ = "state_read"  # a paged parameter or moment read from flash (poet.StateRead)
    STATE_WRITE = "state_write"  # a paged trainable one written back after its update (poet.StateWrite)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    op: int | None  # index into graph.ops for compute / recompute
    tensor: str | None  # original tensor name for page_out / page_in
    reads: tuple[str, ...]  # versioned tensor names ("" = omitted optional input)
    writes: tuple[str, ...]

    def to_json(self) -> list:
        return [self.kind.value, self.op, self.tensor, list(self.reads), list(self.writes)]


_RECOMPUTE_TAG = "__poet_rc"


def recompute_name(name: str, k: int) -> str:
    """The k-th recomputed copy of tensor `name`."""
    return f"{name}{_RECOMPUTE_TAG}{k}"


def recompute_node_name(op_name: str, written: str) -> str:
    """The node that reruns op `op_name` to write `written` (a recompute_name): the op's name with the
    same tag, so the rewritten graph's node names say which copy they are."""
    return f"{op_name}{_RECOMPUTE_TAG}{written.rsplit(_RECOMPUTE_TAG, 1)[1]}"


def restored_name(name: str, k: int = 1) -> str:
    return f"{name}__poet_restored" if k == 1 else f"{name}__poet_restored{k}"


def handle_name(name: str) -> str:
    return f"{name}__poet_handle"


class StepBuilder:
    """Expands decisions into a step list (see the module docstring for the policy)."""

    def __init__(self, graph: TrainGraph, decisions: dict[str, Decision], regenerate_at: dict[str, int] | None = None,
                 repage_at: dict[str, list[int]] | None = None):
        self.g = graph
        self.decisions = decisions
        self.repage: dict[int, list[str]] = {}  # position -> PAGE tensors paged in again before that op
        for name, positions in sorted((repage_at or {}).items()):
            if decisions.get(name) is not Decision.PAGE:
                raise InternalError(f"{name!r} is paged in again but its decision is not page")
            for p in positions:
                self.repage.setdefault(p, []).append(name)
        self._restores: dict[str, int] = {}
        self.early: dict[int, list[str]] = {}  # position -> tensors regenerated before that op, ahead of need
        for name, p in sorted((regenerate_at or {}).items(), key=lambda kv: (kv[1], graph.tensors[kv[0]].producer, kv[0])):
            self.early.setdefault(p, []).append(name)
        self.steps: list[Step] = []
        self.origin: dict[str, str] = {}  # versioned name -> original name
        self.regenerated: dict[str, str] = {}  # original -> registered regenerated version
        self._counter: dict[str, int] = {}
        self.held = {h.name: h for h in graph.decidable_tensors()}
        self.position = 0  # the op being scheduled
        # paged state (fused mode): read before each group of uses, written after the update
        self.state = {s.name: s for s in state_tensors(graph) if decisions.get(s.name) is Decision.PAGE}
        self.group_end = {(s.name, a): b for s in self.state.values() for a, b in s.groups}
        self.state_live: dict[str, tuple[str, int]] = {}  # paged state tensor -> (its read copy, group end)
        self._reads: dict[str, int] = {}

    def decision(self, name: str) -> Decision:
        return self.decisions.get(self.g.storage_root(name), Decision.KEEP)

    def build(self) -> list[Step]:
        for op in self.g.ops:
            self.position = op.index
            for name in self.repage.get(op.index, ()):
                if name not in self.regenerated:
                    raise InternalError(f"{name!r} is paged in again before {op.name!r} but was never paged in")
                del self.regenerated[name]  # this op reads a fresh copy; the last one is freed after its reader
            for name in self.early.get(op.index, ()):
                self.resolve(name)
            if op.role in (Role.FORWARD, Role.LOSS):
                reads = tuple(op.inputs)
            else:
                reads = tuple(self.resolve(x) for x in op.inputs)
            reads = tuple(self.read_state(x) if x in self.state else x for x in reads)
            self.steps.append(Step(StepKind.COMPUTE, op.index, None, reads, tuple(op.outputs)))
            self.after_state_use(op)
            for out in op.outputs:
                if self.decisions.get(out) is Decision.PAGE:
                    self.steps.append(Step(StepKind.PAGE_OUT, None, out, (out,), (handle_name(out),)))
                    self.origin[handle_name(out)] = out
        return self.steps

    def read_state(self, name: str) -> str:
        """The resident copy of paged state tensor `name` for the op at the current position: the one
        its group read, or a new StateRead (at the first use of a group, the group's copy, kept until
        the group's last use; elsewhere, for a recompute, a transient copy freed after it)."""
        live = self.state_live.get(name)
        if live is not None:
            return live[0]
        k = self._reads[name] = self._reads.get(name, 0) + 1
        copy = state_read_name(name, k)
        self.steps.append(Step(StepKind.STATE_READ, None, name, (), (copy,)))
        self.origin[copy] = name
        end = self.group_end.get((name, self.position))
        if end is not None:
            self.state_live[name] = (copy, end)
        return copy

    def after_state_use(self, op) -> None:
        """After a compute op: write back the paged state its update changed, end the groups it closes."""
        for name in [x for x in op.inputs if x in self.state_live]:
            copy, end = self.state_live[name]
            s = self.state[name]
            if s.update == op.index:
                token = state_token_name(name)
                self.steps.append(Step(StepKind.STATE_WRITE, None, name, (copy, op.outputs[0]), (token,)))
                self.origin[token] = token
            if end <= op.index:
                del self.state_live[name]

    def resolve(self, name: str) -> str:
        """The version of `name` to read at the current position: the original while it is still
        resident (up to its last reader before the gap), else the regenerated one."""
        if not name:
            return name
        root = self.g.storage_root(name)
        held = self.held.get(root)
        if held is None or held.fb is None or self.position <= held.lf or self.decision(name) is Decision.KEEP:
            return name
        if name != root and self.g.tensors[name].producer >= held.fb:
            return name  # a view made after the regeneration, from the regenerated tensor
        return self.materialize(name, register=True)

    def materialize(self, name: str, *, register: bool) -> str:
        if name in self.regenerated:
            return self.regenerated[name]
        root = self.g.storage_root(name)
        decision = self.decision(name)
        if name == root and decision is Decision.PAGE:
            k = self._restores[name] = self._restores.get(name, 0) + 1
            new = restored_name(name, k)
            self.steps.append(Step(StepKind.PAGE_IN, None, name, (handle_name(name),), (new,)))
            self.origin[new] = name
            self.regenerated[name] = new
            return new
        producer = self.g.tensors[name].producer
        if producer is None:
            raise InternalError(f"cannot regenerate {name!r}: it has no producer")
        op = self.g.ops[producer]
        reads = []
        for x in op.inputs:
            if x in self.state:
                reads.append(self.read_state(x))
            elif not x or self.g.tensors[x].kind.is_persistent:
                reads.append(x)
            elif self.g.storage_root(x) in self.held:
                reads.append(self.resolve(x))
            elif self.g.tensors[x].kind is TensorKind.ACTIVATION:  # a forward intermediate nobody saved
                reads.append(self.materialize(x, register=False))
            else:  # a gradient no decision is about: still resident (the problem keeps it alive)
                reads.append(x)
        writes = []
        for out in op.outputs:
            k = self._counter.get(out, 0) + 1
            self._counter[out] = k
            writes.append(recompute_name(out, k))
            self.origin[writes[-1]] = out
        self.steps.append(Step(StepKind.RECOMPUTE, op.index, None, tuple(reads), tuple(writes)))
        new = writes[op.outputs.index(name)]
        if register:
            self.regenerated[name] = new
            # one run regenerates every recomputed output of the op (MaxPool's mask, BN's statistics)
            for out, w in zip(op.outputs, writes):
                held = self.held.get(out)
                if (held is not None and out not in self.regenerated and self.position > held.lf
                        and self.decisions.get(out) is Decision.RECOMPUTE):
                    self.regenerated[out] = w
        return new


def build_steps(graph: TrainGraph, decisions: dict[str, Decision], regenerate_at: dict[str, int] | None = None,
                repage_at: dict[str, list[int]] | None = None) -> tuple[list[Step], dict[str, str]]:
    """The step list for `decisions` (with regenerations placed ahead of need and page-ins again, see
    the module docstring) and the map versioned name -> original tensor name."""
    builder = StepBuilder(graph, decisions, regenerate_at, repage_at)
    return builder.build(), builder.origin


# ---------------------------------------------------------------------------------------------------
# Simulation


@dataclass
class StepCosts:
    """Time and energy of each kind of step, supplied by the cost model."""

    op_time_s: list[float]
    op_energy_j: list[float]
    page_out: callable = None  # nbytes -> (time_s, energy_j)
    page_in: callable = None


@dataclass
class SimResult:
    # peak above the fixed state; in the fused mode the parameters and moments are not fixed state
    # (the schedule may page them): this peak counts them, resident or paged in
    peak_bytes: int
    peak_step: int
    live_bytes: list[int]  # during each step: live tensors, that step's new outputs and its kernel workspace
    fixed_bytes: int
    time_s: float = 0.0
    energy_j: float = 0.0
    recompute_ops: int = 0
    paged_bytes: int = 0
    max_flash_bytes: int = 0
    before_bytes: list[int] = field(default_factory=list)  # live tensors as each step starts (before its writes)
    state_read_bytes: int = 0  # fused mode: paged parameters and moments read from flash (StateRead), per step
    state_write_bytes: int = 0  # ... and written back (StateWrite), per step
    # per memory class (MEMORY_CLASSES), during each step: the part of live_bytes it holds
    class_bytes: dict[str, list[int]] = field(default_factory=dict)
    resident_state_bytes: int = 0  # fused mode: parameters and moments resident for the whole step (in peak_bytes)

    @property
    def total_peak_bytes(self) -> int:
        return self.fixed_bytes + self.peak_bytes


# What the RAM of a step is made of (report.json's memory_classes, poetc.plots): the parameters (frozen
# ones included) and the optimizer moments that the fused mode counts in the step, gradients (outputs of
# backward ops), activations (forward outputs), and the rest (kernel workspace, Spill handles)
MEMORY_CLASSES = ("parameters", "moments", "gradients", "activations", "other")


def memory_class(graph: TrainGraph, name: str, roles: dict[str, str]) -> str:
    """The MEMORY_CLASSES entry of original tensor `name`; `roles`: state tensor -> StateTensor.role."""
    if name in roles:
        return "moments" if roles[name] == "moment" else "parameters"
    t = graph.tensors.get(name)
    if t is None:
        return "other"
    if t.kind is TensorKind.PARAMETER:
        return "parameters"
    if t.kind is TensorKind.GRADIENT:
        return "gradients"
    if t.kind is TensorKind.ACTIVATION:
        return "activations"
    return "other"


def io_by_class(graph: TrainGraph, steps: list[Step], costs: StepCosts | None) -> dict[str, dict]:
    """Flash traffic of one step per memory class: bytes read (Restore, StateRead) and written (Spill,
    StateWrite), their time and energy (the costs the simulator charges)."""
    roles = {st.name: st.role for st in state_tensors(graph)}
    out = {c: {"flash_read_bytes": 0, "flash_write_bytes": 0, "io_time_s": 0.0, "io_energy_j": 0.0}
           for c in MEMORY_CLASSES}
    for step in steps:
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            continue
        nbytes = graph.tensors[step.tensor].nbytes
        entry = out[memory_class(graph, step.tensor, roles)]
        written = step.kind in (StepKind.PAGE_OUT, StepKind.STATE_WRITE)
        entry["flash_write_bytes" if written else "flash_read_bytes"] += nbytes
        if costs is not None:
            dt, de = (costs.page_out if written else costs.page_in)(nbytes)
            entry["io_time_s"] += dt
            entry["io_energy_j"] += de
    return out


class ScheduleError(InternalError):
    """A step list that reads a tensor that is not resident: a poetc bug."""


def fixed_state_bytes(graph: TrainGraph) -> dict[str, int]:
    """Memory that exists for the whole step, by category. In the fused optimizer mode there are no
    gradient buffers (each gradient dies at its parameter's update, inside the step, where the
    simulator counts it) and the optimizer state is the moments, learning rate and step counter."""
    return {
        "parameters": graph.bytes_of_kind(TensorKind.PARAMETER),
        "gradient_buffers": graph.bytes_of_kind(TensorKind.GRAD_BUFFER),
        "optimizer_state": graph.optimizer_state_bytes,
        "inputs": graph.bytes_of_kind(TensorKind.INPUT),
        "constants": graph.bytes_of_kind(TensorKind.CONSTANT),
    }


def simulate_keep_all(graph: TrainGraph, costs: StepCosts | None = None) -> SimResult:
    """Every decidable tensor kept: one step per op, in execution order. The one keep-all simulation
    (the solver's Problem holds its result; see poetc.plan)."""
    steps, origin = build_steps(graph, {})
    return simulate(graph, steps, origin, costs)


def _in_place(graph: TrainGraph, step: Step, out, i: int) -> bool:
    """Whether the op of `step` is one ONNX Runtime may run in place on its first input (INPLACE_OPS,
    same dtype); the buffer condition is checked by the caller."""
    if step.op is None or step.kind not in (StepKind.COMPUTE, StepKind.RECOMPUTE) or not step.reads or not step.reads[0]:
        return False
    op = graph.ops[step.op]
    return op.domain in ("", "ai.onnx") and op.op_type in INPLACE_OPS and out.alias_of is None


def simulate(graph: TrainGraph, steps: list[Step], origin: dict[str, str] | None = None,
             costs: StepCosts | None = None) -> SimResult:
    """Replay `steps` under ONNX Runtime's allocation rules; raise ScheduleError on an invalid read."""
    origin = origin or {}
    tensors = graph.tensors

    def original(name: str) -> str:
        return origin.get(name, name)

    def persistent(name: str) -> bool:  # a paged-in copy of a state tensor is not: its step allocates it
        t = tensors.get(name) if name not in origin else None
        return t is not None and t.kind.is_persistent

    last_read: dict[str, int] = {}
    last_page_in: dict[str, int] = {}  # the flash copy is dropped by a tensor's last Restore
    for i, step in enumerate(steps):
        for x in step.reads:
            if x:
                last_read[x] = i
        if step.kind is StepKind.PAGE_IN:
            last_page_in[step.tensor] = i
    outputs = {o.name for o in graph.model.graph.output}
    # storage: versioned name -> buffer id (its own name, or the buffer it aliases)
    buffer_of: dict[str, str] = {}
    buffer_bytes: dict[str, int] = {}
    buffer_users: dict[str, int] = {}
    peak, peak_step = 0, 0
    timeline: list[int] = []
    before: list[int] = []
    time_s = energy_j = 0.0
    recompute_ops = paged = flash = max_flash = 0
    update_op = {pos: name for name, pos in graph.parameter_updates().items()}  # fused optimizer mode
    updated: set[str] = set()
    # fused mode: the parameters and moments are counted here (not in the fixed state) so that the
    # schedule can page them: resident ones from the start to the end of the step, paged ones from
    # each StateRead to the last reader of its copy
    state = {st.name: st for st in state_tensors(graph)}
    roles = {name: st.role for name, st in state.items()}
    paged_state = {step.tensor for step in steps if step.kind is StepKind.STATE_READ}
    live = sum(st.nbytes for name, st in state.items() if name not in paged_state)
    class_live = dict.fromkeys(MEMORY_CLASSES, 0)
    buffer_class: dict[str, str] = {}
    for name, st in state.items():
        if name not in paged_state:
            class_live[memory_class(graph, name, roles)] += st.nbytes
    class_timeline: dict[str, list[int]] = {c: [] for c in MEMORY_CLASSES}
    tokens: set[str] = set()
    state_read = state_written = 0
    writes_state = sum(1 for step in steps if step.kind is StepKind.STATE_WRITE)  # tokens: graph outputs
    frame = frame_bytes(graph_values(graph, steps), graph_inputs(graph, steps),
                        len(graph.model.graph.output) + writes_state, state_session=bool(paged_state))
    live += frame
    class_live["other"] += frame
    for i, step in enumerate(steps):
        for x in step.reads:
            if x and not persistent(x) and x not in buffer_of:
                raise ScheduleError(f"step {i} ({step.kind.value}) reads {x!r}, which is not resident")
            if x in updated:
                raise ScheduleError(f"step {i} ({step.kind.value}) reads parameter {x!r} after its in-graph update")
            if x in paged_state:
                raise ScheduleError(f"step {i} ({step.kind.value}) reads paged state {x!r} without a StateRead")
        if step.kind is StepKind.STATE_READ and step.tensor in updated:
            raise ScheduleError(f"step {i} reads paged parameter {step.tensor!r} after its update (StateWrite)")
        if step.kind is StepKind.COMPUTE and step.op in update_op:
            updated.add(update_op[step.op])
        before.append(live)
        for w in step.writes:
            t = tensors[original(w)] if original(w) in tensors else None
            src = None
            if step.op is not None and t is not None and t.alias_of is not None:
                op = graph.ops[step.op]
                src_versioned = step.reads[op.inputs.index(t.alias_of)]
                src = buffer_of.get(src_versioned)
            if src is None and w == step.writes[0] and t is not None and _in_place(graph, step, t, i):
                src = buffer_of.get(step.reads[0])
                if not (src is not None and buffer_users[src] == 1 and last_read.get(step.reads[0]) == i
                        and step.reads[0] not in outputs and buffer_bytes[src] == t.alloc_bytes):
                    src = None
            if src is not None:  # a view or an in-place output: its Tensor object is held to the step's end
                buffer_of[w] = src
                buffer_users[src] += 1
                live += TENSOR_OBJECT_BYTES
                class_live["other"] += TENSOR_OBJECT_BYTES
            elif t is not None and t.alias_of is not None and persistent(t.alias_of):
                buffer_of[w] = w  # alias of a persistent buffer (e.g. accumulator output): its object only
                buffer_bytes[w], buffer_users[w] = 0, 1
                buffer_class[w] = "other"
                live += TENSOR_OBJECT_BYTES
                class_live["other"] += TENSOR_OBJECT_BYTES
            elif step.kind is StepKind.STATE_WRITE:
                buffer_of[w], buffer_bytes[w], buffer_users[w] = w, STATE_TOKEN_BYTES, 1
                live += STATE_TOKEN_BYTES
                tokens.add(w)
                buffer_class[w] = "other"
                class_live["other"] += STATE_TOKEN_BYTES
            else:
                size = SPILL_HANDLE_BYTES if step.kind is StepKind.PAGE_OUT else (t.alloc_bytes if t else 0)
                buffer_of[w], buffer_bytes[w], buffer_users[w] = w, size, 1
                live += size
                cls = "other" if step.kind is StepKind.PAGE_OUT else memory_class(graph, original(w), roles)
                buffer_class[w] = cls
                class_live[cls] += size
        workspace = graph.ops[step.op].workspace_bytes if step.op is not None else 0
        during = live + workspace
        timeline.append(during)
        for c in MEMORY_CLASSES:
            class_timeline[c].append(class_live[c] + (workspace if c == "other" else 0))
        if during > peak:
            peak, peak_step = during, i
        # costs
        if costs is not None:
            if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
                time_s += costs.op_time_s[step.op]
                energy_j += costs.op_energy_j[step.op]
            else:
                nbytes = tensors[step.tensor].nbytes
                out = step.kind in (StepKind.PAGE_OUT, StepKind.STATE_WRITE)
                dt, de = (costs.page_out if out else costs.page_in)(nbytes)
                time_s += dt
                energy_j += de
        if step.kind is StepKind.RECOMPUTE:
            recompute_ops += 1
        elif step.kind is StepKind.PAGE_OUT:
            paged += tensors[step.tensor].nbytes
            flash += tensors[step.tensor].nbytes
            max_flash = max(max_flash, flash)
        elif step.kind is StepKind.PAGE_IN and last_page_in[step.tensor] == i:
            flash -= tensors[step.tensor].nbytes
        elif step.kind is StepKind.STATE_READ:
            state_read += tensors[step.tensor].nbytes
        elif step.kind is StepKind.STATE_WRITE:
            state_written += tensors[step.tensor].nbytes
        # frees: reads whose last reader is this step; a write nobody reads is held to the step's end
        # (ONNX Runtime releases a value after its last consumer only: BatchNormInternal's running
        # statistics, the original of a tensor regenerated before any read; docs/memory-model.md)
        for x in set(step.reads) | set(step.writes):
            if not x or x not in buffer_of or x in outputs or x in tokens or x not in last_read:
                continue
            if last_read[x] <= i:
                buf = buffer_of.pop(x)
                buffer_users[buf] -= 1
                if buffer_users[buf] == 0:
                    class_live[buffer_class.pop(buf, "other")] -= buffer_bytes[buf]
                    live -= buffer_bytes.pop(buf)
                    del buffer_users[buf]
    fixed = sum(fixed_state_bytes(graph).values()) - sum(st.nbytes for st in state.values())
    return SimResult(peak, peak_step, timeline, fixed, time_s, energy_j, recompute_ops, paged, max_flash, before,
                     state_read, state_written, class_timeline,
                     sum(st.nbytes for name, st in state.items() if name not in paged_state))


# ---------------------------------------------------------------------------------------------------
# The schedule as a document


@dataclass
class Schedule:
    """Decisions plus provenance. `steps` is derived from the decisions by `build_steps`."""

    decisions: dict[str, Decision]
    strategy: str
    graph_fingerprint: str
    steps: list[Step] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    solver: dict = field(default_factory=dict)  # status, gap, bound, time, granularity
    regenerate_at: dict[str, int] = field(default_factory=dict)  # tensor -> position, ahead of its need
    repage_at: dict[str, list[int]] = field(default_factory=dict)  # PAGE tensor -> readers it is paged in again for

    @classmethod
    def from_decisions(cls, graph: TrainGraph, decisions: dict[str, Decision], strategy: str,
                       solver: dict | None = None, regenerate_at: dict[str, int] | None = None,
                       repage_at: dict[str, list[int]] | None = None) -> "Schedule":
        decisions = {k: v for k, v in sorted(decisions.items()) if v is not Decision.KEEP}
        regenerate_at = {k: p for k, p in sorted((regenerate_at or {}).items()) if k in decisions}
        repage_at = {k: sorted(ps) for k, ps in sorted((repage_at or {}).items()) if ps}
        steps, origin = build_steps(graph, decisions, regenerate_at, repage_at)
        return cls(decisions, strategy, graph_fingerprint(graph), steps, origin, solver or {}, regenerate_at,
                   repage_at)

    def counts(self) -> dict[str, int]:
        state = {s.tensor for s in self.steps if s.kind is StepKind.STATE_READ}
        out = {d.value: 0 for d in Decision}
        for name, d in self.decisions.items():
            if name not in state:
                out[d.value] += 1
        out["page_in_again"] = sum(len(ps) for ps in self.repage_at.values())
        if state:  # fused mode: parameters and moments read from flash (StateRead)
            out["paged_state"] = len(state)
        return out

    def to_json(self) -> dict:
        return {
            "format": "poetc-schedule/1",
            "strategy": self.strategy,
            "graph_fingerprint": self.graph_fingerprint,
            "decisions": {k: v.value for k, v in sorted(self.decisions.items())},
            "regenerate_at": dict(sorted(self.regenerate_at.items())),
            "repage_at": dict(sorted(self.repage_at.items())),
            "steps": [s.to_json() for s in self.steps],
            "solver": self.solver,
        }

    def compact_encoding(self, graph: TrainGraph) -> bytes:
        """The device-side encoding, little-endian: u32 count of decidable tensors, their decisions at
        2 bits each (producer order, packed), then u16 count of regenerations ahead of need and, for
        each, u16 tensor index and u16 position, then u16 count of page-ins again and, for each, u16
        tensor index and u16 position of the reader it is for."""
        held = graph.decidable_tensors()
        codes = {Decision.KEEP: 0, Decision.RECOMPUTE: 1, Decision.PAGE: 2}
        bits = bytearray((len(held) + 3) // 4)
        for i, h in enumerate(held):
            bits[i // 4] |= codes[self.decisions.get(h.name, Decision.KEEP)] << (2 * (i % 4))
        index = {h.name: i for i, h in enumerate(held)}
        early = sorted((index[name], p) for name, p in self.regenerate_at.items())
        again = sorted((index[name], p) for name, ps in self.repage_at.items() for p in ps)
        tail = b"".join(len(pairs).to_bytes(2, "little") + b"".join(
            i.to_bytes(2, "little") + p.to_bytes(2, "little") for i, p in pairs) for pairs in (early, again))
        return len(held).to_bytes(4, "little") + bytes(bits) + tail


def graph_fingerprint(graph: TrainGraph) -> str:
    """sha256 over the ops in execution order (name, type, inputs, outputs): identifies the lowered
    graph a schedule or a cost file is for."""
    h = hashlib.sha256()
    for op in graph.ops:
        h.update(json.dumps([op.name, op.qualified_type, op.inputs, op.outputs]).encode())
    return h.hexdigest()
