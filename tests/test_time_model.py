"""The host time model (poetc/cost/timemodel.py, docs/time-model.md): the overhead fit recovers known
coefficients from synthetic profiler events, survives a costs file round trip, and prices each op's
share into the cost table. No wall-clock assertion: timings are synthetic or only checked for form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from poetc.cost import build_cost_table, load_costs, profile_host, save_costs
from poetc.cost.profile import HostTimes
from poetc.cost.timemodel import (HostOverhead, fit_overhead, freed_after, output_bytes, overhead_from_events,
                                  predict_step_s)
from poetc.targets import load_target


def test_fit_recovers_the_coefficients():
    rng = np.random.default_rng(0)
    freed = rng.integers(0, 8 << 20, 200)
    gaps = 9e-6 + 2e-12 * freed
    fit = fit_overhead(gaps, freed, [3e-4, 2e-4, 4e-4])
    assert fit.per_node_s == pytest.approx(9e-6, rel=1e-9)
    assert fit.per_byte_s == pytest.approx(2e-12, rel=1e-9)
    assert fit.per_run_s == pytest.approx(3e-4)
    assert fit.samples == 200


def test_fit_never_goes_negative():
    freed = np.arange(50) * 1e6
    fit = fit_overhead(5e-6 - 1e-13 * freed, freed, [-1.0])  # gaps shrinking with bytes: noise, not a credit
    assert fit.per_byte_s == 0.0 and fit.per_node_s > 0 and fit.per_run_s == 0.0
    fit = fit_overhead(-1e-6 + 1e-12 * freed, freed, [])
    assert fit.per_node_s == 0.0 and fit.per_byte_s > 0


def test_overhead_from_synthetic_events(mlp_graph):
    """Events laid out as the profiler reports them (us): each gap = 10 us + 1 ps per freed byte."""
    _, g = mlp_graph
    freed = freed_after(g)
    events, walls = [], []
    t = 0.0
    for run in range(3):  # 1 warm-up + 2 timed
        start = t
        for op in g.ops:
            events.append((op.name, {"ts": t, "dur": 50.0}))
            t += 50.0 + 10.0 + 1e-6 * freed[op.name]
        walls.append((t - start) * 1e-6 + 5e-4)
        t += 1000.0
    oh = overhead_from_events(g, events, walls, warmup=1)
    assert oh.per_node_s == pytest.approx(10e-6, rel=1e-6)
    assert oh.per_byte_s == pytest.approx(1e-12, rel=1e-6)
    # the run's extra: its wall time less its kernel span (the last gap is after the span)
    last_gap = (10.0 + 1e-6 * freed[g.ops[-1].name]) * 1e-6
    assert oh.per_run_s == pytest.approx(5e-4 + last_gap, rel=1e-6)
    kernels = {op.name: 50e-6 for op in g.ops}
    step = predict_step_s(g, kernels, oh)
    assert step == pytest.approx(len(g.ops) * 50e-6 + len(g.ops) * oh.per_node_s
                                 + oh.per_byte_s * sum(output_bytes(g, op) for op in g.ops) + oh.per_run_s)


def test_overhead_round_trips_and_prices_each_op(mlp_graph, tmp_path):
    _, g = mlp_graph
    times = HostTimes({op.name: 1e-4 for op in g.ops})
    times.overhead = HostOverhead(1e-5, 1e-12, 3e-4, 10, 0.01)
    path = tmp_path / "costs.json"
    save_costs(path, g, times, target="host", meta={"repeats": 5})
    loaded = load_costs(path, g)
    assert loaded.overhead == times.overhead and loaded.meta["repeats"] == 5
    host = load_target("host")
    table = build_cost_table(g, host, loaded)
    for op, cost in zip(g.ops, table):
        assert cost.time_s == pytest.approx(1e-4 + 1e-5 + 1e-12 * output_bytes(g, op))
    plain = build_cost_table(g, host, dict(times))  # a plain mapping: no overhead
    assert plain.times_s == tuple(1e-4 for _ in g.ops)
    assert HostOverhead.from_json({"per_node_s": -1, "per_byte_s": 0, "per_run_s": 0}) is None
    assert HostOverhead.from_json(None) is None


def test_profile_host_fits_an_overhead(mlp_graph):
    """On a real profile: finite, non-negative coefficients from every node's gap (no value is asserted:
    it depends on the machine)."""
    _, g = mlp_graph
    times = profile_host(g, repeats=2)
    oh = times.overhead
    assert oh is not None and oh.samples == len(g.ops) - 1
    assert all(math.isfinite(x) and x >= 0 for x in (oh.per_node_s, oh.per_byte_s, oh.per_run_s, oh.run_s))


# ---------------------------------------------------------------------------------------------------
# what the training API's step adds, and paging through poetc's own ops (docs/time-model.md)

def test_step_extras_round_trip_and_reject_bad_values():
    from poetc.cost.timemodel import StepExtras
    e = StepExtras(1e-4, 2e-3, 1e-6, 5e-6, 0.01, 0.0099, 3)
    assert StepExtras.from_json(e.to_json()) == e
    assert e.step_s == pytest.approx(1e-4 + 2e-3 + 1e-6)
    assert StepExtras.from_json({**e.to_json(), "optimizer_s": -1.0}) is None
    assert StepExtras.from_json({**e.to_json(), "api_s": float("nan")}) is None
    assert StepExtras.from_json({"api_s": 1.0}) is None


def test_without_profiler_takes_the_measured_share_off_per_node():
    oh = HostOverhead(10e-6, 1e-12, 3e-4)
    assert oh.without_profiler(4e-6).per_node_s == pytest.approx(6e-6)
    assert oh.without_profiler(4e-6).profiler_per_node_s == pytest.approx(4e-6)
    assert oh.without_profiler(20e-6).per_node_s == 0.0  # never negative
    assert HostOverhead.from_json(oh.without_profiler(4e-6).to_json()) == oh.without_profiler(4e-6)


def test_profile_host_times_the_training_api_and_paging(mlp_onnx, tmp_path):
    """On the real MLP artifacts: the step extras and the paging figures are measured, finite, of the
    right sign, stored in the costs file and read back; the cost table pages at the measured rates.
    No value is asserted against a number: they depend on the machine."""
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    from poetc.runtime import nativelib
    try:
        nativelib.build_spill_library("host")
    except nativelib.NativeBuildError as exc:
        pytest.skip(f"cannot build the op library here: {exc}")
    artifacts, g = open_graph(mlp_onnx, tmp_path / "imp", ImportOptions())
    times = profile_host(g, repeats=2, artifacts=artifacts, paging=True)
    ex, pg = times.step_extras, times.paging
    assert ex is not None and pg is not None, times.notes
    assert ex.optimizer_s > 0 and ex.module_s > 0 and ex.run_s > 0 and ex.api_s >= 0 and ex.reset_s >= 0
    assert ex.api_s == pytest.approx(max(ex.module_s - ex.run_s, 0.0))
    assert pg.out_bytes_per_s > 0 and pg.in_bytes_per_s > 0 and pg.out_latency_s >= 0 and pg.in_latency_s >= 0
    assert 0 <= pg.out_cpu_fraction <= 1 and 0 <= pg.in_cpu_fraction <= 1
    path = tmp_path / "costs.json"
    save_costs(path, g, times, target="host")
    saved = load_costs(path, g)
    assert saved.paging == pg and saved.step_extras == ex and saved.overhead == times.overhead
    table = build_cost_table(g, load_target("host"), saved)
    assert table.page_out(1 << 20)[0] == pytest.approx(pg.out_s(1 << 20))
    assert table.page_in(1 << 20)[0] == pytest.approx(pg.in_s(1 << 20))
    plain = build_cost_table(g, load_target("host"), None)
    assert plain.page_out(1 << 20) == load_target("host").page_out(1 << 20)  # no costs file: the target's figures
