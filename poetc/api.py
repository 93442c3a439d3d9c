"""poetc's library entry points: inspect, compile, verify, train. The CLI is a thin layer over these.

Nothing here prints or exits; errors are `poetc.errors` types.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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
from .importer import ImportOptions, canonicalizations, import_model
from .ir.graph import TensorKind, TrainGraph
from .ir.lower import load_artifacts
from .overlap import OverlapCosts
from .plan import BASELINES
from .report import CompileReport, KeepAllSummary, StrategySummary, memory_breakdown, state_tensor_list
from .run import INITIAL_STATE, input_specs, label_classes, measure_artifacts
from .runtime.contract import RUNTIME_CONTRACT
from .schedule import Decision, SimResult, Step, StepCosts, StepKind, fixed_state_bytes, simulate
from .units import Deadline

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------
# shared pieces


def open_graph(model_path: Path, work_dir: Path, import_options: ImportOptions) -> tuple[Path, TrainGraph]:
    """Import the model into work_dir and lower it. Returns (artifacts dir, graph)."""
    artifacts = import_model(Path(model_path), work_dir, import_options)
    return artifacts, load_artifacts(artifacts)


def ort_order_keep_all(graph: TrainGraph, original_model: onnx.ModelProto):
    """Keep-all peak in the order onnxruntime-training wrote (before accumulator hoisting)."""
    from .schedule import Step
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
            "canonicalizations": canonicalizations(artifacts),
            "fused": _inspect_fused(artifacts, graph, target),
        }
        if measure:
            run = measure_artifacts(artifacts, graph, steps=2)
            # the first step also makes one-time allocations (optimizer state, kernel caches)
            doc["measured_step_peak_bytes"] = max(s.peak_heap_bytes for s in run.steps[1:])
            doc["measured_first_step_peak_bytes"] = run.steps[0].peak_heap_bytes
            doc["measured_ort_order_note"] = "measured on the artifacts as onnxruntime-training wrote them, " \
                "steady state (second step); compare with keep_all_peak_ort_order_bytes - fixed_total_bytes"
        return doc


def _inspect_fused(artifacts: Path, graph: TrainGraph, target: str) -> dict:
    """The fused optimizer mode's view (issue #17): its fixed state, the parameters and moments by role
    and how many the schedule may page, and its lower bound with paged state (each op holds only the
    state it reads)."""
    from .errors import UnsupportedModelError
    from .ir.fused import fuse_optimizer, read_optimizer_spec, state_directory_bytes, state_tensors
    from .plan import lower_bound
    from .solver import build_problem
    from .solver.problem import MIN_STATE_BYTES
    from .targets import load_target
    try:
        spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
        fused = fuse_optimizer(graph, spec)
    except UnsupportedModelError as exc:
        return {"available": False, "why": str(exc)}
    problem = build_problem(fused, step_costs_for(fused, load_target(target), None))
    by_role: dict[str, dict] = {}
    for st in state_tensors(fused):
        entry = by_role.setdefault(st.role, {"tensors": 0, "bytes": 0, "pageable_tensors": 0, "pageable_bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += st.nbytes
        if st.pageable and st.nbytes >= MIN_STATE_BYTES:
            entry["pageable_tensors"] += 1
            entry["pageable_bytes"] += st.nbytes
    bound = lower_bound(problem)
    doc = {"available": True, "fixed_total_bytes": problem.fixed_bytes, "state": by_role,
           "state_directory_bytes": state_directory_bytes(fused),
           "keep_all_peak_bytes": problem.keep_all.total_peak_bytes,
           "lower_bound": bound.to_json(), "sliced_lower_bound": None}
    op = fused.ops[bound.position]
    if op.op_type == "AdamWUpdate":  # what a sliced update (compile --slice-updates auto) can reach there
        param = op.inputs[0]
        k = min(MAX_UPDATE_SLICES, int(np.prod(fused.tensors[param].shape)))
        sliced = fuse_optimizer(graph, spec, {param: k})
        doc["sliced_lower_bound"] = dict(lower_bound(build_problem(sliced, step_costs_for(
            sliced, load_target(target), None))).to_json(), parameter=param, slices=k)
    return doc


# ---------------------------------------------------------------------------------------------------
# compile


@dataclass
class CompileOptions:
    ram_bytes: int
    out_dir: Path
    target: str = "rpi4"
    # None: the default DEFAULT_DEADLINE, soft: when no schedule fits within it at this budget, relaxed
    # to the fastest one that fits (soft_deadline_plan); an explicit deadline is strict
    deadline: Deadline | None = None
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
    # "fused" applies each parameter's update inside the step (poetc/ir/fused.py), "unfused" keeps ORT's
    # gradient buffers and Optimizer, "auto" takes fused when it fits where unfused does not or lowers
    # the objective (poetc.plan.choose_optimizer_mode)
    optimizer_mode: str = "auto"
    # fused mode: the parameters and moments are decidable (resident or paged from the state directory);
    # False keeps them all resident (the fused mode before issue #17)
    page_state: bool = True
    # overlap paging with compute (poetc.overlap): write-behind spills and prefetched restores where they
    # hide transfer time within the budget; False keeps every Spill/Restore blocking
    overlap: bool = True
    # fused AdamW: "auto" cuts a parameter's update into slices (poetc/ir/fused.py, sliced updates) when
    # that update sets the lower bound above the budget (choose_update_slices); "off" never does
    slice_updates: str = "auto"


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
    optimizer_mode: str = "unfused"  # "fused" or "unfused": which one the compile used (report.json too)


DEFAULT_DEADLINE = Deadline(factor=1.3)
SLICE_UPDATES = ("auto", "off")
MAX_UPDATE_SLICES = 16  # beyond this the moments are a sixteenth of the working set: nothing left to gain


def soft_deadline_plan(run: Callable[[Deadline, str], object], objective: str) -> tuple[object, tuple | None]:
    """The plan under the default deadline (DEFAULT_DEADLINE) made soft: `run(deadline, objective)` at
    the default; when nothing fits within it, once more minimising time with no deadline (1000x) to
    find the fastest schedule that fits, then with `objective` at that schedule's step time (as a
    factor of keep-all rounded up to 0.01x; 0.01x more if the solver misses it at the edge).
    Returns (plan, None) or (plan, (deadline used, note)); InfeasibleError propagates."""
    first = run(DEFAULT_DEADLINE, objective)
    if first.fits:
        return first, None
    fastest = run(Deadline(factor=1000.0), "time")
    if not fastest.fits:
        return first, None  # no deadline helps: the caller reports the default's failure
    base = fastest.problem.base_time_s
    factor = max(math.ceil(fastest.result.sim.time_s / base * 100 - 1e-9) / 100, DEFAULT_DEADLINE.factor) \
        if base > 0 else DEFAULT_DEADLINE.factor
    for f in (factor, factor + 0.01):
        deadline = Deadline(factor=round(f, 2))
        relaxed = run(deadline, objective)
        if relaxed.fits:
            return relaxed, (deadline, f"{DEFAULT_DEADLINE} default not reachable at this budget; using {deadline}, "
                                       f"the fastest schedule that fits")
    # the energy solves at that factor found nothing in their limits: the fastest schedule it is, reported
    # at the factor it meets (not the 1000x it was solved under)
    deadline = Deadline(factor=round(factor, 2))
    return fastest, (deadline, f"{DEFAULT_DEADLINE} default not reachable at this budget; the fastest schedule "
                               f"that fits takes {fastest.result.sim.time_s / base:.2f}x")


def choose_update_slices(graph: TrainGraph, spec, costs_for: Callable[[TrainGraph], StepCosts],
                         ram_bytes: int) -> dict[str, int]:
    """Parameter -> number of sliced updates (poetc/ir/fused.py) for the fused graph of `graph`: while the
    lower bound exceeds `ram_bytes` and is set by a parameter's AdamWUpdate, cut that update into one
    more slice (each slice holds 1/k of the moments), up to MAX_UPDATE_SLICES or the parameter's
    size; deterministic. Empty when no update sets the bound above the budget."""
    from .ir.fused import fuse_optimizer
    from .ir.graph import Role
    from .plan import lower_bound
    from .solver import build_problem
    slices: dict[str, int] = {}
    while True:
        fused = fuse_optimizer(graph, spec, slices)
        bound = lower_bound(build_problem(fused, costs_for(fused)))
        op = fused.ops[bound.position]
        if bound.ram_bytes <= ram_bytes or op.role is not Role.UPDATE or op.op_type != "AdamWUpdate":
            return slices
        param = op.inputs[0]
        k = slices.get(param, 1) + 1
        if k > min(MAX_UPDATE_SLICES, int(np.prod(fused.tensors[param].shape))):
            return slices
        slices[param] = k


SLICE_RETRIES = 3  # re-plans with one more slice of the heaviest update when no schedule fits


def slice_heaviest_update(graph: TrainGraph, slices: dict[str, int]) -> dict[str, int] | None:
    """`slices` with one more slice for the trainable parameter whose update holds the most while it runs
    (weight and gradient whole, 1/k of both moments: (2 + 2/k) x its bytes; ties by name), or None when
    every parameter is at MAX_UPDATE_SLICES or its element count. Deterministic."""
    from .ir.graph import TensorKind
    best = None
    for name in sorted(graph.tensors):
        t = graph.tensors[name]
        if t.kind is not TensorKind.PARAMETER or name in graph.frozen_parameter_names:
            continue
        k = slices.get(name, 1)
        if k + 1 > min(MAX_UPDATE_SLICES, int(np.prod(t.shape))):
            continue
        held = t.nbytes * (2 + 2 / k)
        if best is None or held > best[0]:
            best = (held, name, k)
    if best is None:
        return None
    return {**slices, best[1]: best[2] + 1}


def update_slices(graph: TrainGraph) -> dict[str, int]:
    """report.json's update_slices: parameter -> its sliced updates (fused mode; empty when none)."""
    from .ir.fused import update_slices as count
    return dict(sorted(count(graph).items())) if graph.optimizer_mode == "fused" else {}


