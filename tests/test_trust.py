"""Issue #14, running compiled artifacts and dying loudly: `train`/`verify` check every artifact against
report.json's SHA-256 (the library before it is loaded), `--data` files are checked, a failing verify
says why, SIGTERM cleans up and stops the worker (exit 143), nothing is left in $TMPDIR, `train` saves a
checkpoint, sizes below one byte or absurdly large are refused, ONNX Runtime's own log line stays off
stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bad_inputs import ROOT
from poetc import output
from poetc.cli import main
from poetc.errors import UsageError
from poetc.units import parse_size

MLP = ROOT / "examples" / "mlp.onnx"


def _poetc(args, *, env=None, **kw) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, "-m", "poetc", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=900, **kw)


@pytest.fixture(scope="module")
def paged(tmp_path_factory) -> Path:
    """examples/mlp.onnx compiled with paging (Spill/Restore and the library in the output)."""
    from poetc.runtime import nativelib
    try:
        nativelib.build_spill_library("host")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the Spill/Restore library cannot be built here: {exc}")
    out = tmp_path_factory.mktemp("paged") / "out"
    proc = _poetc(["compile", MLP, "--ram", "19.8MiB", "--deadline", "2x", "--strategy", "paging-only",
                   "--optimizer-mode", "unfused",
                   "--baselines", "", "--json", "-o", out])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["result"]["decisions"]["page"] >= 1
    assert set(report["artifacts"]) >= {"libpoet_spill.so", "training_model.onnx", "schedule.json", "schedule.bin",
                                        "runtime.json", "checkpoint", "reference/training_model.onnx"}
    return out


@pytest.fixture
def copy_of(paged, tmp_path):
    def make() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(paged, dst, symlinks=True)
        return dst
    return make


# ---------------------------------------------------------------------------------------------------
# artifacts checked against report.json


def test_a_replaced_library_is_refused_before_it_is_loaded(copy_of, tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler to build the stand-in library")
    out = copy_of()
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / "libpoet_spill.so"), str(src)], check=True)
    for command in (["train", out, "--steps", "1"], ["verify", out, "--steps", "1"]):
        proc = _poetc(command)
        assert proc.returncode == 10, proc.stderr
        assert "libpoet_spill.so was modified after compile" in proc.stderr
        assert not marker.exists(), "the replaced library's constructor ran"


@pytest.mark.parametrize("tamper", ["reference-graph-swapped-in", "schedule.json", "schedule.bin", "runtime.json",
                                    "checkpoint", "missing-optimizer"])
def test_tampered_artifacts_are_refused(copy_of, tamper):
    out = copy_of()
    if tamper == "reference-graph-swapped-in":
        shutil.copyfile(out / "reference" / "training_model.onnx", out / "training_model.onnx")
        name = "training_model.onnx"
    elif tamper == "missing-optimizer":
        (out / "optimizer_model.onnx").unlink()
        name = "optimizer_model.onnx"
    else:
        name = tamper
        with open(out / name, "ab") as fh:
            fh.write(b"garbage")
    proc = _poetc(["train", out, "--steps", "1"])
    assert proc.returncode == 10, proc.stderr
    assert proc.stderr.startswith("poetc: error: ") and name in proc.stderr
    assert "recompile" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2


def test_an_output_from_before_artifact_hashes_is_refused_with_a_hint(copy_of, capsys):
    out = copy_of()
    report = json.loads((out / "report.json").read_text())
    del report["artifacts"]
    (out / "report.json").write_text(json.dumps(report))
    assert main(["train", str(out), "--steps", "1"]) == 10
    assert "records no artifact hashes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# --data


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"), ("text", "not a NumPy .npz archive"), ("objects", "Python objects"),
    ("npy", "a single .npy array"), ("lacks-labels", "lacks the training input"), ("wrong-shape", "the compiled model takes"),
])
def test_bad_data_files_are_user_errors(paged, tmp_path, capsys, case, expect):
    path = tmp_path / "data.npz"
    report = json.loads((paged / "report.json").read_text())
    good = {n: np.zeros(s["shape"], dtype=np.float32 if s["dtype"] == "float" else np.int64)
            for n, s in report["inputs"].items()}
    if case == "text":
        path.write_text("1 2 3\n")
    elif case == "objects":
        np.savez(path, **dict(good, input=np.array([object()] * 3, dtype=object)))
    elif case == "npy":
        path = tmp_path / "data.npy"
        np.save(path, np.zeros(3))
    elif case == "lacks-labels":
        np.savez(path, input=good["input"])
    elif case == "wrong-shape":
        np.savez(path, **dict(good, input=np.zeros((3, 3), np.float32)))
    for command in ("train", "verify"):
        code = main([command, str(paged), "--data", str(path)])
        err = capsys.readouterr().err
        assert code == 3, err
        assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 2, err


# ---------------------------------------------------------------------------------------------------
# train saves a checkpoint; nothing left in $TMPDIR


def test_train_saves_a_checkpoint_and_leaves_nothing_in_tmpdir(copy_of, tmp_path):
    from onnxruntime.training.api import CheckpointState
    out = copy_of()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _poetc(["train", out, "--steps", "2"], env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    saved = out / "trained_checkpoint"
    assert f"saved the trained checkpoint to {saved}" in proc.stdout
    trained = dict(CheckpointState.load_checkpoint(str(saved)).parameters)
    original = dict(CheckpointState.load_checkpoint(str(out / "checkpoint")).parameters)
    assert set(trained) == set(original)
    assert any(not np.array_equal(trained[k].data, original[k].data) for k in trained)  # it trained
    assert output.foreign_content(out) is None  # recorded in the manifest: --force may still replace DIR
    # nothing but the (private, per-user) spill directory is left in $TMPDIR
    left = sorted(p.name for p in tmp.iterdir())
    assert left == [f"poetc-spill-{os.geteuid()}"], left
    spill = tmp / left[0]
    assert spill.stat().st_mode & 0o777 == 0o700 and not list(spill.iterdir())
    # an explicit --save never overwrites
    again = _poetc(["train", out, "--steps", "1", "--save", saved])
    assert again.returncode == 7 and "already exists" in again.stderr
    # the default path is replaced (poetc wrote it), unless someone else changed it
    assert _poetc(["train", out, "--steps", "1"]).returncode == 0
    saved.write_bytes(b"mine now")
    proc = _poetc(["train", out, "--steps", "1"])
    assert proc.returncode == 7 and "left untouched" in proc.stderr and saved.read_bytes() == b"mine now"


def test_verify_leaves_nothing_in_tmpdir(paged, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _poetc(["verify", paged, "--steps", "2"], env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("poetc-") and "spill" not in p.name] == []


# ---------------------------------------------------------------------------------------------------
# verify failures say why


def test_a_failing_verify_prints_one_paragraph_and_exits_8(paged, monkeypatch, capsys):
    from poetc import run
    from poetc.plan import Budget
    report = run.VerifyReport(
        steps=3, numerics_intra_op_threads=1, losses_reference=[2.3, 2.2, 2.1], losses_compiled=[2.3, 2.25, 2.2],
        max_abs_loss_diff_default_threads=0.1, max_abs_loss_diff=0.1, max_rel_loss_diff=0.045,
        max_abs_param_diff=0.01, max_rel_param_diff=0.002, bitwise_identical_params=False,
        budget=Budget.from_ram(20_000_000, 16_000_000), predicted_step_peak_bytes=3_000_000,
        measured_step_peak_bytes=[4_000_000, 5_000_000, 5_000_000], steady_state_from_step=1,
        reference_step_peak_bytes=[5_000_000] * 3, measured_total_peak_bytes=21_000_000, within_budget=False,
        prediction_within_3pct_or_1MiB=False, step_seconds_reference=[0.1] * 3, step_seconds_compiled=[0.1] * 3,
        identical_results=False)
    assert run.VerifyReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert not report.ok
    monkeypatch.setattr(run, "verify", lambda *a, **k: report)
    code = main(["verify", str(paged)])
    err = capsys.readouterr().err
    assert code == 8
    assert err.startswith("poetc: error: verification failed: the compiled artifacts train differently")
    assert "above the budget" in err and len(err.strip().splitlines()) == 2


# ---------------------------------------------------------------------------------------------------
# SIGTERM


def _wait_for(predicate, what, timeout_s=300.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_sigterm_stops_train_and_its_worker_and_cleans_up(paged, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "poetc", "train", str(paged), "--steps", "100000",
                             "--save", str(tmp_path / "ckpt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    workers = _wait_for(lambda: _processes_mentioning(str(tmp)) and
                        [p for p in _processes_mentioning("poetc.runtime._worker") if p in _processes_mentioning(str(tmp))],
                        "the training worker")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    time.sleep(0.2)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and
                "zombie" not in (Path(f"/proc/{p}/status").read_text().lower())], "the worker kept running"
    assert [p.name for p in tmp.iterdir() if "spill" not in p.name] == []
    assert not (tmp_path / "ckpt").exists()


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def test_a_killed_train_leaves_no_orphan_worker(paged, tmp_path):
    """SIGKILL cannot be handled; the worker asked the kernel (PR_SET_PDEATHSIG) to stop with its parent."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "poetc", "train", str(paged), "--steps", "100000",
                             "--save", str(tmp_path / "ckpt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    workers = _wait_for(lambda: [p for p in _processes_mentioning("poetc.runtime._worker")
                                 if p in _processes_mentioning(str(tmp))], "the training worker")
    proc.kill()
    proc.wait()
    _wait_for(lambda: not any(_alive(p) for p in workers), "the worker to stop", timeout_s=60)


