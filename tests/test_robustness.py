"""Issue #6: every bad input gets one clear paragraph and its documented exit code (no traceback, nothing
half-written); compiles are byte-identical across processes and hash seeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs import CASES, ROOT, prepare, tmpfs
from poetc.cli import main
from poetc.errors import EXIT_CODES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    prepare(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    with tmpfs(tmp_path / "mnt", case.mount) if case.mount else _nothing() as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs (read-only / tiny) needs root")
        code = _run(case.args)
        err = capsys.readouterr().err
        assert code == case.code, err
        assert "Traceback" not in err
        assert err.startswith("poetc: error: "), err
        assert case.expect.lower() in err.lower(), err
        assert len(err.strip().splitlines()) <= 3, err  # one paragraph: the message and at most two hint lines
        for path in case.no_output:
            assert not (tmp_path / path).exists(), f"{path} was written"
        leftovers = list(tmp_path.glob(".poetc-*")) + list(tmp_path.glob("mnt/.poetc-*"))
        assert not leftovers, f"staging directories left behind: {leftovers}"
    assert case.code in EXIT_CODES


def _run(args) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # argparse's own errors (exit 2)
        return exc.code


class _nothing:
    def __enter__(self):
        return True

    def __exit__(self, *exc):
        return False


def test_every_exit_code_is_documented():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"exit code {code} missing from docs/errors.md"


def test_docs_table_lists_every_case():
    """docs/errors.md's table comes from `python tests/bad_inputs.py --write`: one row per case, with the
    expected exit code observed."""
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in CASES:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {case.tried} |")), None)
        assert row is not None, f"no row for {case.id} in docs/errors.md (run python tests/bad_inputs.py --write)"
        assert row.rstrip().endswith(f"| {case.code} |") or "(not run" in row, row


def test_time_limit_accepts_bare_seconds(mlp_onnx, tmp_path, capsys):
    code = main(["compile", str(mlp_onnx), "--ram", "100MB", "--time-limit", "60", "--baselines", "",
                 "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "report.json").exists()


def test_force_replaces_a_previous_output(mlp_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(mlp_onnx), "--ram", "100MB", "--baselines", "", "-o", str(out)]
    assert main(args) == 0
    assert main(args + ["--force"]) == 0
    assert not list(tmp_path.glob(".poetc-*"))
    (out / "stale.txt").write_text("not written by poetc")  # issue #14: then --force must not delete it
    assert main(args + ["--force"]) == 7
    assert (out / "stale.txt").exists()


def test_internal_errors_are_one_paragraph(monkeypatch, mlp_onnx, capsys):
    import poetc.api

    def boom(*a, **k):
        raise KeyError("an invariant")
    monkeypatch.setattr(poetc.api, "inspect_model", boom)
    code = main(["inspect", str(mlp_onnx)])
    err = capsys.readouterr().err
    assert code == 70 and "internal error" in err and "Traceback" not in err and "-vv" in err


# ---------------------------------------------------------------------------------------------------
# determinism


def _compile_in_fresh_process(model: Path, out: Path, hash_seed: str, *extra: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "poetc", "compile", str(model), "-o", str(out), "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("model,options", [
    ("mlp", ["--ram", "19.8MiB", "--deadline", "2x"]),  # pages one activation: Spill/Restore inserted
    ("cnn", ["--ram", "6.2MB", "--deadline", "3x"]),  # recomputes two
], ids=["mlp-paging", "cnn-recompute"])
def test_compile_is_byte_identical_across_hash_seeds(model, options, tmp_path, request):
    from poetc.output import file_hashes
    path = ROOT / "examples" / "mlp.onnx" if model == "mlp" else request.getfixturevalue("cnn_onnx")
    _compile_in_fresh_process(path, tmp_path / "a", "1", *options)
    _compile_in_fresh_process(path, tmp_path / "b", "4242", *options)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert "report.json" in a and "training_model.onnx" in a
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
