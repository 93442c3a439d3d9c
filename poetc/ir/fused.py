"""Fused optimizer mode: each parameter's update runs inside the training step, in place.

`fuse_optimizer` turns a lowered (unfused) TrainGraph into one in which
- the gradient accumulators (InPlaceAccumulatorV2) and their persistent buffers are gone;
- each trainable parameter p is updated by one `poet.AdamWUpdate` / `poet.SGDUpdate` op (the native
  op library, update_ops.c: ONNX Runtime's optimizer arithmetic, bit for bit) placed right after the
  later of p's gradient producer and p's last reader, and reading, besides p, its gradient, its moments,
  the learning rate and the step count, one output of every reader of the old p that is not already
  an ancestor of the update (explicit data dependencies, not only node order); that output is the
  reader's own when it stays alive until the update anyway, else a `Shape` of it made right after the
  reader (a few bytes), so no tensor lives longer for a dependency;
- one `poet.StepCount` op before the first update adds 1 to the step counter in place;
- the moments, learning rate and step counter are graph inputs of kind OPTIMIZER_STATE: with the
  parameters, non-trainable checkpoint state (`write_fused_checkpoint`), so ONNX Runtime's own `Module`
  (no `Optimizer`) binds the state's own buffers and the in-place updates persist across steps.
The gradient of p then dies at p's update. A recompute must never read an updated parameter: the
problem (solver/problem.py) refuses such recomputes, the simulator (schedule.py) rejects such reads.

Names: the moments of p are `p__poet_m1`, `p__poet_m2`; the learning rate `__poet_learning_rate`,
the step counter `__poet_step` (every optimizer-state name contains `__poet_`).

Sliced updates (`slices={p: k}`, AdamW only): p is updated by k `poet.AdamWUpdate` ops in a row, the
i-th updating elements [begin_i, end_i) of p in place (attributes `begin`, `end`: row ranges of p's
first dimension, or element ranges when p has fewer rows than k) with its own moment slices
`p__poet_m1__s<i>`, `p__poet_m2__s<i>` (shape: the rows of the range). The update is elementwise, so
this is bitwise the whole update; the moment slices are independent state tensors (only ever read at
their own update), which the schedule may keep or page one by one: the update's working set is p, its
gradient and 2/k of the moments instead of all of them. Slice i > 0 takes slice i-1's flag as its
dependency; the first carries the dependencies on p's readers. Update op `p__poet_update__s<i>`, flag
`p__poet_updated__s<i>`; the last flag says p is fully updated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import UnsupportedModelError
from .graph import ALIAS_OPS, Op, Role, Tensor, TensorKind, TrainGraph, tensor_nbytes

STATE_MARK = "__poet_"
LEARNING_RATE = "__poet_learning_rate"
STEP = "__poet_step"
POET_DOMAIN = "poet"
DEFAULT_LEARNING_RATE = 1e-3  # what onnxruntime.training.api.Optimizer starts with

_ADAMW_ATTRIBUTES = ("alpha", "beta", "epsilon", "weight_decay", "correct_bias", "adam_mode")


def moment_names(param: str) -> tuple[str, str]:
    return f"{param}{STATE_MARK}m1", f"{param}{STATE_MARK}m2"


def is_optimizer_state(name: str) -> bool:
    return STATE_MARK in name


SLICE_MARK = "__s"


def moment_slice_name(moment: str, i: int) -> str:
    """The i-th slice of moment `moment` (a sliced update, see the module docstring)."""
    return f"{moment}{SLICE_MARK}{i}"


def slice_parent(name: str) -> str:
    """The whole moment a moment slice belongs to ("" when `name` is not a moment slice)."""
    head, sep, tail = name.rpartition(SLICE_MARK)
    return head if sep and tail.isdigit() and STATE_MARK in head else ""


def slice_ranges(shape: tuple[int, ...], k: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """k contiguous ranges covering a tensor of `shape`: (begin, end, slice shape) in elements; whole
    rows of the first dimension when it has at least k rows (as equal as possible, the first ones one
    row longer), else equal element ranges of the flattened tensor."""
    n = int(np.prod(shape)) if shape else 1
    rows = shape[0] if shape else 1
    per_row = n // rows if rows else 0
    units, unit, rest = (rows, per_row, tuple(shape[1:])) if rows >= k else (n, 1, ())
    if k < 1 or units < k:
        raise ValueError(f"cannot cut {shape} into {k} ranges")
    out, start = [], 0
    for i in range(k):
        length = units // k + (1 if i < units % k else 0)
        out.append((start * unit, (start + length) * unit, (length,) + rest))
        start += length
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of an artifacts directory, as its optimizer_model.onnx configures it."""

    kind: str  # "adamw" | "sgd"
    attributes: dict = field(default_factory=dict)
    learning_rate: float = DEFAULT_LEARNING_RATE

    @property
    def moments(self) -> int:
        return 2 if self.kind == "adamw" else 0


