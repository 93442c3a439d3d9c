"""Compare MILP solvers (`--solver` values) on solver-scaling instances, one JSON line per solve.

    python -m benchmarks.solver_compare --solvers highs,highs-lns --time-limit 60 \\
        resnet50_cifar:0.3 encoder24:0.3 corpus:mobilenet_v3:0.3

An instance is MODEL:FRACTION (a model of models/, of models/scaling.py, or corpus:NAME), solved
with the poet strategy on rpi4 at that fraction of keep-all activations and the 1.3x deadline,
exactly as `poetc bench --scaling` does. Solvers run one after the other on the same problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("instances", nargs="+", help="MODEL:FRACTION")
    ap.add_argument("--solvers", default="highs,highs-lns")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--target", default="rpi4")
    args = ap.parse_args(argv)

    from poetc.bench import BenchConfig, _check_config, _lower, _problem, override
    from poetc.plan import Budget, limits_for
    from poetc.solver.strategies import solve_milp
    from poetc.units import Deadline

    instances = [(m, float(f)) for m, f in (spec.rsplit(":", 1) for spec in args.instances)]
    config = override(BenchConfig.scaling(), models=tuple(dict.fromkeys(m for m, _ in instances)))
    _check_config(config)
    with tempfile.TemporaryDirectory(prefix="poetc-solver-compare-") as work:
        graphs = {}
        for model, fraction in instances:
            if model not in graphs:
                graphs[model] = _lower(model, config, Path(work), None)
            problem, target = _problem(graphs[model], args.target)
            budget = problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes)
            limits, _ = limits_for(problem, Budget.from_ram(budget, problem.fixed_bytes), Deadline(factor=1.3),
                                   target.flash_bytes)
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


if __name__ == "__main__":
    sys.exit(main())
