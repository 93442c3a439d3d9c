"""Paged state (issue #17, compiler side): parameters and AdamW moments as decidable tensors of the
fused-mode problem. Structure (the problem, the MILP, the simulator, the lower bound, the
insert-state-io rewrite), numerics (a paged schedule trains bitwise like the fused keep-all one, which
tests/test_fused.py ties to ONNX Runtime's own optimizer), and property tests on random graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poetc.errors import InfeasibleError
from poetc.ir.fused import (fuse_optimizer, fused_state_arrays, read_optimizer_spec, state_directory_bytes,
                            state_tensors)
from poetc.ir.graph import Role
from poetc.plan import Budget, check_budget, lower_bound, plan
from poetc.schedule import Decision, Schedule, ScheduleError, StepKind, simulate
from poetc.solver.problem import build_problem, evaluate_linear
from poetc.units import Deadline
from random_onnx import build, graph_specs


def _fused(artifacts, graph):
    return fuse_optimizer(graph, read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx"))))


def _costs(graph, target="rpi4"):
    from poetc.api import step_costs_for
    from poetc.targets import load_target
    return step_costs_for(graph, load_target(target), None)


@pytest.fixture(scope="module")
def mlp_fused(mlp_graph):
    artifacts, graph = mlp_graph
    fg = _fused(artifacts, graph)
    return artifacts, fg, build_problem(fg, _costs(fg))


def _plan_at(problem, ram, factor=100.0, **kw):
    return plan(problem, Budget.from_ram(ram, problem.fixed_bytes), Deadline(factor=factor), flash_bytes=1e12,
                baselines=(), time_limit_s=60, **kw)


# ---------------------------------------------------------------------------------------------------
# the problem and the simulator


def test_state_tensors_of_the_fused_mlp(mlp_fused):
    _, fg, problem = mlp_fused
    states = state_tensors(fg)
    params = [s for s in states if s.role == "parameter"]
    moments = [s for s in states if s.role == "moment"]
    assert len(params) == len(fg.parameter_names) and len(moments) == 2 * len(params)
    for s in moments:  # a moment's only use is its parameter's update
        assert s.uses == (s.update,) and s.groups == ((s.update, s.update),)
    for s in params:
        assert s.uses[-1] == s.update and fg.ops[s.update].role is Role.UPDATE
        assert fg.ops[s.uses[0]].role is Role.FORWARD
    # the state candidates are the pageable ones of at least MIN_STATE_BYTES, appended last
    cands = [c for c in problem.candidates if c.state]
    assert cands and problem.candidates[-len(cands):] == cands
    # two generations of every parameter, moment, the learning rate and the step counter
    assert state_directory_bytes(fg) == 2 * (sum(s.nbytes for s in states) + 4 + 4)


def test_unfused_graphs_have_no_state_candidates(mlp_graph):
    _, graph = mlp_graph
    assert state_tensors(graph) == [] and state_directory_bytes(graph) == 0
    assert not any(c.state for c in build_problem(graph, _costs(graph)).candidates)


def test_keep_all_is_unchanged_by_counting_state(mlp_fused):
    _, fg, _ = mlp_fused
    with_state = build_problem(fg, _costs(fg))
    without = build_problem(fg, _costs(fg), page_state=False)
    assert with_state.keep_all.total_peak_bytes == without.keep_all.total_peak_bytes
    # the parameters and moments moved from the fixed state into the simulated peak
    state_bytes = sum(s.nbytes for s in state_tensors(fg))
    assert without.fixed_bytes == with_state.fixed_bytes
    assert with_state.keep_all.peak_bytes >= state_bytes


def test_paged_schedule_fits_below_keep_all_and_simulates_as_counted(mlp_fused):
    _, fg, problem = mlp_fused
    bound = lower_bound(problem)
    assert bound.floor_state_bytes > 0  # the worst op reads state: its parameters or moments
    ram = bound.ram_bytes + 64 * 1024
    p = _plan_at(problem, ram)
    r = p.result
    assert r.fits and r.status == "optimal"
    assert r.sim.total_peak_bytes <= ram < problem.keep_all.total_peak_bytes
    counts = r.schedule.counts()
    assert counts["paged_state"] > 0
    ev = evaluate_linear(problem, r.choice, r.early, r.repage)
    writes = sum(s.kind is StepKind.STATE_WRITE for s in r.schedule.steps)
    # the MILP's accounting bounds the simulator's (StateWrite tokens: 8 bytes each, reserved per candidate)
    assert r.sim.peak_bytes <= ev.peak_bytes + 8 * writes
    assert r.sim.state_read_bytes > 0 and r.sim.state_write_bytes > 0
    # time and energy: the simulator charges what the MILP counted, the state's share being its reads and writes
    assert r.overhead_energy_j == pytest.approx(ev.energy_j) and r.overhead_time_s == pytest.approx(ev.time_s)
    from poetc.schedule import io_by_class
    io = io_by_class(fg, r.schedule.steps, problem.costs)
    paged = [c for i, c in enumerate(problem.candidates) if c.state and r.choice[i] is Decision.PAGE]
    assert io["parameters"]["io_energy_j"] + io["moments"]["io_energy_j"] == pytest.approx(
        sum(c.page_energy_j for c in paged))


def test_step_list_reads_before_use_and_writes_after_update(mlp_fused):
    _, fg, problem = mlp_fused
    r = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024).result
    steps = r.schedule.steps
    paged = {s.tensor for s in steps if s.kind is StepKind.STATE_READ}
    updates = fg.parameter_updates()
    by_name = {s.name: s for s in state_tensors(fg)}
    written = [s.tensor for s in steps if s.kind is StepKind.STATE_WRITE]
    assert sorted(written) == sorted(n for n in paged if by_name[n].trainable)  # once each
    for i, s in enumerate(steps):
        for x in s.reads:
            assert x not in paged  # never the graph input of a paged tensor
        if s.kind is StepKind.STATE_WRITE:
            prev = steps[i - 1]
            assert prev.kind in (StepKind.COMPUTE, StepKind.STATE_WRITE)
            assert s.reads[1] in fg.ops[by_name[s.tensor].update].outputs  # after the update, as data
        if s.kind is StepKind.STATE_READ:
            param = s.tensor.split("__poet_")[0]
            upd = updates.get(param)
            assert upd is None or not any(t.kind is StepKind.COMPUTE and t.op == upd for t in steps[:i])


def test_simulator_refuses_a_read_without_state_read(mlp_fused):
    _, fg, problem = mlp_fused
    r = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024).result
    steps = list(r.schedule.steps)
    k = next(i for i, s in enumerate(steps) if s.kind is StepKind.STATE_READ)
    name, copy = steps[k].tensor, steps[k].writes[0]
    j = next(i for i in range(k + 1, len(steps)) if copy in steps[i].reads)
    bad = steps[j].__class__(steps[j].kind, steps[j].op, steps[j].tensor,
                             tuple(name if x == copy else x for x in steps[j].reads), steps[j].writes)
    with pytest.raises(ScheduleError, match="without a StateRead"):
        simulate(fg, steps[:j] + [bad] + steps[j + 1:], r.schedule.origin)


def test_below_the_bound_names_the_op_and_tensor(mlp_fused):
    _, _, problem = mlp_fused
    bound = lower_bound(problem)
    with pytest.raises(InfeasibleError) as e:
        check_budget(problem, Budget.from_ram(bound.ram_bytes - 1, problem.fixed_bytes))
    msg = str(e.value)
    assert bound.set_by in msg and bound.largest_tensor in msg and "smallest budget" in msg
    check_budget(problem, Budget.from_ram(bound.ram_bytes, problem.fixed_bytes))  # the bound itself passes


def test_deadline_counts_state_io(mlp_fused):
    """With no time for any read, nothing is paged: state I/O is in the deadline."""
    _, _, problem = mlp_fused
    r = _plan_at(problem, problem.keep_all.total_peak_bytes + 10**6, factor=1.0).result
    assert r.fits and "paged_state" not in r.schedule.counts()
    tight = plan(problem, Budget.from_ram(lower_bound(problem).ram_bytes + 64 * 1024, problem.fixed_bytes),
                 Deadline(factor=1.0), flash_bytes=1e12, baselines=(), time_limit_s=30)
    assert not tight.result.fits


def test_flash_must_hold_the_state_directory(mlp_fused):
    _, fg, problem = mlp_fused
    with pytest.raises(InfeasibleError, match="state directory"):
        plan(problem, Budget.from_ram(problem.keep_all.total_peak_bytes * 2, problem.fixed_bytes),
             Deadline(factor=2.0), flash_bytes=state_directory_bytes(fg) - 1, baselines=(), time_limit_s=10)


# ---------------------------------------------------------------------------------------------------
# the rewrite


def test_rewrite_structure(mlp_fused, tmp_path):
    from poetc.api import CompileOptions, rewrite
    _, fg, problem = mlp_fused
    r = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024).result
    model, records = rewrite(fg, r.schedule, CompileOptions(ram_bytes=1, out_dir=tmp_path / "o"), tmp_path / "d")
    onnx.checker.check_model(model)
    stats = next(rec["stats"] for rec in records if rec["name"] == "insert-state-io")
    paged = {s.tensor for s in r.schedule.steps if s.kind is StepKind.STATE_READ}
    assert stats["paged_state_tensors"] == len(paged)
    inputs = {i.name for i in model.graph.input}
    assert not paged & inputs  # paged tensors are not graph inputs
    reads = [n for n in model.graph.node if n.op_type == "StateRead"]
    writes = [n for n in model.graph.node if n.op_type == "StateWrite"]
    assert len(reads) == stats["state_reads"] and len(writes) == stats["state_writes"]
    outputs = {o.name for o in model.graph.output}
    assert all(w.output[0] in outputs for w in writes)
    position = {}
    for k, n in enumerate(model.graph.node):
        for o in n.output:
            position[o] = k
    for k, n in enumerate(model.graph.node):
        assert not set(n.input) & paged
        if n.op_type == "StateWrite":
            # data dependency on the update that changed the copy, which comes first
            flag = n.input[1]
            assert flag.endswith("__poet_updated") and position[flag] < k
        if n.op_type == "StateRead":
            assert all(position[x] < k for x in n.input)


def _run_fused(model: onnx.ModelProto, lib, resident: dict, feeds: dict, steps: int, state=None):
    """Run a fused-mode training graph `steps` times, the resident state bound as the graph's own input
    buffers (updated in place), the paged state in the state directory `state` (a StateDir)."""
    sess = ort.InferenceSession(model.SerializeToString(), _options(lib), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    arrays = {k: np.ascontiguousarray(v) for k, v in resident.items() if k in names}  # the buffers: kept alive
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
    losses = []
    for _ in range(steps):
        g = state.begin_step() if state is not None else None
        feed = {k: v for k, v in feeds.items() if k in names}
        feed.update(values)
        if "lazy_reset_grad" in names:
            feed["lazy_reset_grad"] = np.array([True])
        out = sess.run(None, feed)
        losses.append(out[0])
        if state is not None:
            for k in names & set(state.tensors):
                if not state.tensors[k].frozen:
                    state.write(k, arrays[k], g)
            state.commit(g)
    final = {k: v.copy() for k, v in arrays.items()}
    if state is not None:
        final.update({k: state.read(k) for k in state.tensors if k not in final})
    return losses, final


def _options(lib):
    from poetc.runtime.session import contract_session_options
    return contract_session_options(lib, intra_op_threads=1)


@pytest.fixture(scope="module")
def lib():
    from poetc.runtime import nativelib
    try:
        return nativelib.build_spill_library("host")
    except nativelib.NativeBuildError as exc:
        pytest.skip(f"cannot build the poet op library (ORT headers unavailable?): {exc}")


def test_paged_training_is_bitwise_the_fused_keep_all(mlp_fused, mlp_graph, lib, tmp_path):
    from poetc.api import CompileOptions, rewrite
    from poetc.ir.lower import read_checkpoint_parameters
    from poetc.run import input_specs, label_classes, training_feeds
    from poetc.runtime import statedir
    artifacts, fg, problem = mlp_fused
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    params = read_checkpoint_parameters(artifacts / "checkpoint")
    initial = {k: v for k, (v, _) in params.items()}
    initial.update(fused_state_arrays(params, fg, spec))
    feeds = training_feeds(input_specs(fg), label_classes(fg), seed=0)
    opts = CompileOptions(ram_bytes=1, out_dir=tmp_path / "o")
    keep = Schedule.from_decisions(fg, {}, "keep-all")
    ref_model, _ = rewrite(fg, keep, opts, tmp_path / "d0")
    ref_losses, ref = _run_fused(ref_model, lib, {k: v.copy() for k, v in initial.items()}, feeds, 3)

    r = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024).result
    paged = sorted({s.tensor for s in r.schedule.steps if s.kind is StepKind.STATE_READ})
    assert paged
    model, _ = rewrite(fg, r.schedule, opts, tmp_path / "d1")
    d = statedir.write_initial_state(tmp_path / "state", initial, {"test": True},
                                     frozen=set(fg.frozen_parameter_names), paged=paged, library=lib)
    with statedir.StateDir.open(d, library=lib) as s:
        losses, final = _run_fused(model, lib, {k: v.copy() for k, v in initial.items() if k not in paged}, feeds, 3, s)
    for a, b in zip(losses, ref_losses):
        np.testing.assert_array_equal(a, b)
    assert ref.keys() <= final.keys()
    for k in ref:
        np.testing.assert_array_equal(final[k], ref[k], err_msg=k)
    assert any(not np.array_equal(final[k], initial[k]) for k in paged)  # training changed paged state


# ---------------------------------------------------------------------------------------------------
# random graphs


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=graph_specs(), data=st.data())
def test_random_graphs_state_decisions_simulate_within_the_linear_count(spec, data, tmp_path_factory):
    """Random keep/recompute/page vectors, state included: the schedule replays (every read resident),
    its simulated peak stays within the MILP's linear count (plus the tokens and handles it reserves
    per candidate), and the greedy's vectorized evaluator agrees with the linear one."""
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    from poetc.solver.problem import ProfileEvaluator
    d = tmp_path_factory.mktemp("rg")
    onnx.save(build(spec), str(d / "m.onnx"))
    artifacts, g = open_graph(d / "m.onnx", d / "art", ImportOptions())
    fg = _fused(artifacts, g)
    problem = build_problem(fg, _costs(fg))
    choice = [Decision.KEEP] * len(problem.candidates)
    for i, c in enumerate(problem.candidates):
        if not c.fixed:
            options = [Decision.KEEP] + ([Decision.PAGE] if c.pageable else []) + (
                [Decision.RECOMPUTE] if c.recomputable else [])
            choice[i] = data.draw(st.sampled_from(options))
    for i, c in enumerate(problem.candidates):  # the MILP's rule: a recompute reads resident state
        if choice[i] is Decision.RECOMPUTE:
            for s in c.reads_state:
                choice[s] = Decision.KEEP
    sched = Schedule.from_decisions(fg, problem.decisions_from(dict(enumerate(choice))), "random")
    sim = simulate(fg, sched.steps, sched.origin, problem.costs)
    ev = evaluate_linear(problem, choice)
    writes = sum(s.kind is StepKind.STATE_WRITE for s in sched.steps)
    assert sim.peak_bytes <= ev.peak_bytes + 8 * writes + 16 * len(problem.candidates)
    assert ProfileEvaluator(problem)(choice).peak_bytes == pytest.approx(ev.peak_bytes)
    paged = {s.tensor for s in sched.steps if s.kind is StepKind.STATE_READ}
    assert paged == {c.name for i, c in enumerate(problem.candidates) if c.state and choice[i] is Decision.PAGE}


