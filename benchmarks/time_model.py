"""Host step time: predicted vs measured, keep-all and compiled (issue #19, docs/time-model.md).

For each model: lower it, profile it as `poetc profile` does (per-op kernel times, the host overhead,
the training API's step and Spill/Restore through poetc's ops: poetc/cost/timemodel.py,
poetc/cost/paging.py), compile it for the host target with those costs at `--fraction` of keep-all
activations (unfused optimizer: the reference's own), then `poetc verify` runs the reference (keep-all,
ORT's graph) and the compiled step. Two predictions of each step:
- kernels: the sum of the profiled kernel times (what poetc predicted before the time model);
- model: the simulator's time with each op's overhead share (what compile plans with: transfers at
  the measured paging rates, overlap as planned) plus the per-run term plus what the training API's
  step adds (Module binding and fetching, Optimizer.step, lazy_reset_grad: StepExtras);
against the measured step (the minimum over the steady-state steps). Writes a markdown table, the
rows as JSON and a figure. Timings depend on the machine's load: run it on a quiet machine.

    python -m benchmarks.time_model [--models mlp cnn ...] [--fraction 0.5] [--steps 4]
        [--out docs/bench/time_model.json] [--figure docs/figures/time_model.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def profiled(name: str, batch: int | None, work: Path, repeats: int = 5):
    """(model path, batch, TrainGraph, costs file, HostTimes): `name` from models/ built at `batch` (None:
    its default) and lowered as `poetc profile` does, profiled with the training API's step and paging."""
    import models

    from poetc.api import open_graph
    from poetc.cost import profile_host, save_costs
    from poetc.importer import ImportOptions
    batch = batch or models.get_spec(name).default_batch
    path = models.build(name, batch=batch, seed=0)
    artifacts, graph = open_graph(path, work / f"{name}-b{batch}", ImportOptions())
    times = profile_host(graph, repeats=repeats, artifacts=artifacts, paging=True)
    costs = work / f"{name}-b{batch}-costs.json"
    save_costs(costs, graph, times, target="host", meta={"repeats": repeats})
    return Path(path), batch, graph, costs, times


def _row(name: str, fraction: float, steps: int, work: Path, repeats: int = 5) -> dict:
    from poetc.api import CompileOptions, compile_model, step_costs_for
    from poetc.run import verify
    from poetc.solver import build_problem
    from poetc.targets import load_target
    from poetc.units import Deadline
    path, batch, graph, costs, times = profiled(name, None, work, repeats)
    oh, extras = times.overhead, times.step_extras
    host = load_target("host")
    opt_s = extras.step_s  # what the training API's step adds to the graph's run (measured)
    kernels_keep = sum(times[op.name] for op in graph.ops)
    out = work / f"{name}-out"
    problem = build_problem(graph, step_costs_for(graph, host, costs))
    from poetc.plan import lower_bound
    ram = max(problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes),
              int(lower_bound(problem).ram_bytes * 1.02))  # (a small model's floor may be above the fraction)
    options = CompileOptions(ram_bytes=ram, out_dir=out, target="host", costs_path=costs, optimizer_mode="unfused",
                             deadline=Deadline(factor=1.3), baselines=(), time_limit_s=60, force=True)
    result = compile_model(path, options)
    rep = result.report
    keep_model = rep.keep_all.time_s + oh.per_run_s + opt_s
    # the compiled step's kernels alone: its simulated time less every executed node's overhead share
    share = sum(oh.op_s(_out_bytes(graph, s.op)) for s in result.timelines.steps if s.op is not None)
    compiled_model = rep.result.time_s + oh.per_run_s + opt_s
    compiled_kernels = rep.result.time_s - share
    v = verify(out, steps=steps).to_json()
    k = v["steady_state_from_step"]
    allocations = sum(1 for op in graph.ops for t in op.outputs
                      if t and graph.tensors.get(t) is not None and graph.tensors[t].alias_of is None)
    return {"model": name, "batch": batch, "fraction": fraction, "ops": len(graph.ops), "allocations": allocations,
            "profiled_run_s": oh.run_s,
            "overhead": oh.to_json(), "step_extras": extras.to_json(),
            "paging": times.paging.to_json() if times.paging else None, "notes": list(times.notes),
            "keep_all": {"kernels_s": kernels_keep, "model_s": keep_model,
                         "measured_s": min(v["step_seconds_reference"][k:])},
            "compiled": {"kernels_s": compiled_kernels, "model_s": compiled_model,
                         "measured_s": min(v["step_seconds_compiled"][k:]),
                         "decisions": rep.result.decisions, "identical": bool(v["identical_results"])}}