def step_costs_for(graph: TrainGraph, target, costs_path: Path | None) -> StepCosts:
    from .cost import build_cost_table, load_costs
    measured = load_costs(costs_path, graph) if costs_path else None
    table = build_cost_table(graph, target, measured)
    return StepCosts([c.time_s for c in table.ops], [c.energy_j for c in table.ops], table.page_out, table.page_in)


def compile_model(model_path: Path, options: CompileOptions, *,
                  progress: Callable[[str], None] | None = None) -> CompileResult:
    """Import, plan, rewrite and export. `progress`, if given, is called with the name of each phase
    as it starts (the CLI shows it on a terminal); it must not raise."""
    from .plan import Budget, add_baselines, choose_optimizer_mode, plan
    from .solver import build_problem
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
        flash = options.flash_bytes if options.flash_bytes is not None else target.flash_bytes

        deadline_notes: dict[int, tuple[Deadline, str]] = {}  # id(plan) -> (deadline used, why), when relaxed
        overlap_costs = None
        if options.overlap:  # the CPU share of a transfer, when the costs file measured paging (docs/overlap.md)
            from .cost import load_costs
            overlap_costs = OverlapCosts.for_target(target, load_costs(options.costs_path) if options.costs_path else None)

        def plan_graph(g: TrainGraph):
            problem = build_problem(g, step_costs_for(g, target, options.costs_path), page_state=options.page_state)
            say(f"solving ({options.strategy}, {g.optimizer_mode} optimizer)")

            def run(deadline: Deadline, objective: str):
                def solve(overlap):
                    return plan(problem, Budget.from_ram(options.ram_bytes, problem.fixed_bytes), deadline,
                                flash_bytes=flash, objective=objective, strategy=options.strategy, baselines=(),
                                time_limit_s=options.time_limit_s, seed=options.seed, threads=options.threads,
                                solver=options.solver, overlap=overlap)
                planned = solve(overlap_costs)
                if overlap_costs is not None and not planned.fits:
                    # the overlapped schedule is judged on the simulator; when the one the MILP chose does
                    # not fit there, the blocking MILP (--no-overlap) may still find one that does
                    blocking = solve(None)
                    if blocking.fits:
                        return blocking
                return planned
            if options.deadline is not None:
                return run(options.deadline, options.objective)
            chosen_plan, note = soft_deadline_plan(run, options.objective)
            if note:
                deadline_notes[id(chosen_plan)] = note
            return chosen_plan

        def plan_fused():
            from .ir.fused import fuse_optimizer, read_optimizer_spec
            spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
            slices = {}
            auto = options.slice_updates == "auto" and options.page_state and spec.kind == "adamw"
            if auto:
                slices = choose_update_slices(graph, spec, lambda g: step_costs_for(g, target, options.costs_path),
                                              options.ram_bytes)
            planned = plan_graph(fuse_optimizer(graph, spec, slices))
            # the lower bound counts one op's working set; what ONNX Runtime holds across the step (unread
            # outputs, its bookkeeping) can still leave no schedule at the largest update: cut it further
            for _ in range(SLICE_RETRIES if auto else 0):
                if planned.fits:
                    break
                more = slice_heaviest_update(graph, slices)
                if more is None:
                    break
                grown = next(p for p in more if more[p] != slices.get(p, 1))
                say(f"no schedule fits: cutting the update of {grown} into {more[grown]} slices")
                slices = more
                planned = plan_graph(fuse_optimizer(graph, spec, slices))
            return planned

        mode, chosen, mode_reason = choose_optimizer_mode(options.optimizer_mode, options.objective,
                                                          lambda: plan_graph(graph), plan_fused)
        chosen = add_baselines(chosen, options.baselines, time_limit_s=max(options.time_limit_s / 4, 5),
                               seed=options.seed, threads=options.threads, solver=options.solver, progress=say)
        problem, graph, budget, main = chosen.problem, chosen.problem.graph, chosen.budget, chosen.result
        deadline_used, deadline_note = deadline_notes.get(id(chosen), (options.deadline or DEFAULT_DEADLINE, ""))
        fused = mode == "fused"
        if not main.fits:
            raise InfeasibleError(_infeasible_message(chosen), hint="raise --ram, relax --deadline, or allow more "
                                  "flash (--flash)")
        main, overlap = _overlap(main, problem, budget, target, options)
        say("rewriting")
        model, pass_records = rewrite(graph, main.schedule, options, work / "dumps", overlap=overlap)
        (stage / "reference").mkdir()
        shutil.copy2(artifacts / "training_model.onnx", stage / "reference" / "training_model.onnx")
        if fused:  # Module alone drives it; verify's reference keeps ORT's optimizer and checkpoint
            initial_state = _write_fused_state(artifacts, graph, stage)
        else:
            for name in ("optimizer_model.onnx", "checkpoint"):
                shutil.copy2(artifacts / name, stage / name)
        shutil.copy2(artifacts / "eval_model.onnx", stage / "eval_model.onnx")
        onnx.save(model, str(stage / "training_model.onnx"))
        uses_paging = any(d is Decision.PAGE for d in main.schedule.decisions.values())  # (state included)
        libraries = output.copy_native_libraries(stage, required=uses_paging or fused)
        _write_json(stage / "schedule.json", main.schedule.to_json())
        encoding = main.schedule.compact_encoding(graph)
        (stage / "schedule.bin").write_bytes(encoding)
        keep = chosen.keep_all
        report = CompileReport(
            model=Path(model_path).name, target=target.name, objective=options.objective, budget=budget,
            deadline=str(deadline_used), deadline_s=chosen.deadline_s, flash_bytes=int(flash),
            deadline_note=deadline_note, update_slices=update_slices(graph),
            fixed_state_bytes=fixed_state_bytes(graph), lower_bound=chosen.bound,
            keep_all=KeepAllSummary(keep.total_peak_bytes, keep.peak_bytes - keep.resident_state_bytes, keep.time_s,
                                    keep.energy_j, keep.resident_state_bytes),
            result=StrategySummary.of(main),
            baselines={k: StrategySummary.of(v) for k, v in chosen.baselines.items()},
            candidates=len(problem.candidates),
            granularity="op (every saved activation of the ONNX Runtime training graph)",
            schedule_encoding_bytes=len(encoding),
            passes=[{k: v for k, v in r.items() if k != "seconds"} for r in pass_records],
            native_libraries=libraries, runtime_contract=RUNTIME_CONTRACT, label_classes=label_classes(graph),
            inputs=input_specs(graph), optimizer_mode=mode, optimizer_mode_reason=mode_reason,
            canonicalizations=canonicalizations(artifacts),
            memory_classes=memory_breakdown(graph, main.schedule, main.sim, problem.costs),
            state_tensors=state_tensor_list(graph, main.schedule), state_dir=STATE_DIR if fused else "",
            overlap=overlap.to_json() if overlap is not None else None)
        timings = {"compile_s": round(time.perf_counter() - t0, 3), "solve_s": round(main.solve_time_s, 3),
                   "passes": {r["name"]: r.get("seconds") for r in pass_records}}
        timelines = Timelines(keep, main.sim, main.schedule.steps, problem.backward_start, budget.ram_bytes)
        _write_json(stage / "runtime.json", dict(RUNTIME_CONTRACT, **_optimizer_contract(graph)))
        report = dataclasses.replace(report, artifacts=output.artifact_hashes(stage))
        if fused:  # after the hashes: training changes it, and its MAC key is random (not hashed)
            _write_state_dir(stage / STATE_DIR, graph, main.schedule, initial_state)
        _write_json(stage / "report.json", report.to_json())
        tx.commit()
    return CompileResult(out_dir, report, timings, timelines, optimizer_mode=mode)


