"""Native Spill/Restore ops, the spill-file I/O core and the build helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from poetc.runtime import nativelib
from poetc.runtime.contract import SPILL_DOMAIN, make_restore_node_spec, make_spill_node_spec
from poetc.runtime.nativelib import NativeBuildError
from poetc.runtime.session import contract_session_options

DTYPES = [
    (TensorProto.FLOAT, np.float32),
    (TensorProto.INT64, np.int64),
    (TensorProto.BOOL, np.bool_),
    (TensorProto.DOUBLE, np.float64),
    (TensorProto.FLOAT16, np.float16),
    (TensorProto.INT32, np.int32),
    (TensorProto.INT8, np.int8),
    (TensorProto.UINT8, np.uint8),
]



@pytest.fixture
def spill_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "spill"
    monkeypatch.setenv("POETC_SPILL_DIR", str(d))  # read at kernel creation
    return d


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("poet", 1)],
                              ir_version=8)
    return model.SerializeToString()


def _session(model: bytes, lib: Path) -> ort.InferenceSession:
    return ort.InferenceSession(model, contract_session_options(lib),
                                providers=["CPUExecutionProvider"])


def _roundtrip_model(onnx_dtype: int, shape) -> bytes:
    sop, sattrs = make_spill_node_spec(onnx_dtype, key="x-key")
    rop, rattrs = make_restore_node_spec(onnx_dtype)
    return _model(
        [helper.make_node(sop, ["X"], ["H"], domain=SPILL_DOMAIN, **sattrs),
         helper.make_node(rop, ["H"], ["Y"], domain=SPILL_DOMAIN, **rattrs)],
        [helper.make_tensor_value_info("X", onnx_dtype, shape)],
        [helper.make_tensor_value_info("Y", onnx_dtype, shape)])


def _spill_only(onnx_dtype: int, shape) -> bytes:
    return _model([helper.make_node("Spill", ["X"], ["H"], domain="poet", key="act7")],
                  [helper.make_tensor_value_info("X", onnx_dtype, shape)],
                  [helper.make_tensor_value_info("H", TensorProto.INT64, [2])])


def _restore_only(onnx_dtype: int) -> bytes:
    rop, _ = make_restore_node_spec(onnx_dtype)
    return _model([helper.make_node(rop, ["H"], ["Y"], domain="poet", key="act7")],
                  [helper.make_tensor_value_info("H", TensorProto.INT64, [2])],
                  [helper.make_tensor_value_info("Y", onnx_dtype, None)])


def _sample(np_dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np_dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return rng.integers(info.min, info.max, shape, dtype=np_dtype, endpoint=True)
    x = (rng.standard_normal(shape) * 100).astype(np_dtype)
    x.flat[0] = np.inf  # special values survive bit-exactly
    x.flat[1] = -0.0
    return x


def _spill_path(d: Path, handle: np.ndarray) -> Path:
    token, pid = int(handle[0]) & (2**64 - 1), int(handle[1])
    return d / f"poet-{pid}-{token:016x}.spill"


# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("onnx_dtype,np_dtype", DTYPES, ids=[d[1].__name__ for d in DTYPES])
def test_roundtrip_bit_exact(spill_lib, spill_dir, onnx_dtype, np_dtype):
    shape = [3, 5, 7]
    x = _sample(np_dtype, shape)
    sess = _session(_roundtrip_model(onnx_dtype, shape), spill_lib)
    (y,) = sess.run(None, {"X": x})
    assert y.dtype == x.dtype and y.shape == x.shape
    assert x.tobytes() == y.tobytes()
    assert list(spill_dir.iterdir()) == []  # Restore deleted the file


@pytest.mark.parametrize("shape", [[], [0, 4], [1], [2, 3, 4, 5]], ids=str)
def test_roundtrip_shapes(spill_lib, spill_dir, shape):
    x = _sample(np.float32, shape, seed=1) if int(np.prod(shape)) >= 2 else \
        np.ones(shape, np.float32)
    sess = _session(_roundtrip_model(TensorProto.FLOAT, shape), spill_lib)
    (y,) = sess.run(None, {"X": x})
    assert y.shape == tuple(shape)
    assert x.tobytes() == y.tobytes()


def test_spill_writes_named_file_and_restore_removes_it(spill_lib, spill_dir):
    x = _sample(np.float32, [4, 8])
    (h,) = _session(_spill_only(TensorProto.FLOAT, [4, 8]), spill_lib).run(None, {"X": x})
    assert h.dtype == np.int64 and h.shape == (2,)
    assert int(h[1]) == os.getpid()
    path = _spill_path(spill_dir, h)
    assert path.is_file()
    assert path.stat().st_size == 184 + x.nbytes
    assert path.read_bytes()[:8] == b"POETSPL\0"
    (y,) = _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})
    assert np.array_equal(x, y)
    assert not path.exists()


def test_restore_twice_keeps_the_file_until_the_last(spill_lib, spill_dir):
    """A tensor paged in again: the first Restore (keep_file=1) leaves the file, the last deletes it."""
    x = _sample(np.float32, [5, 6], seed=3)
    sop, sattrs = make_spill_node_spec(TensorProto.FLOAT, key="twice")
    rop, keep = make_restore_node_spec(TensorProto.FLOAT, key="twice", keep_file=True)
    _, last = make_restore_node_spec(TensorProto.FLOAT, key="twice")
    assert keep["keep_file"] == 1 and "keep_file" not in last
    model = _model(
        [helper.make_node(sop, ["X"], ["H"], domain="poet", **sattrs),
         helper.make_node(rop, ["H"], ["Y1"], domain="poet", **keep),
         helper.make_node("Neg", ["Y1"], ["N1"]),
         helper.make_node(rop, ["H"], ["Y2"], domain="poet", **last)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 6])],
        [helper.make_tensor_value_info("N1", TensorProto.FLOAT, [5, 6]),
         helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [5, 6]),
         helper.make_tensor_value_info("H", TensorProto.INT64, [2])])
    n1, y2, h = _session(model, spill_lib).run(None, {"X": x})
    assert (-n1).tobytes() == x.tobytes() and y2.tobytes() == x.tobytes()
    assert not _spill_path(spill_dir, h).exists() and list(spill_dir.iterdir()) == []
    # keep_file alone leaves the file for the next Restore
    (h,) = _session(_spill_only(TensorProto.FLOAT, [5, 6]), spill_lib).run(None, {"X": x})
    keep_only = _model([helper.make_node(rop, ["H"], ["Y"], domain="poet", **keep)],
                       [helper.make_tensor_value_info("H", TensorProto.INT64, [2])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    for _ in range(2):
        (y,) = _session(keep_only, spill_lib).run(None, {"H": h})
        assert np.array_equal(x, y) and _spill_path(spill_dir, h).is_file()
    (y,) = _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})
    assert np.array_equal(x, y) and not _spill_path(spill_dir, h).exists()


def test_tokens_differ_between_runs(spill_lib, spill_dir):
    sess = _session(_spill_only(TensorProto.INT64, [3]), spill_lib)
    handles = {int(sess.run(None, {"X": np.arange(3)})[0][0]) for _ in range(20)}
    assert len(handles) == 20
    assert len(list(spill_dir.iterdir())) == 20


def test_missing_file_is_an_error(spill_lib, spill_dir):
    (h,) = _session(_spill_only(TensorProto.FLOAT, [16]), spill_lib).run(
        None, {"X": np.ones(16, np.float32)})
    path = _spill_path(spill_dir, h)
    path.unlink()
    with pytest.raises(Exception) as ei:
        _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})
    msg = str(ei.value)
    assert "missing" in msg and str(path) in msg and "key=act7" in msg


def test_corrupted_payload_fails_checksum(spill_lib, spill_dir):
    x = _sample(np.float32, [64, 64])
    (h,) = _session(_spill_only(TensorProto.FLOAT, [64, 64]), spill_lib).run(None, {"X": x})
    path = _spill_path(spill_dir, h)
    data = bytearray(path.read_bytes())
    data[184 + 1000] ^= 0x04  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as ei:
        _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})
    msg = str(ei.value)
    assert "checksum mismatch" in msg and str(path) in msg
    assert path.exists()  # kept for inspection


def test_truncated_file_is_an_error(spill_lib, spill_dir):
    (h,) = _session(_spill_only(TensorProto.FLOAT, [256]), spill_lib).run(
        None, {"X": np.ones(256, np.float32)})
    path = _spill_path(spill_dir, h)
    os.truncate(path, 184 + 100)
    with pytest.raises(Exception, match="truncated"):
        _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})


def test_dtype_mismatch_is_an_error(spill_lib, spill_dir):
    (h,) = _session(_spill_only(TensorProto.FLOAT, [8]), spill_lib).run(
        None, {"X": np.ones(8, np.float32)})
    with pytest.raises(Exception) as ei:
        _session(_restore_only(TensorProto.INT64), spill_lib).run(None, {"H": h})
    assert "dtype mismatch" in str(ei.value) and "float" in str(ei.value)


def test_bad_magic_is_an_error(spill_lib, spill_dir):
    (h,) = _session(_spill_only(TensorProto.FLOAT, [8]), spill_lib).run(
        None, {"X": np.ones(8, np.float32)})
    path = _spill_path(spill_dir, h)
    data = bytearray(path.read_bytes())
    data[:8] = b"GARBAGE!"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="bad magic"):
        _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})


def test_unwritable_spill_dir_is_a_clear_error(spill_lib, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "spill"
    monkeypatch.setenv("POETC_SPILL_DIR", str(bad))
    with pytest.raises(Exception) as ei:
        _session(_spill_only(TensorProto.FLOAT, [4]), spill_lib).run(
            None, {"X": np.ones(4, np.float32)})
    msg = str(ei.value)
    assert "unusable spill directory" in msg and str(bad) in msg and "Not a directory" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
def test_readonly_spill_dir_is_a_clear_error(spill_lib, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("POETC_SPILL_DIR", str(ro))
    with pytest.raises(Exception, match="not writable"):
        _session(_spill_only(TensorProto.FLOAT, [4]), spill_lib)


def test_spill_dir_removed_after_session_creation_is_recreated(spill_lib, spill_dir):
    sess = _session(_roundtrip_model(TensorProto.FLOAT, [16]), spill_lib)
    assert spill_dir.is_dir()  # created at kernel creation
    spill_dir.rmdir()
    x = _sample(np.float32, [16])
    (y,) = sess.run(None, {"X": x})
    assert x.tobytes() == y.tobytes()


def test_drop_cache_mode_roundtrips(spill_lib, spill_dir, monkeypatch):
    monkeypatch.setenv("POETC_SPILL_DROP_CACHE", "1")
    x = _sample(np.float32, [32, 32])
    (y,) = _session(_roundtrip_model(TensorProto.FLOAT, [32, 32]), spill_lib).run(None, {"X": x})
    assert x.tobytes() == y.tobytes()


def test_node_specs():
    assert make_spill_node_spec(TensorProto.FLOAT) == ("Spill", {})
    assert make_spill_node_spec(TensorProto.INT64, key="k") == ("Spill", {"key": "k"})
    assert make_restore_node_spec(TensorProto.FLOAT) == ("Restore", {})
    assert make_restore_node_spec(TensorProto.BOOL) == ("Restore_bool", {})
    assert make_restore_node_spec(TensorProto.FLOAT16)[0] == "Restore_float16"
    with pytest.raises(ValueError):
        make_restore_node_spec(TensorProto.STRING)
    with pytest.raises(ValueError):
        make_spill_node_spec(TensorProto.COMPLEX64)


def test_build_is_cached(spill_lib):
    assert nativelib.build_spill_library("host") == spill_lib
    assert nativelib.ensure_headers().joinpath("onnxruntime_c_api.h").is_file()


def test_io_core_native():
    out = nativelib.run_io_core_tests("host")
    assert " 0 failed" in out and "FAIL" not in out


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


@pytest.mark.skipif(not (nativelib.cross_compiler_available() and nativelib.qemu_available()),
                    reason="aarch64 cross compiler (gcc-aarch64-linux-gnu, "
                           "libc6-dev-arm64-cross) or qemu-user-static not installed")
def test_io_core_aarch64_under_qemu():
    out = nativelib.run_io_core_tests("aarch64")
    assert " 0 failed" in out and "FAIL" not in out


@pytest.mark.skipif(not nativelib.cross_compiler_available(),
                    reason="aarch64 cross compiler (gcc-aarch64-linux-gnu) not installed")
def test_spill_library_cross_compiles_for_aarch64(spill_lib):
    lib = nativelib.build_spill_library("aarch64")
    assert _elf_machine(lib) == 183  # EM_AARCH64


def test_missing_cross_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nativelib, "cross_compiler_available", lambda: False)
    with pytest.raises(NativeBuildError, match="aarch64-linux-gnu-gcc"):
        nativelib.build_spill_library("aarch64")


# --------------------------------------------------------------------------- #
# issue #14: spill files authenticate only in the process that wrote them; private spill dirs


_FORGER = r"""
import sys, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from poetc.runtime.session import contract_session_options
g = helper.make_graph([helper.make_node("Spill", ["X"], ["H"], domain="poet")], "g",
                      [helper.make_tensor_value_info("X", TensorProto.FLOAT, [32])],
                      [helper.make_tensor_value_info("H", TensorProto.INT64, [2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("poet", 1)], ir_version=8)
s = ort.InferenceSession(m.SerializeToString(), contract_session_options(sys.argv[1]), providers=["CPUExecutionProvider"])
print(s.run(None, {"X": np.full(32, 2.0, np.float32)})[0].tolist())
"""


def test_a_well_formed_spill_file_from_another_process_fails_restore(spill_lib, spill_dir):
    """The issue's forgery: a valid spill file with the payload doubled, written by another process (its
    own key), put in place of ours. Before: restored silently (shape taken from the file). Now: refused."""
    import subprocess
    import sys
    x = np.ones(16, np.float32)
    (h,) = _session(_spill_only(TensorProto.FLOAT, [16]), spill_lib).run(None, {"X": x})
    ours = _spill_path(spill_dir, h)
    proc = subprocess.run([sys.executable, "-c", _FORGER, str(spill_lib)], capture_output=True, text=True,
                          env=dict(os.environ, POETC_SPILL_DIR=str(spill_dir)), check=True)
    theirs = _spill_path(spill_dir, np.array(eval(proc.stdout.strip()), dtype=np.int64))
    assert theirs.exists() and theirs != ours
    os.replace(theirs, ours)
    with pytest.raises(Exception) as ei:
        _session(_restore_only(TensorProto.FLOAT), spill_lib).run(None, {"H": h})
    assert "not written by this process" in str(ei.value) and str(ours) in str(ei.value)


def test_restore_checks_the_shape_the_graph_declares(spill_lib, spill_dir):
    x = np.ones(16, np.float32)
    (h,) = _session(_spill_only(TensorProto.FLOAT, [16]), spill_lib).run(None, {"X": x})
    rop, _ = make_restore_node_spec(TensorProto.FLOAT)
    declared = _model([helper.make_node(rop, ["H"], ["Y"], domain="poet", key="act7")],
                      [helper.make_tensor_value_info("H", TensorProto.INT64, [2])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [8])])
    with pytest.raises(Exception) as ei:
        _session(declared, spill_lib).run(None, {"H": h})
    assert "shape mismatch" in str(ei.value) and "[16]" in str(ei.value) and "[8]" in str(ei.value)
    assert _spill_path(spill_dir, h).exists()  # kept for inspection


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o1777])
def test_a_spill_dir_other_users_can_reach_is_refused(spill_lib, tmp_path, monkeypatch, mode):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    monkeypatch.setenv("POETC_SPILL_DIR", str(d))
    with pytest.raises(Exception) as ei:
        _session(_spill_only(TensorProto.FLOAT, [4]), spill_lib)
    assert "unusable spill directory" in str(ei.value) and "private" in str(ei.value)


def test_a_symlinked_spill_dir_is_refused(spill_lib, tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("POETC_SPILL_DIR", str(tmp_path / "link"))
    with pytest.raises(Exception, match="symbolic link"):
        _session(_spill_only(TensorProto.FLOAT, [4]), spill_lib)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_spill_dir_owned_by_another_user_is_refused(spill_lib, tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    monkeypatch.setenv("POETC_SPILL_DIR", str(d))
    with pytest.raises(Exception, match="owned by uid 65534"):
        _session(_spill_only(TensorProto.FLOAT, [4]), spill_lib)


def test_default_spill_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("POETC_SPILL_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert nativelib.default_spill_dir() == tmp_path / f"poetc-spill-{os.geteuid()}"
