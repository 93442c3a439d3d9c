"""Fuzzing on random ONNX DAGs (chains, residual blocks, two-branch blocks with Concat; random widths,
activations and batch sizes; tests/random_onnx.py): every strategy's schedule replays in the
simulator and fits when it says so, under random costs and budgets; and compiled random graphs train
bitwise identically in ONNX Runtime within their budget."""

from __future__ import annotations

import zlib

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poetc.api import CompileOptions, compile_model, open_graph
from poetc.run import verify
from poetc.importer import ImportOptions
from poetc.plan import STRATEGIES, Budget, Limits, lower_bound
from poetc.schedule import StepCosts
from poetc.solver import build_problem, run_strategy
from poetc.solver.problem import evaluate_linear
from poetc.units import Deadline
from random_onnx import build, graph_specs

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_costs(graph, seed: int, page_scale: float) -> StepCosts:
    times = [1e-4 * (1 + zlib.crc32(f"{seed}:{op.name}".encode()) % 50) for op in graph.ops]
    return StepCosts(times, [t * 3.0 for t in times],
                     lambda n: (1e-5 + n / 24.5e6 * page_scale, (1e-5 + n / 24.5e6 * page_scale) * 0.15),
                     lambda n: (5e-6 + n / 45.5e6 * page_scale, (5e-6 + n / 45.5e6 * page_scale) * 0.15))


def lower(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "model.onnx"
    onnx.save(build(spec), str(path))
    return path, open_graph(path, work / "art", ImportOptions())[1]


@settings(max_examples=5, **SETTINGS)
@given(spec=graph_specs(), seed=st.integers(0, 1000), page_scale=st.floats(0.05, 20),
       fractions=st.lists(st.floats(0.2, 0.95), min_size=2, max_size=3), deadline=st.floats(1.05, 3.0))
def test_every_strategy_is_valid_on_random_graphs(spec, seed, page_scale, fractions, deadline, tmp_path_factory):
    _, graph = lower(spec, tmp_path_factory)
    problem = build_problem(graph, random_costs(graph, seed, page_scale))
    for fraction in fractions:
        budget = Budget.activations_only(int(problem.keep_all_peak_bytes * fraction))
        limits = Limits.of(budget, problem.base_time_s * (deadline - 1), 1e12)
        for strategy in STRATEGIES:
            r = run_strategy(problem, limits, strategy, time_limit_s=20)  # simulate() raises on a bad read
            assert not any("failed simulation" in note for note in r.notes), (strategy, r.notes)
            if r.fits:
                assert r.sim.peak_bytes <= limits.activation_budget_bytes
                assert r.overhead_time_s <= limits.overhead_time_s + 1e-9
                assert evaluate_linear(problem, r.choice, r.early, r.repage).peak_bytes >= r.sim.peak_bytes - 128


@settings(max_examples=3, **SETTINGS)
@given(spec=graph_specs(), position=st.floats(0.2, 0.8))
def test_random_graphs_compile_and_train_identically(spec, position, tmp_path_factory):
    """The budget lies `position` of the way from the least any schedule needs to keep-all."""
    path, graph = lower(spec, tmp_path_factory)
    problem = build_problem(graph, random_costs(graph, 0, 1.0))
    least = lower_bound(problem).ram_bytes
    keep_all = Budget.smallest_for(problem.keep_all_peak_bytes, problem.fixed_bytes).ram_bytes
    ram = int(least + position * (keep_all - least))
    out = tmp_path_factory.mktemp("fuzz-out") / "out"
    options = CompileOptions(ram_bytes=ram, out_dir=out, time_limit_s=20, baselines=(), deadline=Deadline(factor=3.0))
    report = compile_model(path, options).report
    assert report.result.fits
    result = verify(out, steps=2)
    assert result.to_json()["bitwise_identical_params"], result.to_json()
    assert result.ok, result.to_json()
