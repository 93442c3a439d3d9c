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
Paged state (fused mode, issue #17; Candidate.state): a parameter or moment s has keep_s + page_s = 1
(rec_s = 0). const(p) counts it resident (nbytes) at every position; page_s adds -nbytes at every
position outside its groups of uses and (copy allocation - nbytes) inside them, and its StateWrite's
token (8 bytes, a graph output) after its update. Its cost c_page_s is
its reads (one per group) and its write (trainable: one), in the deadline and the objective; it takes
no flash beyond the state directory, which holds two generations of all state whatever is paged
(poetc.plan takes that off the flash before any strategy runs). rec_u + page_s <= 1 when u's
recompute reads s (a recompute reads a resident parameter).
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

import numpy as np

from ..plan import Limits
from ..schedule import Decision
from . import overlap_rows
from .problem import LinearEval, Problem, state_delta

INF = float("inf")


class LinearModel:
    """A MILP as plain arrays: columns (bounds, integrality, objective) and rows (sparse terms and
    bounds), built without any solver so that building costs microseconds a row; `to_highs` and
    `to_mip` hand it to a solver in one call / through python-mip."""

    def __init__(self) -> None:
        self.col_lb: list[float] = []
        self.col_ub: list[float] = []
        self.integer: list[bool] = []
        self.col_names: list[str] = []
        self.obj: dict[int, float] = {}
        self.row_start: list[int] = [0]
        self.row_index: list[int] = []
        self.row_value: list[float] = []
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []

    @property
    def num_cols(self) -> int:
        return len(self.col_lb)

    @property
    def num_rows(self) -> int:
        return len(self.row_lb)

    @property
    def num_int(self) -> int:
        return sum(self.integer)

    def add_var(self, name: str, lb: float = 0.0, ub: float = 1.0, integer: bool = False) -> int:
        self.col_lb.append(lb)
        self.col_ub.append(ub)
        self.integer.append(integer)
        self.col_names.append(name)
        return len(self.col_lb) - 1

    def add_row(self, terms: dict[int, float], lb: float = -INF, ub: float = INF) -> None:
        """lb <= sum coef * x[col] <= ub (zero coefficients dropped)."""
        for col, coef in terms.items():
            if coef != 0.0:
                self.row_index.append(col)
                self.row_value.append(coef)
        self.row_start.append(len(self.row_index))
        self.row_lb.append(lb)
        self.row_ub.append(ub)

    def objective_of(self, x) -> float:
        return float(sum(c * x[j] for j, c in self.obj.items()))

    def to_highs(self):
        """A highspy.Highs holding this model (no options set)."""
        import highspy
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.num_cols, self.num_rows
        cost = np.zeros(self.num_cols)
        for j, c in self.obj.items():
            cost[j] = c
        lp.col_cost_ = cost
        lp.col_lower_ = np.array(self.col_lb, dtype=np.float64)
        lp.col_upper_ = np.array(self.col_ub, dtype=np.float64)
        lp.row_lower_ = np.array(self.row_lb, dtype=np.float64)
        lp.row_upper_ = np.array(self.row_ub, dtype=np.float64)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.array(self.row_start, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(self.row_index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(self.row_value, dtype=np.float64)
        lp.integrality_ = [highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous
                           for b in self.integer]
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.passModel(lp)
        return h

    def to_mip(self, solver_name: str):
        """A python-mip model of this one, and its variables by column (for CBC)."""
        import mip
        m = mip.Model(name="poetc", sense=mip.MINIMIZE, solver_name=solver_name)
        m.verbose = 0
        xs = [m.add_var(name, lb=lb, ub=ub, var_type=mip.INTEGER if integer else mip.CONTINUOUS)
              for name, lb, ub, integer in zip(self.col_names, self.col_lb, self.col_ub, self.integer)]
        for r in range(self.num_rows):
            a, b = self.row_start[r], self.row_start[r + 1]
            expr = mip.xsum(c * xs[j] for j, c in zip(self.row_index[a:b], self.row_value[a:b]))
            if self.row_lb[r] == self.row_ub[r]:
                m += expr == self.row_lb[r]
            else:
                if self.row_lb[r] > -INF:
                    m += expr >= self.row_lb[r]
                if self.row_ub[r] < INF:
                    m += expr <= self.row_ub[r]
        m.objective = mip.minimize(mip.xsum(c * xs[j] for j, c in self.obj.items()))
        return m, xs


@dataclass
class MilpVars:
    """Column indices into the LinearModel, by role."""
    keep: dict[int, int] = field(default_factory=dict)
    rec: dict[int, int] = field(default_factory=dict)
    page: dict[int, int] = field(default_factory=dict)
    y: dict[tuple[int, int], int] = field(default_factory=dict)
    tau: dict[tuple[int, int], int] = field(default_factory=dict)
    ext: dict[tuple[int, int], int] = field(default_factory=dict)
    run: dict[int, int] = field(default_factory=dict)  # group -> its producer reruns
    z: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, stage) -> has rerun by then
    gtau: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, stage) -> reruns there
    # (member, stage) -> the run wrote a copy of it by then and it is not recomputed: held to the end
    w: dict[tuple[int, int], int] = field(default_factory=dict)
    drop: dict[tuple[int, int], int] = field(default_factory=dict)  # (candidate, inner gap) -> paged in again
    # overlap (issue #19, poetc/solver/overlap_rows.py): candidate asynchronous windows and their columns
    windows: list = field(default_factory=list)
    win: dict[int, int] = field(default_factory=dict)
    # {0: column}: the execution frame's values the decisions add, as a fraction of its largest value
    # (problem.bookkeeping_bytes; in every memory row: ONNX Runtime allocates the frame at the start)
    bk: dict[int, int] = field(default_factory=dict)
    # stage index -> column: the bytes held to the step's end from that stage on (problem.held_profile),
    # as a fraction of their largest value; in the memory rows of the stage's positions
    held: dict[int, int] = field(default_factory=dict)
    held_max: dict[int, float] = field(default_factory=dict)
    # (recomputed candidate outside a group, stage) -> recomputed and materialized by then
    h: dict[tuple[int, int], int] = field(default_factory=dict)
    held_rows: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)  # k -> its definition
    state_session: dict[int, int] = field(default_factory=dict)  # {0: column}: >= every paged state's page_s

    def var(self, key: tuple) -> int:
        """The column a memory-row key names: ("keep", i), ("y", i, k), ("ext", b, p), ..."""
        table = getattr(self, key[0])
        return table[key[1]] if len(key) == 2 else table[key[1:]]


