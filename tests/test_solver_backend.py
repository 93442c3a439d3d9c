"""The solver back end (issue #18): the array-built MILP on HiGHS and CBC, the hard time limit,
and the warm-start time budget. No test here depends on the machine's speed: time limits are far
from what the children would need, so the asserted outcome holds however slow the machine is."""

import time

import numpy as np
import pytest

from poetc.schedule import Decision
from poetc.solver import Limits, build_problem
from poetc.solver.backend import solve_in_child
from poetc.solver.formulation import LinearModel, build_model
from poetc.solver.strategies import greedy, solve_milp

from test_solver import costs_for


def _knapsack() -> LinearModel:
    """max 5a + 4b + 3c s.t. 2a + 3b + c <= 4, binaries (as a minimization): optimum a = c = 1, -8."""
    m = LinearModel()
    a, b, c = (m.add_var(n, integer=True) for n in "abc")
    m.add_row({a: 2.0, b: 3.0, c: 1.0}, ub=4.0)
    m.obj = {a: -5.0, b: -4.0, c: -3.0}
    return m


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_linear_model_solves_on_both_solvers(solver):
    def build():
        return _knapsack(), None, lambda x: [round(v) for v in x]
    report = solve_in_child(build, solver=solver, time_limit_s=60, t0=time.perf_counter())
    assert report.status == "OPTIMAL", report.error
    assert report.payload == [1, 0, 1]
    assert report.objective == pytest.approx(-8.0)
    assert report.bound == pytest.approx(-8.0, abs=1e-6)
    assert not report.killed and not report.from_start


def test_the_time_limit_is_hard_and_keeps_the_incumbent():
    """A child that overruns (here: a model build that would take 10 minutes) is stopped at the
    limit; the caller gets the incumbent it passed in, marked as such."""
    def build():
        time.sleep(600)
    t0 = time.perf_counter()
    report = solve_in_child(build, solver="highs", time_limit_s=1.0, t0=t0, incumbent=("start", 3.0))
    elapsed = time.perf_counter() - t0
    assert elapsed < 60  # stopped near 1 s, nowhere near the child's 600 s
    assert report.killed and report.from_start
    assert report.payload == "start" and report.objective == 3.0 and report.bound is None


def test_a_child_error_is_reported():
    def build():
        raise ValueError("broken build")
    report = solve_in_child(build, solver="highs", time_limit_s=60, t0=time.perf_counter())
    assert report.status == "ERROR" and "broken build" in report.error


def test_greedy_past_its_deadline_gives_no_start(cnn_graph):
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.8, problem.base_time_s * 5, 1e12)
    choice = greedy(problem, limits)
    assert choice is not None and any(d is not Decision.KEEP for d in choice)  # it has work to do
    assert greedy(problem, limits, deadline=time.perf_counter() - 1.0) is None


def test_highs_and_cbc_agree_on_the_optimum(cnn_graph):
    """The same array-built MILP, through highspy and through python-mip's CBC, proves the same optimum."""
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.6, problem.base_time_s * 5, 1e12)
    results = {s: solve_milp(problem, limits, "poet", time_limit_s=60, solver=s) for s in ("highs", "cbc")}
    for s, r in results.items():
        assert r.status == "optimal", (s, r.notes)
        assert r.fits
    assert results["highs"].overhead_energy_j == pytest.approx(results["cbc"].overhead_energy_j, rel=2e-4)


def test_milp_model_is_pure(cnn_graph):
    """Same problem and limits: the same arrays, column for column and row for row."""
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.5, problem.base_time_s * 5, 1e12)
    (m1, _), (m2, _) = build_model(problem, limits), build_model(problem, limits)
    assert m1.num_rows == m2.num_rows and m1.num_cols == m2.num_cols and m1.num_int > 0
    assert m1.row_index == m2.row_index and np.array_equal(m1.row_value, m2.row_value)
    assert m1.obj == m2.obj and m1.row_ub == m2.row_ub


