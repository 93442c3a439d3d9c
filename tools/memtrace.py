"""Per-op heap trace of one compiled training step against the simulator (issue #15 diagnostics).

    python tools/memtrace.py MODEL.onnx --ram BYTES [--target rpi4] [--loss mse] [--strategy poet] [--top 15]

Compiles MODEL (as `poetc compile` does), then runs a copy of the compiled training graph with a
marker after every node (a chain of uint8 Pads of distinct sizes, each freed by the next, so the
heap events between two markers belong to one node) under a tracing build of poetc's heap counter
(heap_counter.c with every malloc/free written to a file). Prints, per step, the measured live heap
(markers subtracted) against the simulator's, the steps where they differ most, and the measured and
simulated peaks. Step 3 of the run is traced (1 and 2 allocate the optimizer state and kernel caches);
one intra-op thread. Not part of poetc: a measuring tool for docs/memory-model.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S0, STEP = 20000, 16  # marker k: a uint8 tensor of S0 + STEP * k bytes (heap-served, under the 64 KiB mmap
# threshold up to 2,800 nodes; usable size up to 40 B more)


def build_tracer(out: Path) -> Path:
    src = (ROOT / "poetc/runtime/native/heap_counter.c").read_text()
    src = src.replace("static int g_binding;", """static int g_binding;
