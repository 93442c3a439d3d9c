"""The asynchronous paging ops (poetc/runtime/native/async_ops.c): SpillAsync writes behind the step,
Prefetch reads ahead of the reader, Flush and Await wait. Correctness must come from the handles and
tickets the graph passes along, never from timing: every test here also runs under slow storage, and
a read or write that fails after it was queued must fail the run naming the file, with nothing handed
to the reader.

Slow and failing storage use tests/native/spill_fault.c (LD_PRELOAD) in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from poetc.runtime.contract import (SPILL_DOMAIN, make_await_node_spec, make_flush_node_spec,
                                    make_prefetch_node_spec, make_restore_node_spec,
                                    make_spill_async_node_spec)
from poetc.runtime.session import contract_session_options

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [
    (TensorProto.FLOAT, np.float32),
    (TensorProto.DOUBLE, np.float64),
    (TensorProto.FLOAT16, np.float16),
    (TensorProto.INT64, np.int64),
    (TensorProto.INT32, np.int32),
    (TensorProto.INT8, np.int8),
    (TensorProto.UINT8, np.uint8),
    (TensorProto.BOOL, np.bool_),
]



@pytest.fixture
def spill_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "spill"
    monkeypatch.setenv("POETC_SPILL_DIR", str(d))  # read at kernel creation
    return d


def _node(spec, inputs, outputs):
    op, attrs = spec
    return helper.make_node(op, inputs, outputs, domain=SPILL_DOMAIN, **attrs)


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("poet", 1)],
                             ir_version=8).SerializeToString()


def _session(model: bytes, lib: Path) -> ort.InferenceSession:
    return ort.InferenceSession(model, contract_session_options(lib), providers=["CPUExecutionProvider"])


def _pipeline(dtype: int, shape, n: int = 1, *, flush: bool = False, sync_restore: bool = False) -> bytes:
    """n inputs X_i: each SpillAsync'ed, (optionally Flush'ed), then all prefetched before any Await
    (or restored synchronously); Y_i = the restored X_i. A Relu-free graph: the values are the test."""
    nodes, ins, outs = [], [], []
    for i in range(n):
        ins.append(helper.make_tensor_value_info(f"X{i}", dtype, shape))
        outs.append(helper.make_tensor_value_info(f"Y{i}", dtype, shape))
        nodes.append(_node(make_spill_async_node_spec(dtype, key=f"x{i}"), [f"X{i}"], [f"H{i}"]))
    for i in range(n):
        h = f"H{i}"
        if flush:
            nodes.append(_node(make_flush_node_spec(key=f"x{i}"), [h], [f"F{i}"]))
            h = f"F{i}"
        if sync_restore:
            nodes.append(_node(make_restore_node_spec(dtype, key=f"x{i}"), [h], [f"Y{i}"]))
        else:
            nodes.append(_node(make_prefetch_node_spec(key=f"x{i}"), [h], [f"P{i}"]))
    if not sync_restore:
        for i in range(n):
            nodes.append(_node(make_await_node_spec(dtype, key=f"x{i}"), [f"P{i}"], [f"Y{i}"]))
    return _model(nodes, ins, outs)


def _values(np_dtype, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np_dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=np_dtype, endpoint=True)
    return rng.standard_normal(shape).astype(np_dtype)


@pytest.mark.parametrize("onnx_dtype,np_dtype", DTYPES)
def test_write_behind_then_prefetch_roundtrips_every_dtype_bitwise(spill_lib, spill_dir, onnx_dtype, np_dtype):
    shape = [3, 5, 7]
    sess = _session(_pipeline(onnx_dtype, shape), spill_lib)
    x = _values(np_dtype, shape, 1)
    (y,) = sess.run(None, {"X0": x})
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes()
    assert list(spill_dir.iterdir()) == []  # every file read is deleted


@pytest.mark.parametrize("flush,sync_restore", [(True, False), (False, True), (True, True)])
def test_flush_and_synchronous_restore_order_by_the_handle(spill_lib, spill_dir, flush, sync_restore):
    """Restore of a SpillAsync handle waits for its write (no Flush needed); Flush passes H through."""
    shape = [64, 33]
    sess = _session(_pipeline(TensorProto.FLOAT, shape, n=3, flush=flush, sync_restore=sync_restore), spill_lib)
    xs = {f"X{i}": _values(np.float32, shape, i) for i in range(3)}
    ys = sess.run(None, xs)
    for i, y in enumerate(ys):
        assert y.tobytes() == xs[f"X{i}"].tobytes()
    assert list(spill_dir.iterdir()) == []


def test_more_transfers_than_the_queue_holds_and_many_runs_of_one_session(spill_lib, spill_dir):
    """150 handles in flight (the queue holds 64: submitters wait for room) over 3 runs of one session."""
    n, shape = 150, [17]
    sess = _session(_pipeline(TensorProto.FLOAT, shape, n=n), spill_lib)
    for run in range(3):
        xs = {f"X{i}": _values(np.float32, shape, 1000 * run + i) for i in range(n)}
        ys = sess.run(None, xs)
        assert all(y.tobytes() == xs[f"X{i}"].tobytes() for i, y in enumerate(ys))
    assert list(spill_dir.iterdir()) == []


def test_keep_file_leaves_the_file_for_a_second_await(spill_lib, spill_dir):
    shape = [4, 4]
    f = TensorProto.FLOAT
    nodes = [_node(make_spill_async_node_spec(f), ["X"], ["H"]),
             _node(make_prefetch_node_spec(), ["H"], ["P1"]),
             _node(make_await_node_spec(f, keep_file=True), ["P1"], ["Y1"]),
             _node(make_prefetch_node_spec(), ["H"], ["P2"]),
             _node(make_await_node_spec(f), ["P2"], ["Y2"])]
    model = _model(nodes, [helper.make_tensor_value_info("X", f, shape)],
                   [helper.make_tensor_value_info("Y1", f, shape), helper.make_tensor_value_info("Y2", f, shape)])
    x = _values(np.float32, shape, 3)
    y1, y2 = _session(model, spill_lib).run(None, {"X": x})
    assert y1.tobytes() == x.tobytes() == y2.tobytes()
    assert list(spill_dir.iterdir()) == []


def test_await_checks_the_declared_shape(spill_lib, spill_dir):
    f = TensorProto.FLOAT
    nodes = [_node(make_spill_async_node_spec(f), ["X"], ["H"]),
             _node(make_prefetch_node_spec(), ["H"], ["P"]),
             _node(make_await_node_spec(f, key="act3"), ["P"], ["Y"])]
    model = _model(nodes, [helper.make_tensor_value_info("X", f, [2, 3])],
                   [helper.make_tensor_value_info("Y", f, [3, 2])])
    with pytest.raises(Exception, match=r"poetc Await\[key=act3\]: shape mismatch.*\[2,3\].*\[3,2\]"):
        _session(model, spill_lib).run(None, {"X": np.zeros((2, 3), np.float32)})


def test_await_of_a_ticket_never_issued_fails_clearly(spill_lib, spill_dir):
    f = TensorProto.FLOAT
    model = _model([_node(make_await_node_spec(f), ["P"], ["Y"])],
                   [helper.make_tensor_value_info("P", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("Y", f, None)])
    with pytest.raises(Exception, match="no prefetch .* was issued"):
        _session(model, spill_lib).run(None, {"P": np.array([12345, os.getpid()], np.int64)})


# ---------------------------------------------------------------------------------------------------
# slow and failing storage, in a child process with the LD_PRELOAD shim


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_async_ops import _pipeline, _session, _values
    from onnx import TensorProto
    from pathlib import Path
    n, shape = 4, [256, 64]
    sess = _session(_pipeline(TensorProto.FLOAT, shape, n=n, flush={flush}, sync_restore={sync}), Path({lib!r}))
    xs = {{f"X{{i}}": _values(np.float32, shape, i) for i in range(n)}}
    try:
        ys = sess.run(None, xs)
    except Exception as exc:
        print("FAILED:", exc)
        sys.exit(3)
    assert all(y.tobytes() == xs[f"X{{i}}"].tobytes() for i, y in enumerate(ys)), "stale or wrong data"
    print("OK")
""")


