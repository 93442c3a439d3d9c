"""TrainGraph: the training step as ops in execution order and the tensors between them.

A TrainGraph is lowered from an ONNX Runtime training model (see `lower.py`). Ops keep the file order
of the training model, which is the order ONNX Runtime executes under poetc's runtime contract
(PRIORITY_BASED, ORT_DISABLE_ALL). Tensors carry concrete shapes, dtypes and byte sizes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import onnx


class Role(str, enum.Enum):
    """What an op does in the training step."""

    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    ACCUMULATE = "accumulate"  # InPlaceAccumulator: adds a gradient into its persistent buffer
    UPDATE = "update"  # fused optimizer mode: a parameter's update (or the step counter) in place (ir/fused.py)


class TensorKind(str, enum.Enum):
    """Where a tensor lives and who owns it."""

    INPUT = "input"  # user data fed each step (and the lazy_reset_grad flag)
    PARAMETER = "parameter"  # model weights, owned by the checkpoint state
    GRAD_BUFFER = "grad_buffer"  # persistent gradient accumulation buffers
    CONSTANT = "constant"  # initializers of the training graph
    ACTIVATION = "activation"  # produced by forward or loss ops
    GRADIENT = "gradient"  # produced by backward ops (gradients and their temporaries)
    OPTIMIZER_STATE = "optimizer_state"  # fused optimizer mode: moments, learning rate, step (checkpoint state)

    @property
    def is_persistent(self) -> bool:
        """Persistent tensors exist before the step starts and are not freed by it."""
        return self in (TensorKind.INPUT, TensorKind.PARAMETER, TensorKind.GRAD_BUFFER, TensorKind.CONSTANT,
                        TensorKind.OPTIMIZER_STATE)


# ONNX elem type -> bytes per element. Sub-byte and string types are rejected by lowering.
DTYPE_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.UINT16: 2, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}
DTYPE_NAMES = {v: onnx.TensorProto.DataType.Name(v).lower() for v in DTYPE_BYTES}
_PROFILE_DTYPES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                   "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
                   "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32,
                   "int16": onnx.TensorProto.INT16, "int8": onnx.TensorProto.INT8,
                   "uint8": onnx.TensorProto.UINT8, "uint16": onnx.TensorProto.UINT16,
                   "uint32": onnx.TensorProto.UINT32, "uint64": onnx.TensorProto.UINT64,
                   "bool": onnx.TensorProto.BOOL}


def dtype_from_profile_name(name: str) -> int | None:
    return _PROFILE_DTYPES.get(name)


def tensor_nbytes(shape: tuple[int, ...], dtype: int) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype] if shape else DTYPE_BYTES[dtype]


# ONNX Runtime's CPU allocator asks for 64-byte aligned blocks; glibc serves blocks from the mmap
# threshold up (the measurement worker sets it to 64 KiB) as whole pages, with the alignment slack and
# chunk header on top. Measured: two 4 MiB tensors take 8 KiB more than their data.
PAGE_BYTES = 4096
MMAP_THRESHOLD_BYTES = 65536
ALLOCATION_SLACK_BYTES = 96
# Every tensor ONNX Runtime creates during a step has a Tensor object on the heap: a 200 B and a 40 B
# block (usable sizes), allocated with the tensor. An owning tensor's object is freed with its buffer;
# a view's (alias op) or an in-place output's is held until the step ends (poetc.schedule.simulate).
# Measured with tools/memtrace.py (docs/memory-model.md, "per-step bookkeeping").
TENSOR_OBJECT_BYTES = 240


def data_block_bytes(nbytes: int) -> int:
    """Heap the data buffer of `nbytes` takes: whole pages from the mmap threshold up, else glibc's
    usable size of a 64-byte aligned block (16-byte granules plus an 8-byte header; measured: 64 -> 72,
    480 -> 488, 18,840 -> 18,856)."""
    if nbytes >= MMAP_THRESHOLD_BYTES:
        return -(-(nbytes + ALLOCATION_SLACK_BYTES) // PAGE_BYTES) * PAGE_BYTES
    return -(-nbytes // 16) * 16 + 8 if nbytes > 0 else 0


def allocation_bytes(nbytes: int) -> int:
    """Heap a tensor of `nbytes` occupies under the runtime contract (no arena): its data buffer and
    its Tensor object."""
    return data_block_bytes(nbytes) + TENSOR_OBJECT_BYTES


# Ops whose output shares its input's buffer in ONNX Runtime's CPU kernels (declared `Alias`): the
# output costs no new memory and keeps the input's buffer alive while it lives.
ALIAS_OPS = {("", "Reshape"), ("", "Identity"), ("", "Squeeze"), ("", "Unsqueeze"), ("", "Flatten"),
             ("com.microsoft", "ExpandDims")}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int
    nbytes: int
    kind: TensorKind
    producer: int | None = None  # op index
    consumers: list[int] = field(default_factory=list)
    is_graph_output: bool = False
    alias_of: str | None = None  # the tensor whose buffer this one shares

    @property
    def alloc_bytes(self) -> int:
        """Heap its buffer takes (see allocation_bytes); memory accounting uses this, paging nbytes."""
        return allocation_bytes(self.nbytes)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))


@dataclass
class Op:
    index: int
    name: str
    op_type: str
    domain: str
    inputs: list[str]  # "" for an omitted optional input
    outputs: list[str]
    role: Role
    host_time_s: float | None = None  # measured by the shape probe on this machine, if run
    workspace_bytes: int = 0  # scratch the ORT kernel allocates while it runs (poetc.runtime.workspace)

    @property
    def qualified_type(self) -> str:
        return self.op_type if self.domain in ("", "ai.onnx") else f"{self.domain}.{self.op_type}"


# Smaller gradients (shapes, per-channel sums), or gaps whose ops allocate less, cannot move a peak
# by more than this and would only add stages and variables (see TrainGraph.decidable_tensors).
MIN_GRADIENT_BYTES = 1024


@dataclass(frozen=True)
class Held:
    """A tensor a schedule decides about: resident over [prod, lf], droppable until fb (None: nothing
    to drop), resident again from fb to lb (its last reader)."""

    name: str
    prod: int
    lf: int
    fb: int | None
    lb: int
    gradient: bool


@dataclass
class TrainGraph:
    """The training step. `ops` are in execution order; `tensors` maps name -> Tensor."""

    ops: list[Op]
    tensors: dict[str, Tensor]
    loss_output: str
    model: onnx.ModelProto  # the training model the graph was lowered from (shapes filled in)
    parameter_names: list[str]
    frozen_parameter_names: list[str] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    user_inputs: list[str] = field(default_factory=list)

    # ---- queries -------------------------------------------------------------------------------
    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def ops_with_role(self, role: Role) -> list[Op]:
        return [op for op in self.ops if op.role is role]

    def tensors_of_kind(self, kind: TensorKind) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.kind is kind]

    def bytes_of_kind(self, kind: TensorKind) -> int:
        return sum(t.nbytes for t in self.tensors_of_kind(kind))

    def storage_root(self, name: str) -> str:
        """The tensor owning the buffer `name` lives in (follows Alias chains)."""
        while self.tensors[name].alias_of is not None:
            name = self.tensors[name].alias_of
        return name

    def saved_activations(self) -> list[Tensor]:
        """Forward activations read by a backward op: the tensors a schedule may keep, recompute or page.

        Ordered by producer. Aliases are reported through their storage root, once.
        """
        seen: dict[str, Tensor] = {}
        for op in self.ops:
            if op.role is not Role.BACKWARD:
                continue
            for name in op.inputs:
                if not name:
                    continue
                root = self.tensors[self.storage_root(name)]
                if root.kind is TensorKind.ACTIVATION and root.name not in seen:
                    seen[root.name] = root
        return sorted(seen.values(), key=lambda t: (t.producer, t.name))

    def decidable_tensors(self) -> list["Held"]:
        """Every tensor a schedule decides about (keep, recompute, page), with where it may be dropped.

        - A saved activation (see saved_activations) may be dropped after its last forward reader and
          regenerated before its next (backward) reader; one whose backward readers all come earlier
          (a Shape in the backward pass that ORT places in the forward) has nothing to drop: gap None.
        - A gradient (an output of a backward op, of at least MIN_GRADIENT_BYTES) may be dropped over
          one gap between two of its readers (or its producer and first reader): the one whose ops
          allocate the most, if that is at least MIN_GRADIENT_BYTES. The gradient a residual branch
          point keeps across the backward pass of the branch, for instance; not one whose readers
          are separated only by in-place accumulators.
        Aliases are reported through their storage root, once; readers include the aliases' readers.
        Ordered by producer.
        """
        members: dict[str, list[str]] = {}
        for name in self.tensors:
            members.setdefault(self.storage_root(name), []).append(name)

        def readers(root: str) -> list[int]:
            return sorted({c for name in members[root] for c in self.tensors[name].consumers})

        # what each op allocates while it runs. Memory anywhere in a gap is at most the memory at its
        # start (which holds the gradient whatever the decision) plus what the ops inside allocate:
        # over a gap of accumulators (in-place) and views, dropping the gradient cannot lower a peak
        allocates = [op.workspace_bytes + sum(self.tensors[o].alloc_bytes for o in op.outputs
                                              if o and self.tensors[o].alias_of is None) for op in self.ops]
        out: list[Held] = []
        for t in self.saved_activations():
            r = readers(t.name)
            lf = max((c for c in r if self.ops[c].role in (Role.FORWARD, Role.LOSS)), default=t.producer)
            fb = next((c for c in r if c > lf), None)
            out.append(Held(t.name, t.producer, lf, fb, r[-1], gradient=False))
        for t in self.tensors.values():
            if (t.kind is not TensorKind.GRADIENT or t.alias_of is not None or t.producer is None
                    or self.ops[t.producer].role is not Role.BACKWARD):
                continue
            at = [t.producer] + readers(t.name)
            if len(at) < 2 or t.nbytes < MIN_GRADIENT_BYTES:
                continue
            inside = [sum(allocates[at[k] + 1: at[k + 1]]) for k in range(len(at) - 1)]
            j = max(range(len(at) - 1), key=lambda k: (inside[k], -k))
            if inside[j] >= MIN_GRADIENT_BYTES:
                out.append(Held(t.name, t.producer, at[j], at[j + 1], at[-1], gradient=True))
        return sorted(out, key=lambda h: (h.prod, h.name))

    def parameter_updates(self) -> dict[str, int]:
        """Fused optimizer mode: parameter -> position of the op that updates it in place (empty when
        the optimizer runs after the step). No op may read the parameter after that position."""
        return {op.inputs[0]: op.index for op in self.ops
                if op.role is Role.UPDATE and op.inputs and op.inputs[0] in self.tensors
                and self.tensors[op.inputs[0]].kind is TensorKind.PARAMETER}

    @property
    def optimizer_mode(self) -> str:
        """"fused" when the parameter updates run inside the step, else "unfused"."""
        return "fused" if any(op.role is Role.UPDATE for op in self.ops) else "unfused"

    def op_counts_by_role(self) -> dict[str, int]:
        counts = {role.value: 0 for role in Role}
        for op in self.ops:
            counts[op.role.value] += 1
        return counts
