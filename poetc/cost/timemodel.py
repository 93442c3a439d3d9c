"""The host time model (issue #19, docs/time-model.md): what a training step costs beyond the sum of
its kernels.

ONNX Runtime's profiler times each kernel; a step takes longer than the sum of those times. Under
poetc's runtime contract (sequential executor, no arena, no buffer reuse) the rest is, per node, the
executor's own work between two kernels (fences, input/output bookkeeping) and the frees of the
tensors whose last reader that node was (with no arena every free is a real `free`, and large buffers
go back to the kernel with `munmap`), and, per run, `session.run` itself (feeds, fetches, executor
setup). `HostOverhead` holds the three coefficients:

  step time = sum of kernel times + per_node_s * nodes + per_byte_s * bytes allocated + per_run_s

(every allocated byte is freed once in a step, so the per-byte term needs only the total). They are
fitted from the profiling run `poetc profile` makes anyway: the gap before each kernel (its start
minus the previous kernel's end) against the bytes the previous node freed, by least squares; the
per-run term is the median of each run's wall time minus its span from first kernel start to last
kernel end. The costs file keeps them (`meta.overhead`), and `build_cost_table` adds each op's share
(per_node_s + per_byte_s * its output bytes) to its measured time, so the simulator, the MILP and the
deadline see them. The per-run term is not an op's: `predict_step_s` adds it.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..ir.graph import TrainGraph


@dataclass(frozen=True)
class HostOverhead:
    per_node_s: float
    per_byte_s: float
    per_run_s: float
    samples: int = 0  # gaps the fit used
    run_s: float = 0.0  # the profiled runs' median wall time (session.run, profiler on): a diagnostic
    profiler_per_node_s: float = 0.0  # taken off per_node_s: the profiler's own cost (StepExtras)

    def without_profiler(self, per_node_s: float) -> HostOverhead:
        """This overhead with the profiler's own cost per node (measured) taken off per_node_s."""
        return dataclasses.replace(self, per_node_s=max(self.per_node_s - per_node_s, 0.0),
                                   profiler_per_node_s=min(per_node_s, self.per_node_s))

    def op_s(self, out_bytes: int) -> float:
        """What one node executing costs besides its kernel, given the bytes its outputs allocate."""
        return self.per_node_s + self.per_byte_s * out_bytes

    def to_json(self) -> dict:
        return {"per_node_s": self.per_node_s, "per_byte_s": self.per_byte_s, "per_run_s": self.per_run_s,
                "samples": self.samples, "run_s": self.run_s, "profiler_per_node_s": self.profiler_per_node_s}

    @classmethod
    def from_json(cls, doc) -> HostOverhead | None:
        """None unless `doc` holds three finite non-negative coefficients."""
        if not isinstance(doc, dict):
            return None
        try:
            values = [float(doc[k]) for k in ("per_node_s", "per_byte_s", "per_run_s")]
        except (KeyError, TypeError, ValueError):
            return None
        if not all(np.isfinite(values)) or min(values) < 0:
            return None
        return cls(*values, int(doc.get("samples", 0)), float(doc.get("run_s", 0.0)),
                   float(doc.get("profiler_per_node_s", 0.0)))


def fit_overhead(gaps_s, freed_bytes, run_extra_s) -> HostOverhead:
    """Least squares of gap = per_node_s + per_byte_s * freed bytes (each coefficient at least 0),
    and per_run_s = the median of `run_extra_s` (each run's wall time minus its kernel span)."""
    y = np.asarray(gaps_s, dtype=np.float64)
    x = np.asarray(freed_bytes, dtype=np.float64)
    if len(y) == 0:
        return HostOverhead(0.0, 0.0, max(statistics.median(run_extra_s), 0.0) if run_extra_s else 0.0)
    a = np.column_stack([np.ones_like(x), x])
    (c0, c1), *_ = np.linalg.lstsq(a, y, rcond=None)
    if c1 < 0:  # no per-byte cost visible: the constant alone
        c0, c1 = float(np.mean(y)), 0.0
    if c0 < 0:  # through the origin
        c0, c1 = 0.0, max(float(x @ y / (x @ x)) if x @ x > 0 else 0.0, 0.0)
    per_run = max(statistics.median(run_extra_s), 0.0) if run_extra_s else 0.0
    return HostOverhead(float(c0), float(c1), float(per_run), len(y))


def freed_after(graph: TrainGraph) -> dict[str, int]:
    """op name -> bytes freed right after it runs, in the keep-all step (the simulator's accounting)."""
    from ..schedule import simulate_keep_all
    sim = simulate_keep_all(graph)
    out: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        nxt = sim.before_bytes[i + 1] if i + 1 < len(graph.ops) else None
        if nxt is None:
            out[op.name] = 0
            continue
        out[op.name] = max(int(sim.live_bytes[i] - op.workspace_bytes - nxt), 0)
    return out


def output_bytes(graph: TrainGraph, op) -> int:
    """Bytes an op's outputs allocate (views of another buffer allocate none)."""
    total = 0
    for name in op.outputs:
        t = graph.tensors.get(name) if name else None
        if t is not None and t.alias_of is None:
            total += t.alloc_bytes
    return total


