"""The primal heuristics of --solver highs-lns (poetc/solver/heuristics.py): the local search and the
LNS never return anything worse than what they were given, and what they return is checked by the
simulator. No assertion depends on the machine's speed: the LNS windows have a wall-clock cap, so
how much they improve may vary, but never-worse and fits hold at any speed."""

import time
from dataclasses import replace

import numpy as np
import pytest

from poetc.schedule import Decision
from poetc.solver import Limits, build_problem
from poetc.solver.formulation import build_model, read_choice, read_early, read_repage, start_values
from poetc.solver.heuristics import best_start, lns_windows, local_search, objective_of, page_first, run_lns
from poetc.solver.problem import ProfileEvaluator, evaluate_linear
from poetc.solver.strategies import SOLVERS, evaluate_choice, greedy, solve_milp

from test_solver import costs_for


def _setup(graph, fraction):
    problem = build_problem(graph, costs_for(graph, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * fraction, problem.base_time_s * 5, 1e12)
    return problem, limits


def _greedy_start(problem, limits):
    starts = [s for s in (greedy(problem, limits, rule=r) for r in ("capuchin", "cheapest")) if s is not None]
    assert starts, "no greedy start fits: the fixture's budget is too tight for this test"
    return starts[0]


@pytest.mark.parametrize("fixture,fraction", [("cnn_graph", 0.9), ("cnn_graph", 0.8), ("bert_tiny_graph", 0.5),
                                              ("bert_tiny_graph", 0.7)])
def test_local_search_is_never_worse_and_fits(fixture, fraction, request):
    _, g = request.getfixturevalue(fixture)
    problem, limits = _setup(g, fraction)
    start = _greedy_start(problem, limits)
    evaluate = ProfileEvaluator(problem)
    improved = local_search(problem, limits, start)
    assert objective_of(limits, evaluate(improved)) <= objective_of(limits, evaluate(start))
    assert evaluate(improved).peak_bytes <= limits.activation_budget_bytes
    assert local_search(problem, limits, start) == improved  # deterministic without a deadline
    assert evaluate_choice(problem, "poet", improved, limits, "heuristic").fits


def test_local_search_finds_a_cheaper_schedule_than_a_wasteful_one(cnn_graph):
    """Everything recomputed or paged where keep-all fits: the search must give most of it back."""
    _, g = cnn_graph
    problem, limits = _setup(g, 1.0)
    wasteful = [Decision.PAGE if c.pageable and not c.fixed else Decision.KEEP for c in problem.candidates]
    assert any(d is Decision.PAGE for d in wasteful)
    evaluate = ProfileEvaluator(problem)
    improved = local_search(problem, limits, wasteful)
    assert objective_of(limits, evaluate(improved)) < objective_of(limits, evaluate(wasteful))


def test_best_start_is_the_best_plain_greedy_or_better(bert_tiny_graph):
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.5)
    evaluate = ProfileEvaluator(problem)
    start, notes = best_start(problem, limits, greedy)
    assert start is not None and notes
    plain = [greedy(problem, limits, rule=r) for r in ("cheapest", "capuchin")]
    best_plain = min(objective_of(limits, evaluate(s)) for s in plain if s is not None)
    assert objective_of(limits, evaluate(start)) <= best_plain


def test_lns_windows_cover_every_decidable_tensor(bert_tiny_graph):
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.5)
    model, v = build_model(problem, limits)
    spec = lns_windows(problem, v.keep, v.rec, v.page, window=10)
    covered = {col for w in spec.windows for col in w}
    assert covered == set(spec.decision_cols) == {c for i in v.keep for c in (v.keep[i], v.rec[i], v.page[i])}
    assert all(len(w) <= 30 for w in spec.windows)