def build_model(problem: Problem, limits: Limits) -> tuple[LinearModel, MilpVars]:
    """Build (not solve) the MILP. Pure: same problem and limits give the same model."""
    cands = problem.candidates
    stages = problem.stages
    stage_idx = {s: k for k, s in enumerate(stages)}
    scale = 1.0 / max(limits.activation_budget_bytes, 1.0)  # memory rows in units of the budget
    m = LinearModel()
    v = MilpVars()
    decidable = [i for i, c in enumerate(cands) if not c.fixed]

    def row(lb: float, ub: float, *parts) -> None:
        """lb <= sum of parts <= ub; a part is (column, coef) or a float constant (moved to the bounds)."""
        terms: dict[int, float] = {}
        const = 0.0
        for part in parts:
            if isinstance(part, tuple):
                terms[part[0]] = terms.get(part[0], 0.0) + part[1]
            else:
                const += part
        m.add_row(terms, lb - const, ub - const)

    for i in decidable:
        c = cands[i]
        v.keep[i] = m.add_var(f"keep_{i}", integer=True)
        v.rec[i] = m.add_var(f"rec_{i}", ub=1.0 if (c.recomputable and limits.allow_recompute) else 0.0, integer=True)
        v.page[i] = m.add_var(f"page_{i}", ub=1.0 if (c.pageable and limits.allow_page) else 0.0, integer=True)
        row(1.0, 1.0, (v.keep[i], 1.0), (v.rec[i], 1.0), (v.page[i], 1.0))
        if c.state:
            continue  # no gap, no stage: its rows are in memory_rows
        if c.pageable and limits.allow_page:
            for j in range(len(c.inner)):
                v.drop[(i, j)] = m.add_var(f"drop_{i}_{j}", integer=True)
                row(-INF, 0.0, (v.drop[(i, j)], 1.0), (v.page[i], -1.0))
        has_events = c.recomputable and limits.allow_recompute and c.transient_bytes > 0 and c.group < 0
        for k in range(stage_idx[c.first_stage], stage_idx[c.first_after_gap]):
            v.y[(i, k)] = m.add_var(f"y_{i}_{k}", integer=has_events)
        for k in range(stage_idx[c.first_stage], stage_idx[c.first_after_gap] - 1):
            row(0.0, INF, (v.y[(i, k + 1)], 1.0), (v.y[(i, k)], -1.0))

    def Y(i: int, k: int, sign: float = 1.0) -> tuple:  # noqa: N802  (resident-by-stage-k, see module docstring)
        """sign * Y[i,k] as row parts."""
        c = cands[i]
        if k == stage_idx[c.first_after_gap]:
            return (sign, (v.keep[i], -sign))
        if (i, k) in v.y:
            return ((v.y[(i, k)], sign),)
        return ()

    for u in decidable:
        c = cands[u]
        if not c.recomputable or not limits.allow_recompute:
            continue
        for s in c.reads_state:  # a recompute reads a resident parameter
            row(-INF, 1.0, (v.rec[u], 1.0), (v.page[s], 1.0))
        for b in c.boundary:
            t = cands[b]
            for p in range(t.last_read + 1, c.first_after_gap + 1):  # read after b's own last reader: b stays resident
                if (b, p) not in v.ext:
                    v.ext[(b, p)] = m.add_var(f"ext_{b}_{p}")
                row(0.0, INF, (v.ext[(b, p)], 1.0), (v.rec[u], -1.0))
        if c.group >= 0:
            continue  # materialization and events per group, below
        for b in c.boundary:
            t = cands[b]
            if not t.fixed:  # wherever u is materialized in b's gap, b is too
                lo = max(stage_idx[c.first_stage], stage_idx[t.first_stage])
                hi = min(stage_idx[c.first_after_gap], stage_idx[t.first_after_gap] - 1)
                for k in range(lo, hi + 1):
                    row(0.0, INF, (v.y[(b, k)], 1.0), *Y(u, k, -1.0), (v.page[u], 1.0), (v.keep[b], 1.0))
        if c.transient_bytes > 0:
            for k in range(stage_idx[c.first_stage], stage_idx[c.first_after_gap] + 1):
                v.tau[(u, k)] = m.add_var(f"tau_{u}_{k}")
                prev = Y(u, k - 1) if k > stage_idx[c.first_stage] else ()
                row(0.0, INF, (v.tau[(u, k)], 1.0), *Y(u, k, -1.0), *prev, (v.page[u], 1.0))

    # groups (a multi-output producer): z[g,k] = the producer has rerun by stage k; one run, one cost
    if limits.allow_recompute:
        for g, members in enumerate(problem.groups):
            first_k = stage_idx[cands[members[0]].first_stage]  # shared by the group
            last_k = max(stage_idx[cands[i].first_after_gap] for i in members)
            v.run[g] = m.add_var(f"run_{g}")
            for k in range(first_k, last_k + 1):
                v.z[(g, k)] = m.add_var(f"z_{g}_{k}", integer=True)
                if k > first_k:
                    row(0.0, INF, (v.z[(g, k)], 1.0), (v.z[(g, k - 1)], -1.0))
            for i in members:
                row(0.0, INF, (v.run[g], 1.0), (v.rec[i], -1.0))
                for k in range(first_k, stage_idx[cands[i].first_after_gap] + 1):
                    # any member recomputed (or pulled early as a boundary) by stage k reran the producer
                    row(0.0, INF, (v.z[(g, k)], 1.0), *Y(i, k, -1.0), (v.page[i], 1.0))
                    if k < stage_idx[cands[i].first_after_gap]:  # ... which materialized every recomputed member
                        row(-1.0, INF, (v.y[(i, k)], 1.0), (v.z[(g, k)], -1.0), (v.rec[i], -1.0))
            for b in cands[members[0]].boundary:
                t = cands[b]
                if not t.fixed:
                    for k in range(max(first_k, stage_idx[t.first_stage]), min(last_k, stage_idx[t.first_after_gap] - 1) + 1):
                        row(0.0, INF, (v.y[(b, k)], 1.0), (v.z[(g, k)], -1.0), (v.keep[b], 1.0))
            for k in range(first_k, last_k + 1):
                v.gtau[(g, k)] = m.add_var(f"gtau_{g}_{k}")
                prev = ((v.z[(g, k - 1)], 1.0),) if k > first_k else ()
                row(0.0, INF, (v.gtau[(g, k)], 1.0), (v.z[(g, k)], -1.0), *prev)
                for i in members:  # written by the run but not recomputed: held to the step's end
                    v.w[(i, k)] = m.add_var(f"w_{i}_{k}")
                    row(0.0, INF, (v.w[(i, k)], 1.0), (v.z[(g, k)], -1.0), (v.rec[i], 1.0))

    for (i, j), col in v.drop.items():  # a recompute that may read it there
        for u in cands[i].inner_conflicts[j]:
            if u in v.rec:
                row(-INF, 1.0, (col, 1.0), (v.rec[u], 1.0))

    held_rows(problem, limits, m, v, decidable, row)

    if limits.overlap is not None:  # issue #19: asynchronous windows and the storage channel
        overlap_rows.add_windows(problem, limits.overlap, m, v, limits.allow_page)

    # memory rows
    decidable_rows = memory_rows(problem, v)
    rows: dict[tuple, float] = {}
    budget = limits.milp_budget_bytes(sum(1 for i in decidable if cands[i].pageable and not cands[i].state))  # Spill handles
    for c0, row_terms in decidable_rows:
        key = tuple(sorted(row_terms.items()))
        if c0 + sum(b for b in row_terms.values() if b > 0) <= budget:
            continue  # cannot bind
        rows[key] = max(rows.get(key, -1.0), float(c0))
    for key, c0 in sorted(rows.items(), key=lambda kv: kv[1]):
        m.add_row({v.var(name): coef * scale for name, coef in key}, -INF, (budget - c0) * scale)

    # deadline, flash, objective
    def overhead(rec_cost, alias_cost, page_cost, repage_cost) -> dict[int, float]:
        terms: dict[int, float] = {}

        def add(col: int, coef: float) -> None:
            terms[col] = terms.get(col, 0.0) + coef
        for i in decidable:
            add(v.page[i], page_cost(cands[i]))
            add(v.rec[i], alias_cost(cands[i]))
            if cands[i].group not in v.run:  # a group's producer reruns once for all its recomputed members
                add(v.rec[i], rec_cost(cands[i]))
        for (i, _), col in v.drop.items():
            add(col, repage_cost(cands[i]))
        for g, col in v.run.items():
            add(col, rec_cost(cands[problem.groups[g][0]]))
        return terms

    overhead_time = overhead(lambda c: c.rec_time_s, lambda c: c.alias_time_s, lambda c: c.page_time_s,
                             lambda c: c.repage_time_s)
    overhead_time.update(overlap_rows.cost_terms(v, "time"))  # (no windows: nothing)
    m.add_row(overhead_time, -INF, max(limits.overhead_time_s, 0.0))
    spillable = [i for i in decidable if not cands[i].state]  # paged state lives in the state directory
    if limits.flash_bytes < sum(cands[i].nbytes for i in spillable):
        m.add_row({v.page[i]: cands[i].nbytes / max(limits.flash_bytes, 1.0) for i in spillable}, -INF, 1.0)
    if limits.objective == "time":
        m.obj = overhead_time
    else:
        m.obj = overhead(lambda c: c.rec_energy_j, lambda c: c.alias_energy_j, lambda c: c.page_energy_j,
                         lambda c: c.repage_energy_j)
        m.obj.update(overlap_rows.cost_terms(v, "energy"))
    return m, v