def overhead_from_events(graph: TrainGraph, events: list[tuple[str, dict]], run_seconds: list[float],
                         warmup: int) -> HostOverhead:
    """Fit HostOverhead from profile_kernels' events of `warmup + len(timed)` runs of `graph.model`
    (kernel events with "ts" and "dur" in us) and each run's wall time."""
    runs: list[list] = []
    for ev in events:  # each run starts with the same node
        if not runs or ev[0] == events[0][0]:
            runs.append([])
        runs[-1].append(ev)
    runs = runs[warmup:]
    walls = run_seconds[warmup:]
    freed = freed_after(graph)
    gaps: dict[str, list[float]] = {}
    extra = []
    for run, wall in zip(runs, walls):
        if not run:
            continue
        ordered = sorted(run, key=lambda e: float(e[1].get("ts", 0)))
        first = float(ordered[0][1]["ts"])
        end = first
        prev = None
        for name, args in ordered:
            ts, dur = float(args["ts"]), float(args["dur"])
            if prev is not None:
                gaps.setdefault(prev, []).append(max(ts - end, 0.0) * 1e-6)
            end = ts + dur
            prev = name
        extra.append(wall - (end - first) * 1e-6)
    names = [n for n in gaps if n in freed]
    fit = fit_overhead([statistics.median(gaps[n]) for n in names], [freed[n] for n in names], extra)
    return dataclasses.replace(fit, run_s=statistics.median(walls) if walls else 0.0)


def predict_step_s(graph: TrainGraph, kernel_s: dict[str, float], overhead: HostOverhead | None,
                   extra_s: float = 0.0) -> float:
    """A step of `graph` on this host: its kernels (op name -> seconds), each node's overhead and the
    run's; `extra_s`: anything else the step runs (the compiled graph's transfers, say)."""
    total = sum(kernel_s[op.name] for op in graph.ops) + extra_s
    if overhead is not None:
        total += sum(overhead.op_s(output_bytes(graph, op)) for op in graph.ops) + overhead.per_run_s
    return total


@dataclass(frozen=True)
class StepExtras:
    """What a training step through ONNX Runtime's training API (`Module` + `Optimizer`, the step
    `poetc verify`/`train` time) costs besides the training graph's run, measured by
    `measure_step_extras` on the keep-all artifacts. Every figure is the minimum over the repeats (the
    least disturbed reading: other processes only add time):

    - module_s - run_s = `api_s`: the Module call (binding parameters, gradients and feeds, fetching
      the loss) beyond an unprofiled `session.run` of the same graph;
    - `optimizer_s`: `Optimizer.step()` (ORT's AdamW session over every parameter);
    - `reset_s`: `lazy_reset_grad()`;
    - `profiler_per_node_s`: (profiled run - unprofiled run) / nodes, the profiler's own cost per node,
      which the gaps `fit_overhead` sees include (HostOverhead.per_node_s is measured under it).
    """

    api_s: float
    optimizer_s: float
    reset_s: float
    profiler_per_node_s: float
    module_s: float = 0.0
    run_s: float = 0.0
    repeats: int = 0

    @property
    def step_s(self) -> float:
        """What the step adds to the graph's run: the API's work, the optimizer, the reset."""
        return self.api_s + self.optimizer_s + self.reset_s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc) -> StepExtras | None:
        """None unless `doc` holds the four finite non-negative figures."""
        if not isinstance(doc, dict):
            return None
        try:
            values = [float(doc[k]) for k in ("api_s", "optimizer_s", "reset_s", "profiler_per_node_s")]
        except (KeyError, TypeError, ValueError):
            return None
        if not all(np.isfinite(values)) or min(values) < 0:
            return None
        return cls(*values, float(doc.get("module_s", 0.0)), float(doc.get("run_s", 0.0)), int(doc.get("repeats", 0)))


def measure_step_extras(graph: TrainGraph, artifacts, feeds: dict, repeats: int = 5) -> StepExtras:
    """Time the training API's step on the keep-all `artifacts` (an unfused directory: `Module` and
    `Optimizer`) against an unprofiled and a profiled `session.run` of `graph.model` with `feeds` (every
    input), all in alternation (so that a change of load hits each alike), `repeats` times after one
    warm-up. ONNX Runtime's exceptions propagate."""
    import tempfile
    import time

    import onnxruntime as ort

    from ..runtime.session import contract_session_options, open_training

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sess = open_training(artifacts)
    user = [feeds[n] for n in sess.input_names]
    model = graph.model.SerializeToString()
    plain = ort.InferenceSession(model, contract_session_options(), providers=["CPUExecutionProvider"])
    tmp = tempfile.TemporaryDirectory(prefix="poetc-extras-")
    so = contract_session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tmp.name) / "p")
    profiled = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    best = {"module": float("inf"), "optimizer": float("inf"), "reset": float("inf"), "run": float("inf"),
            "profiled": float("inf")}
    for i in range(repeats + 1):
        tp = time.perf_counter()
        profiled.run(None, feeds)
        t0 = time.perf_counter()
        plain.run(None, feeds)
        t1 = time.perf_counter()
        sess.module.train()
        sess.module(*user)
        t2 = time.perf_counter()
        if sess.optimizer is not None:
            sess.optimizer.step()
        t3 = time.perf_counter()
        sess.module.lazy_reset_grad()
        t4 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        for key, dt in (("profiled", t0 - tp), ("run", t1 - t0), ("module", t2 - t1), ("optimizer", t3 - t2),
                        ("reset", t4 - t3)):
            best[key] = min(best[key], dt)
    profiled.end_profiling()
    del profiled
    tmp.cleanup()
    nodes = max(len(graph.model.graph.node), 1)
    return StepExtras(api_s=max(best["module"] - best["run"], 0.0), optimizer_s=best["optimizer"],
                      reset_s=best["reset"], profiler_per_node_s=max(best["profiled"] - best["run"], 0.0) / nodes,
                      module_s=best["module"], run_s=best["run"], repeats=repeats)


__all__ = ["HostOverhead", "StepExtras", "measure_step_extras", "fit_overhead", "freed_after", "output_bytes", "overhead_from_events", "predict_step_s"]
