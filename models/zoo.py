"""Model registry, ONNX export, seeded batches and on-disk cache.

Models are exported in **training form**: the module is put in ``train()``
mode and exported with ``torch.onnx.TrainingMode.TRAINING`` and constant
folding off (folding would rename or fuse parameters), so every BatchNorm
appears as ``BatchNormalization`` with ``training_mode=1`` (normalising with
batch statistics), which ORT's gradient builder turns into
``BatchNormInternal``/``BatchNormalizationGrad``. The running-mean/var
outputs of those nodes are dead (the legacy exporter drops the buffer
updates), so an ORT training step never updates the running statistics;
they stay embedded as non-trainable initializers.

Two ORT 1.19.2 quirks are handled here:

* ``LayerNormalization`` is exported with only ``Y``, but ORT's gradient for
  it reads the optional Mean/InvStdDev outputs; :func:`export_proto` adds them.
* ``generate_artifacts`` builds an invalid *eval* model for training-mode BN
  (it flips ``training_mode`` to 0 but keeps three outputs, which ORT then
  refuses to load). :func:`training_artifacts` wraps ``generate_artifacts``
  and repairs the eval model; use it (or copy its fix) rather than calling
  ``generate_artifacts`` directly on a model with BatchNorm. The repaired
  eval model normalises with the (never updated) running statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from . import cnn, transformer

__all__ = ["InputSpec", "ModelSpec", "MODELS", "OPSET", "MAX_IR_VERSION", "OUTPUT_NAME",
           "LABELS_NAME", "BATCH_DIM", "get_spec", "export_proto",
           "instantiate", "export_onnx", "make_batch", "build", "default_cache_dir",
           "trainable_initializers", "training_artifacts"]

OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.19 loads IR <= 10
OUTPUT_NAME = "logits"
LABELS_NAME = "labels"
BATCH_DIM = "batch"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input; ``shape`` excludes the batch dimension.

    Integer inputs (token ids) are drawn uniformly from ``[0, high)``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, export and feed one architecture."""

    name: str
    description: str
    builder: Callable[[], nn.Module]
    default_batch: int
    inputs: tuple[InputSpec, ...]
    num_classes: int
    loss: str = "cross_entropy"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


def _image(size: int) -> tuple[InputSpec, ...]:
    return (InputSpec("input", (3, size, size)),)


_TOKENS = (InputSpec("input_ids", (128,), "int64", high=1000),)

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("mlp", "MLP 784-512-512-512-10, ReLU", cnn.mlp, 64,
              (InputSpec("input", (784,)),), 10),
    ModelSpec("cnn", "3x(Conv3x3+BN+ReLU+MaxPool) 32/64/128 + Linear, CIFAR-10",
              cnn.small_cnn, 64, _image(32), 10),
    ModelSpec("resnet18_cifar", "ResNet-18, CIFAR stem (3x3/s1, no max-pool), 32x32, 10 classes",
              cnn.resnet18_cifar, 32, _image(32), 10),
    ModelSpec("resnet18", "ResNet-18, ImageNet stem (7x7/s2 + max-pool), 224x224, 1000 classes",
              cnn.resnet18, 8, _image(224), 1000),
    ModelSpec("mobilenetv2", "MobileNetV2 width 1.0, ReLU6, CIFAR strides, 32x32, 10 classes",
              cnn.mobilenetv2, 32, _image(32), 10),
    ModelSpec("vgg11", "VGG-11 with BatchNorm, single Linear classifier, 32x32, 10 classes",
              cnn.vgg11, 32, _image(32), 10),
    ModelSpec("bert_tiny", "BERT encoder 2 layers, hidden 128, 2 heads, FFN 512, seq 128, "
              "vocab 1000, 2 classes", transformer.bert_tiny, 16, _TOKENS, 2),
    ModelSpec("bert_small", "BERT encoder 4 layers, hidden 256, 4 heads, FFN 1024, seq 128, "
              "vocab 1000, 2 classes", transformer.bert_small, 8, _TOKENS, 2),
)}


