"""`poetc bench`: sweep models x targets x RAM budgets x deadlines x strategies and record the results.

Each model is exported and lowered once; its scheduling problem is built once per target and reused
for every budget, deadline and strategy (solving is fast, lowering and measuring are the slow parts).
Every strategy's numbers come from the simulator (`poetc.schedule.simulate`). A small subset is also
compiled for the `host` target and run in ONNX Runtime to set measured peaks and step times next to
the predictions.

Budgets are fractions of keep-all *activation* memory: budget = fixed state + f x keep-all activation
peak (fixed state: parameters, gradient buffers, optimizer state, inputs).

Outputs in the output directory: `results.csv` and `results.json` (one row per (experiment, model,
target, budget, deadline, strategy)), `tables.md` (the tables of docs/benchmarks.md) and PNG figures
(`poetc.plots`). Nothing here prints; progress goes to an optional callback and to logging.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import OutputError, PoetcError, UsageError
from .plan import STRATEGIES
from .solver.strategies import SOLVERS

log = logging.getLogger(__name__)

BENCH_FORMAT = "poetc-bench/1"
ALL_STRATEGIES = STRATEGIES  # every strategy, in the order tables show them
MILP_STRATEGIES = ("poet", "remat-only", "paging-only")
CORPUS_PREFIX = "corpus:"  # a model name "corpus:NAME" is models/corpus.py's NAME (bench --scaling has them all)
CORPUS_BATCH = 8  # its batch unless `batches` says otherwise (docs/corpus.md measured at 8)

COLUMNS = (
    "experiment", "model", "batch", "target", "ops", "candidates", "decidable",
    "fixed_bytes", "keep_all_activation_bytes", "keep_all_time_s", "keep_all_energy_j", "lower_bound_bytes",
    "budget_fraction", "ram_budget_bytes", "deadline_factor", "deadline_s",
    "strategy", "status", "fits", "peak_bytes", "activation_peak_bytes", "time_s", "energy_j",
    "overhead_energy_pct", "overhead_time_pct", "recompute", "page", "page_in_again", "bound", "gap", "solve_time_s",
    "time_to_1pct_s", "measured_activation_peak_bytes", "keep_all_ort_order_activation_bytes", "measured_keep_all_activation_peak_bytes",
    "measured_step_s", "measured_keep_all_step_s", "predicted_keep_all_step_s", "measured_within_budget",
    "identical", "max_rel_param_diff", "notes",
)


@dataclass(frozen=True)
class BenchConfig:
    """What to sweep. `full()` regenerates docs/benchmarks.md; `quick()` is a CI smoke run."""

    name: str
    # budget sweep (POET fig. 3 and 5, the issue #3 table) at `deadline_factor`: `strategies` on
    # `baseline_target`, `device_strategies` on the other targets
    models: tuple[str, ...]
    targets: tuple[str, ...]
    fractions: tuple[float, ...]
    deadline_factor: float = 1.3
    strategies: tuple[str, ...] = ALL_STRATEGIES
    baseline_target: str = "rpi4"
    device_strategies: tuple[str, ...] = ALL_STRATEGIES
    # deadline sweep (POET fig. 4): integrated vs remat-only vs paging-only as the deadline tightens
    deadline_models: tuple[str, ...] = ()
    deadline_target: str = "rpi4"
    deadline_fraction: float = 0.5
    deadline_factors: tuple[float, ...] = ()
    # solver time and gap vs graph size: extra models, solved with poet on `scaling_target`
    scaling_models: tuple[str, ...] = ()
    scaling_target: str = "rpi4"
    scaling_fractions: tuple[float, ...] = (0.7, 0.5, 0.3)
    # measured on this machine (target host): compile, run in ONNX Runtime, compare with the prediction
    measure_models: tuple[str, ...] = ()
    measure_fractions: tuple[float, ...] = (0.5,)
    measure_steps: int = 2
    # one memory-over-time figure: (model, target, fraction)
    timeline: tuple[str, str, float] | None = None
    batches: dict = field(default_factory=dict)  # model -> batch (default: the model's own)
    time_limit_s: float = 60.0
    seed: int = 0
    threads: int = 1
    solver: str = "highs"  # strategies.SOLVERS
    # asynchronous paging windows in the MILPs (issue #19), as `poetc compile` plans by default
    # (`--no-overlap` on both commands turns them off): the sweep solves the problem compile solves
    overlap: bool = True

    @classmethod
    def full(cls) -> "BenchConfig":
        return cls(
            name="full",
            models=("resnet18_cifar", "mobilenetv2", "vgg11", "bert_tiny"),
            targets=("m0", "m4f", "rpi4", "jetson-tx2"),
            fractions=(0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
            device_strategies=("poet",),  # fig. 3 needs poet only; the MILPs of MobileNetV2 dominate the run time
            deadline_models=("resnet18_cifar", "mobilenetv2", "vgg11", "bert_tiny"),
            deadline_factors=(1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0),
            scaling_models=("mlp", "cnn", "resnet18", "bert_small"),
            measure_models=("mlp", "cnn", "bert_tiny", "resnet18_cifar"),
            measure_fractions=(0.7, 0.5),
            timeline=("resnet18_cifar", "rpi4", 0.5),
            batches={"mlp": 512},
            time_limit_s=30.0,
        )

    @classmethod
    def scaling(cls) -> "BenchConfig":
        """The solver-scaling sweep alone (issue #18): every model in models/, the large graphs of
        models/scaling.py and the corpus of models/corpus.py (batch 8), poet on rpi4 at 70/50/30%,
        60 s per solve."""
        import models
        import models.scaling
        from models.corpus import CORPUS
        models.scaling.register()  # the large graphs
        return cls(
            name="scaling",
            models=tuple(models.MODELS) + tuple(CORPUS_PREFIX + n for n in CORPUS),
            targets=("rpi4",),
            fractions=(0.7, 0.5, 0.3),
            strategies=("poet",),
            device_strategies=("poet",),
            batches={"mlp": 512},
            time_limit_s=60.0,
        )

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(
            name="quick",
            models=("mlp", "cnn"),
            targets=("m0", "rpi4"),
            fractions=(0.9, 0.7),
            deadline_models=("cnn",),
            deadline_fraction=0.8,
            deadline_factors=(1.05, 1.3, 2.0),
            measure_models=(),  # measuring compiles and runs ONNX Runtime: tests/test_bench.py covers it
            timeline=("mlp", "rpi4", 0.7),
            batches={"mlp": 512, "cnn": 16},
            time_limit_s=20.0,
        )


@dataclass
class BenchResult:
    out_dir: Path
    rows: list[dict]
    files: dict[str, Path]  # "results.csv", "results.json", "tables.md", figure names -> paths
    wall_s: dict[str, float]
    doc: dict  # what results.json holds


@dataclass
class _LoweredModel:
    model: str
    batch: int
    path: Path
    graph: object
    lower_s: float
    problems: dict = field(default_factory=dict)  # target name -> (Problem, Target)


def _check_config(config: BenchConfig) -> None:
    from .targets import load_target
    import models
    import models.scaling
    names = set(config.models) | set(config.deadline_models) | set(config.scaling_models) | set(config.measure_models)
    if names & {spec.name for spec in models.scaling.SPECS}:
        models.scaling.register()  # a bench naming a large graph of the solver-scaling sweep
    from models.corpus import CORPUS
    for name in set(config.models) | set(config.deadline_models) | set(config.scaling_models) | \
            set(config.measure_models) | ({config.timeline[0]} if config.timeline else set()):
        if name not in models.MODELS and name.removeprefix(CORPUS_PREFIX) not in CORPUS:
            raise UsageError(f"unknown model {name!r}", hint=f"models: {', '.join(models.MODELS)}, or "
                             f"{CORPUS_PREFIX}NAME for a corpus model ({', '.join(CORPUS)})")
    if config.solver not in SOLVERS:
        raise UsageError(f"unknown solver {config.solver!r}", hint=f"solvers: {', '.join(SOLVERS)}")
    for t in set(config.targets) | {config.deadline_target, config.scaling_target, config.baseline_target}:
        load_target(t)  # raises TargetError with the list of names
    for s in config.strategies + config.device_strategies:
        if s not in STRATEGIES:
            raise UsageError(f"unknown strategy {s!r}", hint=f"strategies: {', '.join(STRATEGIES)}")
    for f in config.fractions + config.scaling_fractions + config.measure_fractions + (config.deadline_fraction,):
        if not 0 < f <= 1:
            raise UsageError(f"budget fraction {f} is not in (0, 1]",
                             hint="fractions are of keep-all activation memory, e.g. 0.5")
    for d in config.deadline_factors + (config.deadline_factor,):
        if d < 1:
            raise UsageError(f"deadline factor {d} is below 1 (the keep-all step time)")


def run_bench(config: BenchConfig, out_dir: Path, *, figures_dir: Path | None = None, force: bool = False,
              progress: Callable[[str], None] | None = None, cache_dir: Path | None = None) -> BenchResult:
    """Run the sweep described by `config`, write results and figures into `out_dir`."""
    _check_config(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"output directory {out_dir} exists and is not empty",
                          hint="choose another --out or pass --force")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures_dir = Path(figures_dir) if figures_dir else out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    def say(msg: str) -> None:
        log.info("%s", msg)
        if progress is not None:
            progress(msg)

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    rows: list[dict] = []
    graphs: dict[str, _LoweredModel] = {}
    timeline = None

    with tempfile.TemporaryDirectory(prefix="poetc-bench-") as work:
        work = Path(work)
        t0 = time.perf_counter()
        names = list(dict.fromkeys(config.models + config.deadline_models + config.scaling_models))
        for i, name in enumerate(names):
            say(f"lowering {name} ({i + 1}/{len(names)})")
            graphs[name] = _lower(name, config, work, cache_dir)
        wall["lower"] = time.perf_counter() - t0

        # budget sweep
        t0 = time.perf_counter()
        jobs = [(m, t, f) for m in config.models for t in config.targets for f in config.fractions]
        for i, (m, t, f) in enumerate(jobs):
            say(f"budget sweep {i + 1}/{len(jobs)}: {m} on {t} at {f:.0%}")
            strategies = config.strategies if t == _baseline_target(config) else config.device_strategies
            results = _solve_all(rows, "budget", graphs[m], t, f, config.deadline_factor, strategies, config)
            if config.timeline and (m, t, f) == tuple(config.timeline) and "poet" in results:
                timeline = _timeline(graphs[m], t, results["poet"], f)
        wall["budget"] = time.perf_counter() - t0

        # deadline sweep
        t0 = time.perf_counter()
        jobs = [(m, d) for m in config.deadline_models for d in config.deadline_factors]
        for i, (m, d) in enumerate(jobs):
            say(f"deadline sweep {i + 1}/{len(jobs)}: {m} at {d:g}x")
            _solve_all(rows, "deadline", graphs[m], config.deadline_target, config.deadline_fraction, d,
                       [s for s in MILP_STRATEGIES if s in config.strategies], config)
        wall["deadline"] = time.perf_counter() - t0

        # solver scaling: models not already solved on the scaling target
        t0 = time.perf_counter()
        done = set(config.models) if config.scaling_target in config.targets else set()
        jobs = [(m, f) for m in config.scaling_models if m not in done for f in config.scaling_fractions]
        for i, (m, f) in enumerate(jobs):
            say(f"solver scaling {i + 1}/{len(jobs)}: {m} at {f:.0%}")
            _solve_all(rows, "scaling", graphs[m], config.scaling_target, f, config.deadline_factor, ["poet"], config)
        wall["scaling"] = time.perf_counter() - t0

        if config.timeline and timeline is None:  # the timeline configuration was not part of the sweep
            m, t, f = config.timeline
            g = graphs.get(m) or _lower(m, config, work, cache_dir)
            results = _solve_all([], "timeline", g, t, f, config.deadline_factor, ["poet"], config)
            if "poet" in results:
                timeline = _timeline(g, t, results["poet"], f)

        # measured on this machine
        t0 = time.perf_counter()
        jobs = [(m, f) for m in config.measure_models for f in config.measure_fractions]
        for i, (m, f) in enumerate(jobs):
            say(f"measuring {i + 1}/{len(jobs)}: {m} at {f:.0%} on host (compile + ONNX Runtime)")
            g = graphs.get(m)
            if g is None:
                g = graphs[m] = _lower(m, config, work, cache_dir)
            rows.append(_measure(g, f, config, work / f"measure-{m}-{f:g}"))
        wall["measure"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("writing tables and figures")
    files = _write_outputs(rows, config, out_dir, figures_dir, timeline)
    wall["outputs"] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - t_start
    doc = {
        "format": BENCH_FORMAT,
        "config": _config_doc(config),
        "machine": machine_info(load_start),
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "graphs": [{"model": g.model, "batch": g.batch, "ops": len(g.graph.ops),
                    "saved_activations": len(g.graph.saved_activations()), "lower_s": round(g.lower_s, 2)}
                   for g in graphs.values()],
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    files["results.json"] = out_dir / "results.json"
    log.info("bench %s: %d rows in %.0f s", config.name, len(rows), wall["total"])
    return BenchResult(out_dir, rows, files, wall, doc)


# ---------------------------------------------------------------------------------------------------
# sweeping


def _lower(name: str, config: BenchConfig, work: Path, cache_dir: Path | None) -> _LoweredModel:
    import models

    from .api import open_graph
    from .importer import ImportOptions
    t0 = time.perf_counter()
    if name.startswith(CORPUS_PREFIX):  # a model of models/corpus.py, exported the way its family's tools did
        from models.corpus import CORPUS, export_corpus
        entry = CORPUS[name.removeprefix(CORPUS_PREFIX)]
        batch = config.batches.get(name, CORPUS_BATCH)
        path = export_corpus(entry.name, work / f"{entry.name}-b{batch}.onnx", batch, seed=config.seed)
        options = ImportOptions(loss=entry.loss)
    else:
        batch = config.batches.get(name, models.get_spec(name).default_batch)
        path = models.build(name, cache_dir=cache_dir, batch=batch, seed=config.seed)
        options = ImportOptions()
    _, graph = open_graph(path, work / f"{name.replace(':', '-')}-b{batch}", options)
    return _LoweredModel(name, batch, Path(path), graph, time.perf_counter() - t0)


def _problem(g: _LoweredModel, target_name: str):
    from .api import step_costs_for
    from .solver import build_problem
    from .targets import load_target
    if target_name not in g.problems:
        target = load_target(target_name)
        g.problems[target_name] = (build_problem(g.graph, step_costs_for(g.graph, target, None)), target)
    return g.problems[target_name]


def lower_bound_bytes(problem) -> int:
    """The RAM below which no schedule fits (poetc.plan.lower_bound, the figure compile checks)."""
    from .plan import lower_bound
    return lower_bound(problem).ram_bytes


def _base_row(experiment: str, g: _LoweredModel, problem, target_name: str, fraction: float, factor: float) -> dict:
    budget = problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes)
    return {
        "experiment": experiment, "model": g.model, "batch": g.batch, "target": target_name,
        "ops": len(g.graph.ops), "candidates": len(problem.candidates),
        "decidable": sum(not c.fixed for c in problem.candidates),
        "fixed_bytes": problem.fixed_bytes, "keep_all_activation_bytes": problem.keep_all_peak_bytes,
        "keep_all_time_s": problem.base_time_s, "keep_all_energy_j": problem.base_energy_j,
        "lower_bound_bytes": lower_bound_bytes(problem), "budget_fraction": fraction, "ram_budget_bytes": budget,
        "deadline_factor": factor, "deadline_s": factor * problem.base_time_s,
    }


def _solve_all(rows: list[dict], experiment: str, g: _LoweredModel, target_name: str, fraction: float, factor: float,
               strategies, config: BenchConfig) -> dict:
    """Run `strategies` on one (model, target, budget, deadline); append one row each."""
    from .plan import Budget, plan
    from .units import Deadline
    problem, target = _problem(g, target_name)
    base = _base_row(experiment, g, problem, target_name, fraction, factor)
    if base["ram_budget_bytes"] < base["lower_bound_bytes"]:
        rows.extend(dict(base, strategy=s, status="below-lower-bound", fits=False,
                         notes=f"budget below the lower bound {base['lower_bound_bytes']} B: nothing can fit")
                    for s in strategies)
        return {}
    chosen = plan(problem, Budget.from_ram(base["ram_budget_bytes"], problem.fixed_bytes), Deadline(factor=factor),
                  flash_bytes=target.flash_bytes, strategy=strategies[0], baselines=tuple(strategies[1:]),
                  time_limit_s=config.time_limit_s, baseline_time_limit_s=config.time_limit_s, seed=config.seed,
                  threads=config.threads, solver=config.solver, overlap=overlap_costs(target, config.overlap))
    results = {strategies[0]: chosen.result, **chosen.baselines}
    for s in strategies:
        rows.append(dict(base, strategy=s, **_strategy_columns(problem, results[s])))
    return results


def overlap_costs(target, enabled: bool = True):
    """The MILP's overlap costs on `target` (poetc.overlap.OverlapCosts), exactly as `poetc compile`
    builds them (poetc.api), or None when overlap is off (`--no-overlap`)."""
    from .overlap import OverlapCosts
    return OverlapCosts(target.mem_bytes_per_s, target.active_power_w) if enabled else None


def _strategy_columns(problem, r) -> dict:
    counts = r.schedule.counts()
    return {
        "status": r.status, "fits": bool(r.fits),
        "peak_bytes": r.sim.total_peak_bytes, "activation_peak_bytes": r.sim.peak_bytes,
        "time_s": r.sim.time_s, "energy_j": r.sim.energy_j,
        "overhead_energy_pct": 100.0 * r.overhead_energy_j / problem.base_energy_j,
        "overhead_time_pct": 100.0 * r.overhead_time_s / problem.base_time_s,
        "recompute": counts["recompute"], "page": counts["page"], "page_in_again": counts["page_in_again"],
        "bound": r.bound, "gap": r.gap, "solve_time_s": round(r.solve_time_s, 3),
        "time_to_1pct_s": None if r.time_to_1pct_s is None else round(r.time_to_1pct_s, 3),
        "notes": "; ".join(r.notes),
    }


def _timeline(g: _LoweredModel, target_name: str, result, fraction: float):
    from .api import Timelines
    problem, _ = _problem(g, target_name)
    budget = problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes)
    return (Timelines(problem.keep_all, result.sim, result.schedule.steps, problem.backward_start, budget),
            f"{g.model} (batch {g.batch}) on {target_name}, budget {fraction:.0%} of keep-all activations")


def _measure(g: _LoweredModel, fraction: float, config: BenchConfig, out: Path) -> dict:
    """Compile for the host target at `fraction` and run reference and compiled steps in ONNX Runtime."""
    from .api import CompileOptions, compile_model
    from .run import verify
    from .units import Deadline
    problem, _ = _problem(g, "host")
    row = dict(_base_row("measured", g, problem, "host", fraction, config.deadline_factor), strategy="poet")
    if row["ram_budget_bytes"] < row["lower_bound_bytes"]:
        return dict(row, status="below-lower-bound", fits=False)
    options = CompileOptions(ram_bytes=row["ram_budget_bytes"], out_dir=out, target="host",
                             deadline=Deadline(factor=config.deadline_factor), baselines=(),
                             time_limit_s=config.time_limit_s, seed=config.seed, threads=config.threads, force=True)
    try:
        result = compile_model(g.path, options)
        rep, res, keep = result.report, result.report.result, result.report.keep_all
        # compile lowers again: on host the op times are measured anew, so take its keep-all figures
        row.update(keep_all_time_s=keep.time_s, keep_all_energy_j=keep.energy_j,
                   keep_all_activation_bytes=keep.activation_peak_bytes,
                   fixed_bytes=rep.budget.fixed_bytes, deadline_s=rep.deadline_s)
        row.update(status=res.status, fits=res.fits, peak_bytes=res.peak_bytes,
                   activation_peak_bytes=res.activation_peak_bytes, time_s=res.time_s, energy_j=res.energy_j,
                   overhead_energy_pct=100.0 * res.overhead_energy_j / keep.energy_j,
                   overhead_time_pct=100.0 * res.overhead_time_s / keep.time_s,
                   recompute=res.decisions["recompute"], page=res.decisions["page"],
                   page_in_again=res.decisions["page_in_again"], bound=res.bound,
                   gap=res.gap, solve_time_s=round(result.timings["solve_s"], 3),
                   predicted_keep_all_step_s=keep.time_s)
        row["keep_all_ort_order_activation_bytes"] = _ort_order_keep_all(g.graph, out)
        v = verify(out, steps=config.measure_steps).to_json()
    except PoetcError as exc:
        return dict(row, status=row.get("status", "error"), notes=f"{type(exc).__name__}: {exc.message}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    k = v["steady_state_from_step"]
    row.update(measured_activation_peak_bytes=max(v["measured_step_peak_bytes"][k:]),
               measured_keep_all_activation_peak_bytes=max(v["reference_step_peak_bytes"][k:]),
               measured_step_s=min(v["step_seconds_compiled"]),
               measured_keep_all_step_s=min(v["step_seconds_reference"]),
               measured_within_budget=bool(v["within_budget"]), identical=bool(v["identical_results"]),
               max_rel_param_diff=v["max_rel_param_diff"],
               notes=f"steady state: steps {k}..{v['steps'] - 1} of {v['steps']}")
    return row


def _ort_order_keep_all(graph, out: Path) -> int | None:
    """Simulated keep-all activation peak in the order onnxruntime-training wrote the graph (the
    reference `verify` runs), as opposed to poetc's order with accumulators hoisted."""
    import onnx

    from .api import ort_order_keep_all
    from .ir.lower import ensure_unique_node_names
    original = onnx.load(str(out / "reference" / "training_model.onnx"), load_external_data=False)
    ensure_unique_node_names(original)
    sim = ort_order_keep_all(graph, original)
    return sim.peak_bytes if sim is not None else None


# ---------------------------------------------------------------------------------------------------
# outputs


def machine_info(load_start: tuple[float, float, float] | None = None) -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kb"] = int(line.split()[1])
                break
    except OSError:
        pass
    for pkg in ("onnxruntime", "mip", "highspy", "matplotlib"):
        try:
            from importlib.metadata import version
            info[pkg] = version(pkg if pkg != "onnxruntime" else "onnxruntime-training-cpu")
        except Exception:
            info[pkg] = None
    if load_start is not None:
        info["loadavg_start"] = [round(x, 2) for x in load_start]
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _config_doc(config: BenchConfig) -> dict:
    doc = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items()}


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _write_outputs(rows, config, out_dir: Path, figures_dir: Path, timeline) -> dict[str, Path]:
    from . import plots
    files = {"results.csv": out_dir / "results.csv", "tables.md": out_dir / "tables.md"}
    write_csv(rows, files["results.csv"])
    files["tables.md"].write_text(render_tables(rows, config))
    figs = {
        "energy_vs_budget.png": lambda p: plots.energy_vs_budget(p, [r for r in rows if r["experiment"] == "budget"]),
        "deadline_sweep.png": lambda p: plots.deadline_sweep(p, [r for r in rows if r["experiment"] == "deadline"]),
        "baselines.png": lambda p: plots.baselines(p, [r for r in rows if r["experiment"] == "budget"],
                                                   target=_baseline_target(config)),
        "solver_scaling.png": lambda p: plots.solver_scaling(p, [r for r in rows if r["strategy"] in MILP_STRATEGIES
                                                                 and r["experiment"] != "measured"]),
        "measured_vs_predicted.png": lambda p: plots.measured_vs_predicted(
            p, [r for r in rows if r["experiment"] == "measured"]),
    }
    for name, draw in figs.items():
        path = figures_dir / name
        if draw(path):
            files[name] = path
    if timeline is not None:
        tl, title = timeline
        path = figures_dir / "memory_timeline.png"
        plots.memory_timeline(path, tl, title=title)
        files["memory_timeline.png"] = path
    return files


