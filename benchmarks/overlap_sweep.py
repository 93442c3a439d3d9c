"""The deadline sweep with and without overlap in the MILP (issue #19, POET fig. 4 analogue).

For each model, at `--fraction` of keep-all activations on `--target`, poet solves every deadline factor
twice: "before" (every transfer blocking in the MILP, the deadline row charges each in full) and "after"
(the MILP may make transfers asynchronous, poetc/solver/overlap_rows.py; the deadline is checked against
the overlapped time). A row per (model, variant): the energy overhead against keep-all at each deadline
("no fit" where nothing fits), the tightest deadline that fits, and the asynchronous transfers used.
Predictions of the target's cost model only: nothing runs, so the numbers do not depend on the load.

    python -m benchmarks.overlap_sweep [--models resnet18_cifar mobilenetv2] [--target rpi4]
        [--fraction 0.5] [--time-limit 60] [--out docs/bench/overlap_sweep.json]
        [--figure docs/figures/overlap_sweep.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

FACTORS = (1.005, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0)


def sweep(models: list[str], target_name: str, fraction: float, factors, time_limit_s: float) -> list[dict]:
    from poetc.bench import BenchConfig, _lower, _problem
    from poetc.overlap import OverlapCosts
    from poetc.plan import Budget, plan
    from poetc.units import Deadline
    config = BenchConfig(name="overlap", models=tuple(models), targets=(target_name,), fractions=(fraction,))
    rows = []
    with tempfile.TemporaryDirectory(prefix="poetc-overlap-sweep-") as work:
        for name in models:
            g = _lower(name, config, Path(work), None)
            problem, target = _problem(g, target_name)
            budget = Budget.from_ram(problem.fixed_bytes + int(fraction * problem.keep_all_peak_bytes),
                                     problem.fixed_bytes)
            costs = OverlapCosts(target.mem_bytes_per_s, target.active_power_w)
            for variant, overlap in (("before", None), ("after", costs)):
                for factor in factors:
                    r = plan(problem, budget, Deadline(factor=factor), flash_bytes=target.flash_bytes,
                             strategy="poet", baselines=(), time_limit_s=time_limit_s, overlap=overlap).result
                    rows.append({
                        "model": name, "batch": g.batch, "target": target_name, "fraction": fraction,
                        "variant": variant, "deadline_factor": factor, "fits": r.fits, "status": r.status,
                        "time_s": r.sim.time_s, "keep_all_time_s": problem.base_time_s,
                        "energy_j": r.sim.energy_j, "keep_all_energy_j": problem.base_energy_j,
                        "peak_bytes": r.sim.peak_bytes, "counts": r.schedule.counts(),
                        "async_transfers": len(r.overlap.transfers) if r.overlap is not None else 0,
                        "gap": r.gap, "solve_s": r.solve_time_s})
    return rows


def table(rows: list[dict], factors) -> str:
    head = "| model | MILP | " + " | ".join(f"{f:g}x" for f in factors) + " | tightest fit |"
    lines = [head, "|" + "---|" * (len(factors) + 3)]
    keys = sorted({(r["model"], r["variant"]) for r in rows}, key=lambda k: (k[0], k[1] != "before"))
    for model, variant in keys:
        cells = []
        fit = []
        for f in factors:
            r = next(r for r in rows if r["model"] == model and r["variant"] == variant and r["deadline_factor"] == f)
            if r["fits"]:
                fit.append(f)
                extra = f" ({r['async_transfers']} async)" if r["async_transfers"] else ""
                cells.append(f"{100 * (r['energy_j'] / r['keep_all_energy_j'] - 1):.2f}%{extra}")
            else:
                cells.append("no fit")
        label = "blocking" if variant == "before" else "overlap"
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {min(fit):g}x |" if fit else
                     f"| {model} | {label} | " + " | ".join(cells) + " | none |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    """Energy overhead against the deadline factor, one panel per model, blocking vs overlap (the
    points where a schedule fits)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant, label, marker in (("before", "blocking (--no-overlap)", "s"), ("after", "overlap in the MILP", "o")):
            pts = sorted((r["deadline_factor"], 100 * (r["energy_j"] / r["keep_all_energy_j"] - 1)) for r in rows
                         if r["model"] == model and r["variant"] == variant and r["fits"])
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("deadline (x keep-all step time)")
        ax.set_ylabel("energy overhead vs keep-all (%)")
        r0 = next(r for r in rows if r["model"] == model)
        ax.set_title(f"{model} b{r0['batch']}, {r0['target']}, {r0['fraction']:.0%} of keep-all activations")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18_cifar", "mobilenetv2"])
    ap.add_argument("--target", default="rpi4")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--figure", type=Path, default=None, help="write the energy-vs-deadline figure here")
    args = ap.parse_args(argv)
    rows = sweep(args.models, args.target, args.fraction, args.factors, args.time_limit)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    if args.figure:
        figure(rows, args.figure)
    print(table(rows, args.factors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