def get_spec(name: str) -> ModelSpec:
    """Return the spec for ``name``; ``KeyError`` lists the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def instantiate(name: str, seed: int = 0) -> nn.Module:
    """Build the torch module for ``name`` with weights drawn from ``seed``.

    The global torch RNG state of the caller is left untouched.
    """
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.builder()
    return model.train()


def make_batch(name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for the forward graph plus ``labels`` (int64 in ``[0, num_classes)``)."""
    spec = get_spec(name)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for inp in spec.inputs:
        shape = (batch, *inp.shape)
        if inp.dtype == "float32":
            out[inp.name] = rng.standard_normal(shape, dtype=np.float32)
        elif inp.dtype == "int64":
            out[inp.name] = rng.integers(0, inp.high, size=shape, dtype=np.int64)
        else:
            raise ValueError(f"unsupported input dtype {inp.dtype}")
    out[LABELS_NAME] = rng.integers(0, spec.num_classes, size=(batch,), dtype=np.int64)
    return out


def _example_inputs(spec: ModelSpec, batch: int) -> tuple[torch.Tensor, ...]:
    batch_np = make_batch(spec.name, batch, seed=0)
    return tuple(torch.from_numpy(batch_np[i.name]) for i in spec.inputs)


def _atomic_write(data: bytes, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def export_proto(name: str, batch: int | None = None, seed: int = 0,
                 dynamic_batch: bool = False) -> onnx.ModelProto:
    """Export ``name`` in training form and return the ONNX model (opset 17, IR <= 10)."""
    spec = get_spec(name)
    batch = spec.default_batch if batch is None else batch
    model = instantiate(name, seed)
    args = _example_inputs(spec, batch)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: BATCH_DIM} for n in spec.input_names + [OUTPUT_NAME]}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, buf, dynamo=False, opset_version=OPSET,
            input_names=spec.input_names, output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes, training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    _expose_layernorm_stats(proto)
    proto.graph.name = name
    return proto


def _expose_layernorm_stats(proto: onnx.ModelProto) -> None:
    """Give every ``LayerNormalization`` its optional Mean and InvStdDev outputs.

    The exporter emits only ``Y``, but ORT's LayerNormalization gradient
    reads outputs 1 and 2 and fails ("i < node_->OutputDefs().size()")
    without them. The names follow the exporter's ``<node>_output_<k>`` style.
    """
    taken = {o for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization" or len(node.output) >= 3:
            continue
        stem = node.output[0].rsplit("_output_", 1)[0] if "_output_" in node.output[0] \
            else node.output[0]
        for k in range(len(node.output), 3):
            name = f"{stem}_output_{k}"
            while name in taken:
                name += "_"
            taken.add(name)
            node.output.append(name)


def export_onnx(name: str, path: str | os.PathLike[str], batch: int | None = None,
                seed: int = 0, dynamic_batch: bool = False) -> pathlib.Path:
    """Write the forward model of ``name`` (outputs ``logits``) to ``path``.

    ``batch`` defaults to the spec's ``default_batch``; with ``dynamic_batch``
    the leading dimension of inputs and output is the symbolic dim ``"batch"``
    (``batch`` then only sizes the tracing example). The file is written
    atomically and is byte-identical for equal ``(name, batch, seed,
    dynamic_batch)``.
    """
    path = pathlib.Path(path)
    proto = export_proto(name, batch, seed, dynamic_batch)
    _atomic_write(proto.SerializeToString(), path)
    return path


def default_cache_dir() -> pathlib.Path:
    """``$POETC_CACHE`` if set, else ``~/.cache/poetc/models``."""
    env = os.environ.get("POETC_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "poetc" / "models"


def build(name: str, cache_dir: str | os.PathLike[str] | None = None,
          batch: int | None = None, seed: int = 0,
          dynamic_batch: bool = False) -> pathlib.Path:
    """Return ``<cache_dir>/<name>-b<batch>-s<seed>/model.onnx``, exporting it if absent.

    ``cache_dir`` defaults to :func:`default_cache_dir`. With ``dynamic_batch``
    the directory is ``<name>-bdyn-s<seed>`` (traced at the default batch).
    Concurrent builders are safe: the file appears atomically.
    """
    spec = get_spec(name)
    batch = spec.default_batch if batch is None else batch
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = "dyn" if dynamic_batch else str(batch)
    path = root / f"{name}-b{tag}-s{seed}" / "model.onnx"
    if not path.exists():
        export_onnx(name, path, batch=None if dynamic_batch else batch, seed=seed,
                    dynamic_batch=dynamic_batch)
    return path


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))


