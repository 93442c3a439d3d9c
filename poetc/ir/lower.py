"""Lowering: ONNX Runtime training artifacts -> TrainGraph.

Shapes: graph inputs and initializers carry their own; every node output's shape and dtype is read
from one probe run of the training model in ONNX Runtime (profiling on, ORT_DISABLE_ALL,
PRIORITY_BASED), which also yields each op's measured time on this machine. ONNX shape inference
cannot type ONNX Runtime's gradient ops (com.microsoft ReluGrad, ConvGrad, ...), the probe can.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputFileError, UnsupportedModelError
from .canonicalize import hoist_accumulators
from .graph import ALIAS_OPS, DTYPE_BYTES, Op, Role, Tensor, TensorKind, TrainGraph, dtype_from_profile_name, tensor_nbytes

log = logging.getLogger(__name__)

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
GRAD_BUFFER_SUFFIX = "_grad.accumulation.buffer"
ACCUMULATOR_OPS = {"InPlaceAccumulator", "InPlaceAccumulatorV2"}

# Optimizer state per trainable parameter, in multiples of the parameter's bytes.
OPTIMIZER_STATE_FACTORS = {"AdamWOptimizer": 2, "AdamOptimizer": 2, "SGDOptimizerV2": 0, "SGDOptimizer": 0}


@dataclass(frozen=True)
class ArtifactPaths:
    directory: Path

    @property
    def training_model(self) -> Path:
        return self.directory / "training_model.onnx"

    @property
    def eval_model(self) -> Path:
        return self.directory / "eval_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        return self.directory / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint"

    def check(self) -> None:
        missing = [f for f in ARTIFACT_FILES if not (self.directory / f).exists()]
        if missing:
            raise InputFileError(
                f"{self.directory} is not a complete training artifacts directory: missing {', '.join(missing)}",
                hint="pass a forward ONNX model with --loss instead, or a directory written by "
                "onnxruntime.training.artifacts.generate_artifacts",
            )


def read_checkpoint_parameters(path: Path) -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (value, requires_grad) from an ORT training checkpoint."""
    from onnxruntime.training.api import CheckpointState  # imports torch: keep it local

    state = CheckpointState.load_checkpoint(str(path))
    return {name: (np.array(p.data), bool(p.requires_grad)) for name, p in state.parameters}


def optimizer_state_factor(optimizer_model: onnx.ModelProto) -> int:
    for node in optimizer_model.graph.node:
        if node.op_type in OPTIMIZER_STATE_FACTORS:
            return OPTIMIZER_STATE_FACTORS[node.op_type]
    return 2  # unknown optimizer: assume Adam-like state, the common worst case


def ensure_unique_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique, stable name (profiling and passes address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}__{k}", k + 1
        node.name = name
        seen.add(name)


