"""poetc's library entry points: inspect, compile, verify, train. The CLI is a thin layer over these.

Nothing here prints or exits; errors are `poetc.errors` types.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import output
from .errors import InfeasibleError
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


def step_costs_for(graph: TrainGraph, target, costs_path: Path | None) -> StepCosts:
    from .cost import build_cost_table, load_costs
    measured = load_costs(costs_path, graph) if costs_path else None
    table = build_cost_table(graph, target, measured)
    return StepCosts([c.time_s for c in table.ops], [c.energy_j for c in table.ops], table.page_out, table.page_in)


def compile_model(model_path: Path, options: CompileOptions, *,
                  progress: Callable[[str], None] | None = None) -> CompileResult:
    """Import, solve, rewrite and export. `progress`, if given, is called with the name of each phase
    as it starts (the CLI shows it on a terminal); it must not raise."""
    from .solver import Limits, activation_budget, build_problem, check_lower_bound, run_strategy
    from .targets import load_target

    out_dir = Path(options.out_dir)
    with output.OutputTransaction(out_dir, force=options.force, inputs=[Path(model_path)]) as tx, \
            tempfile.TemporaryDirectory(prefix="poetc-compile-") as work:
        target = load_target(options.target)
        stage = tx.stage
        work = Path(work)
        say = progress or (lambda phase: None)
        t0 = time.perf_counter()
        say("importing and lowering")
        artifacts, graph = open_graph(model_path, work, options.import_options)
        costs = step_costs_for(graph, target, options.costs_path)
        problem = build_problem(graph, costs)
        check_lower_bound(problem, options.ram_bytes)
        bound, bound_op = lower_bound_bytes(graph)
        deadline_s = options.deadline.resolve(problem.base_time_s)
        flash = options.flash_bytes if options.flash_bytes is not None else target.flash_bytes
        limits = Limits(activation_budget(options.ram_bytes, problem.fixed_bytes), deadline_s - problem.base_time_s,
                        flash, objective=options.objective)
        if limits.overhead_time_s < 0:
            raise InfeasibleError(f"deadline {options.deadline} is below the keep-all step time "
                                  f"{problem.base_time_s:.4g} s on {target.name}: no schedule can meet it",
                                  hint=f"use --deadline of at least {problem.base_time_s:.4g}s, or a factor "
                                  f"of keep-all such as 1.3x")
        say(f"solving ({options.strategy})")
        main = run_strategy(problem, limits, options.strategy, time_limit_s=options.time_limit_s,
                            seed=options.seed, threads=options.threads, solver=options.solver)
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
        for name in ("eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
            shutil.copy2(artifacts / name, stage / name)
        (stage / "reference").mkdir()
        shutil.copy2(artifacts / "training_model.onnx", stage / "reference" / "training_model.onnx")
        onnx.save(model, str(stage / "training_model.onnx"))
        uses_paging = any(d is Decision.PAGE for d in main.schedule.decisions.values())
        libraries = output.copy_native_libraries(stage, required=uses_paging)
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
        _write_json(stage / "runtime.json", RUNTIME_CONTRACT)
        report["artifacts"] = output.artifact_hashes(stage)  # checked by train and verify
        _write_json(stage / "report.json", report)
        tx.commit()
    return CompileResult(out_dir, report, timings, timelines)


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


def _write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


# ---------------------------------------------------------------------------------------------------
# running compiled artifacts: poetc.run (re-exported here for existing callers)

from .output import file_hashes  # noqa: E402
from .run import VerifyReport, load_report, make_feeds, measure_artifacts, train, verify  # noqa: E402

VerifyResult = VerifyReport


__all__ = ["CompileOptions", "CompileResult", "Timelines", "compile_model", "inspect_model", "verify", "train",
           "VerifyReport", "file_hashes", "load_report", "make_feeds", "measure_artifacts"]
