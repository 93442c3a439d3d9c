"""The MILP: keep / recompute / page per saved activation, exact for poetc's regeneration policy.

POET (Patil et al. 2022) decides R, S_RAM, S_flash, page-in and page-out per (stage, node): O(n^2)
binaries. Under poetc's runtime contract the execution order of the training graph is fixed, every
tensor is regenerated at most once, and regeneration happens only at "stages" (first backward reads),
so the decision collapses to three binaries per saved activation plus continuous residency variables:

  keep_i + rec_i + page_i = 1
  y[i,k]   in [0,1]: i materialized early, at or before stage k (< its own first backward read)
           y[i,k+1] >= y[i,k];   y[b,k] >= Y[u,k] - page_u - keep_b   for b in boundary(u)
           where Y[u,k] = y[u,k] before u's own stage and 1 - keep_u at it
  tau[i,k] >= Y[i,k] - Y[i,k-1] - page_i     (recompute event: its transient intermediates)
  ext[b,p] >= rec_u   for p in (lb(b), fb(u)]  (a recompute reads b after its last own reader)
  memory at every position p:  const(p) + sum m_i * (lifetime terms) <= budget - fixed state
  sum rec_i * t_rec_i + page_i * t_page_i <= deadline - keep-all time;  sum page_i * m_i <= flash
  minimise sum rec_i * e_rec_i + page_i * e_page_i     (overhead only: the mandatory first
                                                          computation is a constant, kept out)
y is binary for a tensor whose recompute creates transient intermediates (it has tau variables);
otherwise y, and tau and ext everywhere, are continuous, which is exact: at integral keep/rec/page
their minimal values are integral and any larger value only uses more memory. (A continuous y with
tau is not exact: ramping y up over several stages splits the event and its transient bytes into
fractions that no schedule has; HiGHS found such "optimal" schedules that did not fit.) Rows with
identical variable sets keep only the largest constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mip

from ..schedule import SPILL_HANDLE_BYTES, Decision
from .problem import LinearEval, Problem


@dataclass
class MilpVars:
    keep: dict[int, mip.Var] = field(default_factory=dict)
    rec: dict[int, mip.Var] = field(default_factory=dict)
    page: dict[int, mip.Var] = field(default_factory=dict)
    y: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    tau: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    ext: dict[tuple[int, int], mip.Var] = field(default_factory=dict)


# What the simulator does not model (kernel scratch below 64 KiB, small bookkeeping blocks) measured
# up to 0.5% of the activation peak on real models, and about 5 KB a step on toy ones
# (docs/memory-model.md): plans keep this much of the activation budget spare.
RESERVE_FRACTION = 0.01
RESERVE_BYTES = 16 * 1024


def activation_budget(ram_bytes: int, fixed_bytes: int) -> float:
    """The activation memory a schedule may plan for: RAM budget minus fixed state minus the reserve."""
    free = ram_bytes - fixed_bytes
    return free - RESERVE_FRACTION * max(free, 0) - RESERVE_BYTES


@dataclass(frozen=True)
class Limits:
    activation_budget_bytes: float  # RAM budget minus fixed state
    overhead_time_s: float  # deadline minus keep-all step time
    flash_bytes: float
    objective: str = "energy"  # or "time"
    allow_recompute: bool = True
    allow_page: bool = True


def build_model(problem: Problem, limits: Limits, solver_name: str = mip.HIGHS) -> tuple[mip.Model, MilpVars]:
    """Build (not solve) the MILP. Pure: same problem and limits give the same model."""
    cands = problem.candidates
    stages = problem.stages
    stage_idx = {s: k for k, s in enumerate(stages)}
    scale = 1.0 / max(limits.activation_budget_bytes, 1.0)  # memory rows in units of the budget
    m = mip.Model(name="poetc", sense=mip.MINIMIZE, solver_name=solver_name)
    m.verbose = 0
    v = MilpVars()
    decidable = [i for i, c in enumerate(cands) if not c.fixed]
    for i in decidable:
        c = cands[i]
        v.keep[i] = m.add_var(f"keep_{i}", var_type=mip.BINARY)
        v.rec[i] = m.add_var(f"rec_{i}", var_type=mip.BINARY,
                             ub=1.0 if (c.recomputable and limits.allow_recompute) else 0.0)
        v.page[i] = m.add_var(f"page_{i}", var_type=mip.BINARY,
                              ub=1.0 if (c.pageable and limits.allow_page) else 0.0)
        m += v.keep[i] + v.rec[i] + v.page[i] == 1, f"one_{i}"
        has_events = c.recomputable and limits.allow_recompute and c.transient_bytes > 0
        y_type = mip.BINARY if has_events else mip.CONTINUOUS
        for k in range(stage_idx[c.s0], stage_idx[c.fb]):
            v.y[(i, k)] = m.add_var(f"y_{i}_{k}", lb=0.0, ub=1.0, var_type=y_type)
        for k in range(stage_idx[c.s0], stage_idx[c.fb] - 1):
            m += v.y[(i, k + 1)] - v.y[(i, k)] >= 0, f"mono_{i}_{k}"

    def Y(i: int, k: int):  # noqa: N802  (resident-by-stage-k expression, see module docstring)
        c = cands[i]
        if k == stage_idx[c.fb]:
            return 1 - v.keep[i]
        return v.y.get((i, k), 0)

    for u in decidable:
        c = cands[u]
        if not c.recomputable or not limits.allow_recompute:
            continue
        for b in c.boundary:
            t = cands[b]
            for p in range(t.lb + 1, c.fb + 1):  # read after b's own last reader: b stays resident
                if (b, p) not in v.ext:
                    v.ext[(b, p)] = m.add_var(f"ext_{b}_{p}", lb=0.0, ub=1.0)
                m += v.ext[(b, p)] - v.rec[u] >= 0, f"ext_{b}_{p}_{u}"
            if not t.fixed:  # wherever u is materialized before b's own first read, b is too
                for k in range(stage_idx[c.s0], min(stage_idx[c.fb], stage_idx[t.fb] - 1) + 1):
                    m += v.y[(b, k)] - Y(u, k) + v.page[u] + v.keep[b] >= 0, f"need_{u}_{b}_{k}"
        if c.transient_bytes > 0:
            for k in range(stage_idx[c.s0], stage_idx[c.fb] + 1):
                v.tau[(u, k)] = m.add_var(f"tau_{u}_{k}", lb=0.0, ub=1.0)
                prev = Y(u, k - 1) if k > stage_idx[c.s0] else 0
                m += v.tau[(u, k)] - Y(u, k) + prev + v.page[u] >= 0, f"event_{u}_{k}"

    # memory rows
    const = problem.const_bytes.copy()
    terms: list[dict] = [dict() for _ in range(problem.positions)]
    for i in decidable:
        c = cands[i]
        const[c.prod: c.lf + 1] += c.mem_bytes
        const[c.fb: c.lb + 1] += c.mem_bytes
        for p in range(c.lf + 1, c.fb):
            terms[p][("keep", i)] = c.mem_bytes
            k = problem.stage_of(p)
            if k is not None and (i, k) in v.y:
                terms[p][("y", i, k)] = c.mem_bytes
    for (u, k), _ in v.tau.items():
        terms[stages[k]][("tau", u, k)] = cands[u].transient_bytes
    for (b, p), _ in v.ext.items():
        terms[p][("ext", b, p)] = cands[b].mem_bytes
    rows: dict[tuple, float] = {}
    # Spill handles (16 bytes each) are not modelled per position: reserve room for all of them
    budget = limits.activation_budget_bytes - SPILL_HANDLE_BYTES * len(decidable)
    for p in range(problem.positions):
        key = tuple(sorted(terms[p].items()))
        if const[p] + sum(terms[p].values()) <= budget:
            continue  # cannot bind
        rows[key] = max(rows.get(key, -1.0), float(const[p]))
    lookup = {"keep": v.keep, "y": v.y, "tau": v.tau, "ext": v.ext}
    for r, (key, c0) in enumerate(sorted(rows.items(), key=lambda kv: kv[1])):
        expr = mip.xsum(coef * scale * (lookup[name[0]][name[1]] if len(name) == 2 else lookup[name[0]][name[1:]])
                        for name, coef in key)
        m += expr <= (budget - c0) * scale, f"mem_{r}"

    # deadline, flash, objective
    rec_cost_t = {i: cands[i].rec_time_s for i in decidable}
    page_cost_t = {i: cands[i].page_time_s for i in decidable}
    m += mip.xsum(rec_cost_t[i] * v.rec[i] + page_cost_t[i] * v.page[i] for i in decidable) \
        <= max(limits.overhead_time_s, 0.0), "deadline"
    if limits.flash_bytes < sum(cands[i].nbytes for i in decidable):
        m += mip.xsum(cands[i].nbytes / max(limits.flash_bytes, 1.0) * v.page[i] for i in decidable) <= 1, "flash"
    if limits.objective == "time":
        m.objective = mip.minimize(mip.xsum(rec_cost_t[i] * v.rec[i] + page_cost_t[i] * v.page[i] for i in decidable))
    else:
        m.objective = mip.minimize(mip.xsum(cands[i].rec_energy_j * v.rec[i] + cands[i].page_energy_j * v.page[i]
                                            for i in decidable))
    return m, v


def start_values(problem: Problem, v: MilpVars, choice: list[Decision], ev: LinearEval) -> list[tuple[mip.Var, float]]:
    """A complete start (every variable set: python-mip's HiGHS backend zeroes missing ones)."""
    start = []
    for i in v.keep:
        start += [(v.keep[i], float(choice[i] is Decision.KEEP)), (v.rec[i], float(choice[i] is Decision.RECOMPUTE)),
                  (v.page[i], float(choice[i] is Decision.PAGE))]
    start += [(var, ev.y.get(key, 0.0)) for key, var in v.y.items()]
    start += [(var, ev.tau.get(key, 0.0)) for key, var in v.tau.items()]
    start += [(var, ev.ext.get(key, 0.0)) for key, var in v.ext.items()]
    return start


def read_choice(problem: Problem, v: MilpVars) -> list[Decision]:
    choice = [Decision.KEEP] * len(problem.candidates)
    for i in v.keep:
        if v.rec[i].x is not None and v.rec[i].x > 0.5:
            choice[i] = Decision.RECOMPUTE
        elif v.page[i].x is not None and v.page[i].x > 0.5:
            choice[i] = Decision.PAGE
    return choice