@pytest.mark.parametrize("fixture,fraction", [("cnn_graph", 0.8), ("bert_tiny_graph", 0.5)])
def test_lns_is_never_worse_and_its_schedule_simulates_within_limits(fixture, fraction, request):
    _, g = request.getfixturevalue(fixture)
    problem, limits = _setup(g, fraction)
    start = _greedy_start(problem, limits)
    model, v = build_model(problem, limits)
    x0 = np.zeros(model.num_cols)
    for col, val in start_values(problem, v, start, evaluate_linear(problem, start)):
        x0[col] = val
    spec = lns_windows(problem, v.keep, v.rec, v.page, window=8)
    seen = []
    x = run_lns(model, model.objective_of, x0, spec, time.perf_counter() + 600,
                lambda xi, obj: seen.append(obj))
    assert model.objective_of(x) <= model.objective_of(x0) * (1 + 1e-9)
    assert seen == sorted(seen, reverse=True)  # every report is an improvement
    choice = read_choice(problem, v, x)
    result = evaluate_choice(problem, "poet", choice, limits, "feasible", read_early(problem, v, choice, x),
                             read_repage(v, choice, x))
    assert result.fits, result.notes


@pytest.mark.parametrize("concurrent", [True, False])
def test_highs_lns_solver_is_never_worse_than_its_start_and_reports_a_bound(bert_tiny_graph, monkeypatch, concurrent):
    """Both ways of getting the start: computed while the child builds the model (a core is free) or
    before the child starts."""
    from poetc.solver import strategies
    monkeypatch.setattr(strategies, "_a_core_is_free", lambda: concurrent)
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.5)
    start, _ = best_start(problem, limits, greedy)
    r = solve_milp(problem, limits, "poet", time_limit_s=60, solver="highs-lns")
    assert r.fits and r.status in ("optimal", "feasible"), r.notes
    assert r.bound is not None and r.gap is not None
    assert r.overhead_energy_j <= objective_of(limits, evaluate_linear(problem, start)) * (1 + 1e-6) + 1e-12


def test_cli_solver_choices_are_the_solvers():
    from poetc.cli import SOLVER_CHOICES
    assert set(SOLVER_CHOICES) == set(SOLVERS)


def test_the_scaling_sweep_has_the_corpus_and_bench_accepts_corpus_names():
    from models.corpus import CORPUS
    from poetc.bench import CORPUS_PREFIX, BenchConfig, _check_config, override
    from poetc.errors import UsageError
    config = BenchConfig.scaling()
    assert {CORPUS_PREFIX + n for n in CORPUS} <= set(config.models)
    _check_config(override(config, models=(CORPUS_PREFIX + "squeezenet",), solver="highs-lns"))
    with pytest.raises(UsageError, match="unknown model"):
        _check_config(override(config, models=(CORPUS_PREFIX + "no_such_model",)))
    with pytest.raises(UsageError, match="unknown solver"):
        _check_config(override(config, solver="gurobi"))


def test_highs_lns_reports_an_infeasible_relaxation_as_infeasible(bert_tiny_graph):
    """Far below the floor the LP relaxation is infeasible, which proves the MILP is: no waiting for
    the limit."""
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.01)
    r = solve_milp(problem, limits, "poet", time_limit_s=600, solver="highs-lns")
    assert r.status == "infeasible" and not r.fits
    assert any("the MILP is infeasible" in n for n in r.notes), r.notes


def test_highs_lns_proves_the_same_optimum_as_highs(cnn_graph):
    """Where the full MILP closes the gap, the LNS never runs and the result is the same optimum."""
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * 0.6, problem.base_time_s * 5, 1e12)
    results = {s: solve_milp(problem, limits, "poet", time_limit_s=120, solver=s) for s in ("highs", "highs-lns")}
    for s, r in results.items():
        assert r.status == "optimal" and r.fits, (s, r.notes)
    assert results["highs-lns"].overhead_energy_j == pytest.approx(results["highs"].overhead_energy_j, rel=2e-4)


def _relaxation(problem, limits):
    model, v = build_model(problem, limits)
    h = model.to_highs()
    h.setOptionValue("solve_relaxation", True)
    h.run()
    assert h.getModelStatus().name == "kOptimal"
    return model, v, h


@pytest.mark.parametrize("fixture,fraction", [("cnn_graph", 0.6), ("cnn_graph", 0.8), ("bert_tiny_graph", 0.3),
                                              ("bert_tiny_graph", 0.5)])