def _write_fused_state(artifacts: Path, graph: TrainGraph, stage: Path) -> tuple[dict, dict]:
    """The fused checkpoint and the reference's optimizer and checkpoint; returns the initial state
    (every parameter, zero moments, learning rate, step counter) and the state directory's meta."""
    from .ir.fused import fused_state_arrays, read_optimizer_spec, write_fused_checkpoint
    from .ir.lower import read_checkpoint_parameters
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    parameters = read_checkpoint_parameters(artifacts / "checkpoint")
    write_fused_checkpoint(parameters, graph, spec, stage / "checkpoint")
    for name in ("optimizer_model.onnx", "checkpoint"):
        shutil.copy2(artifacts / name, stage / "reference" / name)
    tensors = {name: value for name, (value, _) in parameters.items()}
    tensors.update(fused_state_arrays(parameters, graph, spec))
    meta = {"optimizer": spec.kind, "attributes": {k: _json_default(v) if not isinstance(v, (int, float)) else v
                                                   for k, v in sorted(spec.attributes.items())},
            "learning_rate": spec.learning_rate}
    return tensors, meta


# the state directory (poetc.runtime.statedir) inside a fused-mode output directory: generation 0
STATE_DIR = INITIAL_STATE  # where poetc.run looks for it


def _write_state_dir(directory: Path, graph: TrainGraph, schedule, initial: tuple[dict, dict]) -> None:
    from .runtime import statedir
    from .schedule import StepKind
    import hashlib
    tensors, meta = initial
    paged = sorted({s.tensor for s in schedule.steps if s.kind is StepKind.STATE_READ})
    # a template (poetc.run re-keys it for every state directory it creates): its key and id come from
    # its content, so the same input gives the same output bytes
    h = hashlib.sha256(json.dumps([meta, paged], sort_keys=True, default=_json_default).encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode())
        h.update(a.tobytes())
    digest = h.digest()
    statedir.write_initial_state(directory, tensors, meta, frozen=set(graph.frozen_parameter_names), paged=paged,
                                 trainable=set(graph.parameter_names), mac_key=digest[:16], state_id=digest[16:24].hex())


