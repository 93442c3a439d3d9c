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
A group (the recomputable outputs of one multi-output op: MaxPool's output and mask, BatchNorm's
output and statistics) reruns its producer once, for all its recomputed members:
  z[g,k] binary, monotone: the producer has rerun by stage k;  z[g,k] >= Y[i,k] - page_i
  y[i,k] >= z[g,k] + rec_i - 1 (every recomputed member is materialized by that run)
  y[b,k] >= z[g,k] - keep_b for b in the group's boundary;  run_g >= rec_i
  gtau[g,k] >= z[g,k] - z[g,k-1] (the run);  w[i,k] >= gtau[g,k] - rec_i (a member it writes that is
  not recomputed: a transient copy)
Memory, in units of the activation budget (poetc.plan.Budget; less a Spill handle per decidable tensor):
  at every position p, while its op runs:  const(p) + sum m_i * (lifetime terms) <= budget
  at every stage, while the regeneration steps before its op run (the op's outputs and workspace not
  yet there):  pre_const(k) + the same lifetime terms + transients (tau, gtau, w) <= budget
Time and energy, overhead only (the mandatory first computation is a constant, kept out):
  sum (rec_i, outside groups) * c_rec_i + sum run_g * c_rec_g + sum rec_i * c_alias_i + page_i * c_page_i
  <= deadline - keep-all time;  the same sum in energy is the objective;  sum page_i * m_i <= flash
(c_alias: Flatten/Reshape views of a regenerated tensor that backward ops read, rebuilt once.)
Page in again: for each pair (a, b) of a pageable tensor's consecutive backward readers with ops
between them (Candidate.inner), a binary drop[i,j] <= page_i: the tensor is not resident over (a, b)
(a term -m_i in those rows) and is paged in again before b (one more page-in in time and energy);
drop[i,j] + rec_u <= 1 for every u whose recompute may read i as a boundary tensor inside (a, b).
y is binary for a tensor outside a group whose recompute creates transient intermediates (it has tau
variables), z is binary; otherwise y, and tau, gtau, w, run and ext everywhere, are continuous, which
is exact: at integral keep/rec/page their minimal values are integral and any larger value only uses
more memory or cost. (A continuous y with tau is not exact: ramping y up over several stages splits
the event and its transient bytes into fractions that no schedule has; HiGHS found such "optimal"
schedules that did not fit.) Rows with identical variable sets keep only the largest constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mip

from ..plan import Limits
from ..schedule import Decision
from .problem import LinearEval, Problem


