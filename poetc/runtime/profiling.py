"""Profiled runs of a training graph under the runtime contract: per-node kernel events.

Shared by lowering (one probe run gives every node's output shapes) and host cost measurement
(per-node medians over several runs).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import onnx

KERNEL_SUFFIX = "_kernel_time"


def probe_array(shape: tuple[int, ...], dtype: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded feed that is valid for any op: floats ~ N(0, 0.1^2), integers 0 (always a valid
    index or label), bools True."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    if dtype == onnx.TensorProto.BOOL:
        return np.ones(shape, dtype=np.bool_)
    if np.issubdtype(np_dtype, np.floating):
        return (rng.standard_normal(shape) * 0.1).astype(np_dtype)
    return np.zeros(shape, dtype=np_dtype)


def profile_kernels(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 1,
                    intra_op_threads: int | None = None, run_seconds: list | None = None) -> list[tuple[str, dict]]:
    """Run `model` `runs` times with profiling; return (node name, event args + "dur" and "ts" in us)
    for every kernel event, in execution order. `run_seconds`, if given, receives each run's wall time
    (session.run, as the caller sees it). ONNX Runtime's exceptions propagate to the caller."""
    import onnxruntime as ort

    from .session import contract_session_options

    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="poetc-profile-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        so = contract_session_options()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        if intra_op_threads is not None:
            so.intra_op_num_threads = intra_op_threads
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feeds)
            if run_seconds is not None:
                run_seconds.append(time.perf_counter() - t0)
        with open(session.end_profiling()) as fh:
            events = json.load(fh)
    out = []
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") == "Node" and name.endswith(KERNEL_SUFFIX):
            args = dict(ev.get("args", {}))
            args["dur"] = ev.get("dur", 0)
            args["ts"] = ev.get("ts", 0)
            out.append((name[: -len(KERNEL_SUFFIX)], args))
    return out