def test_the_start_is_never_lost(cnn_graph):
    """Whatever the solver does, solve_milp's schedule fits and costs at most the greedy start's."""
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.8, problem.base_time_s * 5, 1e12)
    start = greedy(problem, limits)
    r = solve_milp(problem, limits, "poet", time_limit_s=60)
    assert r.fits
    from poetc.solver.problem import evaluate_linear
    assert r.overhead_energy_j <= evaluate_linear(problem, start).energy_j * (1 + 1e-9) + 1e-15
    assert all(isinstance(d, Decision) for d in r.choice)


def test_a_worse_final_solution_never_replaces_the_start():
    """If the solver rejects the warm start and ends with a worse schedule of its own, the start stays."""
    def build():
        return _knapsack(), None, lambda x: [round(v) for v in x]
    report = solve_in_child(build, solver="highs", time_limit_s=60, t0=time.perf_counter(),
                            incumbent=("start", -9.0))  # better than the optimum the child finds (-8)
    assert report.payload == "start" and report.objective == -9.0 and report.from_start
    report = solve_in_child(build, solver="highs", time_limit_s=60, t0=time.perf_counter(),
                            incumbent=("start", -7.0))
    assert report.payload == [1, 0, 1] and not report.from_start


@pytest.mark.parametrize("limit", [0.5, 7.0, 60.0, 600.0])
def test_the_time_budget_sums_to_the_limit(limit):
    """solve_milp's phases: the solver child is killed at solver_s and the simulation after it has
    the rest, so the two sum to the limit; the warm starts end well before the child's share."""
    from poetc.solver.strategies import TimeBudget
    b = TimeBudget.of(limit)
    assert b.solver_s + b.simulation_s == pytest.approx(limit, rel=1e-12)
    assert 0 < b.simulation_s <= 0.02 * limit + 1e-12 and b.simulation_s <= 1.0
    assert b.local_search_s <= b.warm_start_s < b.solver_s


@pytest.mark.parametrize("solver", ["highs", "highs-lns"])
def test_the_time_limit_is_passed_down_to_every_phase(cnn_graph, monkeypatch, solver):
    """The limit given to solve_milp reaches the warm starts and the solver child as TimeBudget says,
    all measured from one start time (the child's own hard stop is test_the_time_limit_is_hard_...)."""
    from poetc.solver import strategies
    from poetc.solver.strategies import TimeBudget
    seen = {"greedy": [], "start": [], "child": []}
    real_greedy, real_start, real_child = strategies.greedy, strategies.best_start, strategies.solve_in_child

    def spy_greedy(*args, deadline=None, **kw):
        seen["greedy"].append(deadline)
        return real_greedy(*args, deadline=deadline, **kw)

    def spy_start(problem, limits, greedy, *, deadline, search_s):
        seen["start"].append((deadline, search_s))
        return real_start(problem, limits, greedy, deadline=deadline, search_s=search_s)

    def spy_child(build, *, time_limit_s, t0, **kw):
        seen["child"].append((time_limit_s, t0))
        return real_child(build, time_limit_s=time_limit_s, t0=t0, **kw)
    monkeypatch.setattr(strategies, "greedy", spy_greedy)
    monkeypatch.setattr(strategies, "best_start", spy_start)
    monkeypatch.setattr(strategies, "solve_in_child", spy_child)
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.6, problem.base_time_s * 5, 1e12)
    b = TimeBudget.of(120.0)
    r = solve_milp(problem, limits, "poet", time_limit_s=120.0, solver=solver)
    assert r.fits
    [(child_limit, t0)] = seen["child"]
    assert child_limit == b.solver_s
    if solver == "highs-lns":
        assert seen["start"] == [(t0 + b.warm_start_s, b.local_search_s)]
        # best_start's plain rules stop early enough to leave page_first a fifth of what was left when they
        # started (at or after t0): their deadline lies in [t0 + 4/5 of the share, t0 + the share]
        assert seen["greedy"] and all(t0 + 0.8 * b.warm_start_s - 1e-9 <= d <= t0 + b.warm_start_s
                                      for d in seen["greedy"])
    else:
        assert seen["greedy"] and all(d == t0 + b.warm_start_s for d in seen["greedy"])