# ---------------------------------------------------------------------------------------------------
# the CLI


def _one_big_weight(path, features=1024, hidden=1024, batch=4):
    """A forward model whose first weight (4 MiB) alone exceeds a 2 MB budget with its moments."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((hidden, features)).astype(np.float32) * 0.01, "big.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((10, hidden)).astype(np.float32) * 0.01, "head.weight")
    nodes = [helper.make_node("Gemm", ["input", "big.weight"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "head.weight"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], [w1, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_cli_names_the_tensor_and_the_smallest_budget(tmp_path, capsys):
    from poetc.cli import main
    model = _one_big_weight(tmp_path / "big.onnx")
    code = main(["compile", str(model), "--ram", "8MB", "-o", str(tmp_path / "out"), "--baselines", "",
                 "--optimizer-mode", "fused", "--deadline", "10x"])
    err = capsys.readouterr().err
    assert code == 6, err  # InfeasibleError
    assert "Traceback" not in err
    assert "'big.weight'" in err and "AdamWUpdate" in err and "smallest budget that can work" in err
    assert not (tmp_path / "out").exists()


def test_report_breakdown_by_class(mlp_fused):
    from poetc.report import memory_breakdown, state_tensor_list
    from poetc.schedule import MEMORY_CLASSES
    _, fg, problem = mlp_fused
    r = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024).result
    classes = memory_breakdown(fg, r.schedule, r.sim, problem.costs)
    assert set(classes) == set(MEMORY_CLASSES)
    states = state_tensor_list(fg, r.schedule)
    for cls, role in (("parameters", ("parameter", "frozen")), ("moments", ("moment",))):
        mine = [s for s in states if s["role"] in role]
        assert classes[cls]["paged_bytes"] == sum(s["bytes"] for s in mine if s["paged"])
        assert classes[cls]["resident_bytes"] == sum(s["bytes"] for s in mine if not s["paged"])
        assert classes[cls]["flash_read_bytes"] == sum(s["bytes"] * s["reads_per_step"] for s in mine)
        assert classes[cls]["flash_write_bytes"] == sum(s["bytes"] * s["writes_per_step"] for s in mine)
    assert sum(classes[c]["flash_read_bytes"] for c in MEMORY_CLASSES) == r.sim.state_read_bytes + sum(
        fg.tensors[s.tensor].nbytes for s in r.schedule.steps if s.kind is StepKind.PAGE_IN)
    # the classes' shares add up to the simulated peak
    assert sum(classes[c]["peak_step_bytes"] for c in MEMORY_CLASSES) == r.sim.peak_bytes
    for s in states:  # a paged trainable tensor is written once; a resident one never read
        assert s["writes_per_step"] == (1 if s["paged"] and s["trainable"] else 0)
        assert (s["reads_per_step"] > 0) == s["paged"]


def test_report_round_trips_with_the_new_fields(mlp_fused, tmp_path):
    import dataclasses
    import json
    from poetc.report import REPORT_FORMAT, CompileReport, KeepAllSummary, StrategySummary, memory_breakdown
    _, fg, problem = mlp_fused
    p = _plan_at(problem, lower_bound(problem).ram_bytes + 64 * 1024)
    r = p.result
    summary = StrategySummary.of(r)
    assert summary.peak_bytes == p.budget.fixed_bytes + summary.resident_state_bytes + summary.activation_peak_bytes
    report = CompileReport(model="m", target="rpi4", objective="energy", budget=p.budget, deadline="100x",
                           deadline_s=p.deadline_s, flash_bytes=1, fixed_state_bytes={}, lower_bound=p.bound,
                           keep_all=KeepAllSummary(1, 1, 1.0, 1.0, 5), result=summary, baselines={}, candidates=1,
                           granularity="op", schedule_encoding_bytes=1, passes=[], native_libraries={},
                           runtime_contract={}, label_classes=None, inputs={},
                           memory_classes=memory_breakdown(fg, r.schedule, r.sim, problem.costs),
                           state_tensors=[{"name": "x"}], state_dir="initial_state")
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["format"] == REPORT_FORMAT == "poetc-report/3"
    back = CompileReport.from_json(doc)
    assert dataclasses.asdict(back) == dataclasses.asdict(report)


def test_an_empty_directory_does_not_make_an_output_foreign(tmp_path):
    """A fused output's initial_state/frozen is empty when no parameter is frozen: --force must still
    replace the output; a directory with content poetc did not write still makes it foreign."""
    from poetc.output import foreign_content, write_manifest
    out = tmp_path / "out"
    (out / "initial_state" / "frozen").mkdir(parents=True)
    (out / "initial_state" / "MANIFEST.json").write_text("{}")
    (out / "report.json").write_text("{}")
    write_manifest(out)
    assert foreign_content(out) is None
    (out / "other").mkdir()
    (out / "other" / "data.txt").write_text("x")
    assert "other" in foreign_content(out)


# ---------------------------------------------------------------------------------------------------
# the soft default deadline


class _FakePlan:
    """What soft_deadline_plan reads of a plan: fits, the keep-all time and the schedule's time."""

    def __init__(self, fits, time_s, base_s=1.0):
        from types import SimpleNamespace
        self.fits = fits
        self.problem = SimpleNamespace(base_time_s=base_s)
        self.result = SimpleNamespace(sim=SimpleNamespace(time_s=time_s))