def _baseline_target(config: BenchConfig) -> str:
    return config.baseline_target if config.baseline_target in config.targets else config.targets[0]


# ---------------------------------------------------------------------------------------------------
# tables (markdown)


def _mib(b) -> str:
    return "" if b is None or b == "" else f"{b / 2**20:.1f}"


def _pct(row: dict) -> str:
    if row.get("status") == "below-lower-bound":
        return "below bound"
    if not row.get("fits"):
        return "no fit"
    return f"{row['overhead_energy_pct']:.2f}%"


def _counts(row: dict) -> str:
    """recomputed/paged tensors, and "+n" page-ins again"""
    again = row.get("page_in_again") or 0
    return f"{row['recompute']}/{row['page']}" + (f"+{again}" if again else "")


def _pct_counts(row: dict) -> str:
    return f"{_pct(row)} ({_counts(row)})" if row.get("fits") else _pct(row)


def _gap(gap) -> str:
    return f"{max(gap, 0.0) * 100:.2f}%"


def _index(rows):
    return {(r["experiment"], r["model"], r["target"], r["budget_fraction"], r["deadline_factor"], r["strategy"]): r
            for r in rows}


def render_tables(rows: list[dict], config: BenchConfig) -> str:
    """The markdown tables of docs/benchmarks.md, from the rows."""
    idx = _index(rows)
    out: list[str] = []
    base_t = _baseline_target(config)
    budget = [r for r in rows if r["experiment"] == "budget"]
    d = config.deadline_factor

    if budget:
        out.append(f"### Strategies at each budget on {base_t} (deadline {d:g}x keep-all; POET fig. 5, issue #3)\n")
        out.append("Energy overhead over keep-all; `no fit`: the strategy's schedule exceeds the budget or the "
                   "deadline; `below bound`: the budget is below the lower bound, nothing can fit. poet status: "
                   "MILP status, overhead gap to the solver's bound, solve time.\n")
        shown = [s for s in ("poet", "capuchin", "chen", "remat-only", "paging-only") if s in config.strategies]
        out.append("| model | budget | MiB (fixed + act.) | floor MiB | " + " | ".join(shown) +
                   " | poet status | rec/page(+again) | issue #3 checks |")
        out.append("|---|---|---|---|" + "---|" * len(shown) + "---|---|---|")
        for m in config.models:
            for f in config.fractions:
                p = idx.get(("budget", m, base_t, f, d, "poet"))
                if p is None:
                    continue
                cells = [_pct(idx[("budget", m, base_t, f, d, s)]) for s in shown]
                status, checks = "", ""
                if p.get("status") not in (None, "below-lower-bound"):
                    gap = p.get("gap")
                    status = f"{p['status']}, gap {_gap(gap)}, {p['solve_time_s']:.1f} s" if gap is not None \
                        else f"{p['status']}, {p['solve_time_s']:.1f} s"
                    checks = _versus_heuristics(p, [idx[("budget", m, base_t, f, d, s)] for s in ("capuchin", "chen")
                                                if ("budget", m, base_t, f, d, s) in idx])
                rp = _counts(p) if p.get("fits") else ""
                out.append(f"| {m} | {f:.0%} | {_mib(p['ram_budget_bytes'])} ({_mib(p['fixed_bytes'])} + "
                           f"{_mib(p['ram_budget_bytes'] - p['fixed_bytes'])}) | {_mib(p['lower_bound_bytes'])} | " +
                           " | ".join(cells) + f" | {status} | {rp} | {checks} |")
        out.append("")

        out.append(f"### poet energy overhead by device (deadline {d:g}x; POET fig. 3)\n")
        out.append("Energy overhead over keep-all, and (recomputed / paged tensors, +page-ins again).\n")
        out.append("| model | target | " + " | ".join(f"{f:.0%}" for f in config.fractions) + " |")
        out.append("|---|---|" + "---|" * len(config.fractions))
        for m in config.models:
            for t in config.targets:
                cells = [_pct_counts(idx[("budget", m, t, f, d, "poet")]) if ("budget", m, t, f, d, "poet") in idx
                         else "" for f in config.fractions]
                out.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
        out.append("")

        wins = integrated_wins(rows)
        out.append("### Where the integrated schedule beats both remat-only and paging-only\n")
        if wins:
            out.append("| experiment | model | target | budget | deadline | poet | remat-only | paging-only |")
            out.append("|---|---|---|---|---|---|---|---|")
            for p, rm, pg in wins:
                out.append(f"| {p['experiment']} | {p['model']} | {p['target']} | {p['budget_fraction']:.0%} | "
                           f"{p['deadline_factor']:g}x | {_pct(p)} | {_pct(rm)} | {_pct(pg)} |")
            compared = sum(1 for k, r in idx.items() if k[-1] == "poet" and r.get("fits")
                           and k[:-1] + ("remat-only",) in idx and k[:-1] + ("paging-only",) in idx)
            out.append(f"\n{len(wins)} of the {compared} configurations where poet fits and both restricted "
                       "MILPs ran.\n")
        else:
            out.append("None in this run.\n")

    dl = [r for r in rows if r["experiment"] == "deadline"]
    if dl:
        out.append(f"### Deadline sweep on {config.deadline_target} at {config.deadline_fraction:.0%} "
                   "(POET fig. 4)\n")
        out.append("| model | strategy | " + " | ".join(f"{x:g}x" for x in config.deadline_factors) + " |")
        out.append("|---|---|" + "---|" * len(config.deadline_factors))
        for m in config.deadline_models:
            for s in MILP_STRATEGIES:
                cells = [_pct(idx[k]) if (k := ("deadline", m, config.deadline_target, config.deadline_fraction, x, s))
                         in idx else "" for x in config.deadline_factors]
                out.append(f"| {m} | {s} | " + " | ".join(cells) + " |")
        out.append("")

    milp = [r for r in rows if r["strategy"] in MILP_STRATEGIES and r["experiment"] != "measured"
            and r.get("status") not in (None, "below-lower-bound")]
    if milp:
        out.append("### Solver time and gap vs graph size (all MILP solves of this run)\n")
        out.append("| model | ops | saved activations | solves | optimal | feasible | fallback/infeasible | "
                   "median s | max s | max gap |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        by_model: dict[str, list[dict]] = {}
        for r in milp:
            by_model.setdefault(r["model"], []).append(r)
        for m, rs in sorted(by_model.items(), key=lambda kv: kv[1][0]["candidates"]):
            times = [r["solve_time_s"] for r in rs]
            gaps = [r["gap"] for r in rs if r.get("gap") is not None]
            out.append(f"| {m} | {rs[0]['ops']} | {rs[0]['candidates']} | {len(rs)} | "
                       f"{sum(r['status'] == 'optimal' for r in rs)} | {sum(r['status'] == 'feasible' for r in rs)} | "
                       f"{sum(r['status'] not in ('optimal', 'feasible') for r in rs)} | "
                       f"{statistics.median(times):.2f} | {max(times):.2f} | "
                       f"{_gap(max(gaps) if gaps else 0.0)} |")
        out.append("")
        out.append("### Solver per instance: gap, time to a 1% gap, solve time (poet, every MILP solve of this run)\n")
        out.append("Decidable: saved tensors the MILP decides (not fixed). Time to 1%: first time the incumbent "
                   "was within 1% of the proven bound on the overhead (warm start included), from the start of "
                   "the solve; `-`: never within the limit.\n")
        out.append("| model | ops | decidable | target | budget | status | energy overhead | gap | time to 1% (s) | "
                   "solve time (s) | notes |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted((r for r in milp if r["strategy"] == "poet"),
                        key=lambda r: (r["candidates"], r["model"], r["target"], -r["budget_fraction"])):
            t1 = r.get("time_to_1pct_s")
            t1 = "" if t1 is None or t1 == "" else f"{float(t1):.1f}"
            if not t1 and r.get("gap") not in (None, "") and float(r["gap"]) <= 0.01:
                t1 = f"<= {float(r['solve_time_s']):.1f}"
            elif not t1:
                t1 = "-"
            note = "killed at the limit" if "stopped at the" in (r.get("notes") or "") else \
                "warm start not improved" if "nothing better than its warm start" in (r.get("notes") or "") else ""
            out.append(f"| {r['model']} | {r['ops']} | {r.get('decidable', '')} | {r['target']} | "
                       f"{r['budget_fraction']:.0%} | {r['status']} | {_pct(r)} | "
                       f"{_gap(r['gap']) if r.get('gap') is not None else '-'} | {t1} | "
                       f"{float(r['solve_time_s']):.1f} | {note} |")
        out.append("")

    bad = solver_anomalies(rows)
    if bad:
        out.append("### Solver anomalies: MILP solutions the simulator rejects\n")
        out.append("The MILP reported these schedules as optimal (or feasible) but the simulator, the single source "
                   "of truth, finds them over the budget or the deadline; the rows above count them as `no fit`.\n")
        out.append("| experiment | model | target | budget | deadline | strategy | status | budget MiB | simulated peak "
                   "MiB | time / deadline |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in bad:
            out.append(f"| {r['experiment']} | {r['model']} | {r['target']} | {r['budget_fraction']:.0%} | "
                       f"{r['deadline_factor']:g}x | {r['strategy']} | {r['status']} | {_mib(r['ram_budget_bytes'])} | "
                       f"{_mib(r['peak_bytes'])} | {r['time_s'] / r['deadline_s']:.3f} |")
        out.append("")

    meas = [r for r in rows if r["experiment"] == "measured"]
    if meas:
        out.append(f"### Measured on this machine (target host, deadline {d:g}x, "
                   f"{config.measure_steps} steps, steady state)\n")
        out.append("Activation peak = heap high-water mark of a step above the live heap before it "
                   "(the budget minus fixed state is what it must stay under).\n")
        out.append("| model | budget | act. budget MiB | keep-all (ORT order) predicted / measured MiB | compiled "
                   "predicted / measured MiB | error | fits measured | step time keep-all predicted / measured | "
                   "compiled predicted / measured | same results (max rel. param diff) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in meas:
            if r.get("measured_activation_peak_bytes") is None:
                out.append(f"| {r['model']} | {r['budget_fraction']:.0%} | "
                           f"{_mib(r['ram_budget_bytes'] - r['fixed_bytes'])} | {r.get('status')} "
                           f"{r.get('notes') or ''} | | | | | | |")
                continue
            err = (r["measured_activation_peak_bytes"] - r["activation_peak_bytes"]) / r["activation_peak_bytes"]
            same = "yes" if r["identical"] else "NO"
            out.append(f"| {r['model']} | {r['budget_fraction']:.0%} | {_mib(r['ram_budget_bytes'] - r['fixed_bytes'])} | "
                       f"{_mib(r.get('keep_all_ort_order_activation_bytes'))} / "
                       f"{_mib(r['measured_keep_all_activation_peak_bytes'])} | "
                       f"{_mib(r['activation_peak_bytes'])} / {_mib(r['measured_activation_peak_bytes'])} | "
                       f"{err * 100:+.1f}% | {'yes' if r['measured_within_budget'] else 'no'} | "
                       f"{r['predicted_keep_all_step_s']:.3f} / {r['measured_keep_all_step_s']:.3f} s | "
                       f"{r['time_s']:.3f} / {r['measured_step_s']:.3f} s | {same} ({r['max_rel_param_diff']:.1e}) |")
        out.append("")
    problems = check_rows(rows)
    if problems:
        out.append("### Consistency findings\n")
        out.append("Rows that break what should hold (poet can always fall back to any schedule that fits):\n")
        out += [f"- {line}" for line in problems]
        out.append("")
    return "\n".join(out)


def _versus_heuristics(poet: dict, heuristics: list[dict]) -> str:
    if not poet.get("fits"):
        return "poet: no fit"
    gap = poet.get("gap")
    solved = poet["status"] == "optimal" or (gap is not None and gap <= 0.01)
    parts = [("optimal" if poet["status"] == "optimal" else f"gap {_gap(gap)}" if gap is not None
              else poet["status"]) + (" ok" if solved and poet["solve_time_s"] <= 60 else " FAIL")]
    for h in heuristics:
        if h.get("fits"):
            diff = poet["energy_j"] - h["energy_j"]
            rel = "<" if diff < -1e-9 * h["energy_j"] else "=" if diff <= 1e-9 * h["energy_j"] else ">"
            parts.append(f"{rel} {h['strategy']}")
    return ", ".join(parts)


def integrated_wins(rows: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(poet, remat-only, paging-only) rows where poet fits and is strictly cheaper than both
    (a strategy that does not fit counts as beaten), with both restricted strategies solved."""
    idx = _index(rows)
    out = []
    for (e, m, t, f, d, s), p in idx.items():
        if s != "poet" or not p.get("fits"):
            continue
        rm, pg = idx.get((e, m, t, f, d, "remat-only")), idx.get((e, m, t, f, d, "paging-only"))
        if rm is None or pg is None:
            continue
        if all(not x.get("fits") or x["energy_j"] > p["energy_j"] * (1 + 1e-6) for x in (rm, pg)):
            out.append((p, rm, pg))
    return out


def solver_anomalies(rows: list[dict]) -> list[dict]:
    """MILP rows whose solution the solver called optimal or feasible but the simulator rejects
    (over the budget or the deadline): the MILP's model and the simulator disagree there."""
    return [r for r in rows if r["strategy"] in MILP_STRATEGIES and r.get("status") in ("optimal", "feasible")
            and not r.get("fits")]


def check_rows(rows: list[dict], *, rel_tol: float = 1e-6) -> list[str]:
    """Consistency problems in the rows (empty if none): a fitting schedule above its budget, poet
    costlier than a strategy that fits (it can always fall back to it), a MILP gap outside [0, 1]."""
    problems = []
    idx = _index(rows)
    for key, r in idx.items():
        if r.get("fits") and r.get("peak_bytes") is not None and r["peak_bytes"] > r["ram_budget_bytes"]:
            problems.append(f"{key}: fits but peak {r['peak_bytes']} > budget {r['ram_budget_bytes']}")
        if r.get("fits") and r.get("time_s") is not None and r["time_s"] > r["deadline_s"] * (1 + 1e-9) + 1e-12:
            problems.append(f"{key}: fits but time {r['time_s']} > deadline {r['deadline_s']}")
        if r.get("gap") is not None and not (-1e-9 <= r["gap"] <= 1 + 1e-9):
            problems.append(f"{key}: gap {r['gap']} outside [0, 1]")
        if key[-1] == "poet" or not r.get("fits") or r["experiment"] == "measured":
            continue
        p = idx.get(key[:-1] + ("poet",))
        if p is None:
            continue
        if not p.get("fits"):
            problems.append(f"{key}: fits but poet does not")
        elif p["energy_j"] > r["energy_j"] * (1 + rel_tol) and p.get("status") == "optimal":
            problems.append(f"{key}: poet energy {p['energy_j']} > {r['energy_j']}")
    return problems


def parse_list(text: str, kind=str) -> tuple:
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"cannot read the list {text!r}", hint="write comma-separated values, e.g. 0.7,0.5,0.3") \
            from None


def override(config: BenchConfig, **changes) -> BenchConfig:
    """`config` with the non-None `changes` applied (the CLI's --models, --targets, ...)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


__all__ = ["BenchConfig", "BenchResult", "run_bench", "render_tables", "check_rows", "integrated_wins",
           "solver_anomalies",
           "write_csv", "machine_info", "lower_bound_bytes", "override", "parse_list"]