def memory_rows(problem: Problem, v: MilpVars) -> list[tuple[float, dict[tuple, float]]]:
    """The memory rows before budget and deduplication: (constant bytes, {variable key: bytes}), one
    per position (while its op runs), then one per stage (while the regeneration steps before the
    stage's op run). Spill handles are left out (build_model reserves them globally)."""
    cands = problem.candidates
    stages = problem.stages
    const = problem.const_bytes.copy()
    terms: list[dict] = [dict() for _ in range(problem.positions)]
    stage_at = (np.searchsorted(stages, np.arange(problem.positions), side="right") - 1).tolist()
    for i in v.keep:
        c = cands[i]
        if c.state:  # resident everywhere in const; paged, only over its groups (its copy), plus its token
            for p, delta in enumerate(state_delta(problem, i).tolist()):
                terms[p][("page", i)] = delta
            continue
        const[c.prod: c.last_before_gap + 1] += c.mem_bytes
        const[c.first_after_gap: c.last_read + 1] += c.mem_bytes
        for p in range(c.last_before_gap + 1, c.first_after_gap):
            terms[p][("keep", i)] = c.mem_bytes
            k = stage_at[p]
            if k >= 0 and (i, k) in v.y:
                terms[p][("y", i, k)] = c.mem_bytes
    for (b, p) in v.ext:
        terms[p][("ext", b, p)] = cands[b].mem_bytes
    for (i, j) in v.drop:
        a, b = cands[i].inner[j]
        for p in range(a + 1, b):
            terms[p][("drop", i, j)] = -cands[i].mem_bytes
    for i in v.keep:  # held to the step's end before the gap's stages (the stages' own: v.held)
        c = cands[i]
        if c.state:
            continue
        if c.gap_held_bytes:  # the object of the in-place op it dies at, unless kept
            const[c.last_before_gap: c.first_after_gap] += c.gap_held_bytes
            for p in range(c.last_before_gap, c.first_after_gap):
                terms[p][("keep", i)] = terms[p].get(("keep", i), 0.0) - c.gap_held_bytes
        if c.orig_held_bytes and c.last_before_gap + 1 < c.first_after_gap:  # kept or recomputed: the original
            const[c.last_before_gap + 1: c.first_after_gap] += c.mem_bytes
            for p in range(c.last_before_gap + 1, c.first_after_gap):
                terms[p][("keep", i)] = terms[p].get(("keep", i), 0.0) - c.mem_bytes
                terms[p][("page", i)] = terms[p].get(("page", i), 0.0) - c.mem_bytes
                if terms[p][("keep", i)] == 0.0:
                    del terms[p][("keep", i)]
    if v.bk:
        bk_max = bookkeeping_max(problem)
        for t in terms:
            t[("bk", 0)] = bk_max
    for p, k in enumerate(stage_at):
        if k in v.held:
            terms[p][("held", k)] = v.held_max[k]
    pre_const = problem.pre_const_bytes + (const - problem.const_bytes)[stages]
    pre_terms: list[dict] = [dict(terms[p]) for p in stages]
    for (u, k) in v.tau:
        pre_terms[k][("tau", u, k)] = cands[u].transient_bytes
    for (g, k) in v.gtau:
        pre_terms[k][("gtau", g, k)] = cands[problem.groups[g][0]].transient_bytes
    overlap_rows.memory_terms(problem, v, terms, pre_terms)  # issue #19: staging buffers of the windows
    return list(zip(map(float, const), terms)) + list(zip(map(float, pre_const), pre_terms))


