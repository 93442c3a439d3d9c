"""`poetc export` (issues #16/#17, "output stays usable by the ecosystem"): the trained parameters as a
standard ONNX Runtime checkpoint (parameters only, trainable flags kept, no `__poet_` state) and an
inference model a plain InferenceSession runs, for both optimizer modes; bad inputs are typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from bad_inputs import ROOT
from poetc import output
from poetc.api import CompileOptions, compile_model
from poetc.cli import main
from poetc.importer import ImportOptions

MLP = ROOT / "examples" / "mlp.onnx"
FROZEN = "net.2.*"  # one frozen layer, so the trainable flags are exercised


def _params(path: Path) -> dict[str, tuple[np.ndarray, bool]]:
    from onnxruntime.training.api import CheckpointState
    state = CheckpointState.load_checkpoint(str(path))
    return {name: (np.array(p.data), bool(p.requires_grad)) for name, p in state.parameters}


@pytest.fixture(scope="module", params=["unfused", "fused"])
def trained(request, tmp_path_factory) -> Path:
    """examples/mlp.onnx compiled in one optimizer mode with net.2.* frozen, then trained 2 steps."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    try:
        result = compile_model(MLP, CompileOptions(ram_bytes=40_000_000, out_dir=out, baselines=(),
                                                   optimizer_mode=request.param,
                                                   import_options=ImportOptions(freeze=[FROZEN])))
    except Exception as exc:  # noqa: BLE001 - e.g. the fused mode's op library cannot be built here
        pytest.skip(f"cannot compile examples/mlp.onnx in the {request.param} mode here: {exc}")
    assert result.optimizer_mode == request.param
    assert main(["train", str(out), "--steps", "2"]) == 0
    return out


def _ort_run(model, feeds):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                opts, providers=["CPUExecutionProvider"])
    return sess, sess.run(None, feeds)