def read_optimizer_spec(optimizer_model: onnx.ModelProto) -> OptimizerSpec:
    for node in optimizer_model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "AdamWOptimizer":
            if attrs.get("adam_mode", 0) != 1:
                raise UnsupportedModelError(
                    f"the optimizer model uses AdamW mode {attrs.get('adam_mode', 0)}; the fused optimizer "
                    f"reproduces mode 1 (what generate_artifacts writes)", hint="use --optimizer-mode unfused")
            return OptimizerSpec("adamw", {k: attrs[k] for k in _ADAMW_ATTRIBUTES if k in attrs})
        if node.op_type == "SGDOptimizerV2":
            return OptimizerSpec("sgd", {})
    types = sorted({n.op_type for n in optimizer_model.graph.node})
    raise UnsupportedModelError(f"the optimizer model holds no AdamWOptimizer or SGDOptimizerV2 ({', '.join(types)})",
                                hint="use --optimizer-mode unfused")


def _ancestors(ops: list[Op], tensors: dict[str, Tensor], start: int) -> set[int]:
    seen: set[int] = set()
    stack = [start]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for x in ops[i].inputs:
            if x and tensors[x].producer is not None:
                stack.append(tensors[x].producer)
    return seen


def parameter_views(graph: TrainGraph, param: str) -> list[str]:
    """`param` and every tensor that shares its buffer in ONNX Runtime (alias ops, transitively)."""
    views, stack = [param], [param]
    while stack:
        for c in graph.tensors[stack.pop()].consumers:
            op = graph.ops[c]
            if (op.domain, op.op_type) in ALIAS_OPS and op.outputs and op.inputs[0] in views:
                views.append(op.outputs[0])
                stack.append(op.outputs[0])
    return views