def _child(spill_lib: Path, shim: Path, spill_dir: Path, fault: str, *, flush=False, sync=False):
    code = _CHILD.format(tests=str(ROOT / "tests"), lib=str(spill_lib), flush=flush, sync=sync)
    env = dict(os.environ, LD_PRELOAD=str(shim), POETC_TEST_SPILL_FAULT=fault, POETC_SPILL_DIR=str(spill_dir),
               POETC_TEST_SPILL_DELAY_MS="120", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("flush,sync", [(False, False), (True, False), (False, True)])
def test_slow_storage_changes_nothing_but_time(spill_lib, fault_shim, tmp_path, flush, sync):
    """Every open of a spill file sleeps 120 ms: the Awaits/Restores wait; the data is exact."""
    proc = _child(spill_lib, fault_shim, tmp_path / "spill", "slow", flush=flush, sync=sync)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize("fault,expect", [("corrupt", "checksum"), ("delete", "No such file")])
def test_a_read_failing_after_the_prefetch_fails_the_run(spill_lib, fault_shim, tmp_path, fault, expect):
    """The file is damaged when the I/O thread opens it, i.e. after Prefetch returned: Await fails,
    naming the file; the reader never sees data."""
    proc = _child(spill_lib, fault_shim, tmp_path / "spill", fault)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "poetc Await" in proc.stdout and expect in proc.stdout and ".spill" in proc.stdout, proc.stdout
    assert "nothing was handed to the reader" in proc.stdout


@pytest.mark.parametrize("flush,sync,op", [(True, False, "Flush"), (False, False, "Await"), (False, True, "Restore")])
def test_a_failed_write_behind_fails_the_op_that_waits_for_it(spill_lib, fault_shim, tmp_path, flush, sync, op):
    proc = _child(spill_lib, fault_shim, tmp_path / "spill", "failwrite", flush=flush, sync=sync)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"poetc {op}" in proc.stdout and "Input/output error" in proc.stdout, proc.stdout