def _optimizer_contract(graph: TrainGraph) -> dict:
    if graph.optimizer_mode != "fused":
        return {"optimizer_mode": "unfused",
                "optimizer": "onnxruntime.training.api.Optimizer(optimizer_model.onnx) after each step"}
    return {"optimizer_mode": "fused",
            "optimizer": "inside training_model.onnx: poet.AdamWUpdate / poet.SGDUpdate update each parameter and its "
                         "moments in place during the backward pass; drive it with Module alone (no Optimizer, no "
                         "optimizer_model.onnx) and the op library registered; parameters, moments, "
                         "__poet_learning_rate and __poet_step are non-trainable checkpoint state",
            "state_dir": STATE_DIR,
            "paged_state": "parameters and moments that are not graph inputs are read with poet.StateRead (the value "
                           "at the start of the step) and written with poet.StateWrite from the state directory "
                           "(poetc.runtime.statedir); the runtime persists the resident ones and commits each step"}


def _infeasible_message(chosen) -> str:
    from .plan import RESERVE_BYTES, RESERVE_FRACTION
    from .units import format_size
    result, budget, keep = chosen.result, chosen.budget, chosen.keep_all
    notes = "; ".join(result.notes)
    return (f"no schedule found that fits {format_size(budget.ram_bytes)} within the deadline "
            f"(strategy {result.strategy}: {result.status}{', ' + notes if notes else ''}); keep-all needs "
            f"{format_size(keep.total_peak_bytes)}; schedules are planned with {RESERVE_FRACTION:.1%} of the "
            f"activation budget and {RESERVE_BYTES // 1024} KiB spare for allocations the simulator does not model")