static int g_trace_fd = -1;
#include <stdio.h>
static void trace(char c, void *p, int64_t n) {
  char buf[96]; int k;
  if (g_trace_fd < 0) return;
  k = snprintf(buf, sizeof buf, "%c %lld %p %lld\\n", c, (long long)n, p,
               (long long)__atomic_load_n(&g_current, __ATOMIC_RELAXED));
  if (write(g_trace_fd, buf, k) < 0) g_trace_fd = -1;
}
EXPORT void poetc_heap_trace(int fd) { g_trace_fd = fd; }
""", 1)
    src = src.replace("  if (n >= LARGE_BLOCK)\n    raise_peak(&g_large_peak", "  trace('+', p, n);\n  if (n >= LARGE_BLOCK)\n    raise_peak(&g_large_peak", 1)
    src = src.replace("  account_sub_size(malloc_usable_size(p));\n  real_free(p);",
                      "  trace('-', p, (int64_t)malloc_usable_size(p));\n  account_sub_size(malloc_usable_size(p));\n  real_free(p);", 1)
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-pthread", "-o", str(out), str(c), "-ldl"], check=True)
    return out


def add_markers(art: Path, dst: Path) -> None:
    import numpy as np
    import onnx
    from onnx import helper as oh
    from onnx import numpy_helper as nh
    shutil.copytree(art, dst)
    m = onnx.load(str(art / "training_model.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "Constant"]
    prev = None
    for k, n in enumerate(n for n in m.graph.node if n.op_type != "Constant"):
        nodes.append(n)
        name = f"__memtrace{k}"
        nodes.append(oh.make_node("ConstantOfShape", ["__memtrace_shape"], [name], name=name,
                                  value=oh.make_tensor("v", onnx.TensorProto.UINT8, [1], [1])) if prev is None
                     else oh.make_node("Pad", [prev, "__memtrace_pads"], [name], name=name))
        prev = name
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend([nh.from_array(np.array([S0], np.int64), "__memtrace_shape"),
                                nh.from_array(np.array([0, STEP], np.int64), "__memtrace_pads")])
    onnx.save(m, str(dst / "training_model.onnx"))


def traced_step(art: str, out: str, threads: int = 1) -> None:  # runs in the child, with the tracer preloaded
    import numpy as np

    from poetc.run import load_report, training_feeds
    from poetc.runtime.session import open_training
    from poetc.run import create_state_dir, is_paged
    report = load_report(Path(art))
    feeds = training_feeds(report.inputs, report.label_classes)
    lib = Path(art) / "libpoet_spill.so"
    if is_paged(Path(art)):  # paged state: a fresh state directory, as verify trains on
        from poetc.runtime.session import StateSession
        from poetc.runtime.statedir import StateDir
        state_dir = Path(out).parent / "state"
        create_state_dir(Path(art), report, state_dir, lib)
        sess = StateSession(art, StateDir.open(state_dir, library=str(lib), lock_wait_s=60), str(lib),
                            intra_op_threads=threads or None)
        step = lambda f: sess.step(f, commit=False)  # noqa: E731 (persisting is not the step's RAM)
    else:
        sess = open_training(art, spill_library=str(lib) if lib.exists() else None, intra_op_threads=threads or None)
        step = sess.step
    feeds = {n: np.ascontiguousarray(feeds[n]) for n in sess.input_names}
    c = ctypes.CDLL(None)
    c.poetc_heap_current_bytes.restype = ctypes.c_uint64
    step(feeds)
    step(feeds)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    base = c.poetc_heap_current_bytes()
    c.poetc_heap_trace(fd)
    step(feeds)
    c.poetc_heap_trace(-1)
    os.write(fd, f"BASE {base}\n".encode())
    os.close(fd)


def per_step_live(trace: Path, n_steps: int) -> dict[int, int]:
    """Peak live heap above the step's start during each node, markers subtracted."""
    text = trace.read_text()
    base = int(text.split("BASE ")[1].split()[0])
    expected, node, markers, peak = 0, 0, {}, {}
    for line in text.splitlines():
        if line[:1] not in "+-":
            continue
        c, n, p, cur = line.split()
        n, cur = int(n), int(cur) - base - (int(n) if c == "-" else 0)
        if c == "+" and 0 <= n - (S0 + STEP * expected) <= 40:
            markers[p] = n
            expected += 1
            node = expected
        elif c == "-" and p in markers:
            markers.pop(p)
        peak[node] = max(peak.get(node, -1), cur - sum(markers.values()))
    return peak


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--ram", type=int, required=True)
    ap.add_argument("--target", default="rpi4")
    ap.add_argument("--loss", default="cross_entropy")
    ap.add_argument("--strategy", default="poet")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--deadline", default="1.3x", help="as poetc compile's --deadline")
    ap.add_argument("--time-limit", type=float, default=30.0, help="solver time limit, seconds")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the traced run (0: ORT's default, as verify measures)")
    ap.add_argument("--all", action="store_true", help="print every step, in order")
    ap.add_argument("--keep", type=Path, help="copy the compiled artifacts and the raw trace here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import poetc.api as api
    from poetc.importer import ImportOptions
    from poetc.units import parse_deadline
    with tempfile.TemporaryDirectory(prefix="memtrace-") as work:
        work = Path(work)
        captured = {}
        rewrite = api.rewrite

        def capture(graph, schedule, options, dump_dir, **kw):
            captured["graph"] = graph
            return rewrite(graph, schedule, options, dump_dir, **kw)
        api.rewrite = capture
        result = api.compile_model(args.model, api.CompileOptions(
            ram_bytes=args.ram, out_dir=work / "out", target=args.target, time_limit_s=args.time_limit, baselines=(),
            deadline=parse_deadline(args.deadline),
            strategy=args.strategy, import_options=ImportOptions(loss=args.loss)))
        graph, sim, steps = captured["graph"], result.timelines.compiled, result.timelines.steps
        add_markers(work / "out", work / "marked")
        tracer = build_tracer(work / "tracer.so")
        env = dict(os.environ, LD_PRELOAD=str(tracer), MALLOC_MMAP_THRESHOLD_="65536",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = "import sys; sys.path.insert(0, sys.argv[3]); import memtrace; memtrace.traced_step(sys.argv[1], sys.argv[2], int(sys.argv[4]))"
        subprocess.run([sys.executable, "-c", code, str(work / "marked"), str(work / "step.trace"),
                        str(Path(__file__).parent), str(args.threads)], env=env, check=True)
        measured = per_step_live(work / "step.trace", len(steps))
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    # fused mode: the simulator counts the resident parameters and moments, which exist before the step
    sim_live = [b - sim.resident_state_bytes for b in sim.live_bytes]
    rows = []
    for i, step in enumerate(steps):
        if i in measured:
            op = graph.ops[step.op] if step.op is not None else None
            rows.append((measured[i] - sim_live[i], i, step.kind.value, op.op_type if op else "-",
                         (op.name if op else step.tensor)[-60:], sim_live[i], measured[i]))
    print(f"simulated peak {sim.peak_bytes - sim.resident_state_bytes} B at step {sim.peak_step}; measured peak {max(measured.values())} B "
          f"(markers subtracted)")
    print("measured - simulated at the first steps (per-step bookkeeping):",
          ", ".join(f"{r[0]:+d}" for r in rows[:3]))
    print(f"{'diff':>9} {'step':>5} kind      op type                sim        measured  op")
    for r in (rows if args.all else sorted(rows, key=lambda r: -abs(r[0]))[:args.top]):
        print(f"{r[0]:+9d} {r[1]:5d} {r[2]:9s} {r[3]:20s} {r[5]:10d} {r[6]:10d}  {r[4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
