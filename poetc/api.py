"""poetc's library entry points: inspect, compile, verify, train. The CLI is a thin layer over these.

Nothing here prints or exits; errors are `poetc.errors` types.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .errors import InfeasibleError, InputFileError, OutputError, RuntimeFailure
from .importer import ImportOptions, import_model
from .ir.graph import Role, TensorKind, TrainGraph
from .ir.lower import load_artifacts
from .schedule import Decision, SimResult, Step, StepCosts, build_steps, fixed_state_bytes, simulate
from .units import Deadline

log = logging.getLogger(__name__)

REPORT_FORMAT = "poetc-report/1"
RUNTIME_CONTRACT = {
    "graph_optimization_level": "ORT_DISABLE_ALL",
    "execution_order": "PRIORITY_BASED",
    "enable_cpu_mem_arena": False,
    "enable_mem_pattern": False,
    "enable_mem_reuse": False,
    "custom_op_library": "libpoet_spill.so (host) / aarch64/libpoet_spill.so",
    "spill_dir_env": "POETC_SPILL_DIR",
    "why": "ONNX Runtime executes graph.node in file order only with PRIORITY_BASED at ORT_DISABLE_ALL; "
           "higher levels fuse nodes, reorder them and merge recompute duplicates; the arena hides frees; the "
           "memory pattern and buffer reuse keep dead buffers reserved for later tensors of the same size",
}


# ---------------------------------------------------------------------------------------------------
# shared pieces


def open_graph(model_path: Path, work_dir: Path, import_options: ImportOptions) -> tuple[Path, TrainGraph]:
    """Import the model into work_dir and lower it. Returns (artifacts dir, graph)."""
    artifacts = import_model(Path(model_path), work_dir, import_options)
    return artifacts, load_artifacts(artifacts)


def lower_bound_bytes(graph: TrainGraph) -> tuple[int, str]:
    """A bound valid for any schedule: fixed state + the largest single-op working set (inputs and
    outputs of one op, non-persistent ones, and its kernel workspace), and the op that sets it."""
    best, where = 0, ""
    for op in graph.ops:
        names = {x for x in op.inputs + op.outputs if x}
        roots = {graph.storage_root(x) for x in names}
        size = sum(graph.tensors[r].alloc_bytes for r in roots if not graph.tensors[r].kind.is_persistent) \
            + op.workspace_bytes
        if size > best:
            best, where = size, f"{op.op_type} {op.name}"
    return sum(fixed_state_bytes(graph).values()) + best, where


def keep_all(graph: TrainGraph):
    steps, origin = build_steps(graph, {})
    return simulate(graph, steps, origin)


def ort_order_keep_all(graph: TrainGraph, original_model: onnx.ModelProto):
    """Keep-all peak in the order onnxruntime-training wrote (before accumulator hoisting)."""
    from .schedule import Step, StepKind
    by_name = {op.name: op for op in graph.ops}
    order = [by_name[n.name] for n in original_model.graph.node if n.name in by_name]
    if len(order) != len(graph.ops):
        return None
    steps = [Step(StepKind.COMPUTE, op.index, None, tuple(op.inputs), tuple(op.outputs)) for op in order]
    return simulate(graph, steps)


def largest_activations(graph: TrainGraph, n: int = 10) -> list[dict]:
    saved = sorted(graph.saved_activations(), key=lambda t: -t.nbytes)[:n]
    return [{"name": t.name, "bytes": t.nbytes, "shape": list(t.shape), "dtype": t.dtype_name,
             "producer": graph.ops[t.producer].op_type} for t in saved]


# ---------------------------------------------------------------------------------------------------
# inspect


def inspect_model(model_path: Path, import_options: ImportOptions, *, measure: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="poetc-inspect-") as work:
        artifacts, graph = open_graph(model_path, Path(work), import_options)
        sim = keep_all(graph)
        original = onnx.load(str(artifacts / "training_model.onnx"), load_external_data=False)
        from .ir.lower import ensure_unique_node_names
        ensure_unique_node_names(original)
        ort_sim = ort_order_keep_all(graph, original)
        bound, bound_op = lower_bound_bytes(graph)
        fixed = fixed_state_bytes(graph)
        kinds = {k.value: len(graph.tensors_of_kind(k)) for k in TensorKind}
        doc = {
            "format": "poetc-inspect/1",
            "model": str(model_path),
            "ops": len(graph.ops),
            "ops_by_role": graph.op_counts_by_role(),
            "tensors_by_kind": kinds,
            "saved_activations": len(graph.saved_activations()),
            "saved_activation_bytes": sum(t.nbytes for t in graph.saved_activations()),
            "decidable_gradients": sum(h.gradient for h in graph.decidable_tensors()),
            "decidable_gradient_bytes": sum(graph.tensors[h.name].nbytes for h in graph.decidable_tensors()
                                            if h.gradient),
            "fixed_state_bytes": fixed,
            "fixed_total_bytes": sum(fixed.values()),
            "keep_all_activation_peak_bytes": sim.peak_bytes,
            "keep_all_peak_bytes": sim.total_peak_bytes,
            "keep_all_peak_ort_order_bytes": ort_sim.total_peak_bytes if ort_sim else None,
            "lower_bound_bytes": bound,
            "lower_bound_set_by": bound_op,
            "largest_activations": largest_activations(graph),
        }
        if measure:
            run = measure_artifacts(artifacts, graph, steps=2)
            # the first step also makes one-time allocations (optimizer state, kernel caches)
            doc["measured_step_peak_bytes"] = max(s.peak_heap_bytes for s in run.steps[1:])
            doc["measured_first_step_peak_bytes"] = run.steps[0].peak_heap_bytes
            doc["measured_ort_order_note"] = "measured on the artifacts as onnxruntime-training wrote them, " \
                "steady state (second step); compare with keep_all_peak_ort_order_bytes - fixed_total_bytes"
        return doc


# ---------------------------------------------------------------------------------------------------
# compile


@dataclass
class CompileOptions:
    ram_bytes: int
    out_dir: Path
    target: str = "rpi4"
    deadline: Deadline = field(default_factory=lambda: Deadline(factor=1.3))
    flash_bytes: int | None = None
    objective: str = "energy"
    strategy: str = "poet"
    baselines: tuple[str, ...] = ("keep-all", "chen", "capuchin", "remat-only", "paging-only")
    time_limit_s: float = 120.0
    solver: str = "highs"
    seed: int = 0
    threads: int = 1
    costs_path: Path | None = None
    import_options: ImportOptions = field(default_factory=ImportOptions)
    force: bool = False
    disable_passes: tuple[str, ...] = ()
    dump_after: tuple[str, ...] = ()
    # issue #16: "fused" applies each parameter's update inside the step (poetc/ir/fused.py), "unfused"
    # keeps ORT's gradient buffers and Optimizer, "auto" takes fused when it fits where unfused does not
    # or lowers the objective
    optimizer_mode: str = "auto"


@dataclass
class Timelines:
    """The simulator's memory timelines behind a report, for plots (`poetc.plots.memory_timeline`)."""

    keep_all: SimResult  # every saved activation kept; one step per op, in execution order
    compiled: SimResult  # the chosen schedule
    steps: list[Step]  # the compiled step list (compute / recompute / page_out / page_in)
    backward_start: int  # op position of the first backward op
    ram_budget_bytes: int


