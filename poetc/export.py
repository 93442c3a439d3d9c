"""`poetc export DIR -o OUT`: the trained parameters in the ecosystem's formats.

OUT holds
- `checkpoint`: a standard ONNX Runtime checkpoint with the model's parameters only (trainable ones
  trainable, frozen ones not; none of the fused mode's `__poet_` optimizer state), loadable by
  `onnxruntime.training.api.CheckpointState.load_checkpoint`;
- `inference_model.onnx`: DIR's eval_model.onnx without its loss (the label inputs and the nodes the
  loss block added are dropped; the model's output is what the loss read), the parameters turned into
  initializers with the exported values, runnable by a plain `onnxruntime.InferenceSession`.

The parameters come from `--checkpoint PATH` when given, else from the committed generation of the state
directory `--state S` (or DIR/state when it is one: a paged output trains there), else
DIR/trained_checkpoint when `poetc train` wrote it (checked against DIR's manifest), else DIR/checkpoint
(the untrained state).
Which names are parameters and which are trainable comes from the compile's own ORT checkpoint:
DIR/checkpoint (unfused mode) or DIR/reference/checkpoint (fused mode, whose DIR/checkpoint holds
every tensor as non-trainable state). DIR's artifacts are checked against report.json first, as
`train` and `verify` do; OUT is written through poetc.output's transaction (atomic, `--force` rules).

The loss block: onnxruntime-training's loss blocks (poetc's `--loss` choices) name every tensor they
add `onnx::<what>::<n>` (the pattern the importer renumbers); the loss nodes are the ancestors of the
loss whose outputs all carry such names. Nothing here prints; errors are `poetc.errors` types.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import output
from .errors import ArtifactError, InputFileError, UnsupportedModelError, UsageError
from .ir.fused import is_optimizer_state
from .run import LIBRARY, STATE_DIR, TRAINED_CHECKPOINT, check_artifacts, load_report, private_library
from .runtime import statedir

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
INFERENCE_MODEL = "inference_model.onnx"
_LOSS_NAME = re.compile(r"^onnx::[A-Za-z_]+::\d+$")
_RECOMPILE = "recompile with `poetc compile ... -o DIR --force`"


def export(out_dir: Path, dest: Path, *, checkpoint: Path | None = None, force: bool = False,
           state: Path | None = None) -> dict:
    """Write dest/checkpoint and dest/inference_model.onnx from the compile output out_dir (see the
    module docstring). Returns a summary: source checkpoint, parameter counts, model inputs/outputs."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputFileError(f"{out_dir} does not exist or is not a directory",
                             hint="pass the directory written by `poetc compile -o DIR`")
    report = load_report(out_dir)
    check_artifacts(out_dir, report)
    layout = out_dir / ("reference/checkpoint" if report.optimizer_mode == "fused" else CHECKPOINT)
    declared = _read_checkpoint(layout, artifact=True)
    names = {n: trainable for n, (_, trainable) in declared.items() if not is_optimizer_state(n)}
    if checkpoint is not None and state is not None:
        raise UsageError("--checkpoint and --state both name the parameters to export; give one of them")
    if state is None and checkpoint is None and statedir.is_state_dir(out_dir / STATE_DIR):
        state = out_dir / STATE_DIR
    if state is not None:
        source = Path(state)
        step, values = _read_state_dir(out_dir, report, source)
        label = f"{source} (state directory, step {step})"
    else:
        source = _source_checkpoint(out_dir, checkpoint)
        values = _read_checkpoint(source, artifact=source.parent == out_dir)
        label = str(source)
    parameters = {}
    for name in sorted(names):
        want = declared[name][0]
        if name not in values:
            raise InputFileError(f"checkpoint {source} lacks the parameter {name!r} that {out_dir} trains",
                                 hint="pass a checkpoint written by `poetc train` on this output directory")
        got = values[name][0]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise InputFileError(f"checkpoint {source}: parameter {name!r} is {got.dtype}{list(got.shape)}, the "
                                 f"compiled model's is {want.dtype}{list(want.shape)}",
                                 hint="pass a checkpoint written by `poetc train` on this output directory")
        parameters[name] = (got, names[name])
    model = inference_model(onnx.load(str(out_dir / "eval_model.onnx")), {n: v for n, (v, _) in parameters.items()})
    with output.OutputTransaction(Path(dest), force=force, inputs=[out_dir, source]) as tx:
        _save_checkpoint(parameters, tx.stage / CHECKPOINT)
        onnx.save(model, str(tx.stage / INFERENCE_MODEL))
        tx.commit()
    return {"source_checkpoint": label, "out": str(dest),
            "trainable_parameters": sum(1 for _, t in parameters.values() if t),
            "frozen_parameters": sum(1 for _, t in parameters.values() if not t),
            "inputs": [vi.name for vi in model.graph.input], "outputs": [vi.name for vi in model.graph.output]}


