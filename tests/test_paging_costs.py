"""Paging costs measured through poetc's own Spill/Restore (poetc/cost/paging.py): the fit recovers
known coefficients, the record survives JSON and rejects nonsense, and the MILP's overlap costs take
the measured CPU share. No wall-clock assertion."""

from __future__ import annotations

import numpy as np
import pytest

from poetc.cost.paging import PagingCosts, fit_transfer
from poetc.overlap import OverlapCosts


def test_fit_recovers_latency_and_bandwidth():
    sizes = [64 << 10, 1 << 20, 8 << 20]
    bw, lat = fit_transfer(sizes, [2e-4 + b / 6e8 for b in sizes])
    assert bw == pytest.approx(6e8, rel=1e-9) and lat == pytest.approx(2e-4, rel=1e-6)


def test_fit_never_returns_a_negative_latency_or_bandwidth():
    sizes = np.array([64 << 10, 1 << 20, 8 << 20])
    bw, lat = fit_transfer(sizes, sizes / 1e9 - 1e-5)  # a negative intercept: through the origin
    assert lat == 0.0 and bw > 0
    bw, lat = fit_transfer(sizes, [5e-3, 4e-3, 3e-3])  # slower for less data: noise
    assert lat == 0.0 and bw == pytest.approx((8 << 20) / 3e-3)


def test_round_trip_and_rejects():
    p = PagingCosts(6e8, 1e-4, 5e8, 2e-4, 0.4, 0.3, True, 5)
    assert PagingCosts.from_json(p.to_json()) == p
    assert p.out_s(0) == 0.0 and p.out_s(1 << 20) == pytest.approx(1e-4 + (1 << 20) / 6e8)
    for bad in ({"out_bytes_per_s": 0.0}, {"in_latency_s": -1.0}, {"out_cpu_fraction": 1.5}, {"in_bytes_per_s": "x"}):
        assert PagingCosts.from_json({**p.to_json(), **bad}) is None
    assert PagingCosts.from_json(None) is None


def test_overlap_costs_take_the_measured_cpu_share():
    from poetc.targets import load_target
    host = load_target("host")

    class Measured:
        paging = PagingCosts(6e8, 1e-4, 5e8, 2e-4, 0.4, 0.3)
    oc = OverlapCosts.for_target(host, Measured())
    assert (oc.cpu_out_fraction, oc.cpu_in_fraction) == (0.4, 0.3)
    assert oc.cpu_s("out", 1.0) == pytest.approx(0.4) and oc.cpu_s("in", 1.0) == pytest.approx(0.3)
    assert OverlapCosts.for_target(host, None) == OverlapCosts(host.mem_bytes_per_s, host.active_power_w)


def test_a_window_never_hides_the_cpu_share():
    """delta = copy + cpu + max(0, transfer - hidden - cpu) - transfer: with compute covering the
    whole transfer, the step still pays the copy and the CPU work."""
    from poetc.overlap import Window
    w = Window("out", 0, "t", 1 << 20, 0, 3, transfer_s=1e-2, hidden_by_s=5e-2, copy_s=1e-4, copy_energy_j=0.0,
               cpu_s=4e-3)
    assert w.delta_s == pytest.approx(1e-4 + 4e-3 - 1e-2)
    short = Window("in", 0, "t", 1 << 20, 0, 3, transfer_s=1e-2, hidden_by_s=2e-3, copy_s=1e-4, copy_energy_j=0.0,
                   cpu_s=4e-3)
    assert short.delta_s == pytest.approx(1e-4 + 4e-3 + (1e-2 - 2e-3 - 4e-3) - 1e-2)