@dataclass
class CompileResult:
    out_dir: Path
    report: dict  # what report.json holds: deterministic for the same inputs and options
    timings: dict = field(default_factory=dict)  # wall-clock figures, kept out of the output files
    timelines: Timelines | None = None  # in memory only, not in report.json
    optimizer_mode: str = "unfused"  # "fused" or "unfused": which one the compile used (report.json too)


def step_costs_for(graph: TrainGraph, target, costs_path: Path | None) -> StepCosts:
    from .cost import build_cost_table, load_costs
    measured = load_costs(costs_path, graph) if costs_path else None
    table = build_cost_table(graph, target, measured)
    return StepCosts([c.time_s for c in table.ops], [c.energy_j for c in table.ops], table.page_out, table.page_in)


def _check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise OutputError(f"output directory {out_dir} already exists", hint="choose another -o or pass --force")
        if out_dir.is_symlink() or not out_dir.is_dir():
            raise OutputError(f"{out_dir} exists and is not a directory; --force replaces only a directory "
                              f"that poetc wrote", hint="remove it yourself or choose another -o")
        if any(out_dir.iterdir()) and not (out_dir / "report.json").is_file():
            raise OutputError(f"{out_dir} is not empty and holds no report.json; --force replaces only an "
                              f"empty directory or one that poetc wrote", hint="remove it yourself or choose another -o")
    parent = out_dir.resolve().parent
    if not parent.exists():
        try:  # like `mkdir -p`: a pipeline's fresh `-o build/model` should just work
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot write {out_dir}: cannot create its parent directory {parent}: "
                              f"{exc.strerror}") from None
    if not parent.is_dir():
        raise OutputError(f"cannot write {out_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out_dir}: {parent} is not writable")


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def _staging(out_dir: Path):
    """A hidden staging directory beside out_dir (same file system, so the final rename is atomic),
    created first so an unwritable destination fails before any work. Always removed on exit. A
    failure to write there (disk full, read-only file system, permissions) becomes an OutputError."""
    parent = out_dir.resolve().parent
    try:
        root = Path(tempfile.mkdtemp(prefix=".poetc-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write {out_dir}: cannot create a staging directory in {parent}: "
                          f"{exc.strerror or exc}", hint="choose a writable -o") from None
    try:
        (root / "out").mkdir()
        yield root / "out"
    except OSError as exc:
        inside = exc.filename and str(exc.filename).startswith((str(root), str(out_dir)))
        if not inside and exc.errno not in _OUTPUT_ERRNOS:
            raise
        raise OutputError(f"cannot write {out_dir}: {exc.strerror or exc}; nothing was written there",
                          hint="free space on that file system or choose another -o") from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install(stage: Path, out_dir: Path) -> None:
    """Rename the finished stage into place. An old output (--force) is moved aside first and deleted
    only after the new one is in place, so out_dir holds one complete output or the old one."""
    old = stage.parent / "replaced"
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(stage, out_dir)
    except OSError:
        if old.exists():
            os.replace(old, out_dir)
        raise


def compile_model(model_path: Path, options: CompileOptions, *,
                  progress: Callable[[str], None] | None = None) -> CompileResult:
    """Import, solve, rewrite and export. `progress`, if given, is called with the name of each phase
    as it starts (the CLI shows it on a terminal); it must not raise."""
    from .solver import Limits, activation_budget, build_problem, check_lower_bound, run_strategy
    from .targets import load_target

    out_dir = Path(options.out_dir)
    _check_output_dir(out_dir, options.force)
    target = load_target(options.target)
    with _staging(out_dir) as stage, tempfile.TemporaryDirectory(prefix="poetc-compile-") as work:
        work = Path(work)
        say = progress or (lambda phase: None)
        t0 = time.perf_counter()
        say("importing and lowering")
        artifacts, graph = open_graph(model_path, work, options.import_options)
        flash = options.flash_bytes if options.flash_bytes is not None else target.flash_bytes

        def plan(graph: TrainGraph):
            costs = step_costs_for(graph, target, options.costs_path)
            problem = build_problem(graph, costs)
            check_lower_bound(problem, options.ram_bytes)
            deadline_s = options.deadline.resolve(problem.base_time_s)
            limits = Limits(activation_budget(options.ram_bytes, problem.fixed_bytes),
                            deadline_s - problem.base_time_s, flash, objective=options.objective)
            if limits.overhead_time_s < 0:
                raise InfeasibleError(f"deadline {options.deadline} is below the keep-all step time "
                                      f"{problem.base_time_s:.4g} s on {target.name}: no schedule can meet it",
                                      hint=f"use --deadline of at least {problem.base_time_s:.4g}s, or a factor "
                                      f"of keep-all such as 1.3x")
            say(f"solving ({options.strategy}, {graph.optimizer_mode} optimizer)")
            main = run_strategy(problem, limits, options.strategy, time_limit_s=options.time_limit_s,
                                seed=options.seed, threads=options.threads, solver=options.solver)
            return graph, costs, problem, deadline_s, limits, main

        # ---- optimizer mode (issue #16) -------------------------------------------------------
        graph, costs, problem, deadline_s, limits, main, mode_reason = _plan_optimizer_mode(
            graph, artifacts, options, plan)
        bound, bound_op = lower_bound_bytes(graph)
        fused = graph.optimizer_mode == "fused"
        baselines = {}
        for name in options.baselines:
            if name == options.strategy:
                continue
            say(f"baseline {name}")
            baselines[name] = run_strategy(problem, limits, name, time_limit_s=max(options.time_limit_s / 4, 5),
                                           seed=options.seed, threads=options.threads, solver=options.solver)
        if not main.fits:
            raise InfeasibleError(_infeasible_message(main, options, problem),
                                  hint="raise --ram, relax --deadline, or allow more flash (--flash)")
        say("rewriting")
        model, pass_records = rewrite(graph, main.schedule, options, work / "dumps")
        (stage / "reference").mkdir()
        shutil.copy2(artifacts / "training_model.onnx", stage / "reference" / "training_model.onnx")
        if fused:  # Module alone drives it; verify's reference keeps ORT's optimizer and checkpoint
            _write_fused_state(artifacts, graph, stage)
        else:
            for name in ("optimizer_model.onnx", "checkpoint"):
                shutil.copy2(artifacts / name, stage / name)
        shutil.copy2(artifacts / "eval_model.onnx", stage / "eval_model.onnx")
        onnx.save(model, str(stage / "training_model.onnx"))
        uses_paging = any(d is Decision.PAGE for d in main.schedule.decisions.values())
        libraries = _copy_native_libraries(stage, required=uses_paging or fused)
        schedule_doc = main.schedule.to_json()
        _write_json(stage / "schedule.json", schedule_doc)
        encoding = main.schedule.compact_encoding(graph)
        (stage / "schedule.bin").write_bytes(encoding)
        report = {
            "format": REPORT_FORMAT,
            "model": Path(model_path).name,
            "target": target.name,
            "objective": options.objective,
            "ram_budget_bytes": options.ram_bytes,
            "planned_activation_budget_bytes": limits.activation_budget_bytes,
            "deadline": str(options.deadline),
            "deadline_s": deadline_s,
            "flash_bytes": flash,
            "optimizer_mode": graph.optimizer_mode,
            "optimizer_mode_reason": mode_reason,
            "fixed_state_bytes": fixed_state_bytes(graph),
            "fixed_total_bytes": problem.fixed_bytes,
            "lower_bound_bytes": bound,
            "lower_bound_set_by": bound_op,
            "keep_all": {"peak_bytes": problem.fixed_bytes + problem.keep_all_peak_bytes,
                         "activation_peak_bytes": problem.keep_all_peak_bytes,
                         "time_s": problem.base_time_s, "energy_j": problem.base_energy_j},
            "result": main.summary(),
            "baselines": {k: v.summary() for k, v in baselines.items()},
            "candidates": len(problem.candidates),
            "granularity": "op (every saved activation of the ONNX Runtime training graph)",
            "schedule_encoding_bytes": len(encoding),
            "passes": [{k: v for k, v in r.items() if k != "seconds"} for r in pass_records],
            "native_libraries": libraries,
            "runtime_contract": RUNTIME_CONTRACT,
            "label_classes": _label_classes(graph),
            "inputs": {n: {"shape": list(graph.tensors[n].shape), "dtype": graph.tensors[n].dtype_name}
                       for n in graph.user_inputs if n != "lazy_reset_grad"},
        }
        timings = {"compile_s": round(time.perf_counter() - t0, 3), "solve_s": round(main.solve_time_s, 3),
                   "passes": {r["name"]: r.get("seconds") for r in pass_records}}
        keep_steps, keep_origin = build_steps(graph, {})
        timelines = Timelines(simulate(graph, keep_steps, keep_origin, costs), main.sim, main.schedule.steps,
                              problem.backward_start, options.ram_bytes)
        _write_json(stage / "report.json", report)
        _write_json(stage / "runtime.json", dict(RUNTIME_CONTRACT, **_optimizer_contract(graph)))
        _install(stage, out_dir)
    return CompileResult(out_dir, report, timings, timelines, optimizer_mode=graph.optimizer_mode)


# ---- optimizer mode (issue #16) -------------------------------------------------------------------

OPTIMIZER_MODES = ("auto", "fused", "unfused")


def _objective(result, objective: str) -> float:
    return result.overhead_energy_j if objective == "energy" else result.overhead_time_s


def _plan_optimizer_mode(graph: TrainGraph, artifacts: Path, options: CompileOptions, plan):
    """Plan the unfused and/or fused graph as options.optimizer_mode asks. `plan(graph)` returns
    (graph, costs, problem, deadline_s, limits, main) or raises InfeasibleError. Auto: unfused unless
    it cannot fit (lower bound, or no schedule) where fused does, or fused has a lower objective; fused
    is not planned when unfused fits with no overhead (nothing left to lower). Returns plan's tuple
    and the reason for the mode."""
    from .errors import UsageError
    from .ir.fused import fuse_optimizer, read_optimizer_spec
    mode = options.optimizer_mode
    if mode not in OPTIMIZER_MODES:
        raise UsageError(f"unknown optimizer mode {mode!r}", hint=f"modes: {', '.join(OPTIMIZER_MODES)}")

    def fused_graph() -> TrainGraph:
        return fuse_optimizer(graph, read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx"))))

    if mode == "unfused":
        return (*plan(graph), "requested (--optimizer-mode unfused)")
    if mode == "fused":
        return (*plan(fused_graph()), "requested (--optimizer-mode fused)")
    try:
        unfused = plan(graph)
    except InfeasibleError:
        unfused = None
    if unfused is not None and unfused[-1].fits and _objective(unfused[-1], options.objective) <= 0:
        return (*unfused, "auto: unfused fits with no overhead")
    try:
        fused = plan(fused_graph())
    except InfeasibleError:
        if unfused is None:
            raise  # the fused mode's requirement is the smaller one: report it
        return (*unfused, "auto: the fused mode does not fit either")
    if unfused is None:
        return (*fused, "auto: unfused is below its lower bound or misses the deadline; fused plans")
    if fused[-1].fits and not unfused[-1].fits:
        return (*fused, "auto: no unfused schedule fits; a fused one does")
    if fused[-1].fits and _objective(fused[-1], options.objective) < _objective(unfused[-1], options.objective):
        return (*fused, f"auto: fused lowers the {options.objective} overhead")
    return (*unfused, f"auto: fused does not lower the {options.objective} overhead")


def _write_fused_state(artifacts: Path, graph: TrainGraph, stage: Path) -> None:
    from .ir.fused import read_optimizer_spec, write_fused_checkpoint
    from .ir.lower import read_checkpoint_parameters
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    write_fused_checkpoint(read_checkpoint_parameters(artifacts / "checkpoint"), graph, spec, stage / "checkpoint")
    for name in ("optimizer_model.onnx", "checkpoint"):
        shutil.copy2(artifacts / name, stage / "reference" / name)


def _optimizer_contract(graph: TrainGraph) -> dict:
    if graph.optimizer_mode != "fused":
        return {"optimizer_mode": "unfused",
                "optimizer": "onnxruntime.training.api.Optimizer(optimizer_model.onnx) after each step"}
    return {"optimizer_mode": "fused",
            "optimizer": "inside training_model.onnx: poet.AdamWUpdate / poet.SGDUpdate update each parameter and its "
                         "moments in place during the backward pass; drive it with Module alone (no Optimizer, no "
                         "optimizer_model.onnx) and the op library registered; parameters, moments, "
                         "__poet_learning_rate and __poet_step are non-trainable checkpoint state"}


def _infeasible_message(result, options: CompileOptions, problem) -> str:
    from .solver import RESERVE_BYTES, RESERVE_FRACTION
    from .units import format_size
    notes = "; ".join(result.notes)
    return (f"no schedule found that fits {format_size(options.ram_bytes)} within deadline {options.deadline} "
            f"(strategy {result.strategy}: {result.status}{', ' + notes if notes else ''}); keep-all needs "
            f"{format_size(problem.fixed_bytes + problem.keep_all_peak_bytes)}; schedules are planned with "
            f"{RESERVE_FRACTION:.0%} of the activation budget and {RESERVE_BYTES // 1024} KiB spare for allocations "
            f"the simulator does not model")


def _label_classes(graph: TrainGraph) -> int | None:
    for op in graph.ops:
        if op.role is Role.LOSS and op.op_type.startswith("SoftmaxCrossEntropyLoss"):
            shape = graph.tensors[op.inputs[0]].shape
            return int(shape[1]) if len(shape) > 1 else None
    return None


def rewrite(graph: TrainGraph, schedule, options: CompileOptions, dump_dir: Path) -> tuple[onnx.ModelProto, list]:
    import onnx_graphsurgeon as gs

    from .passes import PassContext, PassManager, default_pipeline
    manager = PassManager(default_pipeline(), disabled=set(options.disable_passes),
                          dump_after=set(options.dump_after), dump_dir=dump_dir)
    ctx = PassContext(graph, schedule, gs.import_onnx(graph.model))
    model = manager.run(ctx)
    return model, manager.records


def _copy_native_libraries(stage: Path, *, required: bool) -> dict:
    from .runtime import nativelib
    out = {}
    try:
        host = nativelib.build_spill_library("host")
        shutil.copy2(host, stage / "libpoet_spill.so")
        out["host"] = "libpoet_spill.so"
    except Exception as exc:
        if required:
            raise RuntimeFailure(f"the schedule pages tensors but the Spill/Restore library could not be built: {exc}",
                                 hint="check network access to the Debian archive, or use --strategy remat-only") from exc
        out["host"] = f"not built: {exc}"
    if nativelib.cross_compiler_available():
        try:
            arm = nativelib.build_spill_library("aarch64")
            (stage / "aarch64").mkdir()
            shutil.copy2(arm, stage / "aarch64" / "libpoet_spill.so")
            out["aarch64"] = "aarch64/libpoet_spill.so"
        except Exception as exc:
            out["aarch64"] = f"not built: {exc}"
    else:
        out["aarch64"] = "not built: aarch64-linux-gnu-gcc not installed"
    return out


def _write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


# ---------------------------------------------------------------------------------------------------
# running compiled artifacts


def make_feeds(report: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for the training model's user inputs, from report.json."""
    rng = np.random.default_rng(seed)
    classes = report.get("label_classes") or 2
    feeds = {}
    for name, spec in sorted(report["inputs"].items()):
        shape, dtype = tuple(spec["shape"]), spec["dtype"]
        if dtype in ("float", "double", "float16"):
            feeds[name] = rng.standard_normal(shape).astype({"float": np.float32, "double": np.float64,
                                                             "float16": np.float16}[dtype])
        elif dtype == "bool":
            feeds[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, classes, shape).astype(np.int64 if dtype == "int64" else np.int32)
    return feeds


def load_report(out_dir: Path) -> dict:
    path = Path(out_dir) / "report.json"
    if not path.exists():
        raise InputFileError(f"{out_dir} is not a poetc output directory (no report.json)",
                             hint="pass the directory written by `poetc compile -o DIR`")
    return json.loads(path.read_text())


def measure_artifacts(artifacts: Path, graph: TrainGraph | None = None, steps: int = 2, feeds=None,
                      spill_library: Path | None = None, spill_dir: Path | None = None,
                      intra_op_threads: int | None = None):
    from .runtime.measure import MeasurementError, measure_training
    if feeds is None:
        report = {"inputs": {n: {"shape": list(graph.tensors[n].shape), "dtype": graph.tensors[n].dtype_name}
                             for n in graph.user_inputs if n != "lazy_reset_grad"},
                  "label_classes": _label_classes(graph)}
        feeds = make_feeds(report)
    try:
        return measure_training(artifacts, feeds, steps=steps, spill_library=spill_library, spill_dir=spill_dir,
                                intra_op_threads=intra_op_threads)
    except MeasurementError as exc:
        raise _runtime_failure(exc) from exc


def _runtime_failure(exc) -> RuntimeFailure:
    """One paragraph from a MeasurementError: the custom op's or ONNX Runtime's own message without
    the C++ source locations, the Python traceback and the worker's stderr (kept in its log file)."""
    text = " ".join(str(exc).split("\n--- worker stderr", 1)[0].split())
    if "Status Message: " in text:
        text = text.rsplit("Status Message: ", 1)[1]
    elif "[ONNXRuntimeError] : " in text:
        text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text.rsplit("[ONNXRuntimeError] : ", 1)[1])
    log_file = Path(exc.workdir) / "worker.stderr" if getattr(exc, "workdir", None) else None
    return RuntimeFailure(f"the training step failed in ONNX Runtime: {text[:600]}",
                          hint="the run stopped there: no parameters were saved and the checkpoint is unchanged"
                          + (f"; full log: {log_file}" if log_file else ""))


@dataclass
class VerifyResult:
    ok: bool
    doc: dict


def verify(out_dir: Path, *, steps: int = 3, data: Path | None = None, rtol: float = 1e-6,
           spill_dir: Path | None = None) -> VerifyResult:
    """Train the reference and the compiled artifacts side by side and compare.

    Numerics come from a run of each with one ORT thread, which is bitwise reproducible (with several
    threads some kernels' reductions depend on thread timing: two runs of the same transformer graph
    differed in the 8th digit of the loss). Memory and step time come from a run of each with ORT's
    default threads, as deployed."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    feeds = dict(np.load(data)) if data else make_feeds(report)
    with tempfile.TemporaryDirectory(prefix="poetc-verify-") as work:
        ref_dir = Path(work) / "reference"
        ref_dir.mkdir()
        for name in ("eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
            src = out_dir / "reference" / name  # a fused-optimizer output keeps ORT's optimizer there
            os.symlink((src if src.exists() else out_dir / name).resolve(), ref_dir / name)
        os.symlink((out_dir / "reference" / "training_model.onnx").resolve(), ref_dir / "training_model.onnx")
        library = out_dir / "libpoet_spill.so"
        library = library if library.exists() else None
        ref = measure_artifacts(ref_dir, steps=steps, feeds=feeds)
        comp = measure_artifacts(out_dir, steps=steps, feeds=feeds, spill_library=library, spill_dir=spill_dir)
        ref_1 = measure_artifacts(ref_dir, steps=steps, feeds=feeds, intra_op_threads=1)
        comp_1 = measure_artifacts(out_dir, steps=steps, feeds=feeds, spill_library=library, spill_dir=spill_dir,
                                   intra_op_threads=1)
        ref_params, comp_params = dict(np.load(ref_1.params_npz)), dict(np.load(comp_1.params_npz))
    loss_diffs = [abs(a.loss - b.loss) for a, b in zip(ref_1.steps, comp_1.steps)]
    loss_rel = max(d / max(abs(a.loss), 1e-30) for d, a in zip(loss_diffs, ref_1.steps))
    param_diff, param_rel, bitwise = 0.0, 0.0, True
    for name, a in ref_params.items():
        b = comp_params[name]
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        param_diff = max(param_diff, diff)
        param_rel = max(param_rel, diff / max(float(np.max(np.abs(a))), 1e-30))
        bitwise &= a.tobytes() == b.tobytes()
    fixed = report["fixed_total_bytes"]
    predicted = report["result"]["activation_peak_bytes"]
    steady = comp.steps[1:] or comp.steps  # step 1 also allocates the optimizer state
    measured = [s.peak_heap_bytes for s in comp.steps]
    budget = report["ram_budget_bytes"]
    peak_ok = fixed + max(s.peak_heap_bytes for s in steady) <= budget
    close = all(abs(s.peak_heap_bytes - predicted) <= max(0.03 * predicted, 2**20) for s in steady)
    same = loss_rel <= rtol and param_rel <= rtol
    doc = {
        "steps": steps,
        "numerics_intra_op_threads": 1,
        "losses_reference": [s.loss for s in ref_1.steps],
        "losses_compiled": [s.loss for s in comp_1.steps],
        "max_abs_loss_diff_default_threads": max(abs(a.loss - b.loss) for a, b in zip(ref.steps, comp.steps)),
        "max_abs_loss_diff": max(loss_diffs),
        "max_rel_loss_diff": loss_rel,
        "max_abs_param_diff": param_diff,
        "max_rel_param_diff": param_rel,
        "bitwise_identical_params": bitwise,
        "ram_budget_bytes": budget,
        "fixed_total_bytes": fixed,
        "predicted_step_peak_bytes": predicted,
        "measured_step_peak_bytes": measured,
        "steady_state_from_step": 1 if len(comp.steps) > 1 else 0,
        "reference_step_peak_bytes": [s.peak_heap_bytes for s in ref.steps],
        "measured_total_peak_bytes": fixed + max(s.peak_heap_bytes for s in steady),
        "within_budget": peak_ok,
        "prediction_within_3pct_or_1MiB": close,
        "step_seconds_reference": [s.step_seconds for s in ref.steps],
        "step_seconds_compiled": [s.step_seconds for s in comp.steps],
        "identical_results": same,
    }
    return VerifyResult(ok=same and peak_ok, doc=doc)


def train(out_dir: Path, *, steps: int, data: Path | None = None, seed: int = 0,
          spill_dir: Path | None = None) -> dict:
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    feeds = dict(np.load(data)) if data else make_feeds(report, seed)
    library = out_dir / "libpoet_spill.so"
    run = measure_artifacts(out_dir, steps=steps, feeds=feeds,
                            spill_library=library if library.exists() else None, spill_dir=spill_dir)
    return {"losses": [s.loss for s in run.steps], "step_peak_bytes": [s.peak_heap_bytes for s in run.steps],
            "step_seconds": [s.step_seconds for s in run.steps]}


def file_hashes(out_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(Path(out_dir).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(out_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


__all__ = ["CompileOptions", "CompileResult", "Timelines", "compile_model", "inspect_model", "verify", "train"]