def trainable_initializers(model: onnx.ModelProto | str | os.PathLike[str]) -> list[str]:
    """Names of the float initializers that are trainable parameters.

    Everything floating-point except BatchNorm running mean/var (inputs 3
    and 4 of ``BatchNormalization``), in initializer order. For the models
    here this equals ``[n for n, _ in module.named_parameters()]`` as a set.
    """
    proto = _load(model)
    stats = {i for n in proto.graph.node if n.op_type == "BatchNormalization"
             for i in n.input[3:5]}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return [t.name for t in proto.graph.initializer
            if t.data_type in floats and t.name not in stats]


def _fix_eval_batchnorm(path: pathlib.Path) -> None:
    """Drop the running-stat outputs of inference-mode BN nodes (ORT 1.19 eval-model bug)."""
    proto = onnx.load(os.fspath(path))
    changed = False
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) == 1:
            continue
        mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        if not mode:
            del node.output[1:]
            changed = True
    if changed:
        _atomic_write(proto.SerializeToString(), path)


@contextlib.contextmanager
def _quiet_gradient_builder(quiet: bool) -> Iterator[None]:
    """Silence the INFO logs of ORT's offline gradient builder.

    ``generate_artifacts`` builds its own ``SessionOptions()`` whose log level
    ignores ``onnxruntime.set_default_logger_severity``; the only handle is
    the ``SessionOptions`` name inside ``_training_graph_utils``, which is
    swapped for a factory with ``log_severity_level=3`` while in this block.
    """
    from onnxruntime.training.onnxblock import _training_graph_utils as tgu

    original = getattr(tgu, "SessionOptions", None)
    if not quiet or original is None:
        yield
        return

    def factory() -> Any:
        options = original()
        options.log_severity_level = 3
        return options

    tgu.SessionOptions = factory
    try:
        yield
    finally:
        tgu.SessionOptions = original


def training_artifacts(model: onnx.ModelProto | str | os.PathLike[str],
                       artifact_dir: str | os.PathLike[str],
                       requires_grad: Sequence[str] | None = None,
                       optimizer: str = "adamw", quiet: bool = True) -> pathlib.Path:
    """Run ORT's ``generate_artifacts`` with cross-entropy loss and fix its eval model.

    ``requires_grad`` defaults to :func:`trainable_initializers`. ``quiet``
    silences the gradient builder's INFO logs. Writes ``training_model.onnx``,
    ``eval_model.onnx``, ``optimizer_model.onnx`` and ``checkpoint`` into
    ``artifact_dir`` (created if needed) and returns it.
    """
    from onnxruntime.training import artifacts

    proto = _load(model)
    out = pathlib.Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    optimizers: Mapping[str, artifacts.OptimType] = {
        "adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}
    with _quiet_gradient_builder(quiet):
        artifacts.generate_artifacts(
            proto,
            requires_grad=list(requires_grad) if requires_grad is not None
            else trainable_initializers(proto),
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=optimizers[optimizer.lower()],
            artifact_directory=os.fspath(out))
    _fix_eval_batchnorm(out / "eval_model.onnx")
    return out