def _read_state_dir(out_dir: Path, report, state: Path) -> tuple[int, dict[str, tuple[np.ndarray, bool]]]:
    """The parameters of the committed generation of the state directory `state` (every file checked),
    holding its lock while reading so no trainer replaces the generation underneath."""
    import tempfile
    if not statedir.is_state_dir(state):
        raise InputFileError(f"--state {state} is not a poetc state directory (no {statedir.MANIFEST})",
                             hint="pass the directory `poetc train --state DIR` trains on")
    with tempfile.TemporaryDirectory(prefix="poetc-export-") as work:
        library = private_library(out_dir, report, Path(work))
        if library is None:
            raise ArtifactError(f"{out_dir} has no {LIBRARY}, which reads state directories", hint=_RECOMPILE)
        with statedir.StateDir.open(state, library=library) as s:
            values = {n: (s.read(n), info.trainable) for n, info in sorted(s.tensors.items())
                      if not is_optimizer_state(n)}
            return s.generation, values


def _source_checkpoint(out_dir: Path, checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            raise InputFileError(f"--checkpoint {checkpoint} does not exist",
                                 hint="pass the checkpoint `poetc train --save PATH` wrote")
        return checkpoint
    trained = out_dir / TRAINED_CHECKPOINT
    if not trained.exists() and not trained.is_symlink():
        log.info("%s has no %s: exporting the untrained parameters", out_dir, TRAINED_CHECKPOINT)
        return out_dir / CHECKPOINT
    recorded = (output.read_manifest(out_dir) or {}).get(TRAINED_CHECKPOINT)
    if trained.is_symlink() or not trained.is_file() or recorded is None:
        raise ArtifactError(f"{trained} was not written by poetc train (its manifest does not record it)",
                            hint="remove it, or rerun `poetc train` on this directory")
    actual = output.sha256_file(trained)
    if actual != recorded:
        raise ArtifactError(f"{trained} was modified after poetc train wrote it: its SHA-256 is {actual[:16]}..., "
                            f"the manifest records {recorded[:16]}...", hint="rerun `poetc train` on this directory")
    return trained


def _read_checkpoint(path: Path, *, artifact: bool) -> dict[str, tuple[np.ndarray, bool]]:
    from onnxruntime.training.api import CheckpointState  # imports torch: keep it local
    try:
        state = CheckpointState.load_checkpoint(str(path))
        return {name: (np.array(p.data), bool(p.requires_grad)) for name, p in state.parameters}
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for a file it cannot read
        detail = _ort_detail(exc)
        if artifact:
            raise ArtifactError(f"{path} cannot be read as an ONNX Runtime checkpoint ({detail})",
                                hint=_RECOMPILE) from None
        raise InputFileError(f"{path} is not an ONNX Runtime checkpoint ({detail})",
                             hint="pass the checkpoint `poetc train --save PATH` wrote") from None


def _ort_detail(exc: Exception) -> str:
    """ORT's message without its source location: "... checkpoint.cc:867 ToCheckpointState Checkpoint
    verification failed." -> "Checkpoint verification failed."."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = re.match(r".*\s\S+\.(?:cc|h|cpp):\d+ \S+ (.+)$", text)
    return m.group(1) if m else text


def _save_checkpoint(parameters: dict[str, tuple[np.ndarray, bool]], dest: Path) -> None:
    from onnxruntime.training.onnxblock import save_checkpoint  # imports torch: keep it local
    trainable = [numpy_helper.from_array(np.ascontiguousarray(v), n) for n, (v, t) in parameters.items() if t]
    frozen = [numpy_helper.from_array(np.ascontiguousarray(v), n) for n, (v, t) in parameters.items() if not t]
    save_checkpoint((trainable, frozen), str(dest))


# ---------------------------------------------------------------------------------------------------
# the inference graph


def loss_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes onnxruntime-training's loss block added: ancestors of the loss (the graph's
    first output) whose outputs all carry its generated names, connected to the loss through such nodes."""
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    loss = graph.output[0].name
    found: set[int] = set()
    stack = [producers[loss]] if loss in producers else []
    while stack:
        i = stack.pop()
        node = graph.node[i]
        if i in found or not all(_LOSS_NAME.match(o) for o in node.output if o):
            continue
        found.add(i)
        stack.extend(producers[x] for x in node.input if x in producers)
    return found


def inference_model(eval_model: onnx.ModelProto, parameters: dict[str, np.ndarray]) -> onnx.ModelProto:
    """eval_model without its loss: the inputs the loss alone reads (labels) and the loss nodes are
    dropped, the model output is what the loss nodes read from the rest of the graph, and every
    parameter input becomes an initializer holding `parameters[name]`."""
    g = eval_model.graph
    drop = loss_nodes(g)
    if not drop:
        raise UnsupportedModelError(
            f"cannot find the loss block in eval_model.onnx: its output {g.output[0].name!r} is not produced by "
            f"onnxruntime-training's loss nodes", hint="export works on outputs poetc compiled with one of its --loss choices")
    kept = [n for i, n in enumerate(g.node) if i not in drop]
    produced = {o for n in kept for o in n.output if o}
    inputs = {vi.name for vi in g.input}
    constants = {t.name for t in g.initializer}
    outputs = []
    for i in sorted(drop):
        for x in g.node[i].input:
            if x and (x in produced or (x in inputs and x not in parameters)) and x not in outputs:
                if x in inputs and not any(x in n.input for n in kept):
                    continue  # a label: read by the loss only
                outputs.append(x)
    outputs = [x for x in outputs if x not in constants]
    if len(outputs) != 1:
        raise UnsupportedModelError(
            f"cannot tell the model's output from eval_model.onnx's loss block: it reads {outputs or 'nothing'} "
            f"from the rest of the graph", hint="export works on models with one output (as poetc trains them)")
    # keep only what the output needs
    need, nodes = set(outputs), []
    for n in reversed(kept):
        if any(o in need for o in n.output):
            nodes.append(n)
            need.update(x for x in n.input if x)
    nodes.reverse()
    inferred = onnx.shape_inference.infer_shapes(eval_model)
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    if outputs[0] not in types:
        raise UnsupportedModelError(f"cannot infer the type of the model output {outputs[0]!r} in eval_model.onnx",
                                    hint="report this with the model")
    new_inputs = [vi for vi in g.input if vi.name in need and vi.name not in parameters]
    initializers = [t for t in g.initializer if t.name in need and t.name not in parameters]
    initializers += [numpy_helper.from_array(np.ascontiguousarray(parameters[n]), n)
                     for n in sorted(parameters) if n in need]
    graph = helper.make_graph(nodes, g.name or "inference", new_inputs, [types[outputs[0]]], initializers)
    model = helper.make_model(graph, opset_imports=list(eval_model.opset_import), ir_version=eval_model.ir_version,
                              producer_name="poetc export")
    onnx.checker.check_model(model)
    return model


__all__ = ["export", "inference_model", "loss_nodes"]
