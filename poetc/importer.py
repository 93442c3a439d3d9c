"""Import: a forward ONNX model (or an artifacts directory) -> ONNX Runtime training artifacts.

Forward models are canonicalized where an exactly equivalent form exists (IR version lowered to 10,
opset converted into ORT 1.19's range, symbolic dims fixed from --batch / --input-shape, Reshape
shapes that bake in the export batch size), then `onnxruntime.training.artifacts.generate_artifacts`
builds the training, eval and optimizer models and the checkpoint. Anything poetc cannot make
trainable fails with an error naming the op, the node and what to do.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import InputFileError, UnsupportedModelError, UsageError
from .ir.canonicalize import (Canonicalization, _attr, _Names, check_cpu_gradients, constant_value, expose_optional_outputs,
                              rewrite_without_gradients, seed_random_ops)
from .ir.lower import ARTIFACT_FILES

log = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # ONNX Runtime 1.19.2 loads IR 3-10
MAX_OPSET = 21  # ... and ai.onnx opsets up to 21
MIN_OPSET = 13  # older models are converted up (training needs recent op definitions)
LOSSES = {"cross_entropy": "CrossEntropyLoss", "mse": "MSELoss", "bce": "BCEWithLogitsLoss", "l1": "L1Loss"}
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class ImportOptions:
    loss: str = "cross_entropy"
    optimizer: str = "adamw"
    batch: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of frozen initializers


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input=8,3,32,32' -> ('input', (8, 3, 32, 32))."""
    m = re.fullmatch(r"([^=]+)=(\d+(?:,\d+)*)", text)
    if not m:
        raise UsageError(f"cannot read --input-shape {text!r}", hint="write NAME=d0,d1,... e.g. input=8,3,32,32")
    dims = tuple(int(d) for d in m.group(2).split(","))
    if any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: every dimension must be positive")
    return m.group(1), dims


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file with errors a person can act on."""
    if not path.exists():
        raise InputFileError(f"model file {path} does not exist")
    if path.is_dir():
        raise InputFileError(f"{path} is a directory without training artifacts "
                             f"({', '.join(ARTIFACT_FILES)})")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"model file {path} is not readable")
    data = path.read_bytes()
    if not data:
        raise InputFileError(f"model file {path} is empty")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise InputFileError(f"{path} is not an ONNX model, or it is truncated or corrupt ({type(exc).__name__})",
                             hint="export the model again, e.g. with torch.onnx.export") from exc
    if not model.graph.node or not model.graph.output:
        raise InputFileError(f"{path} does not contain an ONNX graph with nodes and outputs",
                             hint="is it really an ONNX model? (it parsed, but holds no graph)")
    checked = model
    if model.ir_version > onnx.IR_VERSION:
        # newer than this onnx's checker (and ONNX Runtime 1.19.2, which loads IR <= 10): check a copy at
        # the highest IR both know; canonicalize lowers the model itself and reports it
        checked = onnx.ModelProto()
        checked.CopyFrom(model)
        checked.ir_version = min(onnx.IR_VERSION, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(checked)
    except Exception as exc:
        where = f" (it declares IR version {model.ir_version}; ONNX Runtime 1.19.2 loads IR 3..{MAX_IR_VERSION}, " \
            f"poetc lowers newer ones when they use nothing newer)" if model.ir_version > MAX_IR_VERSION else ""
        raise InputFileError(f"{path} is not a valid ONNX model{where}: {_one_line(str(exc), 300)}",
                             hint=f"export it again with IR version <= {MAX_IR_VERSION} (onnx < 1.16 or "
                             f"model.ir_version = {MAX_IR_VERSION} before saving)" if where else None) from exc
    _check_initializer_sizes(model, path)
    return model


def _one_line(text: str, limit: int) -> str:
    """A message from ONNX / ONNX Runtime as one line, without C++ source locations and signatures."""
    text = " ".join(text.split())
    for marker in ("[ONNXRuntimeError] : ", " was false. ", " failed: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text)  # ORT's "1 : FAIL : "
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_initializer_sizes(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker does not compare raw_data with dims: a flipped or cut size field parses and passes
    the checker, then fails deep inside ONNX Runtime. Compare them here."""
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL or \
                t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:  # noqa: BLE001 - strings and unknown types: nothing to compare
            continue
        want = int(np.prod(t.dims, dtype=np.int64)) * itemsize
        if len(t.raw_data) != want:
            raise InputFileError(
                f"{path} is corrupt: initializer {t.name!r} holds {len(t.raw_data)} bytes but its shape "
                f"{list(t.dims)} and dtype {onnx.TensorProto.DataType.Name(t.data_type).lower()} need {want}",
                hint="export the model again, e.g. with torch.onnx.export")