def start_values(problem: Problem, v: MilpVars, choice: list[Decision], ev: LinearEval,
                 repage: dict[int, list[int]] | None = None) -> list[tuple[int, float]]:
    """A complete start: (column, value) for every column of the model."""
    cands = problem.candidates
    start = []
    for i in v.keep:
        start += [(v.keep[i], float(choice[i] is Decision.KEEP)), (v.rec[i], float(choice[i] is Decision.RECOMPUTE)),
                  (v.page[i], float(choice[i] is Decision.PAGE))]
    start += [(col, ev.y.get(key, 0.0)) for key, col in v.y.items()]
    start += [(col, ev.tau.get(key, 0.0)) for key, col in v.tau.items()]
    start += [(col, ev.ext.get(key, 0.0)) for key, col in v.ext.items()]
    start += [(col, float(j in (repage or {}).get(i, ()))) for (i, j), col in v.drop.items()]
    start += [(col, 0.0) for col in v.win.values()]  # every transfer blocking
    at = ev.group_stage
    start += [(col, float(g in at)) for g, col in v.run.items()]
    start += [(col, float(g in at and k >= at[g])) for (g, k), col in v.z.items()]
    start += [(col, float(at.get(g) == k)) for (g, k), col in v.gtau.items()]
    start += [(col, float(cands[i].group in at and k >= at[cands[i].group] and choice[i] is not Decision.RECOMPUTE))
              for (i, k), col in v.w.items()]
    start += [(col, float(choice[u] is Decision.RECOMPUTE and ev.y.get((u, k), 0.0) > 0.5)) for (u, k), col in v.h.items()]
    start += [(col, float(any(choice[i] is Decision.PAGE for i in v.keep if cands[i].state)))
              for col in v.state_session.values()]
    # the frame and held columns at the least value their rows allow
    value = dict(start)
    for k, col in v.held.items():
        c0, terms = v.held_rows[k]
        start.append((col, max(0.0, (c0 + sum(coef * value[j] for j, coef in terms)) / v.held_max[k])))
    if v.bk:
        c0, terms = v.held_rows[-1]
        start.append((v.bk[0], max(0.0, (c0 + sum(coef * value[j] for j, coef in terms)) / bookkeeping_max(problem))))
    return start


