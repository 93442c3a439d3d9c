"""What paging costs on this host through poetc's own ops (issue #19, docs/time-model.md).

The host target's storage figures (poetc/targets/host.toml) are raw file I/O: `measure_storage`
writes and fdatasyncs, or reads after dropping the page cache. A `Spill` does more: it writes a
header, computes the keyed MAC (SipHash-2-4) of the payload, writes through the spill directory's
file discipline and, with `POETC_SPILL_DROP_CACHE=1`, fdatasyncs and drops the pages; a `Restore` reads,
authenticates and copies. `measure_paging` times those ops themselves: a graph `X -> Spill -> Restore
-> Y` per size, run under the runtime contract with ONNX Runtime's profiler, each op's time the
minimum over the repeats (the least disturbed reading: other processes only add time), then
`time = latency + bytes / bandwidth` by least squares over the sizes, per direction.

It also measures how much of each transfer is CPU work (in unprofiled runs, the CPU time of the
calling thread, which the sequential executor runs the op on, over the run's wall time; ORT's pool
threads, which may spin, are not counted): on a host whose compute already uses every core, an asynchronous transfer
hides only its device wait, not its CPU work (MAC, copies into and out of the kernel), which the I/O
thread takes from compute. poetc.overlap uses it (`OverlapCosts.cpu_out_fraction` / `cpu_in_fraction`).

The figures hold for the spill directory and the `POETC_SPILL_DROP_CACHE` setting they were measured
with (`PagingCosts.drop_cache`, `spill_dir`): profile with the setting the step will run with.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the sizes timed (bytes): a small, a medium and a large activation
SIZES = (64 << 10, 1 << 20, 8 << 20)


@dataclass(frozen=True)
class PagingCosts:
    """Measured Spill (out) and Restore (in) costs: `time = latency + bytes / bandwidth`, and the share
    of that time which is CPU work (0..1)."""

    out_bytes_per_s: float
    out_latency_s: float
    in_bytes_per_s: float
    in_latency_s: float
    out_cpu_fraction: float = 0.0
    in_cpu_fraction: float = 0.0
    drop_cache: bool = False
    repeats: int = 0

    def out_s(self, nbytes: int) -> float:
        return self.out_latency_s + nbytes / self.out_bytes_per_s if nbytes else 0.0

    def in_s(self, nbytes: int) -> float:
        return self.in_latency_s + nbytes / self.in_bytes_per_s if nbytes else 0.0

    def to_json(self) -> dict:
        return {"out_bytes_per_s": self.out_bytes_per_s, "out_latency_s": self.out_latency_s,
                "in_bytes_per_s": self.in_bytes_per_s, "in_latency_s": self.in_latency_s,
                "out_cpu_fraction": self.out_cpu_fraction, "in_cpu_fraction": self.in_cpu_fraction,
                "drop_cache": self.drop_cache, "repeats": self.repeats}

    @classmethod
    def from_json(cls, doc) -> PagingCosts | None:
        """None unless `doc` holds positive bandwidths, non-negative latencies and fractions in [0, 1]."""
        if not isinstance(doc, dict):
            return None
        try:
            bw = [float(doc[k]) for k in ("out_bytes_per_s", "in_bytes_per_s")]
            lat = [float(doc[k]) for k in ("out_latency_s", "in_latency_s")]
            frac = [float(doc.get(k, 0.0)) for k in ("out_cpu_fraction", "in_cpu_fraction")]
        except (KeyError, TypeError, ValueError):
            return None
        if not all(np.isfinite(bw + lat + frac)) or min(bw) <= 0 or min(lat) < 0 \
                or not all(0.0 <= f <= 1.0 for f in frac):
            return None
        return cls(bw[0], lat[0], bw[1], lat[1], frac[0], frac[1], bool(doc.get("drop_cache", False)),
                   int(doc.get("repeats", 0)))


def fit_transfer(sizes, seconds) -> tuple[float, float]:
    """(bytes per second, latency s) of `seconds ~ latency + sizes / bandwidth` by least squares (the
    latency held at least 0; the bandwidth from the largest size alone if the slope is not positive)."""
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    a = np.column_stack([np.ones_like(x), x])
    (lat, slope), *_ = np.linalg.lstsq(a, y, rcond=None)
    if slope <= 0:
        k = int(np.argmax(x))
        return float(x[k] / max(y[k], 1e-12)), 0.0
    if lat < 0:
        slope = float(x @ y / (x @ x))
        lat = 0.0
    return float(1.0 / slope), float(lat)


def _graph(nbytes: int, restore: bool) -> bytes:
    from onnx import TensorProto, helper

    from ..runtime.contract import SPILL_DOMAIN, make_restore_node_spec, make_spill_node_spec
    n = nbytes // 4
    spill_op, spill_attrs = make_spill_node_spec(TensorProto.FLOAT, key="x")
    nodes = [helper.make_node(spill_op, ["X"], ["H"], name="spill", domain=SPILL_DOMAIN, **spill_attrs)]
    outputs = [helper.make_tensor_value_info("H", TensorProto.INT64, [2])]
    if restore:
        op, attrs = make_restore_node_spec(TensorProto.FLOAT, key="x")
        nodes.append(helper.make_node(op, ["H"], ["Y"], name="restore", domain=SPILL_DOMAIN, **attrs))
        outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n])]
    g = helper.make_graph(nodes, "paging", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n])], outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("poet", 1)],
                             ir_version=8).SerializeToString()


def measure_paging(library: str | os.PathLike, *, sizes=SIZES, repeats: int = 5,
                   spill_dir: str | os.PathLike | None = None) -> PagingCosts:
    """Time poetc's Spill and Restore on this host (module docstring). `library`: the host build of
    the op library (poetc.runtime.nativelib.build_spill_library); `spill_dir`: where the files go
    (default: POETC_SPILL_DIR, else a private temporary directory). ONNX Runtime's exceptions
    propagate (the caller says what failed)."""
    import json

    import onnxruntime as ort

    from ..runtime.session import contract_session_options

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    drop = os.environ.get("POETC_SPILL_DROP_CACHE", "") == "1"
    with tempfile.TemporaryDirectory(prefix="poetc-paging-") as tmp:
        saved = os.environ.get("POETC_SPILL_DIR")
        if spill_dir is None and saved is None:
            spill_dir = Path(tmp) / "spill"
            spill_dir.mkdir(mode=0o700)
        try:
            if spill_dir is not None:
                os.environ["POETC_SPILL_DIR"] = str(spill_dir)  # read at kernel creation
            out_s, in_s, cpu = [], [], {"out": [0.0, 0.0], "in": [0.0, 0.0]}
            for nbytes in sizes:
                x = {"X": np.random.default_rng(nbytes).standard_normal(nbytes // 4).astype(np.float32)}
                so = contract_session_options(library)
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / f"p{nbytes}")
                sess = ort.InferenceSession(_graph(nbytes, True), so, providers=["CPUExecutionProvider"])
                for _ in range(repeats + 1):
                    sess.run(None, x)
                with open(sess.end_profiling()) as fh:
                    events = json.load(fh)
                durs: dict[str, list[float]] = {}
                for ev in events:
                    name = ev.get("name", "")
                    if ev.get("cat") == "Node" and name.endswith("_kernel_time"):
                        durs.setdefault(name[: -len("_kernel_time")], []).append(float(ev.get("dur", 0)) * 1e-6)
                out_s.append(min(durs["spill"][1:]))
                in_s.append(min(durs["restore"][1:]))
                # CPU share, unprofiled: the spill alone, then spill + restore (the restore = the difference)
                for kind, restore in (("out", False), ("in", True)):
                    plain = ort.InferenceSession(_graph(nbytes, restore), contract_session_options(library),
                                                 providers=["CPUExecutionProvider"])
                    plain.run(None, x)
                    cpus, walls = [], []
                    for _ in range(repeats):
                        c0, t0 = time.thread_time(), time.perf_counter()
                        plain.run(None, x)
                        cpus.append(time.thread_time() - c0)
                        walls.append(time.perf_counter() - t0)
                    best = (min(cpus), min(walls))  # each the least disturbed reading
                    if kind == "out":
                        spill_only = best
                        cpu["out"][0] += best[0]
                        cpu["out"][1] += best[1]
                    else:
                        cpu["in"][0] += max(best[0] - spill_only[0], 0.0)
                        cpu["in"][1] += max(best[1] - spill_only[1], 1e-9)
        finally:
            if saved is None:
                os.environ.pop("POETC_SPILL_DIR", None)
            else:
                os.environ["POETC_SPILL_DIR"] = saved
    out_bw, out_lat = fit_transfer(sizes, out_s)
    in_bw, in_lat = fit_transfer(sizes, in_s)
    frac = {k: min(max(c / w, 0.0), 1.0) if w > 0 else 0.0 for k, (c, w) in cpu.items()}
    return PagingCosts(out_bw, out_lat, in_bw, in_lat, frac["out"], frac["in"], drop, repeats)


__all__ = ["PagingCosts", "SIZES", "fit_transfer", "measure_paging"]