def test_branching_on_the_lp_gives_a_bound_between_the_lp_and_the_optimum(fixture, fraction, request):
    """bound.branch_bound (60 child LPs, a node limit) lies between the root LP and the optimum HiGHS
    proves, lifts the root LP on these instances, and leaves the model's column bounds as it found them."""
    from poetc.solver.bound import branch_bound
    _, g = request.getfixturevalue(fixture)
    problem, limits = _setup(g, fraction)
    model, v, h = _relaxation(problem, limits)
    lp = h.getInfo().objective_function_value
    spec = lns_windows(problem, v.keep, v.rec, v.page)
    bound = branch_bound(h, model.col_lb, model.col_ub, spec.triples, max_nodes=60,
                         deadline=time.perf_counter() + 3600)
    assert np.array_equal(h.getLp().col_upper_, model.col_ub) and np.array_equal(h.getLp().col_lower_, model.col_lb)
    r = solve_milp(problem, limits, "poet", time_limit_s=600, solver="highs")
    assert r.status == "optimal", r.notes
    assert lp < bound <= r.overhead_energy_j * (1 + 1e-6) + 1e-15


def test_rens_finds_a_schedule_near_the_lp_that_simulates_within_limits(bert_tiny_graph):
    """heuristics.rens (the LP's integral decisions fixed, the rest solved): a schedule of the full
    MILP, no better than the proven optimum, and one that the simulator finds within the limits."""
    from poetc.solver.heuristics import rens
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.3)
    model, v, h = _relaxation(problem, limits)
    x_lp = np.asarray(h.getSolution().col_value)
    spec = lns_windows(problem, v.keep, v.rec, v.page)
    assert any(1 - max(x_lp[c] for c in t) > 1e-6 for t in spec.triples)  # something is left to decide
    x = rens(model, x_lp, spec, time.perf_counter() + 3600)
    assert x is not None
    r = solve_milp(problem, limits, "poet", time_limit_s=600, solver="highs")
    assert r.status == "optimal", r.notes
    assert model.objective_of(x) >= r.overhead_energy_j * (1 - 1e-6) - 1e-15
    choice = read_choice(problem, v, x)
    result = evaluate_choice(problem, "poet", choice, limits, "feasible", read_early(problem, v, choice, x),
                             read_repage(v, choice, x))
    assert result.fits, result.notes
    assert result.overhead_energy_j == pytest.approx(model.objective_of(x), rel=1e-6)


@pytest.mark.parametrize("fixture", ["cnn_graph", "bert_tiny_graph"])
@pytest.mark.parametrize("fraction,deadline", [(0.9, 5.0), (0.5, 5.0), (0.3, 5.0), (0.5, 1.3), (0.3, 1.1)])
def test_page_first_fits_or_finds_nothing(fixture, fraction, deadline, request):
    """page_first's schedule, when it has one, fits the budget and the deadline in the simulator; it
    has none exactly when paging everything does not fit the budget or its pass ends above the
    deadline; and it is deterministic."""
    _, g = request.getfixturevalue(fixture)
    problem = build_problem(g, costs_for(g, 0.3, 1.0))
    limits = Limits(problem.keep_all_peak_bytes * fraction, problem.base_time_s * (deadline - 1), 1e12)
    choice = page_first(problem, limits)
    assert page_first(problem, limits) == choice
    evaluate = ProfileEvaluator(problem)
    page_all = [Decision.PAGE if c.pageable and not c.fixed else Decision.KEEP for c in problem.candidates]
    if evaluate(page_all).peak_bytes > limits.activation_budget_bytes:
        assert choice is None
    if choice is not None:
        ev = evaluate(choice)
        assert ev.peak_bytes <= limits.activation_budget_bytes and ev.time_s <= limits.overhead_time_s
        assert evaluate_choice(problem, "poet", choice, limits, "heuristic").fits


def test_best_start_falls_back_to_page_first_when_no_greedy_fits(bert_tiny_graph, monkeypatch):
    """When neither plain greedy rule fits (ResNet-200-CIFAR at 30%), the start is page_first's,
    improved by the local search, and the extended rules are not run."""
    _, g = bert_tiny_graph
    problem, limits = _setup(g, 0.5)
    calls = []

    def no_greedy(problem, limits, *, rule, extended, deadline=None):
        calls.append((rule, extended))
        return None
    start, notes = best_start(problem, limits, no_greedy)
    expected = page_first(problem, limits)
    assert expected is not None, "page_first found nothing: the fixture's budget is too tight for this test"
    assert start == local_search(problem, limits, expected)
    assert calls == [("cheapest", False), ("capuchin", False)]
    assert any("page first" in n for n in notes)