def fuse_optimizer(graph: TrainGraph, spec: OptimizerSpec, slices: dict[str, int] | None = None) -> TrainGraph:
    """The fused-mode TrainGraph (and its ONNX model) of an unfused one; see the module docstring.
    `slices`: parameter -> number of sliced updates (AdamW; absent or 1: one whole update)."""
    slices = {p: k for p, k in (slices or {}).items() if k > 1}
    if slices and spec.kind != "adamw":
        raise ValueError("sliced updates are for AdamW (SGD has no moments to slice)")
    accumulators = [op for op in graph.ops if op.role is Role.ACCUMULATE]
    grad_of: dict[str, str] = {}
    for op in accumulators:
        buffer, grad = op.inputs[0], op.inputs[1]
        param = next((p for p in graph.parameter_names if buffer == f"{p}_grad.accumulation.buffer"), None)
        if param is None:
            raise UnsupportedModelError(f"accumulator {op.name!r} adds into {buffer!r}, which belongs to no "
                                        f"trainable parameter", hint="use --optimizer-mode unfused")
        grad_of[param] = grad
    missing = [p for p in graph.parameter_names if p not in grad_of]
    if missing:
        raise UnsupportedModelError(f"trainable parameter(s) {missing[:3]} have no gradient accumulator in the "
                                    f"training graph", hint="use --optimizer-mode unfused")
    body = [op for op in graph.ops if op.role is not Role.ACCUMULATE]
    old_tensors = graph.tensors
    # positions in `body` (old op index -> body index) to place each update after
    body_index = {op.index: k for k, op in enumerate(body)}
    after: dict[int, list[str]] = {}
    for p in graph.parameter_names:
        g = grad_of[p]
        # readers of p and of its views: ONNX Runtime's Reshape/Unsqueeze/... of p share p's buffer, so
        # a reader of the view after the in-place update reads the new value (issue #15: corpus
        # resnet_sum's PRelu slope is Unsqueezed in the forward pass and read again in the backward pass)
        readers = [c for v in parameter_views(graph, p) for c in old_tensors[v].consumers
                   if graph.ops[c].role is not Role.ACCUMULATE]
        last = max(readers + [old_tensors[g].producer])
        after.setdefault(body_index[last], []).append(p)

    tensors: dict[str, Tensor] = {}
    for name, t in old_tensors.items():
        if t.kind is TensorKind.GRAD_BUFFER or (t.producer is not None and graph.ops[t.producer].role is Role.ACCUMULATE):
            continue
        tensors[name] = copy.copy(t)
        tensors[name].consumers = []

    def state(name: str, shape: tuple[int, ...], dtype: int = TensorProto.FLOAT) -> str:
        tensors[name] = Tensor(name, shape, dtype, tensor_nbytes(shape, dtype), TensorKind.OPTIMIZER_STATE)
        return name

    lr = state(LEARNING_RATE, (1,))
    step = state(STEP, (1,)) if spec.kind == "adamw" else None
    ranges = {p: slice_ranges(old_tensors[p].shape, k) for p, k in slices.items()}
    for p in graph.parameter_names:
        for m in moment_names(p)[:spec.moments]:
            if p in ranges:
                for i, (_, _, shape) in enumerate(ranges[p]):
                    state(moment_slice_name(m, i), shape, old_tensors[p].dtype)
            else:
                state(m, old_tensors[p].shape, old_tensors[p].dtype)

    ops: list[Op] = []
    placed_step = False
    # old op readers of each parameter, for the dependencies (indices into `body`)
    for k, op in enumerate(body):
        ops.append(Op(len(ops), op.name, op.op_type, op.domain, list(op.inputs), list(op.outputs), op.role,
                      op.host_time_s, op.workspace_bytes))
        for p in after.get(k, []):
            if step is not None and not placed_step:
                ops.append(Op(len(ops), f"{STEP}__count", "StepCount", POET_DOMAIN, [step], [f"{STEP}__n"],
                              Role.UPDATE))
                tensors[f"{STEP}__n"] = Tensor(f"{STEP}__n", (1,), TensorProto.INT64, 8, TensorKind.GRADIENT,
                                               producer=len(ops) - 1)
                placed_step = True
            count = f"{STEP}__n" if step else None
            parts = ranges.get(p, [None])
            for i, part in enumerate(parts):
                u = _update_op(len(ops), p, grad_of[p], spec, lr, count,
                               None if part is None else (i, part[0], part[1]))
                if i:  # after the previous slice (which comes after every reader of the old p)
                    u.inputs.append(ops[-1].outputs[0])
                ops.append(u)
                flag = u.outputs[0]
                tensors[flag] = Tensor(flag, (1,), TensorProto.BOOL, 1, TensorKind.GRADIENT, producer=len(ops) - 1)
    _index(ops, tensors)
    _add_dependencies(ops, tensors)
    _index(ops, tensors)
    model = _fused_model(graph, ops, tensors, spec, ranges)
    state_bytes = sum(t.nbytes for t in tensors.values() if t.kind is TensorKind.OPTIMIZER_STATE)
    return TrainGraph(ops=ops, tensors=tensors, loss_output=graph.loss_output, model=model,
                      parameter_names=list(graph.parameter_names),
                      frozen_parameter_names=list(graph.frozen_parameter_names),
                      optimizer_state_bytes=state_bytes, user_inputs=list(graph.user_inputs))


_UPDATE_FIXED_INPUTS = {"AdamWUpdate": 6, "SGDUpdate": 3}


def _update_op(index: int, param: str, grad: str, spec: OptimizerSpec, lr: str, count: str | None,
               part: tuple[int, int, int] | None = None) -> Op:
    """The update of `param`; `part` = (i, begin, end): its i-th sliced update."""
    suffix = "" if part is None else f"{SLICE_MARK}{part[0]}"
    if spec.kind == "adamw":
        m1, m2 = moment_names(param)
        if part is not None:
            m1, m2 = moment_slice_name(m1, part[0]), moment_slice_name(m2, part[0])
        inputs, op_type = [param, grad, m1, m2, lr, count], "AdamWUpdate"
    else:
        inputs, op_type = [param, grad, lr], "SGDUpdate"
    return Op(index, f"{param}{STATE_MARK}update{suffix}", op_type, POET_DOMAIN, inputs,
              [f"{param}{STATE_MARK}updated{suffix}"], Role.UPDATE)


def _index(ops: list[Op], tensors: dict[str, Tensor]) -> None:
    """Renumber ops and recompute producers and consumers."""
    for t in tensors.values():
        t.consumers = []
    for i, op in enumerate(ops):
        op.index = i
        for o in op.outputs:
            tensors[o].producer = i
        for x in op.inputs:
            if x:
                tensors[x].consumers.append(i)


