"""Shared fixtures: small real models exported from models/ and imported through poetc."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    import models
    return models.export_onnx("mlp", tmp_path_factory.mktemp("mlp") / "mlp.onnx", batch=64, seed=0)


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory) -> Path:
    import models
    return models.export_onnx("cnn", tmp_path_factory.mktemp("cnn") / "cnn.onnx", batch=8, seed=0)


@pytest.fixture(scope="session")
def mlp_graph(mlp_onnx, tmp_path_factory):
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    artifacts, graph = open_graph(mlp_onnx, tmp_path_factory.mktemp("mlp-art"), ImportOptions())
    return artifacts, graph


@pytest.fixture(scope="session")
def cnn_graph(cnn_onnx, tmp_path_factory):
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    artifacts, graph = open_graph(cnn_onnx, tmp_path_factory.mktemp("cnn-art"), ImportOptions())
    return artifacts, graph


@pytest.fixture(scope="session")
def bert_tiny_graph(tmp_path_factory):
    """The tiny transformer encoder (2 layers, hidden 128, seq 128) at batch 8."""
    import models
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    path = models.export_onnx("bert_tiny", tmp_path_factory.mktemp("bert") / "bert_tiny.onnx", batch=8, seed=0)
    return open_graph(path, tmp_path_factory.mktemp("bert-art"), ImportOptions())


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ from the current output instead of "
                          "comparing against them")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def paged_mlp_out(tmp_path_factory) -> Path:
    """examples/mlp.onnx compiled with paging only (unfused optimizer: the fused mode fits this budget
    without paging), at a budget that forces activations out: Spill/Restore nodes, the op library and
    artifact hashes in the output. Shared, read-only: copy it before changing anything."""
    import json
    import subprocess

    from poetc.runtime import nativelib
    try:
        nativelib.build_spill_library("host")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the Spill/Restore library cannot be built here: {exc}")
    out = tmp_path_factory.mktemp("paged") / "out"
    proc = subprocess.run([sys.executable, "-m", "poetc", "compile", str(ROOT / "examples" / "mlp.onnx"),
                           "--ram", "19.8MiB", "--deadline", "2x", "--strategy", "paging-only",
                           "--optimizer-mode", "unfused", "--baselines", "", "--json", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["result"]["decisions"]["page"] >= 1
    assert set(report["artifacts"]) >= {"libpoet_spill.so", "training_model.onnx", "schedule.json", "schedule.bin",
                                        "runtime.json", "checkpoint", "reference/training_model.onnx"}
    return out


@pytest.fixture(scope="session")
def spill_lib() -> Path:
    """The host build of the poet op library (Spill/Restore, async paging, updates, state ops)."""
    from poetc.runtime import nativelib
    try:
        return nativelib.build_spill_library("host")
    except nativelib.NativeBuildError as exc:
        pytest.skip(f"cannot build the spill library (ORT headers unavailable?): {exc}")


@pytest.fixture(scope="session")
def fault_shim(tmp_path_factory) -> Path:
    """tests/native/spill_fault.c built as an LD_PRELOAD shim (damaged, slow or failing spill files)."""
    import shutil
    import subprocess
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler for the LD_PRELOAD fault shim")
    lib = tmp_path_factory.mktemp("shim") / "spill_fault.so"
    subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(lib),
                    str(Path(__file__).parent / "native" / "spill_fault.c"), "-ldl"], check=True)
    return lib
