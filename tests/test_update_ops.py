"""The native in-place optimizer updates (poet.StepCount, poet.AdamWUpdate, poet.SGDUpdate) against
ONNX Runtime's own optimizer kernels (com.microsoft AdamWOptimizer, SGDOptimizerV2): bitwise equal
parameters and moments over several steps, for sizes around the kernels' packet and chunk edges and
for buffers that do not start 16-byte aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from poetc.runtime.session import contract_session_options

ADAMW = dict(alpha=0.9, beta=0.999, epsilon=1e-6, correct_bias=1, adam_mode=1)


@pytest.fixture
def lib(spill_lib) -> Path:
    """The host op library (conftest's spill_lib)."""
    return spill_lib


def _model(nodes, inputs, outputs, domain: str) -> bytes:
    graph = h.make_graph(nodes, "g", inputs, outputs)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid(domain, 1)], ir_version=8)
    return model.SerializeToString()


def _vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def _seq(name, shape):
    return h.make_tensor_sequence_value_info(name, T.FLOAT, shape)


def _ours_adamw(lib, shape, weight_decay):
    nodes = [h.make_node("StepCount", ["S"], ["N"], domain="poet"),
             h.make_node("AdamWUpdate", ["W", "G", "M1", "M2", "LR", "N", "G"], ["F"], domain="poet",
                         weight_decay=weight_decay, **ADAMW)]
    inputs = [_vi("W", shape), _vi("G", shape), _vi("M1", shape), _vi("M2", shape), _vi("LR", [1]), _vi("S", [1])]
    model = _model(nodes, inputs, [_vi("F", [1], T.BOOL), _vi("N", [1], T.INT64)], "poet")
    return ort.InferenceSession(model, contract_session_options(lib, 1), providers=["CPUExecutionProvider"])


def _ort_adamw(shape, weight_decay):
    node = h.make_node("AdamWOptimizer", ["LR", "N", "W", "G", "M1", "M2"], ["F", "W2", "M12", "M22"],
                       domain="com.microsoft", weight_decay=weight_decay, **ADAMW)
    inputs = [_vi("LR", [1]), _vi("N", [1], T.INT64), _seq("W", shape), _seq("G", shape), _seq("M1", shape),
              _seq("M2", shape)]
    outputs = [_vi("F", [1], T.BOOL), _seq("W2", shape), _seq("M12", shape), _seq("M22", shape)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(_model([node], inputs, outputs, "com.microsoft"), so,
                                providers=["CPUExecutionProvider"])


def _misaligned(a: np.ndarray, offset_floats: int) -> np.ndarray:
    """A copy of `a` whose data starts `offset_floats` floats after a 64-byte boundary."""
    raw = np.zeros(a.size + 32, np.float32)
    start = (-(raw.ctypes.data // 4)) % 16 + offset_floats
    out = raw[start:start + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset_floats * 4
    return out


@pytest.mark.parametrize("size,offset", [(1, 0), (3, 0), (4, 0), (7, 1), (1003, 0), (1003, 3), (2500, 2)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_update_is_bitwise_ort_adamw(lib, size, offset, weight_decay):
    shape = [size]
    ours, ref = _ours_adamw(lib, shape, weight_decay), _ort_adamw(shape, weight_decay)
    rng = np.random.default_rng(size * 7 + offset)
    w = _misaligned(rng.standard_normal(shape).astype(np.float32), offset)
    m1, m2 = _misaligned(np.zeros(shape, np.float32), offset), _misaligned(np.zeros(shape, np.float32), offset)
    s = np.zeros([1], np.float32)
    rw, rm1, rm2 = w.copy(), m1.copy(), m2.copy()
    lr = np.array([3e-3], np.float32)
    for step in range(1, 5):
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 2)).astype(np.float32)
        g[rng.random(shape) < 0.05] = 0.0  # zero gradients: the zero and denormal paths of the square root
        flag, n = ours.run(None, {"W": w, "G": g, "M1": m1, "M2": m2, "LR": lr, "S": s})
        # ORT's kernel reads the numpy buffers themselves: give it the same alignment as ours
        rw, rm1, rm2 = (_misaligned(a, offset) for a in (rw, rm1, rm2))
        _, (rw,), (rm1,), (rm2,) = ref.run(None, {"LR": lr, "N": np.array([step], np.int64), "W": [rw],
                                                 "G": [g], "M1": [rm1], "M2": [rm2]})
        assert bool(flag[0]) and int(n[0]) == step and s[0] == step  # StepCount counts in place
        assert m1.tobytes() == rm1.tobytes(), f"first moment differs at step {step}"
        assert m2.tobytes() == rm2.tobytes(), f"second moment differs at step {step}"
        assert w.tobytes() == rw.tobytes(), \
            f"parameter differs at step {step}: max |diff| {np.abs(w - rw).max()}"


def test_sgd_update_is_bitwise_ort_sgd(lib):
    shape = [1003]
    ours = ort.InferenceSession(_model(
        [h.make_node("SGDUpdate", ["W", "G", "LR", "G"], ["F"], domain="poet")],
        [_vi("W", shape), _vi("G", shape), _vi("LR", [1])], [_vi("F", [1], T.BOOL)], "poet"),
        contract_session_options(lib, 1), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(_model(
        [h.make_node("SGDOptimizerV2", ["LR", "W", "G"], ["F", "W2"], domain="com.microsoft")],
        [_vi("LR", [1]), _seq("W", shape), _seq("G", shape)], [_vi("F", [1], T.BOOL), _seq("W2", shape)],
        "com.microsoft"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    rw = w.copy()
    lr = np.array([0.1], np.float32)
    for step in range(3):
        g = rng.standard_normal(shape).astype(np.float32)
        ours.run(None, {"W": w, "G": g, "LR": lr})
        _, (rw,) = ref.run(None, {"LR": lr, "W": [rw.copy()], "G": [g]})
        assert w.tobytes() == rw.tobytes(), f"parameter differs at step {step}"
        assert not np.array_equal(w, rw - 1)  # the comparison is about real values


def test_adamw_update_rejects_other_modes(lib):
    shape = [4]
    nodes = [h.make_node("AdamWUpdate", ["W", "G", "M1", "M2", "LR", "N", "G"], ["F"], domain="poet",
                         alpha=0.9, beta=0.999, epsilon=1e-6, weight_decay=0.0, correct_bias=1, adam_mode=0)]
    inputs = [_vi("W", shape), _vi("G", shape), _vi("M1", shape), _vi("M2", shape), _vi("LR", [1]),
              _vi("N", [1], T.INT64)]
    model = _model(nodes, inputs, [_vi("F", [1], T.BOOL)], "poet")
    with pytest.raises(Exception, match="adam_mode must be 1"):
        sess = ort.InferenceSession(model, contract_session_options(lib, 1), providers=["CPUExecutionProvider"])
        z = np.zeros(shape, np.float32)
        sess.run(None, {"W": z, "G": z, "M1": z.copy(), "M2": z.copy(), "LR": np.ones([1], np.float32),
                        "N": np.ones([1], np.int64)})