def _add_dependencies(ops: list[Op], tensors: dict[str, Tensor]) -> None:
    """Give each update an input from every reader of its parameter that is not already its ancestor
    (the reader's output itself when it lives until the update anyway, else a Shape of it made right
    after the reader). Ops are inserted, so indices are refreshed by the caller."""
    inserts: dict[int, list[Op]] = {}  # reader index -> Shape ops right after it
    for u in [op for op in ops if op.role is Role.UPDATE and op.op_type != "StepCount"]:
        param = u.inputs[0]
        ancestors = _ancestors(ops, tensors, u.index)
        deps: list[str] = []
        for r in sorted(tensors[param].consumers, reverse=True):
            if r == u.index or r in ancestors or ops[r].role is Role.UPDATE:  # (its other slices: chained)
                continue
            out = ops[r].outputs[0]
            if max(tensors[out].consumers, default=r) >= u.index:
                deps.append(out)
            else:
                token = f"{param}{STATE_MARK}after_{ops[r].name}"
                tensors[token] = Tensor(token, (len(tensors[out].shape),), TensorProto.INT64,
                                        8 * len(tensors[out].shape), TensorKind.GRADIENT)
                inserts.setdefault(r, []).append(Op(0, token, "Shape", "", [out], [token], Role.BACKWARD))
                deps.append(token)
            ancestors |= _ancestors(ops, tensors, r)
        u.inputs.extend(deps)
        if len(u.inputs) == _UPDATE_FIXED_INPUTS[u.op_type]:  # at least one dependency: the gradient again
            u.inputs.append(u.inputs[1])
    if inserts:
        ordered: list[Op] = []
        for op in ops:
            ordered.append(op)
            ordered.extend(inserts.get(op.index, []))
        ops[:] = ordered


def _fused_model(graph: TrainGraph, ops: list[Op], tensors: dict[str, Tensor], spec: OptimizerSpec,
                 ranges: dict[str, list]) -> onnx.ModelProto:
    src = graph.model
    model = onnx.ModelProto()
    model.CopyFrom(src)
    g = model.graph
    by_name = {n.name: n for n in src.graph.node}
    nodes = [n for n in src.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")]
    for op in ops:
        if op.name in by_name:
            nodes.append(by_name[op.name])
            continue
        attrs = dict(spec.attributes) if op.op_type == "AdamWUpdate" else {}
        if op.op_type == "AdamWUpdate" and op.inputs[0] in ranges:
            i = int(op.name.rpartition(SLICE_MARK)[2])
            attrs["begin"], attrs["end"] = ranges[op.inputs[0]][i][:2]
        nodes.append(helper.make_node(op.op_type, op.inputs, op.outputs, name=op.name,
                                      domain=op.domain if op.domain else None, **attrs))
    del g.node[:]
    g.node.extend(nodes)
    keep_inputs = [vi for vi in src.graph.input if vi.name in tensors]
    del g.input[:]
    g.input.extend(keep_inputs)
    for t in tensors.values():
        if t.kind is TensorKind.OPTIMIZER_STATE:
            g.input.append(helper.make_tensor_value_info(t.name, t.dtype, list(t.shape)))
    outputs = [vi for vi in src.graph.output if vi.name in tensors]
    del g.output[:]
    g.output.extend(outputs)
    if all(o.domain != POET_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(POET_DOMAIN, 1))
    return model


def fused_state_arrays(parameters: dict[str, tuple[np.ndarray, bool]], graph: TrainGraph,
                       spec: OptimizerSpec) -> dict[str, np.ndarray]:
    """Initial values of the optimizer state: zero moments, the learning rate, a zero step count."""
    out = {LEARNING_RATE: np.array([spec.learning_rate], np.float32)}
    if spec.kind == "adamw":
        out[STEP] = np.zeros([1], np.float32)
    for p in graph.parameter_names:
        for m in moment_names(p)[:spec.moments]:
            if m in graph.tensors:
                out[m] = np.zeros_like(parameters[p][0])
            else:  # sliced: its slices
                for name in moment_slices(graph, m):
                    t = graph.tensors[name]
                    out[name] = np.zeros(t.shape, parameters[p][0].dtype)
    return out


def moment_slices(graph: TrainGraph, moment: str) -> list[str]:
    """The slices of a sliced moment in order (empty when `moment` is whole or absent)."""
    out, i = [], 0
    while moment_slice_name(moment, i) in graph.tensors:
        out.append(moment_slice_name(moment, i))
        i += 1
    return out


def update_slices(graph: TrainGraph) -> dict[str, int]:
    """Parameter -> number of its sliced updates (only parameters updated in more than one slice)."""
    count: dict[str, int] = {}
    for op in graph.ops:
        if op.role is Role.UPDATE and op.op_type == "AdamWUpdate":
            count[op.inputs[0]] = count.get(op.inputs[0], 0) + 1
    return {p: k for p, k in count.items() if k > 1}


def write_fused_checkpoint(parameters: dict[str, tuple[np.ndarray, bool]], graph: TrainGraph,
                           spec: OptimizerSpec, dest: Path) -> None:
    """An ONNX Runtime checkpoint holding the parameters and the optimizer state, all non-trainable
    (Module then binds them as graph inputs, the state's own buffers)."""
    from onnxruntime.training.onnxblock import save_checkpoint  # imports torch: keep it local

    values = {name: value for name, (value, _) in parameters.items()}
    values.update(fused_state_arrays(parameters, graph, spec))
    protos = [onnx.numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in values.items()]
    save_checkpoint(([], protos), str(dest))


# ---------------------------------------------------------------------------------------------------
# Paged state (issue #17): parameters and moments the schedule may keep on flash between their uses

# ops between two uses of a state tensor that allocate less than this (the update's dependency Shape
# tokens, the step counter) cannot move a peak: the two uses form one group (one read)
STATE_GROUP_SLACK_BYTES = 1024


@dataclass(frozen=True)
class StateTensor:
    """A parameter (trainable or frozen) or an AdamW moment of a fused-mode graph, as the schedule sees
    it. Resident, it is a graph input bound to the runtime's buffer for the whole step. Paged, it is
    read from flash (poet.StateRead) before each group of uses (`groups`: (first, last) positions) and
    dropped after the last use of the group; a trainable one is written (poet.StateWrite) right after
    its update (position `update`)."""

    name: str
    role: str  # "parameter" | "frozen" | "moment"
    nbytes: int
    alloc_bytes: int  # heap a paged-in copy occupies (allocation_bytes)
    uses: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]
    update: int | None  # position of the op that updates it in place (None: frozen)
    why_not_pageable: str = ""

    @property
    def pageable(self) -> bool:
        return not self.why_not_pageable

    @property
    def trainable(self) -> bool:
        return self.update is not None


