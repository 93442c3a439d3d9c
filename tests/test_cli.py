"""Bad input: a specific message and a documented exit code, no traceback, nothing half-written."""

import subprocess
import sys

import pytest

from poetc.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def test_missing_file(tmp_path, capsys):
    code, _, err = run(["inspect", tmp_path / "nope.onnx"], capsys)
    assert code == 3 and "does not exist" in err


@pytest.mark.parametrize("content", [b"", b"hello, not onnx", b"\x08\x07\x12\x03abc\xff\xff"])
def test_not_onnx(tmp_path, capsys, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    code, _, err = run(["inspect", p], capsys)
    assert code == 3 and str(p) in err


def test_truncated_model(tmp_path, mlp_onnx, capsys):
    p = tmp_path / "cut.onnx"
    p.write_bytes(mlp_onnx.read_bytes()[: mlp_onnx.stat().st_size // 2])
    code, _, err = run(["inspect", p], capsys)
    assert code == 3


def test_unknown_loss(mlp_onnx, capsys):
    code, _, err = run(["inspect", mlp_onnx, "--loss", "hinge"], capsys)
    assert code == 2 and "hinge" in err


def test_symbolic_batch_needs_batch(tmp_path, capsys):
    import models
    p = models.export_onnx("mlp", tmp_path / "dyn.onnx", dynamic_batch=True)
    code, _, err = run(["inspect", p], capsys)
    assert code == 4 and "--batch" in err and "input" in err
    code, out, _ = run(["inspect", p, "--batch", "4", "--json"], capsys)
    assert code == 0 and '"keep_all_peak_bytes"' in out


@pytest.mark.parametrize("ram", ["8 MB", "8mb", "-1MB", "1e3MB", "12parsecs"])
def test_malformed_sizes(mlp_onnx, tmp_path, capsys, ram):
    code, _, err = run(["compile", mlp_onnx, f"--ram={ram}", "-o", tmp_path / "out"], capsys)
    assert code == 2 and repr(ram) in err
    assert not (tmp_path / "out").exists()


def test_budget_below_lower_bound(mlp_onnx, tmp_path, capsys):
    code, _, err = run(["compile", mlp_onnx, "--ram", "1MB", "-o", tmp_path / "out"], capsys)
    assert code == 6 and "lower bound" in err and "--ram" in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".poetc-*"))  # no staging directory left behind


def test_output_exists(mlp_onnx, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run(["compile", mlp_onnx, "--ram", "100MB", "-o", tmp_path / "out"], capsys)
    assert code == 7 and "--force" in err


def test_unknown_target(mlp_onnx, tmp_path, capsys):
    code, _, err = run(["compile", mlp_onnx, "--ram", "100MB", "--target", "cray", "-o", tmp_path / "o"], capsys)
    assert code == 5 and "cray" in err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "poetc", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "poetc" in out.stdout