def canonicalize(model: onnx.ModelProto, options: ImportOptions) -> tuple[onnx.ModelProto, list[Canonicalization]]:
    """The forward model in a form onnxruntime-training 1.19.2 can load and differentiate, and the
    list of rewrites applied (each exact; `Canonicalization.to_json` for reports)."""
    notes: list[Canonicalization] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModelError("the model has no ai.onnx opset import")
    if model.ir_version > MAX_IR_VERSION:
        notes.append(Canonicalization("ir-version", f"IR version {model.ir_version} lowered to {MAX_IR_VERSION}: "
                                      f"ONNX Runtime 1.19.2 loads IR 3..{MAX_IR_VERSION}"))
        model.ir_version = MAX_IR_VERSION
    if opset > MAX_OPSET or opset < MIN_OPSET:
        model = _convert_opset(model, opset)
        notes.append(Canonicalization("opset-conversion", f"ai.onnx opset {opset} converted to "
                                      f"{_opset_of(model)} (onnx.version_converter): onnxruntime-training 1.19 "
                                      f"needs {MIN_OPSET}..{MAX_OPSET}"))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    notes += _clean_node_names(model)
    notes += _fix_input_shapes(model, options)
    # data_prop: shapes computed by Shape -> Reshape (torch's GroupNorm, flatten(2)) reach the rewrites that
    # need static shapes (ConvTranspose, LRN, ...)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    _complete_shapes(model)
    notes += expose_optional_outputs(model)
    notes += rewrite_without_gradients(model)
    notes += seed_random_ops(model)
    _drop_unused_initializers(model)
    rebatched = next((n for n in notes if n.name == "rebatch-check"), None)
    if rebatched is not None:
        out = model.graph.output[0]
        value = _run_forward(model, out.name, rebatched.why.split(":")[0])
        out.type.tensor_type.ClearField("shape")
        for d in value.shape:
            out.type.tensor_type.shape.dim.add().dim_value = int(d)
    notes += _fix_outputs(model, options)
    return model, notes


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Initializers no node reads any more (a rewritten Resize's scales): onnxruntime-training would
    take a float one for a parameter and fail to find its consumer."""
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    dropped = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    if dropped:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        inputs = [vi for vi in model.graph.input if vi.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def _opset_of(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    target = min(max(opset, MIN_OPSET), 17 if opset < MIN_OPSET else MAX_OPSET)
    if model.ir_version < 4:
        # IR < 4 lists every initializer as a graph input too; the converter then treats them as
        # inputs without shapes. Drop those entries (IR >= 4 does not need them).
        inits = {t.name for t in model.graph.initializer}
        keep = [vi for vi in model.graph.input if vi.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = 4
    try:
        converted = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model uses ai.onnx opset {opset}; onnxruntime-training 1.19 needs {MIN_OPSET}..{MAX_OPSET} and "
            f"converting it to {target} with onnx.version_converter failed: {_one_line(str(exc), 200)}",
            hint=f"re-export the model with an opset between {MIN_OPSET} and {MAX_OPSET} "
            f"(torch.onnx.export(..., opset_version=17))") from exc
    log.info("converted opset %d -> %d", opset, target)
    return converted


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean_node_names(model: onnx.ModelProto) -> list[Canonicalization]:
    """Node names with control characters break ONNX Runtime's JSON profile (and terminals): write
    each as '_' (names carry no meaning in ONNX; tensor names are unchanged)."""
    taken = {n.name for n in model.graph.node}
    changed = []
    for node in model.graph.node:
        if not _CONTROL.search(node.name):
            continue
        name = base = _CONTROL.sub("_", node.name)
        k = 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        node.name = name
        changed.append(name)
    return [Canonicalization("node-names", "node names with control characters rewritten with '_' (ONNX Runtime's "
                             "profile, which poetc reads, cannot carry them)", changed)] if changed else []


def _fix_input_shapes(model: onnx.ModelProto, options: ImportOptions) -> list[Canonicalization]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    unknown = set(options.input_shapes) - {vi.name for vi in inputs}
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {sorted(unknown)}",
                         hint=f"the model's inputs are {[vi.name for vi in inputs]}")
    old_batch = None
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in options.input_shapes:
            shape = options.input_shapes[vi.name]
            if len(shape) != len(dims):
                raise UsageError(f"--input-shape {vi.name}: the input has rank {len(dims)}, not {len(shape)}")
            for d, value in zip(dims, shape):
                d.Clear()
                d.dim_value = value
            continue
        if options.batch is not None and dims:
            if dims[0].HasField("dim_value") and dims[0].dim_value != options.batch:
                old_batch = dims[0].dim_value
            dims[0].Clear()
            dims[0].dim_value = options.batch
        for axis, d in enumerate(dims):
            if not d.HasField("dim_value"):
                raise UnsupportedModelError(
                    f"input {vi.name!r} has a dynamic dimension {d.dim_param or '?'!r} at axis {axis}",
                    hint=(f"give concrete sizes with --batch N (axis 0) or --input-shape {vi.name}=d0,d1,..."))
    _check_input_sizes(inputs, options)
    notes = []
    if old_batch is not None:
        changed = _rebatch_reshapes(model, old_batch, options.batch)
        if changed:
            notes.append(Canonicalization("rebatch-shapes", f"Reshape/Expand target shapes that baked in the export "
                                          f"batch {old_batch} use --batch {options.batch} instead (Reshape copies the "
                                          f"input's dim 0)", changed))
        notes.append(Canonicalization("rebatch-check", f"exported at batch {old_batch}: ran once in ONNX Runtime at "
                                      f"--batch {options.batch} to check nothing else bakes it in"))
    # outputs and intermediates follow from the (now concrete) inputs
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    return notes


def _check_input_sizes(inputs, options: ImportOptions) -> None:
    """Zero-sized inputs crash ONNX Runtime's kernels (SIGFPE in the probe run); inputs larger than
    this machine's memory cannot be probed. Both are the user's sizes: say so before ORT sees them."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = None
    total = 0
    for vi in inputs:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if any(d == 0 for d in dims):
            raise UnsupportedModelError(
                f"input {vi.name!r} has a zero-sized dimension (shape {dims}): a training step needs at least "
                f"one element", hint=f"give its sizes with --batch N or --input-shape {vi.name}=d0,d1,...")
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
        except Exception:  # noqa: BLE001 - strings and unknown types: sized elsewhere
            itemsize = 1
        total += int(np.prod(dims, dtype=object)) * itemsize
        if ram is not None and total > ram:
            flag = f"--batch {options.batch}" if options.batch is not None else "the input shapes"
            raise UsageError(
                f"{flag} makes the inputs alone {total:,} bytes (input {vi.name!r}: {dims}), more than this "
                f"machine's {ram:,} bytes of RAM; poetc runs a training step of the model here to measure it",
                hint="choose a smaller --batch (the schedule's memory grows with it)")


def _rebatch_reshapes(model: onnx.ModelProto, old_batch: int, new_batch: int) -> list[str]:
    """Shapes that bake in the export batch size: a Reshape or Expand whose target shape is constant
    (an initializer, a Constant node, or computed from them, as torch's tracer writes
    Concat(Unsqueeze(Constant))) and starts with the export batch. A Reshape then copies the input's
    dim 0 (0), an Expand expands to the new batch. Exact when that axis is the batch axis, which is
    what exporters emit; `_check_rebatched` runs the model to confirm. Returns the nodes changed."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for x in node.input:
            uses[x] = uses.get(x, 0) + 1
    names = _Names(model.graph)
    changed = []
    for node in model.graph.node:
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
            continue
        shape = constant_value(model, node.input[1])
        if shape is None or shape.ndim != 1 or not shape.size or shape[0] != old_batch:
            continue
        if node.op_type == "Reshape" and _attr(node, "allowzero", 0):
            continue
        new = shape.astype(np.int64).copy()
        new[0] = 0 if node.op_type == "Reshape" else new_batch
        name = names(f"{node.input[1]}__poetc_rebatched")
        model.graph.initializer.append(onnx.numpy_helper.from_array(new, name))
        node.input[1] = name
        changed.append(node.name or node.output[0])
        log.info("%s %s: batch %d in its target shape replaced", node.op_type, node.name, old_batch)
    return changed


def _fix_outputs(model: onnx.ModelProto, options: ImportOptions) -> list[Canonicalization]:
    """Concrete output shapes (onnxruntime-training gives the labels input the first output's shape
    minus the class axis), one trained output, and classification logits as [N, classes]."""
    notes = []
    g = model.graph
    if len(g.output) > 1:
        dropped = [vi.name for vi in g.output[1:]]
        del g.output[1:]
        notes.append(Canonicalization(
            "extra-outputs-dropped", f"the loss is computed on the first output {g.output[0].name!r}; the other "
            f"output(s) {dropped} are not trained (export a model whose first output is the one to train)", dropped))
    out = g.output[0]
    shape = _resolve_output_shape(model, out.name)
    if options.loss == "cross_entropy":
        if len(shape) < 2:
            raise UnsupportedModelError(
                f"the model's output {out.name!r} has shape {list(shape)}; --loss cross_entropy needs class "
                f"scores of shape [N, classes] (or [N, ..., classes])",
                hint="use --loss mse (or bce / l1) for a regression output, or export the classifier's logits")
        if len(shape) > 2 and all(d == 1 for d in shape[2:]):
            # a global-pool head without Flatten: [N, C, 1, 1]
            inner = _Names(g)(f"{out.name}/unflattened")
            for node in g.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if x == out.name else x for x in node.input]
            g.node.append(onnx.helper.make_node("Flatten", [inner], [out.name], name=f"{out.name}/flatten", axis=1))
            notes.append(Canonicalization(
                "flatten-logits", f"output {out.name!r} of shape {list(shape)} flattened to [{shape[0]}, {shape[1]}]: "
                f"cross_entropy needs [N, classes] and the trailing axes have size 1", [f"{out.name}/flatten"]))
            shape = (shape[0], shape[1])
    out.type.tensor_type.ClearField("shape")
    for d in shape:
        out.type.tensor_type.shape.dim.add().dim_value = d
    return notes


def _resolve_output_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    """The output's shape from ONNX shape inference, or, where inference leaves a dimension open
    (exporters' Shape/Gather/Concat chains, e.g. torch's attention), from one forward run in ONNX
    Runtime on probe data."""
    for vi in model.graph.output:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return tuple(int(d.dim_value) for d in dims)
    return tuple(int(d) for d in _run_forward(model, name).shape)


def _run_forward(model: onnx.ModelProto, name: str, rebatched: str | None = None) -> np.ndarray:
    """Run the forward model once on probe data in ONNX Runtime and return output `name`."""
    return _run_forward_values(model, [name], rebatched)[0]


def _run_forward_values(model: onnx.ModelProto, names: list[str], rebatched: str | None = None) -> list[np.ndarray]:
    """Run the forward model once on probe data in ONNX Runtime and return the values of `names`
    (graph outputs, or any tensor the model computes: they are added as outputs of a copy)."""
    import onnxruntime as ort

    from .runtime.profiling import probe_array
    from .runtime.session import contract_session_options
    ort.set_default_logger_severity(3)
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in inits:
            feeds[vi.name] = probe_array(tuple(d.dim_value for d in vi.type.tensor_type.shape.dim),
                                         vi.type.tensor_type.elem_type, rng)
    so = contract_session_options()
    so.log_severity_level = 4  # the error comes back as the exception; nothing on stderr
    try:
        outputs = {o.name for o in model.graph.output}
        if not set(names) <= outputs:
            model = copy.deepcopy(model)
            types = {vi.name: vi for vi in model.graph.value_info}
            for n in names:
                if n not in outputs:
                    out = model.graph.output.add()
                    out.name = n
                    out.type.tensor_type.elem_type = types[n].type.tensor_type.elem_type
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except MemoryError as exc:
        raise UsageError(f"this machine has not enough memory to run the model once at these input sizes "
                         f"({exc})", hint="choose a smaller --batch") from exc
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        text = _one_line(str(exc), 400)
        node = re.search(r"[Nn]ode\.? \(?Name: ?'?([^' )]+)", str(exc)) or re.search(r"Node \(([^)]+)\)", str(exc))
        where = f" (node {node.group(1)!r})" if node else ""
        if rebatched:
            raise UnsupportedModelError(
                f"the model was {rebatched} and still fails at the new batch{where}: it bakes the export batch "
                f"into a shape poetc cannot rewrite: {text}",
                hint="export the model with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': "
                "{0: 'batch'}})) or compile it at its export batch (omit --batch)") from exc
        raise UnsupportedModelError(
            f"ONNX Runtime could not run the forward model at the given input sizes{where}: {text}",
            hint="check the input sizes (--batch, --input-shape) against what the model expects") from exc
    return values


def _complete_shapes(model: onnx.ModelProto) -> int:
    """Static shapes, from one forward run in ONNX Runtime, for the tensors shape inference left open
    around the ops a rewrite must see whole (canonicalize._NO_GRADIENT_REWRITES: the rewrites need
    static shapes): a Pad whose pads torch computes from a chain of constants (F.pad(mode='reflect')),
    a Reshape to a computed shape. Only when every graph input has a static shape; returns how many
    tensors got one."""
    from .ir.canonicalize import _NO_GRADIENT_REWRITES
    g = model.graph
    inits = {t.name for t in g.initializer}
    if any(not _static(vi) for vi in g.input if vi.name not in inits):
        return 0
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    open_ = [x for n in g.node if n.op_type in _NO_GRADIENT_REWRITES and n.domain in ("", "ai.onnx")
             for x in list(n.input[:1]) + list(n.output[:1])
             if x and x not in inits and not (x in infos and _static(infos[x]))
             and x in {vi.name for vi in g.value_info} | {o for m in g.node for o in m.output}]
    names = sorted({x for x in open_ if x in infos and infos[x].type.HasField("tensor_type")
                    and infos[x].type.tensor_type.elem_type})
    if not names:
        return 0
    for name, value in zip(names, _run_forward_values(model, names)):
        shape = infos[name].type.tensor_type.shape
        shape.ClearField("dim")
        for d in value.shape:
            shape.dim.add().dim_value = int(d)
    return len(names)


def _static(vi: onnx.ValueInfoProto) -> bool:
    t = vi.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def trainable_parameters(model: onnx.ModelProto, freeze: list[str]) -> tuple[list[str], list[str]]:
    """(trainable, frozen): float initializers of rank >= 1 except BatchNorm running statistics."""
    stats = {x for n in model.graph.node if n.op_type == "BatchNormalization" for x in n.input[3:5]}
    trainable, frozen = [], []
    for t in model.graph.initializer:
        if t.data_type not in FLOAT_TYPES or not t.dims or t.name in stats:
            continue
        (frozen if any(fnmatch.fnmatchcase(t.name, p) for p in freeze) else trainable).append(t.name)
    return trainable, frozen


@contextlib.contextmanager
def quiet_artifact_generation():
    """generate_artifacts builds its own SessionOptions at INFO level, ignoring the default logger
    severity; swap that factory for one at ERROR level while it runs."""
    import onnxruntime
    from onnxruntime.training.onnxblock import _training_graph_utils as tgu

    onnxruntime.set_default_logger_severity(3)
    original = getattr(tgu, "SessionOptions", None)
    if original is None:
        yield
        return

    def factory():
        so = original()
        so.log_severity_level = 3
        return so

    tgu.SessionOptions = factory
    try:
        yield
    finally:
        tgu.SessionOptions = original


def generate_training_artifacts(model: onnx.ModelProto, out_dir: Path, options: ImportOptions) -> Path:
    """Run generate_artifacts into out_dir (created) and apply the fixes ORT 1.19.2 needs."""
    from onnxruntime.training import artifacts

    if options.loss not in LOSSES:
        raise UsageError(f"unknown loss {options.loss!r}", hint=f"losses: {', '.join(LOSSES)}")
    if options.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {options.optimizer!r}", hint=f"optimizers: {', '.join(OPTIMIZERS)}")
    trainable, frozen = trainable_parameters(model, options.freeze)
    if not trainable:
        raise UnsupportedModelError("the model has no trainable float initializers (or --freeze matched all)")
    check_cpu_gradients(model, set(trainable))
    _check_output_dtypes(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_artifact_generation():
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen,
                loss=getattr(artifacts.LossType, LOSSES[options.loss]),
                optimizer=getattr(artifacts.OptimType, OPTIMIZERS[options.optimizer]),
                artifact_directory=str(out_dir))
    except Exception as exc:
        raise _gradient_error(model, exc) from exc
    _fix_artifacts(out_dir)
    return out_dir


def _gradient_error(model: onnx.ModelProto, exc: Exception) -> UnsupportedModelError:
    text = " ".join(str(exc).split())
    m = re.search(r"gradient builder has not been registered: ([A-Za-z0-9_]+) for node (\S+)", text) or \
        re.search(r"[Gg]radient.*?(?:for|of) (?:op )?['\"]?([A-Za-z0-9_]+)", text)
    if m:
        op = m.group(1)
        node = m.group(2) if m.lastindex and m.lastindex > 1 else \
            next((n.name or n.op_type for n in model.graph.node if n.op_type == op), None)
        where = f" (node {node!r})" if node else ""
        return UnsupportedModelError(
            f"op {op}{where} has no gradient in onnxruntime-training 1.19, and it lies between a trainable "
            f"parameter and the loss, so poetc cannot build the training graph",
            hint=f"replace {op} by a differentiable op before export, or --freeze every parameter that feeds it")
    if "Type Error" in text or "type" in text.lower() and "tensor(" in text:
        return UnsupportedModelError(
            f"onnxruntime-training could not build the training graph because of an element type: "
            f"{_one_line(text, 400)}",
            hint="poetc trains float32 models: export in float32 (float16/bfloat16/double training and "
            "non-numeric inputs are not supported)")
    return UnsupportedModelError(
        f"onnxruntime-training could not build the training graph: {_one_line(text, 400)}",
        hint="check that the model trains in onnxruntime-training 1.19 (generate_artifacts)")


def _check_output_dtypes(model: onnx.ModelProto) -> None:
    """ORT 1.19's loss blocks build float32 gradients: a float16/double/bfloat16 output fails inside
    generate_artifacts with a type-binding error. Say so before."""
    for vi in model.graph.output[:1]:
        dtype = vi.type.tensor_type.elem_type
        if dtype != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(dtype).lower() if dtype else "undefined"
            raise UnsupportedModelError(
                f"the model's output {vi.name!r} has dtype {name}; poetc trains float32 models only "
                f"(onnxruntime-training 1.19's losses build float32 gradients)",
                hint="export the model in float32 (mixed-precision and double training are not supported)")


def _fix_artifacts(out_dir: Path) -> None:
    """IR <= 10 everywhere (generate_artifacts with newer onnx writes IR 14 optimizer models),
    eval-mode BatchNormalization with a single output (ORT 1.19 rejects the three it keeps), names
    that do not depend on what ran before in the process, and the training graph's function ops
    replaced by the bodies ONNX Runtime would run (inline_function_ops)."""
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = out_dir / name
        model = onnx.load(str(path))
        changed = model.ir_version > MAX_IR_VERSION
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        changed |= _renumber_generated_names(model)
        if name == "training_model.onnx":
            changed |= bool(inline_function_ops(model))
        if name == "eval_model.onnx":
            for node in model.graph.node:
                training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
                if node.op_type == "BatchNormalization" and not training and len(node.output) > 1:
                    del node.output[1:]
                    changed = True
        if changed:
            onnx.save(model, str(path))


def inline_function_ops(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, every node ONNX Runtime 1.19.2 runs as a function body by that body; return
    the replaced nodes' names.

    Some gradient ops have no CPU kernel but a function body (DivGrad, the gradient of a Div whose
    divisor depends on a parameter: Shape, Neg, Mul, Div, BroadcastGradientArgs, ReduceSumTraining,
    Reshape). ONNX Runtime inlines such a node when the session is created, so the node poetc
    schedules never runs: the probe finds no kernel for it, and a schedule could not place, recompute
    or free its parts. The bodies come from ONNX Runtime itself (the session's graph saved with every
    optimisation off, which holds only the inlining), and the body nodes are named after the node they
    replace; the graph then runs the same kernels in the same order, in the reference and in every
    compiled graph alike."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="poetc-inline-") as tmp:
        saved = Path(tmp) / "session.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = str(saved)
        so.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - the probe reports ORT's own error with its hint
            return []
        session = onnx.load(str(saved))
    kept = {n.name for n in session.graph.node}
    replaced = [n for n in model.graph.node if n.name and n.name not in kept and n.op_type != "Constant"]
    if not replaced:
        return []
    g = model.graph
    known = {x for n in g.node for x in n.output} | {t.name for t in g.initializer} | {v.name for v in g.input}
    producer = {o: k for k, n in enumerate(session.graph.node) for o in n.output if o}
    session_inits = {t.name: t for t in session.graph.initializer}
    bodies: dict[str, list[onnx.NodeProto]] = {}
    for node in replaced:
        own, stack, seen, consts = set(), [o for o in node.output if o], set(), []
        while stack:
            t = stack.pop()
            if t in seen or (t in known and t not in node.output):
                continue
            seen.add(t)
            if t in producer:
                own.add(producer[t])
                stack.extend(x for x in session.graph.node[producer[t]].input if x)
            elif t in session_inits:  # a constant of the body
                consts.append(onnx.helper.make_node("Constant", [], [t], name=f"{node.name}/{t}",
                                                    value=session_inits[t]))
            else:
                return []  # not a body poetc can read: leave the graph as generated
        body = [copy_node(session.graph.node[k]) for k in sorted(own)]
        for k, n in enumerate(body):
            n.name = f"{node.name}/{n.op_type}_{k}"
        bodies[node.name] = consts + body
    nodes = []
    for node in g.node:
        nodes.extend(bodies.get(node.name, [node]) if node.name else [node])
    del g.node[:]
    g.node.extend(nodes)
    domains = {o.domain for o in model.opset_import}
    for o in session.opset_import:
        if o.domain not in domains and any(n.domain == o.domain for b in bodies.values() for n in b):
            model.opset_import.append(o)
    return [n.name for n in replaced]


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


_GENERATED_NAME = re.compile(r"onnx::([A-Za-z_]+)::(\d+)(?!\d)")


def _renumber_generated_names(model: onnx.ModelProto) -> bool:
    """generate_artifacts names the loss nodes and tensors it adds with a per-process counter
    (onnx::loss::2 in a fresh process, ::8 after a few imports; gradient names derive from them), so
    the same model imported twice in one process got different names and graph fingerprints. Number
    those tokens by first appearance instead."""
    g = model.graph
    numbers: dict[str, str] = {}

    def renumber(name: str) -> str:
        def token(m: re.Match) -> str:
            if m.group(0) not in numbers:
                numbers[m.group(0)] = f"onnx::{m.group(1)}::{len(numbers)}"
            return numbers[m.group(0)]
        return _GENERATED_NAME.sub(token, name)

    before = model.SerializeToString()
    for node in g.node:
        node.name = renumber(node.name)
        node.input[:] = [renumber(x) for x in node.input]
        node.output[:] = [renumber(x) for x in node.output]
    for named in list(g.input) + list(g.output) + list(g.value_info) + list(g.initializer):
        named.name = renumber(named.name)
    return model.SerializeToString() != before


def import_model(path: Path, work_dir: Path, options: ImportOptions) -> Path:
    """Return an artifacts directory for `path` (a forward model or an artifacts directory)."""
    path = Path(path)
    if path.is_dir() and all((path / f).exists() for f in ARTIFACT_FILES):
        dest = work_dir / "imported"
        shutil.copytree(path, dest)
        _fix_artifacts(dest)
        return dest
    model, notes = canonicalize(load_onnx(path), options)
    out = generate_training_artifacts(model, work_dir / "imported", options)
    (out / IMPORT_NOTES).write_text(json.dumps({"canonicalizations": [n.to_json() for n in notes]},
                                               indent=2, sort_keys=True) + "\n")
    return out


IMPORT_NOTES = "poetc_import.json"


def canonicalizations(artifacts: Path) -> list[dict]:
    """The rewrites import applied to the user's model (name, count, nodes, why), for the inspect and
    compile reports; [] for an artifacts directory given as input."""
    path = Path(artifacts) / IMPORT_NOTES
    return json.loads(path.read_text())["canonicalizations"] if path.exists() else []