def _overlap(main, problem, budget, target, options: CompileOptions):
    """(result, OverlapPlan or None): the chosen schedule with its transfers made asynchronous where that
    hides their time within the activation budget; the result's simulation then counts the staging
    buffers and the overlapped time. The MILP's windows when it chose any (already in the result);
    otherwise (a heuristic strategy, or a deadline loose enough that the energy objective wanted no
    window: each costs its staging copy) the greedy planner within the budget's headroom."""
    from .cost import load_costs
    from .overlap import plan_overlap
    if main.overlap is not None and main.overlap.asynchronous:  # the MILP's windows, realised exactly
        return main, main.overlap
    if not options.overlap or not any(s.kind is StepKind.PAGE_OUT for s in main.schedule.steps):
        return main, None
    moved = {s.tensor for s in main.schedule.steps if s.tensor is not None}
    oc = OverlapCosts.for_target(target, load_costs(options.costs_path) if options.costs_path else None)
    plan_ = plan_overlap(main.schedule.steps, main.sim, problem.costs,
                         {t: problem.graph.tensors[t].nbytes for t in moved}, budget.activation_bytes,
                         copy_bytes_per_s=oc.copy_bytes_per_s, copy_power_w=oc.copy_power_w,
                         cpu_out_fraction=oc.cpu_out_fraction, cpu_in_fraction=oc.cpu_in_fraction)
    if not plan_.asynchronous:
        return main, plan_
    sim = plan_.adjusted(main.sim)
    return dataclasses.replace(main, sim=sim, overhead_time_s=main.overhead_time_s + sim.time_s - main.sim.time_s,
                               overhead_energy_j=main.overhead_energy_j + sim.energy_j - main.sim.energy_j), plan_


def rewrite(graph: TrainGraph, schedule, options: CompileOptions, dump_dir: Path, *,
            overlap=None) -> tuple[onnx.ModelProto, list]:
    import onnx_graphsurgeon as gs

    from .passes import PassContext, PassManager, default_pipeline
    manager = PassManager(default_pipeline(), disabled=set(options.disable_passes),
                          dump_after=set(options.dump_after), dump_dir=dump_dir)
    ctx = PassContext(graph, schedule, gs.import_onnx(graph.model), overlap=overlap)
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


__all__ = ["CompileOptions", "CompileResult", "Timelines", "compile_model", "inspect_model", "open_graph", "rewrite"]
