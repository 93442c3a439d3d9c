"""Figures as PNG files: memory over time of one compiled step, and the benchmark figures.

Matplotlib's object API on the Agg canvas: no pyplot, no global state, never a window. Every
function writes one PNG and returns True, or returns False (writing nothing) when it has no data.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import PoetcError

MIB = 2**20
DPI = 100
STRATEGY_STYLE = {  # colour, marker
    "poet": ("#1b7837", "o"),
    "remat-only": ("#d95f02", "s"),
    "paging-only": ("#7570b3", "D"),
    "capuchin": ("#e7298a", "^"),
    "chen": ("#666666", "v"),
    "keep-all": ("#000000", "x"),
}
TARGET_COLOR = {"m0": "#d95f02", "m4f": "#7570b3", "rpi4": "#1b7837", "jetson-tx2": "#e7298a", "host": "#666666"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PoetcError("plots need matplotlib, which is not installed",
                         hint="pip install 'poetc[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes


def _grid(fig, n: int, ncols: int = 2):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def _log_or_empty(ax, has_data: bool, *, x: bool = False) -> None:
    """Log y (and x) axes when something was drawn; otherwise say so (log axes need positive data)."""
    if has_data:
        ax.set_yscale("log")
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if ys:  # at least a factor 1.5 of room on each side: nearly equal values must not look far apart
            ax.set_ylim(min(ys) / 1.5, max(ys) * 1.5)
        _plain_ticks(ax.yaxis)
        if x:
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no schedule fits", transform=ax.transAxes, ha="center", va="center", color="#b2182b")


def _plain_ticks(axis) -> None:
    """Log axis labelled 3, 10, 30 rather than 3x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _ordered(values):
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------
# one compiled step


def step_positions(steps) -> list[float]:
    """x position of each step on the op axis of the keep-all step: a compute step sits at its op's
    index; recompute and page steps inserted between two compute steps are spread evenly between them."""
    xs: list[float | None] = [float(s.op) if s.kind.value == "compute" else None for s in steps]
    i = 0
    while i < len(xs):
        if xs[i] is not None:
            i += 1
            continue
        j = i
        while j < len(xs) and xs[j] is None:
            j += 1
        left = xs[i - 1] if i > 0 else -1.0
        right = xs[j] if j < len(xs) else left + 1.0
        for k in range(i, j):
            xs[k] = left + (right - left) * (k - i + 1) / (j - i + 1)
        i = j
    return xs  # type: ignore[return-value]