def _static_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    dims = value_info.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def probe_feeds(model: onnx.ModelProto, values: dict[str, np.ndarray] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """A value for every graph input: `values` where given, seeded probe data otherwise."""
    from ..runtime.profiling import probe_array

    values = values or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = _static_shape(vi)
        if shape is None:
            raise unresolved_dim_error(vi)
        feeds[vi.name] = values[vi.name] if vi.name in values else \
            probe_array(shape, vi.type.tensor_type.elem_type, rng)
    return feeds


def probe_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Run the training model once in ORT with profiling; return node name -> profile args + dur.

    The returned args hold `output_type_shape` (list of {dtype: shape}) and `dur` (microseconds).
    """
    from ..runtime.guard import ChildCrashed, run_guarded
    from ..runtime.profiling import profile_kernels

    try:
        return dict(run_guarded(profile_kernels, model, feeds, 1))
    except ChildCrashed as exc:
        raise UnsupportedModelError(
            f"ONNX Runtime crashed ({exc.cause}) running one training step of this model: a fault inside "
            f"onnxruntime-training 1.19.2 on one of the training graph's ops",
            hint="nothing was written. Try another --batch, --freeze the parameters that feed the layer you "
            "suspect, or export that layer differently (docs/corpus.md lists the ops poetc rewrites because "
            "ONNX Runtime cannot train them)") from exc
    except MemoryError as exc:
        raise UnsupportedModelError(
            f"this machine has not enough memory to run one training step at these input sizes ({exc})",
            hint="choose a smaller --batch") from exc
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        missing = re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'", str(exc))
        if missing:
            raise UnsupportedModelError(
                f"ONNX Runtime 1.19.2 has no CPU kernel for {missing.group(1)} (node {missing.group(2)!r}), which "
                f"the training graph needs", hint="replace the forward op it differentiates by one with a CPU "
                "gradient before export, or --freeze the parameters that feed it") from exc
        raise UnsupportedModelError(
            f"ONNX Runtime could not run the training graph: {str(exc).strip()[:600]}",
            hint="check that the model loads in onnxruntime 1.19.2 (IR <= 10, opset <= 21)",
        ) from exc


def unresolved_dim_error(vi: onnx.ValueInfoProto) -> UnsupportedModelError:
    dims = [d.dim_param or "?" for d in vi.type.tensor_type.shape.dim if not d.HasField("dim_value")]
    return UnsupportedModelError(
        f"input {vi.name!r} has unresolved dimension(s) {', '.join(repr(d) for d in dims)}",
        hint=f"give concrete sizes with --batch N (for a batch dimension) or "
        f"--input-shape {vi.name}=d0,d1,...",
    )


def _ancestors(targets: set[str], producers: dict[str, int], nodes) -> set[int]:
    seen: set[int] = set()
    stack = [producers[t] for t in targets if t in producers]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(producers[x] for x in nodes[i].input if x in producers)
    return seen


def _descendants(sources: set[str], nodes) -> set[int]:
    reached = set(sources)
    out: set[int] = set()
    for i, node in enumerate(nodes):  # nodes are topologically sorted
        if any(x in reached for x in node.input):
            out.add(i)
            reached.update(o for o in node.output if o)
    return out


def assign_roles(model: onnx.ModelProto, loss_output: str, label_inputs: set[str]) -> list[Role]:
    nodes = list(model.graph.node)
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    forward = _ancestors({loss_output}, producers, nodes)
    from_labels = _descendants(label_inputs, nodes) if label_inputs else {producers[loss_output]}
    roles = []
    for i, node in enumerate(nodes):
        if node.op_type in ACCUMULATOR_OPS:
            roles.append(Role.ACCUMULATE)
        elif i in forward:
            roles.append(Role.LOSS if i in from_labels else Role.FORWARD)
        else:
            roles.append(Role.BACKWARD)
    return roles


def lower_training_model(model: onnx.ModelProto, *, parameters: dict[str, tuple[np.ndarray, bool]],
                         eval_input_names: set[str] | None, optimizer_factor: int = 2,
                         probe_values: dict[str, np.ndarray] | None = None, hoist: bool = True) -> TrainGraph:
    """Lower a training model (nodes topologically sorted, concrete input shapes) to a TrainGraph,
    with each op's kernel workspace measured (poetc.runtime.workspace)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    ensure_unique_node_names(model)
    if hoist:
        moved = hoist_accumulators(model)
        log.debug("moved %d gradient accumulators next to their gradients", moved)
    g = model.graph
    if not g.output:
        raise UnsupportedModelError("the training model has no outputs (expected the loss first)")
    loss_output = g.output[0].name
    initializers = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    tensors: dict[str, Tensor] = {}

    param_names = [n for n, (_, trainable) in parameters.items() if trainable]
    frozen_names = [n for n, (_, trainable) in parameters.items() if not trainable]
    user_inputs: list[str] = []
    for vi in g.input:
        if vi.name in initializers:
            continue
        dtype = vi.type.tensor_type.elem_type
        shape = _static_shape(vi)
        if shape is None:
            raise unresolved_dim_error(vi)
        _check_dtype(dtype, vi.name)
        if vi.name in parameters:
            kind = TensorKind.PARAMETER
        elif vi.name.endswith(GRAD_BUFFER_SUFFIX):
            kind = TensorKind.GRAD_BUFFER
        else:
            kind = TensorKind.INPUT
            user_inputs.append(vi.name)
        tensors[vi.name] = Tensor(vi.name, shape, dtype, tensor_nbytes(shape, dtype), kind)
    for name, init in initializers.items():
        shape = tuple(int(d) for d in init.dims)
        _check_dtype(init.data_type, name)
        tensors[name] = Tensor(name, shape, init.data_type, tensor_nbytes(shape, init.data_type), TensorKind.CONSTANT)

    label_inputs = set()
    if eval_input_names is not None:
        label_inputs = {n for n in user_inputs if n not in eval_input_names and n != "lazy_reset_grad"}
    roles = assign_roles(model, loss_output, label_inputs)

    values = {n: v for n, (v, _) in parameters.items()}
    values.update(probe_values or {})
    feeds = probe_feeds(model, values)
    profile = probe_run(model, feeds)

    ops: list[Op] = []
    for node, role in zip(g.node, roles):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = onnx.numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0])) \
                if node.attribute and node.attribute[0].name == "value" else None
            if value is None:
                raise UnsupportedModelError(f"Constant node {node.name!r} uses an attribute poetc cannot read")
            dtype = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            tensors[node.output[0]] = Tensor(node.output[0], tuple(value.shape), dtype,
                                             tensor_nbytes(tuple(value.shape), dtype), TensorKind.CONSTANT)
            continue
        index = len(ops)
        args = profile.get(node.name)
        if args is None:
            raise UnsupportedModelError(
                f"node {node.name!r} ({node.op_type}) did not run in the ONNX Runtime probe",
                hint="poetc needs every node of the training graph to execute once per step",
            )
        shapes = args.get("output_type_shape", [])
        present = [o for o in node.output if o]
        if len(shapes) != len(present):
            raise UnsupportedModelError(
                f"node {node.name!r} ({node.op_type}): ONNX Runtime reported {len(shapes)} outputs, "
                f"the graph names {len(present)}")
        for out, typed in zip(present, shapes):
            (dtype_name, shape), = typed.items()
            dtype = dtype_from_profile_name(dtype_name)
            if dtype is None:
                raise UnsupportedModelError(
                    f"tensor {out!r} produced by {node.name!r} ({node.op_type}) has dtype {dtype_name}, "
                    f"which poetc does not support", hint="supported: float, double, float16, bfloat16, ints, bool")
            shape = tuple(int(d) for d in shape)
            kind = TensorKind.ACTIVATION if role in (Role.FORWARD, Role.LOSS) else TensorKind.GRADIENT
            tensors[out] = Tensor(out, shape, dtype, tensor_nbytes(shape, dtype), kind, producer=index,
                                  is_graph_output=out in graph_outputs)
        if (node.domain, node.op_type) in ALIAS_OPS and node.input and node.input[0] in tensors:
            source = tensors[node.input[0]]
            if not source.kind.is_persistent:
                tensors[node.output[0]].alias_of = node.input[0]
        ops.append(Op(index, node.name, node.op_type, node.domain, list(node.input), present, role,
                      host_time_s=float(args.get("dur", 0)) * 1e-6))
        for x in node.input:
            if x:
                if x not in tensors:
                    raise UnsupportedModelError(f"node {node.name!r} reads {x!r}, which nothing produces")
                tensors[x].consumers.append(index)

    _attach_workspace(model, ops, tensors, feeds)
    optimizer_state = optimizer_factor * sum(tensors[n].nbytes for n in param_names if n in tensors)
    log.debug("lowered %d ops, %d tensors", len(ops), len(tensors))
    return TrainGraph(ops=ops, tensors=tensors, loss_output=loss_output, model=model,
                      parameter_names=param_names, frozen_parameter_names=frozen_names,
                      optimizer_state_bytes=optimizer_state, user_inputs=user_inputs)



