"""Overlapped paging (poetc.overlap + passes/async_paging.py): the placement never takes a step above the
activation budget, never reads a handle before it exists, and never predicts a slower step than the
blocking one; the channel model against a brute-force replay; the rewritten graph trains bitwise like
the blocking one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poetc.overlap import AsyncTransfer, OverlapCosts, _durations, channel_time, plan_overlap
from poetc.schedule import SimResult, Step, StepCosts, StepKind

ROOT = Path(__file__).resolve().parents[1]


def _costs(op_times, read_bps=1e8, write_bps=5e7):
    return StepCosts(list(op_times), [t * 2.0 for t in op_times],
                     page_out=lambda n: (n / write_bps, n / write_bps),
                     page_in=lambda n: (n / read_bps, n / read_bps))


def _chain(n_ops: int, paged: dict[int, int]) -> list[Step]:
    """n_ops compute steps; tensor T<k> (produced by op k) is spilled right after op k and restored
    before op n_ops - 1 - k (its backward reader)."""
    steps = []
    for i in range(n_ops):
        for k in paged:
            if n_ops - 1 - k == i:
                steps.append(Step(StepKind.PAGE_IN, None, f"T{k}", (f"H{k}",), (f"T{k}_r",)))
        steps.append(Step(StepKind.COMPUTE, i, None, (), (f"x{i}",)))
        if i in paged:
            steps.append(Step(StepKind.PAGE_OUT, None, f"T{i}", (f"T{i}",), (f"H{i}",)))
    return steps


def _sim(steps, live):
    return SimResult(int(max(live)), int(np.argmax(live)), list(live), 0, 0.0, 0.0)


def _check_plan(steps, plan, live, budget):
    extra = np.asarray(plan.extra_bytes)
    assert np.all(np.asarray(live) + extra <= budget + 1e-9)
    spill_at = {s.tensor: i for i, s in enumerate(steps) if s.kind is StepKind.PAGE_OUT}
    for t in plan.transfers:
        if t.kind == "in":
            assert spill_at[t.tensor] < t.issue < t.step
        else:
            assert t.issue == t.step == spill_at[t.tensor]
            first_in = min(i for i, s in enumerate(steps) if s.kind is StepKind.PAGE_IN and s.tensor == t.tensor)
            assert t.wait is None or t.step < t.wait <= first_in
    assert plan.time_s <= plan.blocking_time_s + 1e-12


def _replay(steps, costs, transfers, copy_s, nbytes=None, cpu_s=None):
    """A brute-force replay of the runtime: a main thread running steps, one I/O thread running a FIFO
    queue; advance time in tiny ticks. Independent of channel_time's bookkeeping. `nbytes`: each
    transferred tensor's size (default 1 MiB each); `cpu_s(kind, transfer seconds)`: the CPU work of a
    queued transfer, which the I/O thread takes from the main thread's core (the main thread loses it
    when it queues the transfer)."""
    size = (lambda name: nbytes[name]) if nbytes else (lambda name: 1 << 20)
    cpu = cpu_s or (lambda kind, t: 0.0)
    by = {(t.kind, t.step): t for t in transfers}
    issue = {}
    for t in transfers:
        if t.kind == "in":
            issue.setdefault(t.issue, []).append(t)
    waits = {}
    for t in transfers:
        if t.kind == "out" and t.wait is not None:
            waits.setdefault(t.wait, []).append(t.tensor)
    queue = []  # [remaining seconds, key]
    done = set()
    dt = 1e-5
    now = 0.0

    def tick(main_busy_for: float | None = None, until=None):
        nonlocal now
        # run the clock; I/O progresses in parallel; stop when main work is done (and `until` holds)
        remaining = main_busy_for or 0.0
        while remaining > 1e-12 or (until is not None and not until()):
            step = dt
            if queue:
                queue[0][0] -= step
                if queue[0][0] <= 1e-12:
                    done.add(queue.pop(0)[1])
            remaining -= step
            now += step

    for i, s in enumerate(steps):
        for tensor in waits.get(i, ()):
            tick(until=lambda tensor=tensor: ("w", tensor) in done)
        for t in issue.get(i, ()):
            queue.append([costs.page_in(t.nbytes)[0], ("r", t.step)])
            tick(cpu("in", costs.page_in(t.nbytes)[0]))
        if s.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            tick(costs.op_time_s[s.op])
        elif s.kind is StepKind.PAGE_OUT:
            n = size(s.tensor)
            t = by.get(("out", i))
            if t is None:
                tick(until=lambda: not queue)
                tick(costs.page_out(n)[0])
            else:
                tick(copy_s(t.nbytes))
                queue.append([costs.page_out(n)[0], ("w", s.tensor)])
                tick(cpu("out", costs.page_out(n)[0]))
        else:
            t = by.get(("in", i))
            if t is None:
                tick(until=lambda: not queue)
                tick(costs.page_in(size(s.tensor))[0])
            else:
                tick(until=lambda i=i: ("r", i) in done)
                tick(copy_s(t.nbytes))
    return now


@settings(max_examples=25, deadline=None)
@given(n_ops=st.integers(6, 14), seed=st.integers(0, 10_000), headroom=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_placement_respects_the_budget_and_never_slows_the_step(n_ops, seed, headroom):
    rng = np.random.default_rng(seed)
    paged = {k: 1 << 20 for k in range(n_ops // 2 - 1) if rng.random() < 0.6}
    steps = _chain(n_ops, paged)
    costs = _costs(rng.uniform(1e-3, 2e-2, n_ops))
    live = rng.integers(2 << 20, 6 << 20, len(steps))
    budget = float(max(live) + headroom * (1 << 20))
    plan = plan_overlap(steps, _sim(steps, live), costs, {f"T{k}": b for k, b in paged.items()}, budget,
                        copy_bytes_per_s=5e9)
    _check_plan(steps, plan, live, budget)
    if headroom == 0.0:  # the peak step has no room; steps below it may
        assert all(live[t.step] + (1 << 20) <= budget for t in plan.transfers)


def test_no_room_anywhere_keeps_every_transfer_blocking():
    steps = _chain(8, {0: 1 << 20, 1: 1 << 20})
    live = [5 << 20] * len(steps)
    plan = plan_overlap(steps, _sim(steps, live), _costs([1e-2] * 8), {"T0": 1 << 20, "T1": 1 << 20},
                        float(5 << 20), copy_bytes_per_s=5e9)
    assert plan.transfers == [] and plan.time_s == pytest.approx(plan.blocking_time_s)


def test_with_room_the_transfers_hide_behind_compute():
    steps = _chain(10, {0: 1 << 20, 1: 1 << 20})
    costs = _costs([2e-2] * 10)  # a 1 MiB write takes 21 ms, a read 10.5 ms: one or two ops hide each
    live = [1 << 20] * len(steps)
    plan = plan_overlap(steps, _sim(steps, live), costs, {"T0": 1 << 20, "T1": 1 << 20}, float(8 << 20),
                        copy_bytes_per_s=5e9)
    assert {t.kind for t in plan.transfers} == {"in", "out"} and len(plan.transfers) == 4
    compute = 10 * 2e-2
    assert plan.blocking_time_s > compute + 0.06
    copies = 4 * 2 * (1 << 20) / 5e9
    # the staging copies remain on the step, and a Flush waits ~0.5 ms where T1's write queued behind T0's
    assert compute + copies <= plan.time_s < compute + copies + 1e-3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), cpu=st.sampled_from([(0.0, 0.0), (0.4, 0.3), (0.9, 0.9)]))
def test_channel_model_matches_a_brute_force_replay(seed, cpu):
    """Also with a share of each transfer being CPU work the main thread pays (a host whose compute
    uses every core): the model, the replay, and the plan never slower than blocking."""
    rng = np.random.default_rng(seed)
    n_ops = 10
    paged = {k: 1 << 20 for k in range(4) if rng.random() < 0.7}
    steps = _chain(n_ops, paged)
    costs = _costs(rng.uniform(1e-3, 2e-2, n_ops))
    live = [1 << 20] * len(steps)
    plan = plan_overlap(steps, _sim(steps, live), costs, dict((f"T{k}", b) for k, b in paged.items()),
                        float(rng.choice([1.5, 3.0, 8.0]) * (1 << 20)), copy_bytes_per_s=5e9,
                        cpu_out_fraction=cpu[0], cpu_in_fraction=cpu[1])
    oc = OverlapCosts(5e9, 0.0, *cpu)
    durations = _durations(steps, costs, {f"T{k}": b for k, b in paged.items()})
    model = channel_time(steps, durations, plan.transfers, {}, costs, oc.copy_s, oc.cpu_s)
    replay = _replay(steps, costs, plan.transfers, oc.copy_s, cpu_s=oc.cpu_s)
    assert model == pytest.approx(replay, abs=5e-4)  # the replay ticks in 10 us steps
    assert plan.time_s == pytest.approx(model) and plan.time_s <= plan.blocking_time_s + 1e-12


def test_a_transfer_that_is_all_cpu_work_stays_blocking():
    """If every second of a transfer is CPU work (nothing for a device to do alone), overlap hides
    nothing and costs the staging copy: the greedy keeps everything blocking."""
    steps = _chain(10, {0: 1 << 20, 1: 1 << 20})
    costs = _costs([2e-2] * 10)
    live = [1 << 20] * len(steps)
    plan = plan_overlap(steps, _sim(steps, live), costs, {"T0": 1 << 20, "T1": 1 << 20}, float(8 << 20),
                        copy_bytes_per_s=5e9, cpu_out_fraction=1.0, cpu_in_fraction=1.0)
    assert plan.transfers == []


def test_compiled_graph_is_topological_and_its_awaits_read_prefetch_tickets(tmp_path):
    """Graph-level: the async-paging pass on a compiled paged MLP (the session fixture's output)."""
    from poetc.run import load_report
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "poetc", "compile", str(ROOT / "examples" / "mlp.onnx"),
                           "--ram", "19.8MiB", "--deadline", "2x", "--strategy", "paging-only", "--target", "host",
                           "--optimizer-mode", "unfused", "--baselines", "", "--json", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "Spill/Restore library" in proc.stderr:
        pytest.skip(f"no op library here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    report = load_report(out)
    assert report.overlap and report.overlap["transfers"], report.overlap
    model = onnx.load(str(out / "training_model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "SpillAsync" in ops and "Prefetch" in ops and any(o.startswith("Await") for o in ops)
    produced = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        assert all(not x or x in produced for x in node.input), node.name
        produced.update(node.output)
    prefetch = {n.output[0]: n for n in model.graph.node if n.op_type == "Prefetch"}
    for n in model.graph.node:
        if n.op_type.startswith("Await"):
            assert n.input[0] in prefetch
    # the report's prediction includes the staging buffers and stays within the activation budget
    assert report.result.activation_peak_bytes == report.overlap["peak_bytes"]
    assert report.result.activation_peak_bytes <= report.budget.activation_bytes
    assert json.loads((out / "report.json").read_text())["overlap"]["time_s"] <= report.overlap["blocking_time_s"]


def test_no_overlap_flag_keeps_every_transfer_blocking(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "poetc", "compile", str(ROOT / "examples" / "mlp.onnx"),
                           "--ram", "19.8MiB", "--deadline", "2x", "--strategy", "paging-only", "--no-overlap",
                           "--optimizer-mode", "unfused", "--baselines", "", "--json", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    ops = {n.op_type for n in onnx.load(str(out / "training_model.onnx")).graph.node}
    assert "Spill" in ops and not ops & {"SpillAsync", "Prefetch", "Flush"}
    assert json.loads((out / "report.json").read_text())["overlap"] is None


def test_async_transfer_json_round_trip():
    t = AsyncTransfer("out", 3, "x", 10, 3, 5)
    assert t.to_json() == {"kind": "out", "step": 3, "tensor": "x", "nbytes": 10, "issue": 3, "wait": 5}


# ---------------------------------------------------------------------------------------------------
# the MILP's windows (poetc/solver/overlap_rows.py) on a real graph

def _milp(cnn_graph, frac, deadline, overlap=True, objective="time", seed_scale=0.3, page_scale=0.3, cpu=(0.0, 0.0)):
    from poetc.overlap import OverlapCosts
    from poetc.solver import Limits, build_problem, run_strategy
    from test_solver import costs_for
    _, g = cnn_graph
    problem = build_problem(g, costs_for(g, seed_scale, page_scale))  # seeded rpi4-roofline costs, not measured
    limits = Limits(problem.keep_all_peak_bytes * frac, problem.base_time_s * (deadline - 1), 1e12, objective,
                    overlap=OverlapCosts(5.5e9, 3.0, *cpu) if overlap else None)
    return problem, limits, run_strategy(problem, limits, "poet", time_limit_s=60)


@pytest.mark.parametrize("frac,cpu", [(0.6, (0.0, 0.0)), (0.7, (0.0, 0.0)), (0.6, (0.35, 0.3))])
def test_milp_windows_time_is_the_channel_model_and_the_replay(cnn_graph, frac, cpu):
    """The MILP's time for its windows (blocking time + each window's delta) against the channel model
    and the brute-force replay of the realised schedule: equal when no recompute runs inside a window,
    an upper bound otherwise; and no other transfer is issued while a window is open. Also with a
    share of each transfer being CPU work that overlap cannot hide (the host's measured paging)."""
    problem, limits, r = _milp(cnn_graph, frac, 1.5, cpu=cpu)
    assert r.overlap is not None and r.overlap.windows, "the MILP chose no window"
    _check_milp_windows(problem, limits, r)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.sampled_from([0.6, 0.7, 0.8]), page_scale=st.sampled_from([0.1, 0.3, 1.0, 3.0]),
       seed_scale=st.sampled_from([0.0, 0.3, 1.0]), objective=st.sampled_from(["time", "energy"]),
       deadline=st.sampled_from([1.02, 1.05, 1.5]), cpu=st.sampled_from([(0.0, 0.0), (0.35, 0.3)]))
def test_milp_windows_under_random_costs(cnn_graph, frac, page_scale, seed_scale, objective, deadline, cpu):
    """Whatever the costs, budget, objective, deadline and CPU share of a transfer: a schedule the MILP
    says fits, fits in the simulator with its staging bytes and the channel time, and its windows' time
    is the replay's."""
    problem, limits, r = _milp(cnn_graph, frac, deadline, objective=objective, seed_scale=seed_scale,
                               page_scale=page_scale, cpu=cpu)
    if r.status in ("optimal", "feasible"):
        assert r.fits, r.notes
    if r.overlap is not None and r.overlap.windows:
        _check_milp_windows(problem, limits, r)


def _check_milp_windows(problem, limits, r):
    assert r.status in ("optimal", "feasible") and r.fits, r.notes
    plan = r.overlap
    assert plan.transfers, "the MILP chose windows the schedule does not have"
    assert len(plan.transfers) == len(plan.windows)
    steps = r.schedule.steps
    milp_time = plan.blocking_time_s + sum(w.delta_s for w in plan.windows)
    nbytes = {s.tensor: problem.graph.tensors[s.tensor].nbytes for s in steps if s.tensor}

    def copy_s(b):
        return limits.overlap.copy_s(b)
    replay = _replay(steps, problem.costs, plan.transfers, copy_s, nbytes, cpu_s=limits.overlap.cpu_s)
    assert plan.time_s == pytest.approx(replay, abs=2e-5 * len(steps))
    assert r.sim.time_s == plan.time_s
    spans = []
    for t in plan.transfers:
        lo, hi = (t.step, t.wait) if t.kind == "out" else (t.issue, t.step)
        spans.append((lo, hi))
        between = [i for i in range(lo, hi) if i != t.step and steps[i].kind is not StepKind.COMPUTE
                   and steps[i].kind is not StepKind.RECOMPUTE]
        assert not between, (t, [steps[i] for i in between])  # the channel is this window's alone
    recompute_inside = any(steps[i].kind is StepKind.RECOMPUTE for lo, hi in spans for i in range(lo, hi))
    if recompute_inside:
        assert milp_time >= plan.time_s - 1e-12
    else:
        assert milp_time == pytest.approx(plan.time_s, rel=1e-12, abs=1e-12)
    assert plan.time_s < plan.blocking_time_s


@pytest.mark.parametrize("frac", [0.6, 0.7])
def test_milp_staging_bytes_are_the_simulators(cnn_graph, frac):
    """Memory of the prefetched and written-behind buffers, from issue to wait: the simulator (the
    realised plan's staging bytes per step) equals the MILP's window terms to the byte at every op's
    row; the MILP's regeneration rows are never below the steps they stand for; the peak fits."""
    from poetc.overlap import _slots
    from poetc.solver.overlap_rows import window_bytes
    problem, limits, r = _milp(cnn_graph, frac, 1.5)
    plan = r.overlap
    assert plan is not None and plan.windows
    steps = r.schedule.steps
    op_rows, pre_rows = window_bytes(plan.windows, problem.positions, problem.stages)
    stage_index = {s: k for k, s in enumerate(problem.stages)}
    slot = _slots(steps)
    # an out window's producer row counts the staging buffer for the SpillAsync step after the op
    # (which has no row of its own): the op itself runs without it
    producer = np.zeros(problem.positions)
    for w in plan.windows:
        if w.kind == "out":
            producer[w.start] += w.nbytes
    for i, s in enumerate(steps):
        if s.kind is StepKind.COMPUTE:
            assert plan.extra_bytes[i] == op_rows[s.op] - producer[s.op], (i, s)
        elif s.kind in (StepKind.PAGE_IN, StepKind.RECOMPUTE) and slot[i] in stage_index:
            assert plan.extra_bytes[i] <= pre_rows[stage_index[slot[i]]], (i, s)
        else:  # a Spill right after its producer: the producer's row counts the staging buffer
            assert plan.extra_bytes[i] <= op_rows[slot[i]], (i, s)
    assert r.sim.peak_bytes <= limits.activation_budget_bytes
    assert r.sim.peak_bytes == max(a + b for a, b in zip(simulate_blocking(problem, r).live_bytes, plan.extra_bytes))


def simulate_blocking(problem, r):
    from poetc.schedule import simulate
    return simulate(problem.graph, r.schedule.steps, r.schedule.origin, problem.costs)


def test_overlap_fits_a_deadline_blocking_cannot(cnn_graph):
    """The deadline is checked against the overlapped time: halfway between the fastest blocking
    schedule and the fastest overlapped one (both minimised by the time objective), only the MILP
    with windows fits; its energy still counts every transfer (overlap saves time, not joules)."""
    problem, _, fast_blocking = _milp(cnn_graph, 0.6, 3.0, overlap=False)
    _, _, fast_overlap = _milp(cnn_graph, 0.6, 3.0)
    assert fast_overlap.sim.time_s < fast_blocking.sim.time_s
    mid = (fast_overlap.sim.time_s + fast_blocking.sim.time_s) / 2 / problem.base_time_s
    _, _, blocking = _milp(cnn_graph, 0.6, mid, overlap=False, objective="energy")
    _, _, overlap = _milp(cnn_graph, 0.6, mid, objective="energy")
    assert not blocking.fits
    assert overlap.fits and overlap.overlap is not None and overlap.overlap.windows
    copies = sum(w.copy_energy_j for w in overlap.overlap.windows)
    assert overlap.sim.energy_j == pytest.approx(simulate_blocking(problem, overlap).energy_j + copies)