def test_sigterm_during_compile_leaves_no_staging_or_temp_dirs(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "poetc", "compile", str(MLP), "--ram", "20MB", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: list(tmp.glob("poetc-compile-*")) and list(tmp_path.glob(".poetc-stage-*")), "the compile's dirs")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert not out.exists()
    assert not list(tmp_path.glob(".poetc-*")) and not list(tmp.glob("poetc-*"))


# ---------------------------------------------------------------------------------------------------
# sizes, ONNX Runtime's log


@pytest.mark.parametrize("text,expect", [
    ("0.5B", "less than one byte"), ("1.5B", "not a whole number of bytes"),
    ("1" + "0" * 30, "larger than poetc handles"), ("2048TiB", "larger than poetc handles"),
])
def test_sizes_below_a_byte_or_absurdly_large_are_refused(text, expect):
    with pytest.raises(UsageError, match=expect):
        parse_size(text, what="--ram")
    assert parse_size("1024TiB") == 2**50  # the largest accepted


def test_ram_below_a_byte_through_the_cli(tmp_path, capsys):
    assert main(["compile", str(MLP), "--ram", "0.5B", "-o", str(tmp_path / "o")]) == 2
    assert "less than one byte" in capsys.readouterr().err


_ORT_FAILS = r"""
import sys, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
if sys.argv[1] == "quiet":
    from poetc.cli import _quiet_onnxruntime
    _quiet_onnxruntime()
g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                       helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
try:
    s.run(None, {"x": np.ones(4, np.float32), "s": np.array([5], np.int64)})
except Exception:
    print("raised")
"""


def test_onnxruntime_log_line_does_not_reach_stderr():
    """ORT logs a coloured `[E:onnxruntime:...]` line for an error it also raises; the CLI turns the
    exception into its own paragraph and keeps ORT's logger to fatal messages (control: without it the
    line appears)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    loud = subprocess.run([sys.executable, "-c", _ORT_FAILS, "loud"], capture_output=True, text=True, env=env)
    quiet = subprocess.run([sys.executable, "-c", _ORT_FAILS, "quiet"], capture_output=True, text=True, env=env)
    assert loud.stdout.strip() == quiet.stdout.strip() == "raised"
    assert "onnxruntime" in loud.stderr
    assert "onnxruntime" not in quiet.stderr, quiet.stderr