def test_export_writes_the_trained_parameters_and_a_runnable_inference_model(trained, tmp_path, capsys):
    dest = tmp_path / "exported"
    assert main(["export", str(trained), "-o", str(dest)]) == 0
    assert "trained_checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == [".poetc-manifest.json", "checkpoint", "inference_model.onnx"]

    exported = _params(dest / "checkpoint")
    trained_state = _params(trained / "trained_checkpoint")
    initial = _params(trained / "checkpoint")
    assert not any("__poet_" in n for n in exported)
    names = sorted(n for n in trained_state if "__poet_" not in n)
    assert sorted(exported) == names and len(names) == 8
    for name in names:
        value, trainable = exported[name]
        assert value.dtype == trained_state[name][0].dtype
        assert value.tobytes() == trained_state[name][0].tobytes(), name  # bitwise
        assert trainable == (not name.startswith("net.2.")), name
        # the test means something: trained parameters moved, frozen ones did not
        assert (value.tobytes() != initial[name][0].tobytes()) == trainable, name

    # the inference model: user input in, model output out, no labels or loss
    model = onnx.load(str(dest / "inference_model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [vi.name for vi in model.graph.input] == ["input"]
    assert [vi.name for vi in model.graph.output] == ["logits"]
    x = np.random.default_rng(0).standard_normal((512, 784)).astype(np.float32)
    sess, (logits,) = _ort_run(dest / "inference_model.onnx", {"input": x})
    assert logits.shape == (512, 10)
    # against the user's original forward model with its initializers replaced by the trained values
    forward = onnx.load(str(MLP))
    for init in forward.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(trained_state[init.name][0], init.name))
    _, (expected,) = _ort_run(forward, {"input": x})
    np.testing.assert_array_equal(logits, expected)


def test_export_of_an_untrained_output_and_an_explicit_checkpoint(trained, tmp_path):
    untrained = tmp_path / "untrained"
    shutil.copytree(trained, untrained)
    (untrained / "trained_checkpoint").unlink()  # as compile left it (the manifest still lists it: harmless)
    assert main(["export", str(untrained), "-o", str(tmp_path / "e0")]) == 0
    initial = _params(trained / "checkpoint")
    for name, (value, _) in _params(tmp_path / "e0" / "checkpoint").items():
        assert value.tobytes() == initial[name][0].tobytes(), name

    saved = tmp_path / "saved_checkpoint"
    assert main(["train", str(untrained), "--steps", "1", "--save", str(saved)]) == 0
    assert main(["export", str(untrained), "--checkpoint", str(saved), "-o", str(tmp_path / "e1")]) == 0
    mine = _params(saved)
    for name, (value, _) in _params(tmp_path / "e1" / "checkpoint").items():
        assert value.tobytes() == mine[name][0].tobytes(), name


def _run_error(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert err.startswith("poetc: error: ") and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return code, err


@pytest.mark.parametrize("case,code,phrase", [
    ("missing-dir", 3, "does not exist"),
    ("no-report", 3, "no report.json"),
    ("tampered-eval-model", 10, "eval_model.onnx was modified after compile"),
    ("tampered-trained-checkpoint", 10, "trained_checkpoint was modified after poetc train"),
    ("missing-checkpoint-arg", 3, "does not exist"),
    ("text-checkpoint-arg", 3, "is not an ONNX Runtime checkpoint"),
    ("checkpoint-of-another-model", 3, "lacks the parameter 'net.6.bias'"),
    ("checkpoint-wrong-shape", 3, "parameter 'net.6.bias' is float32[3]"),
    ("unlisted-trained-checkpoint", 10, "was not written by poetc train"),
    ("out-exists", 7, "already exists"),
    ("out-parent-is-a-file", 7, "is not a directory"),
])
def test_bad_inputs_are_typed_errors(trained, tmp_path, capsys, case, code, phrase):
    src = tmp_path / "src"
    shutil.copytree(trained, src)
    dest = tmp_path / "dest"
    argv = ["export", str(src), "-o", str(dest)]
    if case == "missing-dir":
        argv[1] = str(tmp_path / "nope")
    elif case == "no-report":
        (src / "report.json").unlink()
    elif case == "tampered-eval-model":
        with open(src / "eval_model.onnx", "ab") as fh:
            fh.write(b"garbage")
    elif case == "tampered-trained-checkpoint":
        with open(src / "trained_checkpoint", "ab") as fh:
            fh.write(b"garbage")
    elif case == "missing-checkpoint-arg":
        argv += ["--checkpoint", str(tmp_path / "nope.ckpt")]
    elif case == "text-checkpoint-arg":
        (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
        argv += ["--checkpoint", str(tmp_path / "text.ckpt")]
    elif case in ("checkpoint-of-another-model", "checkpoint-wrong-shape"):
        from onnxruntime.training.onnxblock import save_checkpoint
        values = {n: v for n, (v, _) in _params(src / "trained_checkpoint").items()}
        del values["net.6.bias"]
        if case == "checkpoint-wrong-shape":
            values["net.6.bias"] = np.zeros(3, np.float32)
        protos = [onnx.numpy_helper.from_array(v, n) for n, v in values.items()]
        save_checkpoint((protos, []), str(tmp_path / "other.ckpt"))
        argv += ["--checkpoint", str(tmp_path / "other.ckpt")]
    elif case == "unlisted-trained-checkpoint":
        manifest = json.loads((src / output.MANIFEST).read_text())
        del manifest["files"]["trained_checkpoint"]
        (src / output.MANIFEST).write_text(json.dumps(manifest))
    elif case == "out-exists":
        dest.mkdir()
        (dest / "precious.txt").write_text("keep me")
    elif case == "out-parent-is-a-file":
        (tmp_path / "afile").write_text("")
        argv[-1] = str(tmp_path / "afile" / "out")
    got, err = _run_error(argv, capsys)
    assert got == code and phrase in err, err
    if case == "out-exists":
        assert (dest / "precious.txt").read_text() == "keep me" and len(list(dest.iterdir())) == 1
    elif case != "out-parent-is-a-file":
        assert not dest.exists()
    assert not list(tmp_path.glob(".poetc-stage-*")) and not list(tmp_path.glob(".poetc-lock-*"))


def test_force_replaces_a_previous_export_only(trained, tmp_path, capsys):
    dest = tmp_path / "exported"
    assert main(["export", str(trained), "-o", str(dest)]) == 0
    first = (dest / "inference_model.onnx").read_bytes()
    assert main(["export", str(trained), "-o", str(dest), "--force"]) == 0
    assert (dest / "inference_model.onnx").read_bytes() == first  # same input, same bytes
    (dest / "notes.txt").write_text("mine")
    code, err = _run_error(["export", str(trained), "-o", str(dest), "--force"], capsys)
    assert code == 7 and "was not written by poetc" in err
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce", "l1"])
def test_the_inference_model_drops_each_loss_block(loss, tmp_path):
    """For every --loss poetc offers, eval_model.onnx minus the loss block is the user's forward model:
    same inputs, the same output, the same values."""
    from poetc.export import inference_model
    from poetc.importer import import_model
    artifacts = import_model(MLP, tmp_path, ImportOptions(loss=loss))
    params = {n: v for n, (v, _) in _params(artifacts / "checkpoint").items()}
    model = inference_model(onnx.load(str(artifacts / "eval_model.onnx")), params)
    assert [vi.name for vi in model.graph.input] == ["input"]
    assert [vi.name for vi in model.graph.output] == ["logits"]
    assert sorted(n.op_type for n in model.graph.node) == ["Gemm"] * 4 + ["Relu"] * 3
    x = np.random.default_rng(1).standard_normal((512, 784)).astype(np.float32)
    _, (got,) = _ort_run(model, {"input": x})
    forward = onnx.load(str(MLP))
    for init in forward.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(params[init.name], init.name))
    _, (expected,) = _ort_run(forward, {"input": x})
    np.testing.assert_array_equal(got, expected)


def test_an_eval_model_without_an_ort_loss_block_is_refused(tmp_path):
    from poetc.errors import UnsupportedModelError
    from poetc.export import inference_model
    from poetc.importer import import_model
    artifacts = import_model(MLP, tmp_path, ImportOptions())
    model = onnx.load(str(artifacts / "eval_model.onnx"))
    loss = model.graph.output[0].name
    for node in model.graph.node:  # the loss renamed as a user's own loss would be
        node.output[:] = ["my_loss" if o == loss else o for o in node.output]
    model.graph.output[0].name = "my_loss"
    with pytest.raises(UnsupportedModelError, match="cannot find the loss block"):
        inference_model(model, {n: v for n, (v, _) in _params(artifacts / "checkpoint").items()})