@dataclass
class MilpVars:
    keep: dict[int, mip.Var] = field(default_factory=dict)
    rec: dict[int, mip.Var] = field(default_factory=dict)
    page: dict[int, mip.Var] = field(default_factory=dict)
    y: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    tau: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    ext: dict[tuple[int, int], mip.Var] = field(default_factory=dict)
    run: dict[int, mip.Var] = field(default_factory=dict)  # group -> its producer reruns
    z: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # (group, stage) -> has rerun by then
    gtau: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # (group, stage) -> reruns there
    w: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # (member, stage) -> transient copy
    drop: dict[tuple[int, int], mip.Var] = field(default_factory=dict)  # (candidate, inner gap) -> paged in again

    def var(self, key: tuple) -> mip.Var:
        """The variable a memory-row key names: ("keep", i), ("y", i, k), ("ext", b, p), ..."""
        table = getattr(self, key[0])
        return table[key[1]] if len(key) == 2 else table[key[1:]]


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
        if c.pageable and limits.allow_page:
            for j in range(len(c.inner)):
                v.drop[(i, j)] = m.add_var(f"drop_{i}_{j}", var_type=mip.BINARY)
                m += v.drop[(i, j)] - v.page[i] <= 0, f"drop_{i}_{j}"
        has_events = c.recomputable and limits.allow_recompute and c.transient_bytes > 0 and c.group < 0
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
        if c.group >= 0:
            continue  # materialization and events per group, below
        for b in c.boundary:
            t = cands[b]
            if not t.fixed:  # wherever u is materialized in b's gap, b is too
                for k in range(max(stage_idx[c.s0], stage_idx[t.s0]), min(stage_idx[c.fb], stage_idx[t.fb] - 1) + 1):
                    m += v.y[(b, k)] - Y(u, k) + v.page[u] + v.keep[b] >= 0, f"need_{u}_{b}_{k}"
        if c.transient_bytes > 0:
            for k in range(stage_idx[c.s0], stage_idx[c.fb] + 1):
                v.tau[(u, k)] = m.add_var(f"tau_{u}_{k}", lb=0.0, ub=1.0)
                prev = Y(u, k - 1) if k > stage_idx[c.s0] else 0
                m += v.tau[(u, k)] - Y(u, k) + prev + v.page[u] >= 0, f"event_{u}_{k}"

    # groups (a multi-output producer): z[g,k] = the producer has rerun by stage k; one run, one cost
    if limits.allow_recompute:
        for g, members in enumerate(problem.groups):
            first_k = stage_idx[cands[members[0]].s0]  # shared by the group
            last_k = max(stage_idx[cands[i].fb] for i in members)
            v.run[g] = m.add_var(f"run_{g}", lb=0.0, ub=1.0)
            for k in range(first_k, last_k + 1):
                v.z[(g, k)] = m.add_var(f"z_{g}_{k}", var_type=mip.BINARY)
                if k > first_k:
                    m += v.z[(g, k)] - v.z[(g, k - 1)] >= 0, f"zmono_{g}_{k}"
            for i in members:
                m += v.run[g] - v.rec[i] >= 0, f"run_{g}_{i}"
                for k in range(first_k, stage_idx[cands[i].fb] + 1):
                    # any member recomputed (or pulled early as a boundary) by stage k reran the producer
                    m += v.z[(g, k)] - Y(i, k) + v.page[i] >= 0, f"zof_{g}_{i}_{k}"
                    if k < stage_idx[cands[i].fb]:  # ... which materialized every recomputed member
                        m += v.y[(i, k)] - v.z[(g, k)] - v.rec[i] >= -1, f"zmat_{g}_{i}_{k}"
            for b in cands[members[0]].boundary:
                t = cands[b]
                if not t.fixed:
                    for k in range(max(first_k, stage_idx[t.s0]), min(last_k, stage_idx[t.fb] - 1) + 1):
                        m += v.y[(b, k)] - v.z[(g, k)] + v.keep[b] >= 0, f"gneed_{g}_{b}_{k}"
            for k in range(first_k, last_k + 1):
                v.gtau[(g, k)] = m.add_var(f"gtau_{g}_{k}", lb=0.0, ub=1.0)
                prev = v.z[(g, k - 1)] if k > first_k else 0
                m += v.gtau[(g, k)] - v.z[(g, k)] + prev >= 0, f"gevent_{g}_{k}"
                for i in members:  # written by the run but not recomputed: transient
                    v.w[(i, k)] = m.add_var(f"w_{i}_{k}", lb=0.0, ub=1.0)
                    m += v.w[(i, k)] - v.gtau[(g, k)] + v.rec[i] >= 0, f"wof_{i}_{k}"

    for (i, j), var in v.drop.items():  # a recompute that may read it there
        for u in cands[i].inner_conflicts[j]:
            if u in v.rec:
                m += var + v.rec[u] <= 1, f"dropread_{i}_{j}_{u}"

    # memory rows
    decidable_rows = memory_rows(problem, v)
    rows: dict[tuple, float] = {}
    budget = limits.milp_budget_bytes(len(decidable))
    for c0, row_terms in decidable_rows:
        key = tuple(sorted(row_terms.items()))
        if c0 + sum(b for b in row_terms.values() if b > 0) <= budget:
            continue  # cannot bind
        rows[key] = max(rows.get(key, -1.0), float(c0))
    for r, (key, c0) in enumerate(sorted(rows.items(), key=lambda kv: kv[1])):
        expr = mip.xsum(coef * scale * v.var(name) for name, coef in key)
        m += expr <= (budget - c0) * scale, f"mem_{r}"

    # deadline, flash, objective
    def overhead(rec_cost, alias_cost, page_cost, repage_cost):  # a group's producer reruns once for all its
        grouped = v.run  # recomputed members
        return (mip.xsum(page_cost(cands[i]) * v.page[i] for i in decidable)
                + mip.xsum(repage_cost(cands[i]) * var for (i, _), var in v.drop.items())
                + mip.xsum(alias_cost(cands[i]) * v.rec[i] for i in decidable)
                + mip.xsum(rec_cost(cands[i]) * v.rec[i] for i in decidable if cands[i].group not in grouped)
                + mip.xsum(rec_cost(cands[problem.groups[g][0]]) * var for g, var in grouped.items()))

    overhead_time = overhead(lambda c: c.rec_time_s, lambda c: c.alias_time_s, lambda c: c.page_time_s,
                             lambda c: c.repage_time_s)
    m += overhead_time <= max(limits.overhead_time_s, 0.0), "deadline"
    if limits.flash_bytes < sum(cands[i].nbytes for i in decidable):
        m += mip.xsum(cands[i].nbytes / max(limits.flash_bytes, 1.0) * v.page[i] for i in decidable) <= 1, "flash"
    if limits.objective == "time":
        m.objective = mip.minimize(overhead_time)
    else:
        m.objective = mip.minimize(overhead(lambda c: c.rec_energy_j, lambda c: c.alias_energy_j,
                                            lambda c: c.page_energy_j, lambda c: c.repage_energy_j))
    return m, v


