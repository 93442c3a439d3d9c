"""Tests for the ``models`` package: export, ORT parity, determinism, training step."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running pytest without installing the repo
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.__main__ import main as cli_main  # noqa: E402

ort = pytest.importorskip("onnxruntime")

SLOW = {"resnet18", "bert_small"}
TRAINED = ["mlp", "cnn", "bert_tiny"]
BATCH = 2


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


ALL = _params(list(models.MODELS))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each model once per module at ``BATCH``; returns name -> path."""
    root = tmp_path_factory.mktemp("export")
    cache: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in cache:
            cache[name] = models.export_onnx(name, root / f"{name}.onnx", batch=BATCH)
        return cache[name]

    return get


def _torch_forward(name: str, feeds: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    module = models.instantiate(name, seed)  # train mode: BN uses batch statistics
    assert module.training
    spec = models.get_spec(name)
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()


def _ort_forward(path: pathlib.Path, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = models.get_spec(name)
    return sess.run([models.OUTPUT_NAME], {n: feeds[n] for n in spec.input_names})[0]


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_registry():
    core = {"mlp", "cnn", "resnet18_cifar", "resnet18", "mobilenetv2", "vgg11", "bert_tiny", "bert_small"}
    scaling = {"resnet50_cifar", "resnet101_cifar", "resnet200_cifar", "encoder24", "encoder32"}
    # models.scaling.register() (bench --scaling) adds the large graphs; nothing else changes the registry
    assert core <= set(models.MODELS) <= core | scaling
    for name, spec in models.MODELS.items():
        assert spec.name == name
        assert spec.loss == "cross_entropy"
        assert spec.default_batch >= 1 and spec.num_classes >= 2
        assert spec.inputs and all(i.dtype in ("float32", "int64") for i in spec.inputs)
    with pytest.raises(KeyError, match="unknown model"):
        models.get_spec("alexnet")


@pytest.mark.parametrize("name", ALL)
def test_export_is_valid_and_matches_torch(name, exported):
    path = exported(name)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    spec = models.get_spec(name)
    assert proto.ir_version <= models.MAX_IR_VERSION
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == models.OPSET
    assert [i.name for i in proto.graph.input] == spec.input_names
    for vi, inp in zip(proto.graph.input, spec.inputs):
        assert _dims(vi) == [BATCH, *inp.shape]
    assert [o.name for o in proto.graph.output] == [models.OUTPUT_NAME]
    assert _dims(proto.graph.output[0]) == [BATCH, spec.num_classes]

    feeds = models.make_batch(name, BATCH, seed=1)
    got = _ort_forward(path, name, feeds)
    want = _torch_forward(name, feeds)
    assert got.shape == (BATCH, spec.num_classes)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_trainable_initializers_are_the_torch_parameters(name, exported):
    proto = onnx.load(str(exported(name)))
    module = models.instantiate(name)
    assert set(models.trainable_initializers(proto)) == {n for n, _ in module.named_parameters()}


@pytest.mark.parametrize("name", ALL)
def test_export_is_deterministic(name, tmp_path):
    a = models.export_onnx(name, tmp_path / "a.onnx", batch=BATCH, seed=3)
    b = models.export_onnx(name, tmp_path / "b.onnx", batch=BATCH, seed=3)
    assert a.read_bytes() == b.read_bytes()
    if name not in SLOW:
        c = models.export_onnx(name, tmp_path / "c.onnx", batch=BATCH, seed=4)
        assert c.read_bytes() != a.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"] + (
        [] if name in SLOW else ["c.onnx"])


def test_batchnorm_is_exported_in_training_form(exported):
    proto = onnx.load(str(exported("cnn")))
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 3
    for node in bns:
        attrs = {a.name: a.i for a in node.attribute if a.name == "training_mode"}
        assert attrs == {"training_mode": 1}


def test_layernorm_exposes_statistics(exported):
    proto = onnx.load(str(exported("bert_tiny")))
    lns = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 2 * 2 + 1
    assert all(len(n.output) == 3 and all(n.output) for n in lns)


def test_no_dropout_or_fused_attention(exported):
    for name in ("mlp", "cnn", "bert_tiny"):
        ops = {n.op_type for n in onnx.load(str(exported(name))).graph.node}
        assert not ops & {"Dropout", "Attention", "MultiHeadAttention"}, name


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert_tiny"])
def test_dynamic_batch(name, tmp_path):
    path = models.export_onnx(name, tmp_path / "m.onnx", batch=2, dynamic_batch=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert _dims(proto.graph.input[0])[0] == models.BATCH_DIM
    assert _dims(proto.graph.output[0])[0] == models.BATCH_DIM
    for batch in (1, 3):
        feeds = models.make_batch(name, batch, seed=batch)
        got = _ort_forward(path, name, feeds)
        np.testing.assert_allclose(got, _torch_forward(name, feeds), rtol=1e-4, atol=1e-5)


def test_make_batch():
    a = models.make_batch("cnn", 4, seed=0)
    assert set(a) == {"input", "labels"}
    assert a["input"].shape == (4, 3, 32, 32) and a["input"].dtype == np.float32
    assert a["labels"].shape == (4,) and a["labels"].dtype == np.int64
    assert ((0 <= a["labels"]) & (a["labels"] < 10)).all()
    b = models.make_batch("cnn", 4, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input"], models.make_batch("cnn", 4, seed=1)["input"])

    t = models.make_batch("bert_tiny", 3, seed=5)
    assert t["input_ids"].shape == (3, 128) and t["input_ids"].dtype == np.int64
    assert t["input_ids"].min() >= 0 and t["input_ids"].max() < 1000
    assert ((0 <= t["labels"]) & (t["labels"] < 2)).all()


def test_instantiate_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = models.instantiate("mlp", seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = models.instantiate("mlp", seed=7)
    c = models.instantiate("mlp", seed=8)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                         c.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_build_cache(tmp_path, monkeypatch):
    path = models.build("mlp", tmp_path, batch=4, seed=2)
    assert path == tmp_path / "mlp-b4-s2" / "model.onnx"
    assert path.is_file()
    assert os.listdir(path.parent) == ["model.onnx"]  # no temp file left behind
    stat = path.stat()
    assert models.build("mlp", tmp_path, batch=4, seed=2) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # cached, not rebuilt
    assert path.read_bytes() == models.export_proto("mlp", 4, 2).SerializeToString()

    default = models.build("mlp", tmp_path)
    assert default.parent.name == f"mlp-b{models.MODELS['mlp'].default_batch}-s0"

    monkeypatch.setenv("POETC_CACHE", str(tmp_path / "env"))
    assert models.default_cache_dir() == tmp_path / "env"
    assert models.build("mlp", batch=2) == tmp_path / "env" / "mlp-b2-s0" / "model.onnx"
    dyn = models.build("mlp", dynamic_batch=True)
    assert dyn == tmp_path / "env" / "mlp-bdyn-s0" / "model.onnx"
    monkeypatch.delenv("POETC_CACHE")
    assert models.default_cache_dir() == pathlib.Path.home() / ".cache" / "poetc" / "models"


@pytest.mark.parametrize("name", TRAINED)
def test_ort_training_step(name, exported, tmp_path):
    from onnxruntime.training import api

    art = models.training_artifacts(exported(name), tmp_path / "art")
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
        assert (art / f).exists(), f
    state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
    module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"))
    optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), module)

    spec = models.get_spec(name)
    feeds = models.make_batch(name, BATCH, seed=11)
    inputs = [feeds[n] for n in spec.input_names] + [feeds[models.LABELS_NAME]]

    module.train()
    loss0 = float(module(*inputs))
    optimizer.step()
    module.lazy_reset_grad()
    loss1 = float(module(*inputs))
    assert np.isfinite(loss0) and np.isfinite(loss1)
    assert loss1 < loss0  # one AdamW step on the same batch lowers the loss

    logits = torch.from_numpy(_torch_forward(name, feeds))
    want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(feeds["labels"]))
    assert loss0 == pytest.approx(float(want), rel=1e-4, abs=1e-5)

    module.eval()
    assert np.isfinite(float(module(*inputs)))


def test_cli(tmp_path, capsys):
    assert cli_main(["list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(models.MODELS)

    out = tmp_path / "x.onnx"
    assert cli_main(["build", "mlp", "--batch", "3", "--seed", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == models.export_proto("mlp", 3, 1).SerializeToString()

    assert cli_main(["build", "mlp", "--cache-dir", str(tmp_path / "c"), "--batch", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "mlp-b2-s0" / "model.onnx")

    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "alexnet"])
    assert exc.value.code == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err


def test_cli_subprocess_unknown_model():
    proc = subprocess.run([sys.executable, "-m", "models", "build", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr
    assert proc.stdout == ""