def held_rows(problem: Problem, limits: Limits, m: LinearModel, v: MilpVars, decidable: list[int], row) -> None:
    """ONNX Runtime's bookkeeping the decisions add (problem.decision_bookkeeping, held_profile):
    - the execution frame's values, allocated at the step's start: one column v.bk, in every memory row,
      >= sum rec_i * (own values) + (rec_i outside a group, run_g for a group) * (chain values)
      + page_i * (page values);
    - the bytes held to the step's end from a stage on: one column v.held[k] per stage, in the memory
      rows of the positions from stage k up to the next stage, >= the sum of
        (1 - keep_i) * (gap_held + fb_held) and rec_i * orig_held  for i past its gap (fb(i) <= stage k),
        run_held_u * h[u,k] (h[u,k] >= y[u,k] - page_u) before u's own stage, run_held_u * rec_u from it,
        for a group g: run_held_g * z[g,k] + sum m_i * w[i,k] (z, w at the group's last stage after it).
    Before a candidate's first stage its gap_held and orig_held bytes are in its gap rows (memory_rows).
    v.held_rows keeps each definition, {-1: the frame's}, as (constant, [(column, coef)]): the least
    value of the column is (constant + sum coef * x) / scale."""
    cands = problem.candidates
    stages = problem.stages
    stage_idx = {s: k for k, s in enumerate(stages)}
    rec_ok = limits.allow_recompute
    frame_terms: dict[int, float] = {}
    for i in decidable:
        c = cands[i]
        if c.page_frame_bytes:
            frame_terms[v.page[i]] = frame_terms.get(v.page[i], 0.0) + c.page_frame_bytes
        if rec_ok and c.recomputable:
            own = c.rec_own_frame_bytes + (c.rec_frame_bytes if c.group < 0 or c.group not in v.run else 0)
            frame_terms[v.rec[i]] = frame_terms.get(v.rec[i], 0.0) + own
    for g, col in v.run.items():
        frame_terms[col] = float(cands[problem.groups[g][0]].rec_frame_bytes)
    state = [i for i in decidable if cands[i].state and cands[i].pageable and limits.allow_page]
    if state and problem.state_session_bytes:  # any paged state: the step runs as a StateSession
        v.state_session[0] = m.add_var("state_session", lb=0.0, ub=1.0)
        for i in state:
            row(0.0, INF, (v.state_session[0], 1.0), (v.page[i], -1.0))
        frame_terms[v.state_session[0]] = float(problem.state_session_bytes)
    frame_terms = {j: coef for j, coef in frame_terms.items() if coef}
    bk_max = bookkeeping_max(problem)
    if frame_terms and bk_max > 0:
        v.bk[0] = m.add_var("bookkeeping", lb=0.0, ub=1.0)
        row(0.0, INF, (v.bk[0], bk_max), *[(j, -coef) for j, coef in frame_terms.items()])
        v.held_rows[-1] = (0.0, sorted(frame_terms.items()))

    per_stage: list[dict[int, float]] = [dict() for _ in stages]
    consts = [0.0] * len(stages)
    top = [0.0] * len(stages)  # the largest value (every term at its largest)

    def add(k: int, col: int, coef: float) -> None:
        per_stage[k][col] = per_stage[k].get(col, 0.0) + coef

    for i in decidable:
        c = cands[i]
        if c.state:
            continue
        fb = stage_idx[c.first_after_gap]
        either = c.gap_held_bytes + c.fb_held_bytes
        orig = c.orig_held_bytes if rec_ok and c.recomputable else 0
        run = c.run_held_bytes if rec_ok and c.recomputable and c.group < 0 else 0
        if run:
            for k in range(stage_idx[c.first_stage], fb):
                v.h[(i, k)] = m.add_var(f"h_{i}_{k}")
                row(0.0, INF, (v.h[(i, k)], 1.0), (v.y[(i, k)], -1.0), (v.page[i], 1.0))
                add(k, v.h[(i, k)], float(run))
                top[k] += run
        for k in range(fb, len(stages)):
            if either:
                consts[k] += either
                add(k, v.keep[i], -float(either))
            if orig + run:
                add(k, v.rec[i], float(orig + run))
            top[k] += either + orig + run
    for g, members in enumerate(problem.groups):
        if g not in v.run:
            continue
        ks = sorted(k for (gg, k) in v.z if gg == g)
        held_g = cands[members[0]].run_held_bytes
        for k in range(ks[0], len(stages)):
            at = min(k, ks[-1])
            if held_g:
                add(k, v.z[(g, at)], float(held_g))
            for i in members:
                add(k, v.w[(i, at)], float(cands[i].mem_bytes))
            top[k] += held_g + sum(cands[i].mem_bytes for i in members)
    for k, terms in enumerate(per_stage):
        terms = {j: coef for j, coef in terms.items() if coef}
        if top[k] <= 0 or not terms:
            continue
        v.held[k] = m.add_var(f"held_{k}", lb=0.0, ub=1.0)
        v.held_max[k] = top[k]
        row(0.0, INF, (v.held[k], top[k]), -consts[k], *[(j, -coef) for j, coef in terms.items()])
        v.held_rows[k] = (consts[k], sorted(terms.items()))