def memory_rows(problem: Problem, v: MilpVars) -> list[tuple[float, dict[tuple, float]]]:
    """The memory rows before budget and deduplication: (constant bytes, {variable key: bytes}), one
    per position (while its op runs), then one per stage (while the regeneration steps before the
    stage's op run). Spill handles are left out (build_model reserves them globally)."""
    cands = problem.candidates
    stages = problem.stages
    const = problem.const_bytes.copy()
    terms: list[dict] = [dict() for _ in range(problem.positions)]
    for i in v.keep:
        c = cands[i]
        const[c.prod: c.lf + 1] += c.mem_bytes
        const[c.fb: c.lb + 1] += c.mem_bytes
        for p in range(c.lf + 1, c.fb):
            terms[p][("keep", i)] = c.mem_bytes
            k = problem.stage_of(p)
            if k is not None and (i, k) in v.y:
                terms[p][("y", i, k)] = c.mem_bytes
    for (b, p) in v.ext:
        terms[p][("ext", b, p)] = cands[b].mem_bytes
    for (i, j) in v.drop:
        a, b = cands[i].inner[j]
        for p in range(a + 1, b):
            terms[p][("drop", i, j)] = -cands[i].mem_bytes
    pre_const = problem.pre_const_bytes + (const - problem.const_bytes)[stages]
    pre_terms: list[dict] = [dict(terms[p]) for p in stages]
    for (u, k) in v.tau:
        pre_terms[k][("tau", u, k)] = cands[u].transient_bytes
    for (g, k) in v.gtau:
        pre_terms[k][("gtau", g, k)] = cands[problem.groups[g][0]].transient_bytes
    for (i, k) in v.w:
        pre_terms[k][("w", i, k)] = cands[i].mem_bytes
    return list(zip(map(float, const), terms)) + list(zip(map(float, pre_const), pre_terms))


def start_values(problem: Problem, v: MilpVars, choice: list[Decision], ev: LinearEval,
                 repage: dict[int, list[int]] | None = None) -> list[tuple[mip.Var, float]]:
    """A complete start (every variable set: python-mip's HiGHS backend zeroes missing ones)."""
    cands = problem.candidates
    start = []
    for i in v.keep:
        start += [(v.keep[i], float(choice[i] is Decision.KEEP)), (v.rec[i], float(choice[i] is Decision.RECOMPUTE)),
                  (v.page[i], float(choice[i] is Decision.PAGE))]
    start += [(var, ev.y.get(key, 0.0)) for key, var in v.y.items()]
    start += [(var, ev.tau.get(key, 0.0)) for key, var in v.tau.items()]
    start += [(var, ev.ext.get(key, 0.0)) for key, var in v.ext.items()]
    start += [(var, float(j in (repage or {}).get(i, ()))) for (i, j), var in v.drop.items()]
    at = ev.group_stage
    start += [(var, float(g in at)) for g, var in v.run.items()]
    start += [(var, float(g in at and k >= at[g])) for (g, k), var in v.z.items()]
    start += [(var, float(at.get(g) == k)) for (g, k), var in v.gtau.items()]
    start += [(var, float(at.get(cands[i].group) == k and choice[i] is not Decision.RECOMPUTE))
              for (i, k), var in v.w.items()]
    return start


def read_choice(problem: Problem, v: MilpVars) -> list[Decision]:
    choice = [Decision.KEEP] * len(problem.candidates)
    for i in v.keep:
        if v.rec[i].x is not None and v.rec[i].x > 0.5:
            choice[i] = Decision.RECOMPUTE
        elif v.page[i].x is not None and v.page[i].x > 0.5:
            choice[i] = Decision.PAGE
    return choice


def read_repage(v: MilpVars, choice: list[Decision]) -> dict[int, list[int]]:
    """{PAGE candidate: indices into its `inner`} it is dropped across and paged in again."""
    repage: dict[int, list[int]] = {}
    for (i, j), var in sorted(v.drop.items()):
        if choice[i] is Decision.PAGE and var.x is not None and var.x > 0.5:
            repage.setdefault(i, []).append(j)
    return repage


def read_early(problem: Problem, v: MilpVars, choice: list[Decision]) -> dict[int, int]:
    """{candidate: stage index} for regenerated candidates the solution materializes before their own
    stage (y = 1 earlier): whether a dependent's recompute pulls them there or the solver chose to,
    the schedule regenerates them there (Schedule.regenerate_at), which is what the rows counted."""
    early: dict[int, int] = {}
    for (i, k), var in sorted(v.y.items()):
        if choice[i] is not Decision.KEEP and i not in early and var.x is not None and var.x > 0.5:
            early[i] = k
    return early