def state_tensors(graph: TrainGraph) -> list[StateTensor]:
    """The parameters and moments of a fused-mode graph (empty for an unfused one), in name order of
    the parameters, each followed by its moments. See StateTensor."""
    if graph.optimizer_mode != "fused":
        return []
    updates = graph.parameter_updates()
    members: dict[str, list[str]] = {}
    for name in graph.tensors:
        members.setdefault(graph.storage_root(name), []).append(name)
    allocates = [op.workspace_bytes + sum(graph.tensors[o].alloc_bytes for o in op.outputs
                                          if o and graph.tensors[o].alias_of is None) for op in graph.ops]

    def make(name: str, role: str, update: int | None) -> StateTensor:
        t = graph.tensors[name]
        uses = tuple(sorted({c for m in members.get(name, [name]) for c in graph.tensors[m].consumers}))
        why = ""
        views = [m for m in members.get(name, [name]) if m != name]
        if views:
            why = f"it is read through a view ({views[0]!r}), which would need rebuilding after each read"
        elif not uses:
            why = "no op reads it"
        groups: list[tuple[int, int]] = []
        for u in uses:
            if groups and sum(allocates[groups[-1][1] + 1: u]) < STATE_GROUP_SLACK_BYTES:
                groups[-1] = (groups[-1][0], u)
            else:
                groups.append((u, u))
        return StateTensor(name, role, t.nbytes, t.alloc_bytes, uses, tuple(groups), update, why)

    # each moment (or moment slice) is updated by the update op that reads it
    moments: dict[str, list[tuple[str, int]]] = {}
    for op in graph.ops:
        if op.role is Role.UPDATE and op.op_type == "AdamWUpdate":
            moments.setdefault(op.inputs[0], []).extend((m, op.index) for m in op.inputs[2:4])
    out: list[StateTensor] = []
    trainable = set(graph.parameter_names)
    for p in sorted(n for n, t in graph.tensors.items() if t.kind is TensorKind.PARAMETER):
        if p in trainable:
            out.append(make(p, "parameter", updates.get(p)))
            for m, at in moments.get(p, []):
                out.append(make(m, "moment", at))
        else:
            out.append(make(p, "frozen", None))
    return out


def state_read_name(name: str, k: int) -> str:
    """The k-th paged-in copy of state tensor `name` within a step."""
    return f"{name}{STATE_MARK}read{k}"


def state_token_name(name: str) -> str:
    """The token output of the StateWrite of `name` (a graph output, so the node is not pruned)."""
    return f"{name}{STATE_MARK}written"


def state_directory_bytes(graph: TrainGraph) -> int:
    """Flash the state directory takes during a step of a fused-mode graph: two generations (the last
    committed one and the one being written) of every parameter and all optimizer state."""
    if graph.optimizer_mode != "fused":
        return 0
    return 2 * (graph.bytes_of_kind(TensorKind.PARAMETER) + graph.optimizer_state_bytes)