def test_soft_deadline_relaxes_to_the_fastest_schedule_that_fits():
    """A fake planner whose fastest fitting schedule takes 2.713x keep-all: the default 1.3x finds
    nothing, a time-minimising run at no deadline finds 2.713x, the energy run at 2.72x fits; the note
    says so. When 1.3x fits nothing is relaxed; when nothing fits at any deadline, the default's
    failure is returned."""
    from poetc.api import DEFAULT_DEADLINE, soft_deadline_plan
    calls = []

    def run(deadline, objective):
        calls.append((str(deadline), objective))
        return _FakePlan(deadline.factor >= 2.713, 2.713 if objective == "time" else min(deadline.factor, 2.72))
    p, note = soft_deadline_plan(run, "energy")
    assert calls == [("1.3x", "energy"), ("1000x", "time"), ("2.72x", "energy")]
    assert p.fits and str(note[0]) == "2.72x"
    assert note[1] == "1.3x default not reachable at this budget; using 2.72x, the fastest schedule that fits"

    p, note = soft_deadline_plan(lambda d, o: _FakePlan(True, 1.1), "energy")
    assert note is None and p.fits and str(DEFAULT_DEADLINE) == "1.3x"

    first = _FakePlan(False, 1.0)
    p, note = soft_deadline_plan(lambda d, o: first if d.factor == 1.3 else _FakePlan(False, 1.0), "energy")
    assert p is first and note is None

    # the energy runs at the fastest schedule's factor find nothing: the fastest schedule is kept and the
    # deadline reported is the factor it meets, not the 1000x it was solved under
    fastest = _FakePlan(True, 2.713)
    p, note = soft_deadline_plan(lambda d, o: fastest if o == "time" else _FakePlan(False, 1.0), "energy")
    assert p is fastest and str(note[0]) == "2.72x" and "takes 2.71x" in note[1]


