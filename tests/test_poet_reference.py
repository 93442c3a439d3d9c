"""poetc's collapsed MILP against a direct implementation of POET's per-(stage, node) MILP
(benchmarks.poet_reference) on tiny graphs, with the same rpi4 costs and limits."""

import pytest

from poetc.ir.graph import Role
from poetc.schedule import Decision
from benchmarks import poet_reference as pr
from poetc.plan import Budget, Limits
from poetc.solver.strategies import evaluate_choice, run_strategy

TINY = {"chain2": ("chain", 2), "chain3": ("chain", 3), "residual": ("residual", 2)}
BUDGETS = (0.9, 0.75, 0.6)
DEADLINE = 1.3
# Not a limit any assertion relies on: every instance here solves to a proof (optimal or infeasible) in
# HiGHS's deterministic single-threaded, seeded branch and bound, so the outcome is the same at any
# speed; only how long it takes differs (the POET MILP of the residual at 80% took 75 s on a 2-core
# machine running other jobs, where the 60 s limit this replaces made the test fail with FEASIBLE).
# The guard only turns a hang into a failure.
TIME_LIMIT_S = 3600.0


@pytest.fixture(scope="module")
def tiny_problems(tmp_path_factory):
    out = {}
    for name, (kind, layers) in TINY.items():
        work = tmp_path_factory.mktemp(name)
        out[name] = pr.load_problem(pr.tiny_onnx(kind, work / "model.onnx", layers=layers), work / "import")
    return out


def _solve_both(problem, frac, variant):
    rows = pr.compare_problem("g", problem, [frac], deadline_factor=DEADLINE, time_limit_s=TIME_LIMIT_S,
                              variants=(variant,))
    return rows[0]


@pytest.mark.parametrize("name", sorted(TINY))
def test_keep_all_memory_agrees(tiny_problems, name):
    """On these graphs Checkmate's accounting and poetc's simulator agree on keep-all memory, up to the
    bytes POET does not model (graph outputs kept to the end of the step)."""
    problem = tiny_problems[name]
    inst = pr.instance_from_graph(problem.graph, problem.costs)
    poet_peak = pr.checkmate_peak_bytes(inst, *pr.keep_all_schedule(inst))
    assert 0 <= problem.keep_all_peak_bytes - poet_peak <= pr.unmodelled_bytes(problem)


