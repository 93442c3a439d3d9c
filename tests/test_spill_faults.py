"""Spill faults through a full training step (`poetc train` on compiled artifacts that page): a spill
file deleted or corrupted between Spill and Restore, an unwritable spill directory, a full one. Each
fails the step with exit code 9 and one clear paragraph, and leaves the output directory (checkpoint
included) byte-for-byte unchanged.

Deleting and corrupting use tests/native/spill_fault.c, an LD_PRELOAD shim that damages a `.spill`
file at the moment Restore opens it (deterministic: no race with a watcher thread).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs import ROOT, tmpfs
from poetc.output import file_hashes

MLP = ROOT / "examples" / "mlp.onnx"


@pytest.fixture(scope="module")
def paged_out(paged_mlp_out, tmp_path_factory) -> Path:
    """This module's copy of the shared paged MLP output (its tests train in it)."""
    out = tmp_path_factory.mktemp("paged") / "out"
    shutil.copytree(paged_mlp_out, out, symlinks=True)
    return out



def _poetc(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-m", "poetc", *args], capture_output=True, text=True, env=full,
                          timeout=900)


def _train_fails(out: Path, expect: str, **env: str) -> str:
    before = file_hashes(out)
    proc = _poetc(["train", str(out), "--steps", "2"], **env)
    err = proc.stderr
    assert proc.returncode == 9, err
    assert err.startswith("poetc: error: the training step failed"), err
    assert expect in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    assert file_hashes(out) == before  # checkpoint and everything else unchanged
    return err


def test_paged_training_runs_with_the_shim_loaded(paged_out, fault_shim, tmp_path):
    """Control: the shim alone changes nothing; the faults below are what fail the step."""
    proc = _poetc(["train", str(paged_out), "--steps", "2"], LD_PRELOAD=str(fault_shim),
                  POETC_SPILL_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.spill"))  # every Restore deleted its file


def test_spill_file_deleted(paged_out, fault_shim, tmp_path):
    err = _train_fails(paged_out, "is missing", LD_PRELOAD=str(fault_shim), POETC_TEST_SPILL_FAULT="delete",
                       POETC_SPILL_DIR=str(tmp_path))
    assert "poetc Restore" in err


def test_spill_file_corrupted(paged_out, fault_shim, tmp_path):
    err = _train_fails(paged_out, "checksum mismatch", LD_PRELOAD=str(fault_shim), POETC_TEST_SPILL_FAULT="corrupt",
                       POETC_SPILL_DIR=str(tmp_path))
    assert "kept for inspection" in err and len(list(tmp_path.glob("*.spill"))) == 1


def test_spill_dir_not_creatable(paged_out, tmp_path):
    (tmp_path / "afile").write_text("")
    _train_fails(paged_out, "unusable spill directory", POETC_SPILL_DIR=str(tmp_path / "afile" / "spill"))


def test_spill_dir_read_only(paged_out, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m,mode=0700") as mounted:
        if not mounted:
            pytest.skip("mounting a read-only tmpfs needs root (as root, chmod cannot make a directory unwritable)")
        _train_fails(paged_out, "Read-only file system", POETC_SPILL_DIR=str(tmp_path / "ro"))


def test_spill_dir_full(paged_out, tmp_path):
    with tmpfs(tmp_path / "small", "size=64k,mode=0700") as mounted:
        if not mounted:
            pytest.skip("mounting a 64 KiB tmpfs needs root")
        _train_fails(paged_out, "No space left on device", POETC_SPILL_DIR=str(tmp_path / "small"))
        assert not list((tmp_path / "small").iterdir())  # the partial spill file was removed