def test_explicit_deadline_stays_strict_and_default_is_soft(tmp_path, capsys):
    """The bundled-MLP-like case at a budget where state I/O needs more than 1.3x keep-all: an explicit
    --deadline 1.3x is refused; no --deadline compiles with the relaxed deadline in report.json and the
    CLI summary."""
    import models
    from poetc.api import CompileOptions, compile_model
    from poetc.cli import main
    path = models.export_onnx("mlp", tmp_path / "mlp.onnx", batch=64, seed=0)
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    artifacts, graph = open_graph(path, tmp_path / "art", ImportOptions())
    fg = _fused(artifacts, graph)
    ram = lower_bound(build_problem(fg, _costs(fg))).ram_bytes + 64 * 1024
    with pytest.raises(InfeasibleError):
        compile_model(path, CompileOptions(ram_bytes=ram, out_dir=tmp_path / "strict", baselines=(),
                                           optimizer_mode="fused", slice_updates="off", time_limit_s=20,
                                           deadline=Deadline(factor=1.3)))
    report = compile_model(path, CompileOptions(ram_bytes=ram, out_dir=tmp_path / "soft", baselines=(),
                                                optimizer_mode="fused", slice_updates="off",
                                                time_limit_s=20)).report
    assert report.result.fits and report.deadline != "1.3x" and float(report.deadline[:-1]) > 1.3
    assert report.deadline_note.startswith("1.3x default not reachable at this budget; using ")
    assert report.deadline_s <= float(report.deadline[:-1]) * report.keep_all.time_s * (1 + 1e-9)
    assert main(["compile", str(path), "--ram", f"{ram}B", "-o", str(tmp_path / "cli"), "--baselines", "",
                 "--optimizer-mode", "fused", "--slice-updates", "off"]) == 0
    assert f"deadline: {report.deadline_note}" in capsys.readouterr().out