def bookkeeping_max(problem: Problem) -> float:
    """The most execution-frame values any decisions add (the bookkeeping column's scale)."""
    return float(problem.state_session_bytes + sum(max(c.rec_frame_bytes + c.rec_own_frame_bytes, c.page_frame_bytes)
                                                   for c in problem.candidates if not c.fixed))


def read_choice(problem: Problem, v: MilpVars, x) -> list[Decision]:
    """The decision vector of solution x (values by column)."""
    choice = [Decision.KEEP] * len(problem.candidates)
    for i in v.keep:
        if x[v.rec[i]] > 0.5:
            choice[i] = Decision.RECOMPUTE
        elif x[v.page[i]] > 0.5:
            choice[i] = Decision.PAGE
    return choice


def read_repage(v: MilpVars, choice: list[Decision], x) -> dict[int, list[int]]:
    """{PAGE candidate: indices into its `inner`} it is dropped across and paged in again."""
    repage: dict[int, list[int]] = {}
    for (i, j), col in sorted(v.drop.items()):
        if choice[i] is Decision.PAGE and x[col] > 0.5:
            repage.setdefault(i, []).append(j)
    return repage


def read_early(problem: Problem, v: MilpVars, choice: list[Decision], x) -> dict[int, int]:
    """{candidate: stage index} for regenerated candidates the solution materializes before their own
    stage (y = 1 earlier): whether a dependent's recompute pulls them there or the solver chose to,
    the schedule regenerates them there (Schedule.regenerate_at), which is what the rows counted.
    A continuous y may sit anywhere between its least value and 1 where no row binds: only y = 1 is
    read as early (a fractional y was counted in the rows as a fraction of the tensor, which no
    schedule has; its least value, 0 here, is what a schedule can realise)."""
    early: dict[int, int] = {}
    for (i, k), col in sorted(v.y.items()):
        if choice[i] is not Decision.KEEP and i not in early and x[col] > 1.0 - 1e-3:
            early[i] = k
    return early
