"""Compare MILP solvers (`--solver` values) on solver-scaling instances, one JSON line per solve.

    python -m benchmarks.solver_compare --solvers highs,highs-lns --time-limit 60 \\
        resnet50_cifar:0.3 encoder24:0.3 corpus:mobilenet_v3:0.3

An instance is MODEL:FRACTION (a model of models/, of models/scaling.py, or corpus:NAME), solved
with the poet strategy on rpi4 at that fraction of keep-all activations and the 1.3x deadline,
exactly as `poetc bench --scaling` and `poetc compile` do (with the MILP's overlap windows, issue #19,
unless --no-overlap). MODEL+fused:FRACTION is the same model in the fused
optimizer mode (issue #17: its parameters and moments are decidable too), as `poetc compile
--optimizer-mode fused` plans it. Solvers run one after the other on the same problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("instances", nargs="+", help="MODEL:FRACTION")
    ap.add_argument("--solvers", default="highs,highs-lns")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--target", default="rpi4")
    ap.add_argument("--no-overlap", dest="overlap", action="store_false",
                    help="no asynchronous paging windows in the MILP (default: with them, as compile and bench)")
    ap.add_argument("--batch", type=int, default=None, help="batch of every model (default: the sweep's)")
    args = ap.parse_args(argv)

    from poetc.bench import BenchConfig, _check_config, _lower, _problem, overlap_costs, override
    from poetc.plan import Budget, limits_for
    from poetc.solver.strategies import solve_milp
    from poetc.units import Deadline

    instances = [(m, float(f)) for m, f in (spec.rsplit(":", 1) for spec in args.instances)]
    bases = tuple(dict.fromkeys(m.removesuffix("+fused") for m, _ in instances))
    config = override(BenchConfig.scaling(), models=bases)
    if args.batch is not None:
        config = override(config, batches={m: args.batch for m in bases})
    _check_config(config)
    with tempfile.TemporaryDirectory(prefix="poetc-solver-compare-") as work:
        graphs, problems = {}, {}
        for model, fraction in instances:
            base = model.removesuffix("+fused")
            if base not in graphs:
                graphs[base] = _lower(base, config, Path(work), None)
            if model not in problems:
                problems[model] = _problem(graphs[base], args.target) if model == base else \
                    _fused_problem(graphs[base], Path(work), args.target)
            problem, target = problems[model]
            budget = problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes)
            limits, _ = limits_for(problem, Budget.from_ram(budget, problem.fixed_bytes), Deadline(factor=1.3),
                                   target.flash_bytes)
            limits = replace(limits, overlap=overlap_costs(target, args.overlap))
            for solver in args.solvers.split(","):
                r = solve_milp(problem, limits, "poet", time_limit_s=args.time_limit, solver=solver)
                print(json.dumps({
                    "model": model, "fraction": fraction, "solver": solver, "status": r.status, "fits": r.fits,
                    "decidable": sum(not c.fixed for c in problem.candidates), "ops": len(problem.graph.ops),
                    "overhead_energy_pct": round(100 * r.overhead_energy_j / problem.base_energy_j, 3),
                    "gap_pct": None if r.gap is None else round(100 * r.gap, 2),
                    "time_to_1pct_s": None if r.time_to_1pct_s is None else round(r.time_to_1pct_s, 1),
                    "solve_time_s": round(r.solve_time_s, 1), "notes": r.notes}), flush=True)
    return 0


def _fused_problem(g, work: Path, target_name: str):
    """The problem of a lowered model in the fused optimizer mode (poetc.api's plan_fused)."""
    import onnx

    from poetc.api import step_costs_for
    from poetc.ir.fused import fuse_optimizer, read_optimizer_spec
    from poetc.solver import build_problem
    from poetc.targets import load_target
    artifacts = work / f"{g.model.replace(':', '-')}-b{g.batch}" / "imported"  # where _lower's open_graph put them
    fused = fuse_optimizer(g.graph, read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx"))))
    target = load_target(target_name)
    return build_problem(fused, step_costs_for(fused, target, None)), target


if __name__ == "__main__":
    sys.exit(main())
