"""Measured costs on this machine: per-op times from ONNX Runtime's profiler, storage throughput,
and the JSON file that stores per-op times next to a fingerprint of the graph they belong to.

`profile_host` runs the training model under poetc's runtime contract (ORT_DISABLE_ALL,
PRIORITY_BASED, no CPU memory arena) with profiling on: one warm-up run, then `repeats` timed runs
with the same seeded random feeds. Each op's time is the median of its `<node>_kernel_time` event
durations over the timed runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import RuntimeFailure, TargetError
from ..ir.graph import TrainGraph
from ..schedule import graph_fingerprint
from .model import MIN_MEASURED_OP_TIME_S, CostTable

COSTS_FORMAT = "poetc-costs"
COSTS_VERSION = 1
_KERNEL_SUFFIX = "_kernel_time"


# ---- per-op profiling --------------------------------------------------------------------------
def random_feeds(graph: TrainGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every input of the training model: floats ~ N(0, 0.1^2), integers 0,
    bools True. Shapes and dtypes come from `graph.tensors`."""
    from ..runtime.profiling import probe_array

    rng = np.random.default_rng(seed)
    initializers = {t.name for t in graph.model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in graph.model.graph.input:
        if vi.name not in initializers:
            tensor = graph.tensors[vi.name]
            feeds[vi.name] = probe_array(tensor.shape, tensor.dtype, rng)
    return feeds


class HostTimes(dict):
    """op name -> kernel seconds (a plain dict), with what profile_host measured besides: the host
    overhead fitted from the same runs (`overhead`, poetc.cost.timemodel.HostOverhead), Spill/Restore
    through poetc's ops (`paging`, poetc.cost.paging.PagingCosts) and the training API's step
    (`step_extras`, poetc.cost.timemodel.StepExtras), each None when not measured (`notes` say why)."""

    overhead = None
    paging = None
    step_extras = None
    notes: tuple = ()


def profile_host(graph: TrainGraph, repeats: int = 5, seed: int = 0, *, warmup: int = 1,
                 intra_op_threads: int | None = None, artifacts: str | os.PathLike | None = None,
                 paging: bool = False) -> HostTimes:
    """op name -> kernel time in seconds on this machine (the minimum over the timed runs: other
    processes only add time), for every op of `graph`, and (`.overhead`) what the step costs beyond
    its kernels (poetc.cost.timemodel, from the same runs).

    Runs `warmup` untimed and `repeats` timed steps of `graph.model` in one ONNX Runtime session.
    Readings of 0 us (below the profiler's 1 us resolution) become MIN_MEASURED_OP_TIME_S.
    With `artifacts` (the keep-all training artifacts `graph` was lowered from) it also times the
    training API's step (`.step_extras`) and takes the profiler's own per-node cost off the overhead;
    with `paging`, poetc's Spill/Restore (`.paging`; needs the op library, built if absent).
    Raises RuntimeFailure if ONNX Runtime fails or an op never shows up in the profile.
    """
    from ..runtime.profiling import profile_kernels

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    feeds = random_feeds(graph, seed)
    durations: dict[str, list[float]] = {}
    walls: list[float] = []
    try:
        events = profile_kernels(graph.model, feeds, runs=warmup + repeats, intra_op_threads=intra_op_threads,
                                 run_seconds=walls)
    except Exception as exc:  # ORT raises its own exception types
        raise RuntimeFailure(f"ONNX Runtime failed while profiling the training graph: "
                             f"{str(exc).strip()[:600]}") from exc
    for name, args in events:  # events are in execution order, so each node's list is in run order
        durations.setdefault(name, []).append(float(args["dur"]) * 1e-6)
    result = HostTimes()
    missing = []
    for op in graph.ops:
        runs = durations.get(op.name)
        if not runs:
            missing.append(op.name)
            continue
        timed = runs[-repeats:]  # drop the warm-up run(s)
        result[op.name] = max(min(timed), MIN_MEASURED_OP_TIME_S)
    if missing:
        raise RuntimeFailure(f"{len(missing)} op(s) did not appear in the ONNX Runtime profile, "
                             f"e.g. {missing[0]!r}")
    from .timemodel import measure_step_extras, overhead_from_events
    result.overhead = overhead_from_events(graph, events, walls, warmup)
    notes = []
    if artifacts is not None:
        try:
            extras = measure_step_extras(graph, artifacts, feeds, repeats=repeats)
        except Exception as exc:  # ORT raises its own exception types
            raise RuntimeFailure(f"ONNX Runtime failed while timing the training API's step on {artifacts}: "
                                 f"{str(exc).strip()[:600]}") from exc
        result.step_extras = extras
        result.overhead = result.overhead.without_profiler(extras.profiler_per_node_s)
    if paging:
        from ..runtime import nativelib
        from .paging import measure_paging
        try:
            library = nativelib.build_spill_library("host")
        except nativelib.NativeBuildError as exc:
            notes.append(f"paging not measured: the op library could not be built ({str(exc)[:200]})")
        else:
            try:
                result.paging = measure_paging(library, repeats=repeats)
            except Exception as exc:  # ORT raises its own exception types
                raise RuntimeFailure(f"poetc's Spill/Restore failed while timing them: {str(exc).strip()[:600]}") from exc
    result.notes = tuple(notes)
    return result


# ---- cost files --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedCosts(Mapping[str, float]):
    """Contents of a costs file. A read-only mapping op name -> seconds (the same as `times`), so it
    can be passed directly as `build_cost_table(graph, target, measured=...)`."""

    fingerprint: str
    times: dict[str, float]
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ops: tuple[dict[str, Any], ...] = ()  # per-op records in graph order, as stored

    @property
    def overhead(self):
        """The host overhead stored with the times (poetc.cost.timemodel.HostOverhead), or None."""
        from .timemodel import HostOverhead
        return HostOverhead.from_json(self.meta.get("overhead"))

    @property
    def paging(self):
        """Spill/Restore costs measured with the times (poetc.cost.paging.PagingCosts), or None."""
        from .paging import PagingCosts
        return PagingCosts.from_json(self.meta.get("paging"))

    @property
    def step_extras(self):
        """What the training API's step adds to the graph's run (poetc.cost.timemodel.StepExtras), or None."""
        from .timemodel import StepExtras
        return StepExtras.from_json(self.meta.get("step_extras"))

    def __getitem__(self, op_name: str) -> float:
        return self.times[op_name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.times)

    def __len__(self) -> int:
        return len(self.times)

    def check(self, graph: TrainGraph, path: str | os.PathLike[str] = "<costs>") -> None:
        """Raise TargetError unless this file was written for `graph`."""
        expected = graph_fingerprint(graph)
        if self.fingerprint != expected:
            raise TargetError(
                f"{path}: the costs were measured for a different training graph "
                f"(file fingerprint {self.fingerprint[:16]}..., this graph {expected[:16]}...)",
                hint="profile this graph again (its ops differ by name or type from the profiled one)")


def save_costs(path: str | os.PathLike[str], graph: TrainGraph,
               costs: CostTable | Mapping[str, float], *, target: str | None = None,
               meta: Mapping[str, Any] | None = None) -> None:
    """Write per-op times (a CostTable or op name -> seconds) for `graph` as JSON, keys sorted.

    With a CostTable every op's energy, FLOPs and bytes are stored too, and `target` defaults to
    its target's name. Ops absent from a mapping are left out. `meta` is free-form (e.g. repeats);
    times from `profile_host` add their host overhead to it (`meta.overhead`, docs/time-model.md).
    """
    if not isinstance(costs, CostTable):
        for key in ("overhead", "paging", "step_extras"):  # what profile_host measured besides the op times
            value = getattr(costs, key, None)
            if value is not None:
                meta = {**(meta or {}), key: value.to_json()}
        if getattr(costs, "notes", None):
            meta = {**(meta or {}), "notes": list(costs.notes)}
    records = []
    if isinstance(costs, CostTable):
        if costs.op_names != tuple(op.name for op in graph.ops):
            raise ValueError("the CostTable was not built for this graph")
        target = target if target is not None else costs.target.name
        for op, cost, source in zip(graph.ops, costs.ops, costs.time_sources):
            records.append({"name": op.name, "op_type": op.qualified_type, "time_s": cost.time_s,
                            "energy_j": cost.energy_j, "flops": cost.flops,
                            "bytes_moved": cost.bytes_moved, "source": source})
    else:
        for op in graph.ops:
            if op.name in costs:
                records.append({"name": op.name, "op_type": op.qualified_type,
                                "time_s": float(costs[op.name])})
    document = {"format": COSTS_FORMAT, "version": COSTS_VERSION,
                "fingerprint": graph_fingerprint(graph), "target": target,
                "meta": dict(meta or {}), "ops": records}
    text = json.dumps(document, sort_keys=True, indent=1, allow_nan=False) + "\n"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_costs(path: str | os.PathLike[str], graph: TrainGraph | None = None) -> SavedCosts:
    """Read a costs file written by `save_costs`. With `graph`, reject a file written for another
    graph (TargetError). A malformed file raises TargetError naming the file and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TargetError(f"cannot read costs file {path}: {exc.strerror or exc}") from exc

    def bad(problem: str) -> TargetError:
        return TargetError(f"{path}: not a valid poetc costs file: {problem}")

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"malformed JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != COSTS_FORMAT:
        raise bad(f"'format' is not {COSTS_FORMAT!r}")
    if doc.get("version") != COSTS_VERSION:
        raise bad(f"unsupported version {doc.get('version')!r} (expected {COSTS_VERSION})")
    fingerprint = doc.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 64:
        raise bad("'fingerprint' is missing or not a sha256 hex digest")
    ops = doc.get("ops")
    if not isinstance(ops, list):
        raise bad("'ops' must be a list")
    times: dict[str, float] = {}
    for i, rec in enumerate(ops):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise bad(f"ops[{i}] has no 'name'")
        t = rec.get("time_s")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad(f"ops[{i}] ({rec['name']!r}) 'time_s' is {t!r}, not a non-negative number")
        times[rec["name"]] = float(t)
    target = doc.get("target")
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    saved = SavedCosts(fingerprint=fingerprint, times=times,
                       target=target if isinstance(target, str) else None,
                       meta=meta, ops=tuple(ops))
    if graph is not None:
        saved.check(graph, path)
    return saved


# ---- storage -----------------------------------------------------------------------------------
def measure_storage(directory: str | os.PathLike[str], *, small_bytes: int = 4096,
                    large_bytes: int = 64 << 20, repeats: int = 5) -> dict[str, float]:
    """Page-in/page-out bandwidth and latency of the file system holding `directory`.

    Mirrors the Spill/Restore runtime in drop-cache mode: a page-out is write + fdatasync (then
    POSIX_FADV_DONTNEED), a page-in reads the file back after dropping it from the page cache.
    Medians of `repeats` transfers of `small_bytes` and `large_bytes` give a two-point fit
    time = latency + bytes / bandwidth. Returns the TOML [storage] field names -> values.
    """
    medians: dict[int, tuple[float, float]] = {}
    for n in (small_bytes, large_bytes):
        payload = os.urandom(n)
        writes, reads = [], []
        for k in range(repeats):
            path = Path(directory) / f".poetc-storage-probe-{os.getpid()}-{k}"
            try:
                writes.append(_timed_write(path, payload))
                reads.append(_timed_read(path, n))
            finally:
                path.unlink(missing_ok=True)
        medians[n] = (statistics.median(writes), statistics.median(reads))

    def fit(i: int) -> tuple[float, float]:
        t_small, t_large = medians[small_bytes][i], medians[large_bytes][i]
        span = t_large - t_small
        bandwidth = (large_bytes - small_bytes) / span if span > 0 else large_bytes / t_large
        latency = max(t_small - small_bytes / bandwidth, 1e-7)
        return bandwidth, latency

    out_bw, out_lat = fit(0)
    in_bw, in_lat = fit(1)
    return {"page_in_bytes_per_s": in_bw, "page_in_latency_s": in_lat,
            "page_out_bytes_per_s": out_bw, "page_out_latency_s": out_lat}


def _timed_write(path: Path, payload: bytes) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
        elapsed = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return elapsed
    finally:
        os.close(fd)


def _timed_read(path: Path, nbytes: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        got = 0
        while got < nbytes:
            chunk = os.read(fd, min(nbytes - got, 8 << 20))
            if not chunk:
                break
            got += len(chunk)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