def _attach_workspace(model: onnx.ModelProto, ops: list[Op], tensors: dict[str, Tensor],
                      feeds: dict[str, np.ndarray]) -> None:
    from ..runtime.workspace import WorkspaceError, measure_workspace

    types = {t.name: (t.dtype, t.shape) for t in tensors.values() if t.producer is not None}
    try:
        sizes = measure_workspace(model, feeds, types)
    except (WorkspaceError, OSError) as exc:
        raise UnsupportedModelError(f"could not measure kernel workspace in ONNX Runtime: {exc}") from exc
    for op in ops:
        op.workspace_bytes = sizes.get(op.name, 0)


def _check_dtype(dtype: int, name: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise UnsupportedModelError(
            f"tensor {name!r} has dtype {onnx.TensorProto.DataType.Name(dtype)}, which poetc does not support",
            hint="supported: float, double, float16, bfloat16, integer types and bool")


def load_artifacts(directory: Path, probe_values: dict[str, np.ndarray] | None = None,
                   hoist: bool = True) -> TrainGraph:
    """Lower an artifacts directory (training/eval/optimizer models + checkpoint) to a TrainGraph."""
    paths = ArtifactPaths(Path(directory))
    paths.check()
    try:
        model = onnx.load(str(paths.training_model))
        eval_model = onnx.load(str(paths.eval_model), load_external_data=False)
        optimizer = onnx.load(str(paths.optimizer_model))
    except Exception as exc:
        raise InputFileError(f"cannot read the ONNX models in {directory}: {exc}") from exc
    try:
        parameters = read_checkpoint_parameters(paths.checkpoint)
    except Exception as exc:
        raise InputFileError(f"cannot read checkpoint {paths.checkpoint}: {exc}") from exc
    eval_inputs = {i.name for i in eval_model.graph.input} - {t.name for t in eval_model.graph.initializer}
    return lower_training_model(model, parameters=parameters, eval_input_names=eval_inputs,
                                optimizer_factor=optimizer_state_factor(optimizer), probe_values=probe_values,
                                hoist=hoist)