def _random_model(rng, n_cols):
    from poetc.solver.formulation import LinearModel
    m = LinearModel()
    for j in range(n_cols):
        m.add_var(f"x{j}", 0.0, 1.0, integer=True)
        m.obj[j] = float(rng.uniform(-0.5, 2.0))
    for _ in range(int(rng.integers(3, 9))):
        cols = rng.choice(n_cols, size=int(rng.integers(2, n_cols + 1)), replace=False)
        terms = {int(c): float(rng.normal()) for c in cols}
        mid = float(rng.normal())
        kind = rng.integers(3)
        m.add_row(terms, mid - 1.0 if kind != 1 else -np.inf, mid + 0.5 if kind != 0 else np.inf)
    return m


def test_the_projection_bound_never_exceeds_the_optimum_brute_force():
    """projection.project on random 0/1 programs: every feasible integer point's kept part satisfies
    the projected rows, and projection_bound is at most the brute-force optimum (and at most the
    LP relaxation of the whole model)."""
    import itertools

    from poetc.solver.projection import project, projection_bound
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(120):
        n = int(rng.integers(3, 9))
        m = _random_model(rng, n)
        keep = sorted(rng.choice(n, size=int(rng.integers(1, n)), replace=False).tolist())
        small, constant = project(m, keep)
        best = np.inf
        for bits in itertools.product((0.0, 1.0), repeat=n):
            x = np.array(bits)
            ok = all(m.row_lb[r] - 1e-9 <= sum(m.row_value[k] * x[m.row_index[k]]
                                               for k in range(m.row_start[r], m.row_start[r + 1])) <= m.row_ub[r] + 1e-9
                     for r in range(m.num_rows))
            if not ok:
                continue
            best = min(best, m.objective_of(x))
            xs = x[keep]
            for r in range(small.num_rows):
                act = sum(small.row_value[k] * xs[small.row_index[k]] for k in range(small.row_start[r], small.row_start[r + 1]))
                assert small.row_lb[r] - 1e-9 <= act <= small.row_ub[r] + 1e-9
        if not np.isfinite(best):
            continue
        h = m.to_highs()
        h.setOptionValue("solve_relaxation", True)
        h.run()
        b = projection_bound(m, keep, time_limit_s=60)
        assert b is not None
        assert b <= best + 1e-7
        assert b <= h.getInfo().objective_function_value + 1e-7
        checked += 1
    assert checked >= 30  # enough feasible instances were compared


@pytest.mark.parametrize("fixture,fraction", [("cnn_graph", 0.6), ("bert_tiny_graph", 0.3), ("bert_tiny_graph", 0.5)])
def test_the_projection_bound_lies_below_the_lp_of_the_real_model(fixture, fraction, request):
    """On poetc's own MILP (overlap windows on, as compile solves it) the projection onto the decision
    columns is a far smaller LP whose value is positive and at most the full LP's."""
    from poetc.overlap import OverlapCosts
    from poetc.solver.projection import project, projection_bound
    _, g = request.getfixturevalue(fixture)
    problem, limits = _setup(g, fraction)
    limits = replace(limits, overlap=OverlapCosts(1e9, 1.0))
    model, v = build_model(problem, limits)
    cols = [*v.keep.values(), *v.rec.values(), *v.page.values(), *v.run.values(), *v.drop.values(),
            *v.win.values(), *v.bk.values(), *v.held.values(), *v.state_session.values()]
    h = model.to_highs()
    h.setOptionValue("solve_relaxation", True)
    h.run()
    lp = h.getInfo().objective_function_value
    b = projection_bound(model, cols, time_limit_s=600)
    assert b is not None and 0 < b <= lp * (1 + 1e-7) + 1e-15
    assert project(model, cols)[0].num_rows < model.num_rows