_MALLOC_LOOP = """
import ctypes, sys, time
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
malloc, free, n = libc.malloc, libc.free, int(sys.argv[1])
best = float("inf")
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(n):
        free(malloc(4096))
    best = min(best, time.perf_counter() - t0)
print(best / n)
"""


def heap_counter_cost_s(n: int = 200_000) -> float:
    """What poetc's heap counter (verify's LD_PRELOAD) adds to one malloc + free: a loop of n pairs
    through ctypes in two child processes, with and without it (each the fastest of 7 rounds). Not part
    of the table (docs/time-model.md: the difference is below what this loop resolves):

        python -c "from benchmarks.time_model import heap_counter_cost_s as f; print(f())"
    """
    import os
    import subprocess
    import sys

    from poetc.runtime import nativelib
    counter = nativelib.build_heap_counter()
    per = {}
    for key, preload in (("plain", None), ("counted", str(counter))):
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if preload:
            env["LD_PRELOAD"] = preload
        out = subprocess.run([sys.executable, "-c", _MALLOC_LOOP, str(n)], env=env, capture_output=True, text=True,
                             check=True)
        per[key] = float(out.stdout.strip())
    return per["counted"] - per["plain"]


def _out_bytes(graph, op_index: int) -> int:
    from poetc.cost.timemodel import output_bytes
    return output_bytes(graph, graph.ops[op_index])


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | step | kernels (s) | model (s) | measured (s) | kernels err | model err | "
             "profiled session.run (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for which in ("keep_all", "compiled"):
            x = r[which]
            m = x["measured_s"]
            run = f"{r['profiled_run_s']:.4f}" if which == "keep_all" else ""
            lines.append(f"| {r['model']} | {r['batch']} | {which.replace('_', '-')} | {x['kernels_s']:.4f} | "
                         f"{x['model_s']:.4f} | {m:.4f} | {100 * (x['kernels_s'] / m - 1):+.1f}% | "
                         f"{100 * (x['model_s'] / m - 1):+.1f}% | {run} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [(r[w]["measured_s"], r[w][k], k, w) for r in rows for w in ("keep_all", "compiled")
           for k in ("kernels_s", "model_s")]
    hi = max(max(a, b) for a, b, _, _ in pts) * 1.1
    ax.plot([0, hi], [0, hi], color="black", lw=0.8)
    ax.fill_between([0, hi], [0, 0.85 * hi], [0, 1.15 * hi], color="0.9", label="within 15%")
    for key, marker, label in (("kernels_s", "x", "sum of kernels"), ("model_s", "o", "time model")):
        xs = [a for a, b, k, _ in pts if k == key]
        ys = [b for a, b, k, _ in pts if k == key]
        ax.scatter(xs, ys, marker=marker, label=label)
    ax.set_xlabel("measured step (s)")
    ax.set_ylabel("predicted step (s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18_cifar", "resnet18", "mobilenetv2",
                                                    "vgg11", "bert_tiny", "bert_small"])
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="profiled runs per model (default 5)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="poetc-time-model-") as work:
        for name in args.models:
            rows.append(_row(name, args.fraction, args.steps, Path(work), args.repeats))
            print(table(rows[-1:]).splitlines()[-2], flush=True)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.out:  # after every model: a long run stopped part-way keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    if args.figure:
        figure(rows, args.figure)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