@pytest.mark.parametrize("frac", BUDGETS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_poetc_equal_or_better_than_poet(tiny_problems, name, frac):
    """Against POET restricted to decisions about forward nodes: both solve to a proof (optimal or
    infeasible, no time-outs, no heuristic fallback); wherever POET finds a schedule poetc does, no
    worse; where only poetc does, it uses what that restriction rules out (a decision about a
    gradient) or pages a tensor in again."""
    row = _solve_both(tiny_problems[name], frac, "poet-fwd")
    assert row.poet_status in ("optimal", "infeasible"), row
    assert row.poetc_status in ("optimal", "infeasible"), row
    if row.poet_status != "infeasible":
        assert row.poetc_fits, row
    elif row.poetc_fits:
        problem = tiny_problems[name]
        budget = Budget.activations_only(row.activation_budget_bytes)
        limits = Limits.of(budget, problem.base_time_s * (DEADLINE - 1.0), 1e15)
        ours = run_strategy(problem, limits, "poet", time_limit_s=TIME_LIMIT_S)
        gradients = {c.name for c in problem.candidates if c.gradient}
        assert ours.fits and (set(ours.schedule.decisions) & gradients or ours.schedule.repage_at), row
    if row.poetc_fits and row.poet_status != "infeasible":
        assert row.poetc_objective_j <= row.poet_objective_j * (1 + 1e-6) + 1e-12, row
        # POET's choice, read per tensor, replays in poetc's simulator at the same cost
        assert row.mapped_fits and row.mapped_objective_j == pytest.approx(row.poet_objective_j, rel=1e-6)


def test_both_really_solve_a_nontrivial_instance(tiny_problems):
    """Cannot pass vacuously: both solvers prove optimality of a schedule that pays an overhead, POET's
    solution checks out independently of the solver, and the two optima are equal."""
    problem = tiny_problems["chain3"]
    frac = 0.75
    budget = int(problem.keep_all_peak_bytes * frac)
    limits = Limits.of(Budget.activations_only(budget), problem.base_time_s * (DEADLINE - 1.0), 1e15)
    ours = run_strategy(problem, limits, "poet", time_limit_s=TIME_LIMIT_S)
    assert ours.status == "optimal" and ours.fits, ours.notes
    assert any(d is not Decision.KEEP for d in ours.choice) and ours.overhead_energy_j > 0

    inst = pr.instance_from_graph(problem.graph, problem.costs)
    ref_budget = budget - pr.unmodelled_bytes(problem)
    sol = pr.solve_poet(inst, ref_budget, limits.overhead_time_s, time_limit_s=TIME_LIMIT_S, decide_backward=False)
    assert sol.status == "optimal", sol.message
    assert sol.num_int_vars > 1000  # the per-(stage, node) program, not a collapsed one
    assert pr.checkmate_peak_bytes(inst, sol.R, sol.S_ram) <= ref_budget
    assert pr.overhead_energy(inst, sol.R, sol.M_in, sol.M_out) == pytest.approx(sol.objective_j, rel=1e-9)
    assert sol.overhead_time_s <= limits.overhead_time_s * (1 + 1e-9)
    assert pr.describe(inst, sol)  # it did page or recompute something
    assert ours.overhead_energy_j == pytest.approx(sol.objective_j, rel=1e-6)
    mapped = pr.map_to_decisions(problem, sol)
    assert not mapped.outside_policy
    replay = evaluate_choice(problem, "poet-reference", mapped.choice, limits, sol.status)
    assert replay.fits and replay.overhead_energy_j == pytest.approx(sol.objective_j, rel=1e-6)


def test_faithful_poet_on_a_chain_matches_poetc(tiny_problems):
    row = _solve_both(tiny_problems["chain2"], 0.9, "poet")
    assert row.poet_status == "optimal" and row.poetc_status == "optimal"
    assert row.poetc_objective_j == pytest.approx(row.poet_objective_j, rel=1e-6)


@pytest.fixture(scope="module")
def cnn_b2(tmp_path_factory):
    import models
    work = tmp_path_factory.mktemp("cnn-b2")
    return pr.load_problem(models.export_onnx("cnn", work / "model.onnx", batch=2, seed=0), work / "import")


@pytest.mark.parametrize("frac", (0.9, 0.8))
def test_faithful_poet_on_the_cnn_matches_poetc(cnn_b2, frac):
    """MaxPool (output, mask) and BatchNorm (output, statistics) have several saved outputs. POET reruns
    such a node once for all of them, and so does poetc (one run per group). Until ONNX Runtime's
    bookkeeping was modelled (issue #15) the optima agreed (when poetc reran the op once per recomputed
    output, its optimum was 13-23% above POET's). POET's accounting has no term for what ONNX Runtime
    holds because of a decision -- a recomputed BatchNorm's unread output and statistics are kept to the
    step's end -- so its optimum here no longer fits in poetc's simulator; poetc's fits and costs more.
    Where POET's schedule does fit, poetc is never worse."""
    row = _solve_both(cnn_b2, frac, "poet")
    assert row.poet_status == "optimal" and row.poetc_status == "optimal", row
    assert row.poetc_objective_j > 0
    assert row.mapped_fits is not None, row
    if row.mapped_fits:
        assert row.poetc_objective_j <= row.mapped_objective_j * (1 + 1e-3), row
    else:
        assert row.poetc_objective_j >= row.poet_objective_j * (1 - 1e-3), row


def _residual_both(problem, frac):
    budget = int(problem.keep_all_peak_bytes * frac)
    limits = Limits.of(Budget.activations_only(budget), problem.base_time_s * (DEADLINE - 1.0), 1e15)
    ours = run_strategy(problem, limits, "poet", time_limit_s=TIME_LIMIT_S)
    inst = pr.instance_from_graph(problem.graph, problem.costs)
    sol = pr.solve_poet(inst, budget - pr.unmodelled_bytes(problem), limits.overhead_time_s,
                        time_limit_s=TIME_LIMIT_S)
    return ours, inst, sol


def test_faithful_poet_on_the_residual_matches_poetc_which_recomputes_a_gradient(tiny_problems):
    """The skip-connection gradient lives across the backward pass of the block. POET drops it and
    recomputes it before the skip's Add; poetc decides about such gradients too and finds the same
    optimum (before, it could only page a forward activation: 26% more energy)."""
    problem = tiny_problems["residual"]
    ours, inst, sol = _residual_both(problem, 0.9)
    assert ours.status == "optimal" and sol.status == "optimal", sol.message
    assert ours.fits and ours.overhead_energy_j > 0
    assert ours.overhead_energy_j == pytest.approx(sol.objective_j, rel=1e-6)
    backward = {i for i, op in enumerate(problem.graph.ops) if op.role is not Role.FORWARD and op.role is not Role.LOSS}
    assert any(sol.R[t, i] for i in backward for t in range(i + 1, inst.n)), pr.describe(inst, sol)
    gradients = {c.name for c in problem.candidates if c.gradient}
    assert {n for n, d in ours.schedule.decisions.items() if d is Decision.RECOMPUTE} <= gradients
    assert ours.schedule.decisions


def test_poetc_pages_a_tensor_in_twice_on_the_residual_as_poet_does(tiny_problems):
    """At 80% POET pages relu0 out once and in twice, for its two backward readers far apart,
    dropping it in between; poetc can do the same (Schedule.repage_at). POET's optimum, read as
    poetc decisions, maps without actions outside poetc's policy other than recomputing a zero-byte
    Identity, and replays in poetc's simulator at POET's cost; poetc's own optimum is no worse.
    (It is lower, 5.30 vs 7.78 mJ: it keeps relu1, peaking 240 bytes under the budget, inside the
    656 bytes POET's accounting does not model and the comparison takes off POET's budget.)"""
    problem = tiny_problems["residual"]
    ours, inst, sol = _residual_both(problem, 0.8)
    assert sol.status == "optimal", sol.message
    assert any(sol.M_in[:, i].sum() >= 2 for i in range(inst.n)), pr.describe(inst, sol)
    assert ours.status == "optimal" and ours.fits, ours.notes
    assert ours.schedule.repage_at == {"relu0_out": [problem.candidates[
        next(i for i, c in enumerate(problem.candidates) if c.name == "relu0_out")].inner[0][1]]}
    assert 0 < ours.overhead_energy_j <= sol.objective_j * (1 + 1e-6)
    mapped = pr.map_to_decisions(problem, sol)
    assert mapped.repage and all(x.startswith("recompute add_Grad/Identity") for x in mapped.outside_policy), mapped
    budget = Budget.activations_only(int(problem.keep_all_peak_bytes * 0.8))
    limits = Limits.of(budget, problem.base_time_s * (DEADLINE - 1.0), 1e15)
    replay = evaluate_choice(problem, "poet-reference", mapped.choice, limits, sol.status, repage=mapped.repage)
    assert replay.fits and replay.overhead_energy_j == pytest.approx(sol.objective_j, rel=1e-6)
