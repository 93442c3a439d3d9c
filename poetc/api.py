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
from .plan import BASELINES
from .report import CompileReport, InputSpec, KeepAllSummary, StrategySummary
from .schedule import Decision, SimResult, Step, StepCosts, fixed_state_bytes, simulate
from .units import Deadline

log = logging.getLogger(__name__)

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


def inspect_model(model_path: Path, import_options: ImportOptions, *, measure: bool = False,
                  target: str = "rpi4") -> dict:
    from .plan import lower_bound
    from .solver import build_problem
    from .targets import load_target
    with tempfile.TemporaryDirectory(prefix="poetc-inspect-") as work:
        artifacts, graph = open_graph(model_path, Path(work), import_options)
        problem = build_problem(graph, step_costs_for(graph, load_target(target), None))
        sim = problem.keep_all
        original = onnx.load(str(artifacts / "training_model.onnx"), load_external_data=False)
        from .ir.lower import ensure_unique_node_names
        ensure_unique_node_names(original)
        ort_sim = ort_order_keep_all(graph, original)
        bound = lower_bound(problem)
        fixed = fixed_state_bytes(graph)
        kinds = {k.value: len(graph.tensors_of_kind(k)) for k in TensorKind}
        doc = {
            "format": "poetc-inspect/2",
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
            "lower_bound": bound.to_json(),
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
    baselines: tuple[str, ...] = BASELINES
    time_limit_s: float = 120.0
    solver: str = "highs"
    seed: int = 0
    threads: int = 1
    costs_path: Path | None = None
    import_options: ImportOptions = field(default_factory=ImportOptions)
    force: bool = False
    disable_passes: tuple[str, ...] = ()
    dump_after: tuple[str, ...] = ()


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
    report: CompileReport  # what report.json holds: deterministic for the same inputs and options
    timings: dict = field(default_factory=dict)  # wall-clock figures, kept out of the output files
    timelines: Timelines | None = None  # in memory only, not in report.json


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
    """Import, plan, rewrite and export. `progress`, if given, is called with the name of each phase
    as it starts (the CLI shows it on a terminal); it must not raise."""
    from .plan import Budget, plan
    from .solver import build_problem
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
        problem = build_problem(graph, step_costs_for(graph, target, options.costs_path))
        budget = Budget.from_ram(options.ram_bytes, problem.fixed_bytes)
        flash = options.flash_bytes if options.flash_bytes is not None else target.flash_bytes
        chosen = plan(problem, budget, options.deadline, flash_bytes=flash, objective=options.objective,
                      strategy=options.strategy, baselines=options.baselines, time_limit_s=options.time_limit_s,
                      seed=options.seed, threads=options.threads, solver=options.solver, progress=say)
        main = chosen.result
        if not main.fits:
            raise InfeasibleError(_infeasible_message(chosen), hint="raise --ram, relax --deadline, or allow more "
                                  "flash (--flash)")
        say("rewriting")
        model, pass_records = rewrite(graph, main.schedule, options, work / "dumps")
        for name in ("eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
            shutil.copy2(artifacts / name, stage / name)
        (stage / "reference").mkdir()
        shutil.copy2(artifacts / "training_model.onnx", stage / "reference" / "training_model.onnx")
        onnx.save(model, str(stage / "training_model.onnx"))
        uses_paging = any(d is Decision.PAGE for d in main.schedule.decisions.values())
        libraries = _copy_native_libraries(stage, required=uses_paging)
        _write_json(stage / "schedule.json", main.schedule.to_json())
        encoding = main.schedule.compact_encoding(graph)
        (stage / "schedule.bin").write_bytes(encoding)
        keep = chosen.keep_all
        report = CompileReport(
            model=Path(model_path).name, target=target.name, objective=options.objective, budget=budget,
            deadline=str(options.deadline), deadline_s=chosen.deadline_s, flash_bytes=int(flash),
            fixed_state_bytes=fixed_state_bytes(graph), lower_bound=chosen.bound,
            keep_all=KeepAllSummary(keep.total_peak_bytes, keep.peak_bytes, keep.time_s, keep.energy_j),
            result=StrategySummary.of(main),
            baselines={k: StrategySummary.of(v) for k, v in chosen.baselines.items()},
            candidates=len(problem.candidates),
            granularity="op (every saved activation of the ONNX Runtime training graph)",
            schedule_encoding_bytes=len(encoding),
            passes=[{k: v for k, v in r.items() if k != "seconds"} for r in pass_records],
            native_libraries=libraries, runtime_contract=RUNTIME_CONTRACT, label_classes=_label_classes(graph),
            inputs=input_specs(graph))
        timings = {"compile_s": round(time.perf_counter() - t0, 3), "solve_s": round(main.solve_time_s, 3),
                   "passes": {r["name"]: r.get("seconds") for r in pass_records}}
        timelines = Timelines(keep, main.sim, main.schedule.steps, problem.backward_start, budget.ram_bytes)
        _write_json(stage / "report.json", report.to_json())
        _write_json(stage / "runtime.json", RUNTIME_CONTRACT)
        _install(stage, out_dir)
    return CompileResult(out_dir, report, timings, timelines)


def _infeasible_message(chosen) -> str:
    from .plan import RESERVE_BYTES, RESERVE_FRACTION
    from .units import format_size
    result, budget, keep = chosen.result, chosen.budget, chosen.keep_all
    notes = "; ".join(result.notes)
    return (f"no schedule found that fits {format_size(budget.ram_bytes)} within the deadline "
            f"(strategy {result.strategy}: {result.status}{', ' + notes if notes else ''}); keep-all needs "
            f"{format_size(keep.total_peak_bytes)}; schedules are planned with {RESERVE_FRACTION:.0%} of the "
            f"activation budget and {RESERVE_BYTES // 1024} KiB spare for allocations the simulator does not model")


def input_specs(graph: TrainGraph) -> dict[str, InputSpec]:
    """The training graph's user inputs (what a step is fed), without ORT's lazy_reset_grad flag."""
    return {n: InputSpec(list(graph.tensors[n].shape), graph.tensors[n].dtype_name)
            for n in graph.user_inputs if n != "lazy_reset_grad"}


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


def make_feeds(inputs: dict[str, InputSpec], label_classes: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for a training step: floats standard normal, integers in [0, classes)."""
    rng = np.random.default_rng(seed)
    classes = label_classes or 2
    feeds = {}
    for name, spec in sorted(inputs.items()):
        shape, dtype = tuple(spec.shape), spec.dtype
        if dtype in ("float", "double", "float16"):
            feeds[name] = rng.standard_normal(shape).astype({"float": np.float32, "double": np.float64,
                                                             "float16": np.float16}[dtype])
        elif dtype == "bool":
            feeds[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, classes, shape).astype(np.int64 if dtype == "int64" else np.int32)
    return feeds


def load_report(out_dir: Path) -> CompileReport:
    path = Path(out_dir) / "report.json"
    if not path.exists():
        raise InputFileError(f"{out_dir} is not a poetc output directory (no report.json)",
                             hint="pass the directory written by `poetc compile -o DIR`")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"cannot read {path}: {exc}", hint="compile the model again") from None
    return CompileReport.from_json(doc, where=str(path))


def measure_artifacts(artifacts: Path, graph: TrainGraph | None = None, steps: int = 2, feeds=None,
                      spill_library: Path | None = None, spill_dir: Path | None = None,
                      intra_op_threads: int | None = None):
    from .runtime.measure import MeasurementError, measure_training
    if feeds is None:
        feeds = make_feeds(input_specs(graph), _label_classes(graph))
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
    feeds = dict(np.load(data)) if data else make_feeds(report.inputs, report.label_classes)
    with tempfile.TemporaryDirectory(prefix="poetc-verify-") as work:
        ref_dir = Path(work) / "reference"
        ref_dir.mkdir()
        for name in ("eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
            os.symlink((out_dir / name).resolve(), ref_dir / name)
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
    fixed = report.budget.fixed_bytes
    predicted = report.result.activation_peak_bytes
    steady = comp.steps[1:] or comp.steps  # step 1 also allocates the optimizer state
    measured = [s.peak_heap_bytes for s in comp.steps]
    budget = report.budget.ram_bytes
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
    feeds = dict(np.load(data)) if data else make_feeds(report.inputs, report.label_classes, seed)
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