def memory_timeline(path: Path, timelines, *, title: str = "") -> bool:
    """RAM over one training step: keep-all vs compiled, the budget, the fixed state, and where the
    compiled step recomputes, pages out and pages in. `timelines` is a `poetc.api.Timelines`."""
    keep, comp = timelines.keep_all, timelines.compiled
    fixed = keep.fixed_bytes
    fig = _figure(10.5, 4.6)
    ax = fig.subplots()
    kx = list(range(len(keep.live_bytes)))
    ax.axhspan(0, fixed / MIB, color="#dddddd", zorder=0, label=f"fixed state {fixed / MIB:.1f} MiB")
    ax.plot(kx, [(fixed + b) / MIB for b in keep.live_bytes], drawstyle="steps-post", color="#999999", lw=1.2,
            label=f"keep-all (peak {keep.total_peak_bytes / MIB:.1f} MiB)")
    cx = step_positions(timelines.steps)
    cy = [(fixed + b) / MIB for b in comp.live_bytes]
    ax.plot(cx, cy, drawstyle="steps-post", color=STRATEGY_STYLE["poet"][0], lw=1.4,
            label=f"compiled (peak {comp.total_peak_bytes / MIB:.1f} MiB)")
    ax.axhline(timelines.ram_budget_bytes / MIB, color="#b2182b", ls="--", lw=1.2,
               label=f"budget {timelines.ram_budget_bytes / MIB:.1f} MiB")
    ax.axvline(timelines.backward_start - 0.5, color="#444444", ls=":", lw=1)
    ax.text(timelines.backward_start, 0.01, " backward pass", fontsize=8, color="#444444", va="bottom",
            transform=ax.get_xaxis_transform())
    marks = {"recompute": ("#d95f02", "^", "recompute"), "page_out": ("#7570b3", "v", "page out"),
             "page_in": ("#1f78b4", "^", "page in")}
    for kind, (color, marker, label) in marks.items():
        pts = [(x, y) for x, y, s in zip(cx, cy, timelines.steps) if s.kind.value == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, marker=marker, zorder=3,
                       label=f"{label} ({len(pts)} step{'s' if len(pts) != 1 else ''})")
    ax.set_xlabel("position in the training step (op index of the keep-all order)")
    ax.set_ylabel("RAM (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(-1, len(kx))
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


CLASS_STYLE = {"fixed": ("#dddddd", "fixed state (inputs, learning rate, step)"),
               "parameters": ("#1b9e77", "parameters"), "moments": ("#7570b3", "AdamW moments"),
               "gradients": ("#d95f02", "gradients"), "activations": ("#e6ab02", "activations"),
               "other": ("#999999", "workspace, handles")}


def memory_classes_timeline(path: Path, timelines, *, title: str = "") -> bool:
    """RAM over one training step split into parameters / moments / gradients / activations (stacked,
    on the fixed state), keep-all above and the compiled step below, with the budget. Issue #17's
    figure: in the fused mode the parameters and moments are part of the step. `timelines` is a
    `poetc.api.Timelines`."""
    keep, comp = timelines.keep_all, timelines.compiled
    if not keep.class_bytes or not comp.class_bytes:
        return False
    fig = _figure(10.5, 6.4)
    axes = fig.subplots(2, 1, sharey=True)
    budget = timelines.ram_budget_bytes / MIB
    for ax, sim, xs, name in ((axes[0], keep, list(range(len(keep.live_bytes))), "keep-all"),
                              (axes[1], comp, step_positions(timelines.steps), "compiled")):
        layers = [[sim.fixed_bytes / MIB] * len(xs)]
        labels = ["fixed"]
        for c in ("parameters", "moments", "gradients", "activations", "other"):
            layers.append([b / MIB for b in sim.class_bytes[c]])
            labels.append(c)
        ax.stackplot(xs, *layers, colors=[CLASS_STYLE[c][0] for c in labels], step="post",
                     labels=[CLASS_STYLE[c][1] for c in labels])
        ax.axhline(budget, color="#b2182b", ls="--", lw=1.2, label=f"budget {budget:.2f} MiB")
        ax.axvline(timelines.backward_start - 0.5, color="#444444", ls=":", lw=1)
        ax.set_title(f"{name}: peak {sim.total_peak_bytes / MIB:.2f} MiB", fontsize=9, loc="left")
        ax.set_ylabel("RAM (MiB)")
        ax.set_xlim(-1, len(keep.live_bytes))
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("position in the training step (op index of the keep-all order); dotted: backward pass starts")
    _legend(axes[0], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------
# benchmark figures (rows as written by poetc.bench)


def _lower_bound_fraction(r: dict) -> float:
    return (r["lower_bound_bytes"] - r["fixed_bytes"]) / r["keep_all_activation_bytes"]


def energy_vs_budget(path: Path, rows: list[dict]) -> bool:
    """POET fig. 3: poet's energy overhead vs the RAM budget, one panel per model, one line per device."""
    rows = [r for r in rows if r["strategy"] == "poet"]
    if not rows:
        return False
    models = _ordered(r["model"] for r in rows)
    fig = _figure(9.5, 3.3 * math.ceil(len(models) / 2))
    for ax, m in zip(_grid(fig, len(models)), models):
        rs = [r for r in rows if r["model"] == m]
        drawn = False
        for t in _ordered(r["target"] for r in rs):
            pts = sorted((r["budget_fraction"] * 100, max(r["overhead_energy_pct"], 1e-4))
                         for r in rs if r["target"] == t and r.get("fits"))
            if pts:
                drawn = True
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4,
                        color=TARGET_COLOR.get(t), label=t)
        ax.axvline(_lower_bound_fraction(rs[0]) * 100, color="#b2182b", ls=":", lw=1, label="lower bound")
        _log_or_empty(ax, drawn)
        ax.set_xlabel("RAM budget (% of keep-all activation memory)")
        ax.set_ylabel("energy overhead vs keep-all (%)")
        ax.set_title(f"{m} (batch {rs[0]['batch']})", fontsize=10)
        ax.invert_xaxis()
        ax.grid(alpha=0.3, which="both")
        _legend(ax, fontsize=7)
    fig.suptitle("poet: energy overhead as the RAM budget shrinks (missing points: no schedule fits)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def deadline_sweep(path: Path, rows: list[dict]) -> bool:
    """POET fig. 4: integrated vs remat-only vs paging-only as the deadline tightens."""
    if not rows:
        return False
    from matplotlib.ticker import NullFormatter
    models = _ordered(r["model"] for r in rows)
    fig = _figure(9.5, 3.3 * math.ceil(len(models) / 2))
    for ax, m in zip(_grid(fig, len(models)), models):
        rs = [r for r in rows if r["model"] == m]
        drawn = False
        for s in ("remat-only", "paging-only", "poet"):  # poet last: on top where they coincide
            pts = sorted((r["deadline_factor"], max(r["overhead_energy_pct"], 1e-4))
                         for r in rs if r["strategy"] == s and r.get("fits"))
            color, marker = STRATEGY_STYLE[s]
            if pts:
                drawn = True
                if s == "poet":
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=4, color=color,
                            label="poet (integrated)", lw=1.5)
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=7, color=color,
                            mfc="none", label=s, ls="--", lw=1.2)
            misses = sorted({r["deadline_factor"] for r in rs if r["strategy"] == s and not r.get("fits")})
            if misses:
                ax.scatter(misses, [0.0] * len(misses), marker="x", color=color, transform=ax.get_xaxis_transform(),
                           clip_on=False, s=20)
        _log_or_empty(ax, drawn, x=True)
        factors = sorted({r["deadline_factor"] for r in rs})
        ax.set_xticks(factors)
        ax.set_xticklabels([f"{f:g}" for f in factors], fontsize=7, rotation=45)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("deadline (x keep-all step time)")
        ax.set_ylabel("energy overhead vs keep-all (%)")
        ax.set_title(f"{m}, {rs[0]['target']}, budget {rs[0]['budget_fraction']:.0%}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _legend(ax, fontsize=7)
    fig.suptitle("tightening the deadline (x on the axis: the strategy finds no schedule)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def baselines(path: Path, rows: list[dict], *, target: str = "rpi4") -> bool:
    """POET fig. 5: poet vs Capuchin-like, Chen sqrt(n), remat-only, paging-only, per budget."""
    rows = [r for r in rows if r["target"] == target]
    if not rows:
        return False
    from matplotlib.patches import Patch
    strategies = [s for s in ("poet", "capuchin", "chen", "remat-only", "paging-only")
                  if any(r["strategy"] == s for r in rows)]
    models = _ordered(r["model"] for r in rows)
    fig = _figure(10.0, 3.4 * math.ceil(len(models) / 2))
    width = 0.8 / max(len(strategies), 1)
    for ax, m in zip(_grid(fig, len(models)), models):
        rs = [r for r in rows if r["model"] == m]
        fracs = sorted({r["budget_fraction"] for r in rs}, reverse=True)
        top = 1.0
        for k, s in enumerate(strategies):
            color, _ = STRATEGY_STYLE[s]
            xs, ys, miss = [], [], []
            for i, f in enumerate(fracs):
                r = next((r for r in rs if r["budget_fraction"] == f and r["strategy"] == s), None)
                x = i + (k - (len(strategies) - 1) / 2) * width
                if r is not None and r.get("fits"):
                    xs.append(x)
                    ys.append(max(r["overhead_energy_pct"], 1e-3))
                else:
                    miss.append(x)
            ax.bar(xs, ys, width=width, color=color)
            top = max([top] + ys)
            if miss:
                ax.scatter(miss, [0.0] * len(miss), marker="x", color=color, s=14,
                           transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_yscale("log")
        ax.set_ylim(1e-3, top * 3)
        ax.set_xticks(range(len(fracs)))
        ax.set_xticklabels([f"{f:.0%}" for f in fracs])
        ax.set_xlabel("RAM budget (% of keep-all activation memory)")
        ax.set_ylabel("energy overhead (%)")
        ax.set_title(f"{m}, {target}, deadline {rs[0]['deadline_factor']:g}x", fontsize=10)
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(handles=[Patch(color=STRATEGY_STYLE[s][0], label=s) for s in strategies], fontsize=7, ncol=2)
    fig.suptitle("strategies at each budget (x on the axis: does not fit the budget or the deadline)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def solver_scaling(path: Path, rows: list[dict]) -> bool:
    """MILP solve time and final gap against graph size (saved activations)."""
    rows = [r for r in rows if r.get("solve_time_s") is not None and r.get("status") != "below-lower-bound"]
    if not rows:
        return False
    fig = _figure(10.0, 3.8)
    ax_t, ax_g = fig.subplots(1, 2)
    status_marker = {"optimal": "o", "feasible": "s", "heuristic-fallback": "x", "infeasible": "+"}
    for k, s in enumerate(_ordered(r["strategy"] for r in rows)):
        color, _ = STRATEGY_STYLE.get(s, ("#000000", "o"))
        jitter = 1 + 0.04 * (k % 3 - 1)  # side by side, deterministic
        for st, marker in status_marker.items():
            rs = [r for r in rows if r["strategy"] == s and r["status"] == st]
            if not rs:
                continue
            xs = [r["candidates"] * jitter for r in rs]
            ax_t.scatter(xs, [max(r["solve_time_s"], 1e-2) for r in rs], color=color, marker=marker, s=14,
                         alpha=0.7, label=f"{s}, {st}")
            gs = [(x, r["gap"] * 100) for x, r in zip(xs, rs) if r.get("gap") is not None]
            if gs:
                ax_g.scatter([g[0] for g in gs], [max(g[1], 1e-4) for g in gs], color=color, marker=marker, s=14,
                             alpha=0.7)
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    _plain_ticks(ax_t.xaxis)
    _plain_ticks(ax_t.yaxis)
    ax_t.set_xlabel("saved activations (decision candidates)")
    ax_t.set_ylabel("solve time (s), incl. model build")
    ax_t.grid(alpha=0.3, which="both")
    _legend(ax_t, fontsize=6, ncol=2)
    ax_g.set_xscale("log")
    ax_g.set_yscale("log")
    _plain_ticks(ax_g.xaxis)
    ax_g.axhline(1.0, color="#b2182b", ls=":", lw=1)
    ax_g.set_xlabel("saved activations (decision candidates)")
    ax_g.set_ylabel("gap on the overhead at the end (%, floor 1e-4)")
    ax_g.grid(alpha=0.3, which="both")
    fig.suptitle("MILP (HiGHS, 1 thread): solve time and gap vs graph size", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def measured_vs_predicted(path: Path, rows: list[dict]) -> bool:
    """Host target: simulated vs measured activation peak and step time, keep-all and compiled."""
    rows = [r for r in rows if r.get("measured_activation_peak_bytes") is not None]
    if not rows:
        return False
    labels = [f"{r['model']}\n{r['budget_fraction']:.0%}" for r in rows]
    fig = _figure(max(6.0, 1.3 * len(rows) + 3), 4.2)
    ax_m, ax_t = fig.subplots(1, 2)
    xs = range(len(rows))
    w = 0.2
    series = [("keep-all predicted", "keep_all_activation_bytes", -1.5, "#bbbbbb"),
              ("keep-all measured", "measured_keep_all_activation_peak_bytes", -0.5, "#666666"),
              ("compiled predicted", "activation_peak_bytes", 0.5, "#a6dba0"),
              ("compiled measured", "measured_activation_peak_bytes", 1.5, "#1b7837")]
    for label, key, off, color in series:
        ax_m.bar([x + off * w for x in xs], [r[key] / MIB for r in rows], width=w, color=color, label=label)
    ax_m.scatter([x + 1.5 * w for x in xs], [(r["ram_budget_bytes"] - r["fixed_bytes"]) / MIB for r in rows],
                 marker="_", s=200, color="#b2182b", label="budget - fixed state", zorder=3)
    ax_m.set_xticks(list(xs))
    ax_m.set_xticklabels(labels, fontsize=8)
    ax_m.set_ylabel("activation peak above fixed state (MiB)")
    _legend(ax_m, fontsize=7)
    ax_m.grid(alpha=0.3, axis="y")
    series = [("keep-all predicted", "predicted_keep_all_step_s", -1.5, "#bbbbbb"),
              ("keep-all measured", "measured_keep_all_step_s", -0.5, "#666666"),
              ("compiled predicted", "time_s", 0.5, "#a6dba0"),
              ("compiled measured", "measured_step_s", 1.5, "#1b7837")]
    for label, key, off, color in series:
        ax_t.bar([x + off * w for x in xs], [r[key] for r in rows], width=w, color=color, label=label)
    ax_t.set_xticks(list(xs))
    ax_t.set_xticklabels(labels, fontsize=8)
    ax_t.set_ylabel("step time (s)")
    _legend(ax_t, fontsize=7)
    ax_t.grid(alpha=0.3, axis="y")
    fig.suptitle("host: simulated vs measured in ONNX Runtime (heap counter, best step time)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


__all__ = ["memory_timeline", "step_positions", "energy_vs_budget", "deadline_sweep", "baselines",
           "solver_scaling", "measured_vs_predicted"]
