"""Fused optimizer mode (issue #16): each parameter's update inside the backward pass.

Structure of the fused graph (no accumulators or buffers, one update per parameter after every
reader of the old value, with data dependencies), the fixed-state accounting, the rule that no
recompute reads an updated weight (problem and simulator, on random graphs), the report fields, and
bitwise equality with the unfused reference in ONNX Runtime (AdamW and SGD, schedules that recompute
and page)."""

from __future__ import annotations

import json
import zlib

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poetc.api import CompileOptions, compile_model, open_graph
from poetc.plan import STRATEGIES, Budget, Limits, lower_bound
from poetc.report import CompileReport
from poetc.run import verify
from poetc.errors import InfeasibleError
from poetc.importer import ImportOptions
from poetc.ir.fused import fuse_optimizer, is_optimizer_state, read_optimizer_spec
from poetc.ir.graph import Role, TensorKind
from poetc.schedule import simulate_keep_all as keep_all
from poetc.schedule import (ScheduleError, Step, StepCosts, StepKind, build_steps, fixed_state_bytes, frame_bytes,
                            recompute_name, simulate)
from poetc.solver import build_problem, run_strategy
from poetc.units import Deadline
from random_onnx import build, graph_specs

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fused(artifacts, graph):
    return fuse_optimizer(graph, read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx"))))


def _ancestors(graph, index):
    seen, stack = set(), [index]
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(graph.tensors[x].producer for x in graph.ops[i].inputs
                         if x and graph.tensors[x].producer is not None)
    return seen


def check_fused_structure(unfused, fused):
    assert fused.optimizer_mode == "fused" and unfused.optimizer_mode == "unfused"
    assert not fused.ops_with_role(Role.ACCUMULATE)
    assert not fused.tensors_of_kind(TensorKind.GRAD_BUFFER)
    updates = fused.parameter_updates()
    assert sorted(updates) == sorted(unfused.parameter_names)
    for param, u in updates.items():
        op = fused.ops[u]
        grad = op.inputs[1]
        assert fused.tensors[grad].kind is TensorKind.GRADIENT
        assert fused.tensors[grad].consumers[-1] == u or max(fused.tensors[grad].consumers) >= u
        before = _ancestors(fused, u)
        for reader in fused.tensors[param].consumers:
            if reader != u:
                assert reader < u, f"{fused.ops[reader].name} reads {param} after its update"
                assert reader in before, f"no data dependency from {fused.ops[reader].name} to {op.name}"
    # the same computation otherwise: every unfused non-accumulator op is still there, in the same order
    names = [op.name for op in fused.ops]
    kept = [op.name for op in unfused.ops if op.role is not Role.ACCUMULATE]
    assert [n for n in names if n in set(kept)] == kept
    onnx.checker.check_model(fused.model)


def test_fused_graph_structure_and_fixed_state(mlp_graph):
    artifacts, graph = mlp_graph
    fused = _fused(artifacts, graph)
    check_fused_structure(graph, fused)
    before, after = fixed_state_bytes(graph), fixed_state_bytes(fused)
    params = before["parameters"]
    assert before["gradient_buffers"] == params and after["gradient_buffers"] == 0
    assert after["parameters"] == params and after["inputs"] == before["inputs"]
    assert after["optimizer_state"] == 2 * params + 8  # two moments, the learning rate and the step counter
    assert _bound(graph) - _bound(fused) >= params - 2**20
    assert keep_all(fused).total_peak_bytes < keep_all(graph).total_peak_bytes - params // 2


def _bound(graph) -> int:
    """poetc's lower bound (poetc.plan.lower_bound) of a graph."""
    return lower_bound(build_problem(graph, _costs(graph))).ram_bytes


def test_simulator_rejects_a_read_of_an_updated_parameter(mlp_graph):
    artifacts, graph = mlp_graph
    fused = _fused(artifacts, graph)
    steps, origin = build_steps(fused, {})
    simulate(fused, steps, origin)  # valid as built
    param, u = min(fused.parameter_updates().items(), key=lambda kv: kv[1])
    reader = fused.tensors[param].consumers[0]
    op = fused.ops[reader]
    late = Step(StepKind.RECOMPUTE, reader, None, tuple(op.inputs), tuple(recompute_name(o, 1) for o in op.outputs))
    bad = steps[:] + [late]
    with pytest.raises(ScheduleError, match="after its in-graph update"):
        simulate(fused, bad, origin)


def test_problem_refuses_a_recompute_that_would_read_an_updated_weight(mlp_graph, monkeypatch):
    """In real graphs a parameter's update follows every op that could rerun before a backward reader
    (the gradient needs those readers first), so the rule rarely binds; move an update earlier than
    a recompute would run and the problem must refuse that recompute."""
    artifacts, graph = mlp_graph
    fused = _fused(artifacts, graph)
    problem = build_problem(fused, _costs(fused))
    updates = fused.parameter_updates()
    cand = next(c for c in problem.candidates if c.recomputable and
                any(x in updates for i in c.chain_ops for x in fused.ops[i].inputs))
    param = next(x for i in cand.chain_ops for x in fused.ops[i].inputs if x in updates)
    steps, origin = build_steps(fused, {})
    keep = simulate(fused, steps, origin, _costs(fused))  # the keep-all replay itself is valid
    import poetc.solver.problem as problem_module
    monkeypatch.setattr(problem_module, "simulate_keep_all", lambda *args, **kw: keep)
    monkeypatch.setattr(fused, "parameter_updates", lambda: dict(updates, **{param: cand.first_after_gap - 1}))
    again = {c.name: c for c in build_problem(fused, _costs(fused)).candidates}[cand.name]
    assert not again.recomputable and "after its in-graph update" in again.why_not_recomputable


def _costs(graph) -> StepCosts:
    times = [1e-4 * (1 + zlib.crc32(op.name.encode()) % 50) for op in graph.ops]
    return StepCosts(times, [t * 3.0 for t in times], lambda n: (1e-5 + n / 24.5e6, 1.5e-6 + n / 163e6),
                     lambda n: (5e-6 + n / 45.5e6, 7.5e-7 + n / 303e6))


def _random_graph(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("fused-fuzz")
    path = work / "model.onnx"
    onnx.save(build(spec), str(path))
    artifacts, graph = open_graph(path, work / "art", ImportOptions())
    return graph, _fused(artifacts, graph)


@settings(max_examples=6, **SETTINGS)
@given(spec=graph_specs(), fractions=st.lists(st.floats(0.1, 0.9), min_size=1, max_size=2))
def test_no_recompute_reads_an_updated_weight_on_random_graphs(spec, fractions, tmp_path_factory):
    graph, fused = _random_graph(spec, tmp_path_factory)
    check_fused_structure(graph, fused)
    problem = build_problem(fused, _costs(fused))
    updates = fused.parameter_updates()
    for cand in problem.candidates:
        if cand.recomputable:
            read = {x for i in cand.chain_ops for x in fused.ops[i].inputs if x in updates}
            assert all(updates[x] > cand.first_after_gap for x in read), (cand.name, read)
    for fraction in fractions:
        limits = Limits.of(Budget.activations_only(int(problem.keep_all_peak_bytes * fraction)),
                           problem.base_time_s * 2, 1e12)
        for strategy in STRATEGIES:
            r = run_strategy(problem, limits, strategy, time_limit_s=10)
            assert not any("failed simulation" in note for note in r.notes), (strategy, r.notes)
            # simulate() raises on a read of an updated parameter; replay every step list to be sure
            simulate(fused, r.schedule.steps, r.schedule.origin)
            updated = set()
            for step in r.schedule.steps:
                assert not updated & set(step.reads), (strategy, step)
                if step.kind is StepKind.COMPUTE and fused.ops[step.op].role is Role.UPDATE:
                    updated.add(fused.ops[step.op].inputs[0])


def test_report_fields_and_outputs(mlp_onnx, tmp_path):
    out = tmp_path / "fused"
    result = compile_model(mlp_onnx, CompileOptions(ram_bytes=40 * 2**20, out_dir=out, baselines=(),
                                                    optimizer_mode="fused", time_limit_s=20))
    assert result.optimizer_mode == "fused"
    report = CompileReport.from_json(json.loads((out / "report.json").read_text()))
    assert report.optimizer_mode == "fused" and "requested" in report.optimizer_mode_reason
    assert report.fixed_state_bytes["gradient_buffers"] == 0
    assert not (out / "optimizer_model.onnx").exists()  # Module alone drives it
    assert (out / "reference" / "optimizer_model.onnx").exists() and (out / "reference" / "checkpoint").exists()
    assert json.loads((out / "runtime.json").read_text())["optimizer_mode"] == "fused"
    from onnxruntime.training.api import CheckpointState
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    names = [n for n, p in state.parameters]
    assert all(not p.requires_grad for _, p in state.parameters)
    assert {n for n in names if is_optimizer_state(n)} >= {"__poet_learning_rate", "__poet_step"}
    model = onnx.load(str(out / "training_model.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "InPlaceAccumulatorV2"]
    params = [n for n in names if not is_optimizer_state(n)]
    assert len([n for n in model.graph.node if n.op_type == "AdamWUpdate"]) == len(params) == 8  # the MLP's

    out_u = tmp_path / "unfused"
    r_u = compile_model(mlp_onnx, CompileOptions(ram_bytes=40 * 2**20, out_dir=out_u, baselines=(),
                                                 optimizer_mode="unfused", time_limit_s=20))
    assert r_u.optimizer_mode == "unfused" and r_u.report.optimizer_mode == "unfused"
    assert (out_u / "optimizer_model.onnx").exists()
    assert r_u.report.fixed_state_bytes["gradient_buffers"] > 0


def test_auto_takes_fused_when_only_fused_fits(mlp_onnx, mlp_graph, tmp_path):
    artifacts, graph = mlp_graph
    fused = _fused(artifacts, graph)
    unfused_bound, fused_bound = _bound(graph), _bound(fused)
    ram = (unfused_bound + fused_bound) // 2  # below the unfused lower bound
    with pytest.raises(InfeasibleError):
        compile_model(mlp_onnx, CompileOptions(ram_bytes=ram, out_dir=tmp_path / "u", baselines=(),
                                               optimizer_mode="unfused", time_limit_s=20,
                                               deadline=Deadline(factor=3.0)))
    try:
        result = compile_model(mlp_onnx, CompileOptions(ram_bytes=ram, out_dir=tmp_path / "a", baselines=(),
                                                        time_limit_s=20, deadline=Deadline(factor=3.0)))
    except InfeasibleError as exc:  # the fused mode may need more than its own lower bound here
        pytest.fail(f"auto found no schedule at {ram} B although fused keep-all needs "
                    f"{keep_all(fused).total_peak_bytes} B: {exc}")
    assert result.optimizer_mode == "fused" and result.report.optimizer_mode_reason.startswith("auto:")


def _compile_verify(model, tmp_path, ram, **kw):
    out = tmp_path / "out"
    options = CompileOptions(ram_bytes=ram, out_dir=out, baselines=(), time_limit_s=30,
                             deadline=Deadline(factor=3.0), **kw)
    report = compile_model(model, options).report
    v = verify(out, steps=3)
    return report, v


def test_fused_mlp_sgd_is_bitwise_unfused(tmp_path):
    import models
    path = models.export_onnx("mlp", tmp_path / "mlp.onnx", batch=64, seed=0)
    report, v = _compile_verify(path, tmp_path, 40 * 2**20, optimizer_mode="fused",
                                import_options=ImportOptions(optimizer="sgd"))
    assert report.optimizer_mode == "fused"
    assert v.to_json()["bitwise_identical_params"] and v.to_json()["max_abs_loss_diff"] == 0, v.to_json()
    assert v.ok, v.to_json()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_cnn_recompute_and_page_is_bitwise_unfused(cnn_onnx, cnn_graph, tmp_path, optimizer):
    artifacts, graph = cnn_graph
    fused = _fused(artifacts, graph)
    problem = build_problem(fused, _costs(fused))
    least = lower_bound(problem).ram_bytes
    keep = Budget.smallest_for(problem.keep_all_peak_bytes, problem.fixed_bytes).ram_bytes
    # a third of the way from the least any schedule needs to keep-all: recompute and page
    ram = int(least + 0.3 * (keep - least))
    report, v = _compile_verify(cnn_onnx, tmp_path, ram, optimizer_mode="fused",
                                import_options=ImportOptions(optimizer=optimizer))
    counts = report.result.decisions
    assert counts["recompute"] + counts["page"] > 0, counts
    assert v.to_json()["bitwise_identical_params"] and v.to_json()["max_abs_loss_diff"] == 0, v.to_json()
    # the fused step holds no gradient buffers: it needs less than the unfused reference. (Within the
    # budget is not asserted here: on this cnn at batch 8 the measured peak of such schedules exceeds
    # the prediction by ~0.5 MB in the unfused mode too -- a known, separate simulator gap.)
    assert v.to_json()["measured_total_peak_bytes"] < v.to_json()["fixed_total_bytes"] + max(v.to_json()["reference_step_peak_bytes"][1:])


def test_an_update_comes_after_every_reader_of_a_view_of_its_parameter(tmp_path):
    """ONNX Runtime's Unsqueeze/Reshape of a parameter share its buffer: a reader of the view after the
    in-place update reads the new value (issue #15: the corpus resnet_sum, whose PRelu slope [C] is
    Unsqueezed to [C, 1, 1], trained differently in the fused mode). The update goes after them."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    from poetc.ir.fused import fuse_optimizer, parameter_views, read_optimizer_spec

    rng = np.random.default_rng(2)
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"], name="scale"),
             oh.make_node("Unsqueeze", ["S", "axes"], ["s3"], name="lift_slope"),
             oh.make_node("PRelu", ["xw", "s3"], ["y"], name="prelu")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])],
                          [nh.from_array((rng.standard_normal((1, 4, 1, 1)) + 1).astype(np.float32), "W"),
                           nh.from_array((rng.standard_normal(4) * 0.2).astype(np.float32), "S"),
                           nh.from_array(np.array([1, 2], np.int64), "axes")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    artifacts, g = open_graph(tmp_path / "m.onnx", tmp_path / "work", ImportOptions(loss="mse"))
    fused = fuse_optimizer(g, read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx"))))
    updates = fused.parameter_updates()
    assert len(parameter_views(fused, "S")) > 1  # the Unsqueeze output is a view of S
    for param, at in updates.items():
        for view in parameter_views(fused, param):
            late = [c for c in fused.tensors[view].consumers if c > at]
            assert not late, (param, view, [fused.ops[c].name for c in late])


# ---------------------------------------------------------------------------------------------------
# sliced updates (issue #17): a parameter updated in k row ranges, its moments as k slice tensors


def _adamw_session(lib, n, ranges, weight_decay=0.01):
    """A session updating W (n floats) with one poet.AdamWUpdate per (begin, end) range, moment
    slices M1_i, M2_i of end - begin floats; ranges None: one whole update."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    from poetc.runtime.session import contract_session_options
    attrs = dict(alpha=0.9, beta=0.999, epsilon=1e-6, weight_decay=weight_decay, correct_bias=1, adam_mode=1)
    nodes = [h.make_node("StepCount", ["S"], ["N"], domain="poet")]
    inputs = [h.make_tensor_value_info("W", T.FLOAT, [n]), h.make_tensor_value_info("G", T.FLOAT, [n]),
              h.make_tensor_value_info("LR", T.FLOAT, [1]), h.make_tensor_value_info("S", T.FLOAT, [1])]
    outputs = [h.make_tensor_value_info("N", T.INT64, [1])]
    prev = "G"
    for i, r in enumerate(ranges or [None]):
        size = n if r is None else r[1] - r[0]
        inputs += [h.make_tensor_value_info(f"M1_{i}", T.FLOAT, [size]),
                   h.make_tensor_value_info(f"M2_{i}", T.FLOAT, [size])]
        extra = {} if r is None else dict(begin=r[0], end=r[1])
        nodes.append(h.make_node("AdamWUpdate", ["W", "G", f"M1_{i}", f"M2_{i}", "LR", "N", prev], [f"F{i}"],
                                 domain="poet", **attrs, **extra))
        outputs.append(h.make_tensor_value_info(f"F{i}", T.BOOL, [1]))
        prev = f"F{i}"
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("poet", 1)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), contract_session_options(lib, 1),
                                providers=["CPUExecutionProvider"])


def _aligned_at(values, offset_floats):
    import numpy as np
    raw = np.zeros(values.size + 32, np.float32)
    start = (-(raw.ctypes.data // 4)) % 16 + offset_floats
    out = raw[start:start + values.size]
    out[...] = values
    return out


@pytest.mark.parametrize("n,offset", [(5003, 0), (5003, 3), (2049, 1), (7, 2)])
def test_sliced_adamw_update_is_bitwise_the_whole_update(spill_lib, n, offset):
    """k range updates (random cut points, none a multiple of the 1024-element chunk or of the 4-float
    packet by construction, plus ranges of one element) equal the whole update bit for bit, over
    steps with zero and tiny gradients (the square root's scalar, packet and denormal paths); W starts
    `offset` floats past a 64-byte boundary, so the packet head moves."""
    import numpy as np
    rng = np.random.default_rng(n * 10 + offset)
    cuts = sorted(set(rng.choice(np.arange(1, n), size=min(n - 1, 5), replace=False).tolist()) | {1})
    edges = [0] + [c for c in cuts if c < n] + [n]
    ranges = list(zip(edges[:-1], edges[1:]))
    assert len(ranges) >= 2 and any(b - a == 1 for a, b in ranges)
    whole, sliced = _adamw_session(spill_lib, n, None), _adamw_session(spill_lib, n, ranges)
    w0 = rng.standard_normal(n).astype(np.float32)
    w_whole, w_sliced = _aligned_at(w0, offset), _aligned_at(w0, offset)
    m_whole = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    m_sliced = [[np.zeros(b - a, np.float32), np.zeros(b - a, np.float32)] for a, b in ranges]
    s_whole, s_sliced = np.zeros([1], np.float32), np.zeros([1], np.float32)
    lr = np.array([3e-3], np.float32)
    for step in range(4):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 2)).astype(np.float32)
        g[rng.random(n) < 0.05] = 0.0
        if step == 3:
            g[: n // 2] = np.float32(1e-30)  # second moments in the denormal range
        whole.run(None, {"W": w_whole, "G": g, "LR": lr, "S": s_whole, "M1_0": m_whole[0], "M2_0": m_whole[1]})
        feeds = {"W": w_sliced, "G": g, "LR": lr, "S": s_sliced}
        for i, (m1, m2) in enumerate(m_sliced):
            feeds[f"M1_{i}"], feeds[f"M2_{i}"] = m1, m2
        sliced.run(None, feeds)
        assert w_sliced.tobytes() == w_whole.tobytes(), f"parameter differs at step {step}"
        assert np.concatenate([m[0] for m in m_sliced]).tobytes() == m_whole[0].tobytes()
        assert np.concatenate([m[1] for m in m_sliced]).tobytes() == m_whole[1].tobytes()
    assert not np.array_equal(w_whole, w0)  # the updates did something


def test_sliced_adamw_update_refuses_a_bad_range(spill_lib):
    import numpy as np
    sess = _adamw_session(spill_lib, 8, [(0, 4), (4, 9)])  # the second range ends past W
    z = np.zeros(8, np.float32)
    with pytest.raises(Exception, match="outside the parameter"):
        sess.run(None, {"W": z, "G": z, "LR": np.ones([1], np.float32), "S": np.zeros([1], np.float32),
                        "M1_0": np.zeros(4, np.float32), "M2_0": np.zeros(4, np.float32),
                        "M1_1": np.zeros(5, np.float32), "M2_1": np.zeros(5, np.float32)})


def test_slice_ranges_cover_rows_then_elements():
    from poetc.ir.fused import slice_ranges
    assert slice_ranges((5, 3), 2) == [(0, 9, (3, 3)), (9, 15, (2, 3))]
    assert slice_ranges((2, 3), 4) == [(0, 2, (2,)), (2, 4, (2,)), (4, 5, (1,)), (5, 6, (1,))]
    assert slice_ranges((7,), 1) == [(0, 7, (7,))]


def test_sliced_fusion_structure(mlp_graph):
    from poetc.ir.fused import moment_names, slice_parent, state_tensors, update_slices
    artifacts, graph = mlp_graph
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    param = max(graph.parameter_names, key=lambda p: graph.tensors[p].nbytes)
    whole, sliced = fuse_optimizer(graph, spec), fuse_optimizer(graph, spec, {param: 3})
    check_fused_structure(graph, sliced)
    assert update_slices(sliced) == {param: 3} and update_slices(whole) == {}
    assert sliced.optimizer_state_bytes == whole.optimizer_state_bytes  # the same bytes, cut in three
    ups = [op for op in sliced.ops if op.role is Role.UPDATE and op.inputs[0] == param]
    assert [op.index for op in ups] == list(range(ups[0].index, ups[0].index + 3))  # one after the other
    for a, b in zip(ups, ups[1:]):
        assert a.outputs[0] in b.inputs[6:]  # chained: slice i+1 after slice i
    assert sliced.parameter_updates()[param] == ups[-1].index  # the parameter is updated after the last
    states = {s.name: s for s in state_tensors(sliced)}
    for m in moment_names(param):
        assert m not in states
        parts = [states[f"{m}__s{i}"] for i in range(3)]
        assert sum(s.nbytes for s in parts) == graph.tensors[param].nbytes
        assert [s.update for s in parts] == [op.index for op in ups]
        assert all(slice_parent(s.name) == m and s.groups == ((s.update, s.update),) for s in parts)
    node = {n.name: n for n in sliced.model.graph.node}
    ranges = [tuple(a.i for a in node[op.name].attribute if a.name in ("begin", "end")) for op in ups]
    rows = graph.tensors[param].shape[0]
    per_row = graph.tensors[param].nbytes // 4 // rows
    assert ranges[0][0] == 0 and ranges[-1][1] == rows * per_row
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # all resident: the same tensors' RAM; only ONNX Runtime's execution frame grows, by the values and
    # graph inputs the slices add (the moment slices, the extra updates' flags)
    def frame(g):
        return frame_bytes(len(g.tensors), sum(1 for _ in g.model.graph.input))
    assert frame(sliced) > frame(whole)
    assert keep_all(sliced).total_peak_bytes == keep_all(whole).total_peak_bytes + frame(sliced) - frame(whole)


def test_slicing_lowers_the_bound_set_by_an_update(mlp_graph):
    """The fused MLP's bound is set by its largest weight's update (weight, gradient, both moments);
    choose_update_slices cuts just that update, the smallest number of slices that brings the bound
    to the budget; with the budget at the unsliced bound nothing is sliced."""
    from poetc.api import choose_update_slices, step_costs_for
    from poetc.targets import load_target
    artifacts, graph = mlp_graph
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    costs = lambda g: step_costs_for(g, load_target("rpi4"), None)  # noqa: E731
    whole = fuse_optimizer(graph, spec)
    bound = lower_bound(build_problem(whole, costs(whole)))
    op = whole.ops[bound.position]
    assert op.op_type == "AdamWUpdate", bound
    param = op.inputs[0]
    moment = graph.tensors[param].nbytes
    assert choose_update_slices(graph, spec, costs, bound.ram_bytes) == {}
    target = bound.ram_bytes - moment // 2  # needs the moments' share cut by more than a half
    slices = choose_update_slices(graph, spec, costs, target)
    assert set(slices) == {param} and slices[param] >= 2
    sliced = fuse_optimizer(graph, spec, slices)
    sliced_bound = lower_bound(build_problem(sliced, costs(sliced)))
    assert sliced_bound.ram_bytes <= target < bound.ram_bytes
    if slices[param] > 2:  # the smallest k: one slice fewer does not reach the budget
        fewer = fuse_optimizer(graph, spec, {param: slices[param] - 1})
        assert lower_bound(build_problem(fewer, costs(fewer))).ram_bytes > target


@pytest.fixture(scope="module")
def sliced_mlp(mlp_onnx, mlp_graph, tmp_path_factory):
    """The test MLP compiled (fused) at half its largest weight below the unsliced fused bound."""
    artifacts, graph = mlp_graph
    whole_bound = _bound(_fused(artifacts, graph))
    ram = whole_bound - graph.tensors[max(graph.parameter_names, key=lambda p: graph.tensors[p].nbytes)].nbytes // 2
    out = tmp_path_factory.mktemp("sliced") / "out"
    report = compile_model(mlp_onnx, CompileOptions(ram_bytes=ram, out_dir=out, baselines=(), optimizer_mode="fused",
                                                    time_limit_s=30)).report
    return ram, out, report


def test_compiled_sliced_mlp_verifies_bitwise(mlp_onnx, sliced_mlp, tmp_path):
    """Below the unsliced fused bound: compile slices the binding update (with --slice-updates off the
    same budget is refused), the schedule pages moment slices, report.json lists the slices with their
    parent, and verify is bitwise against the unfused reference."""
    ram, out, report = sliced_mlp
    with pytest.raises(InfeasibleError):  # off: below the bound
        compile_model(mlp_onnx, CompileOptions(ram_bytes=ram, out_dir=tmp_path / "off", baselines=(),
                                               optimizer_mode="fused", slice_updates="off", time_limit_s=20))
    assert report.update_slices and all(k >= 2 for k in report.update_slices.values())
    slices = [s for s in report.state_tensors if s["parent"]]
    assert slices and all(s["role"] == "moment" and s["parent"].split("__poet_")[0] in report.update_slices
                          for s in slices)
    assert any(s["paged"] for s in slices)
    v = verify(out, steps=3)
    assert v.to_json()["bitwise_identical_params"] and v.ok, v.to_json()


@pytest.mark.slow
def test_sliced_state_directory_resumes_and_exports_whole_parameters(mlp_graph, sliced_mlp, tmp_path):
    """A state directory of a sliced compile: two steps then resumed to four equals four in one run;
    the export holds whole parameters, bitwise equal between the two, and no optimizer state."""
    import numpy as np

    from poetc.export import _read_checkpoint, export
    from poetc.run import train
    from poetc.runtime.statedir import StateDir
    _, graph = mlp_graph
    _, out, _ = sliced_mlp
    train(out, steps=2, state=tmp_path / "a", threads=1)
    train(out, steps=4, state=tmp_path / "a", threads=1)
    train(out, steps=4, state=tmp_path / "b", threads=1)
    exported = {}
    for run in ("a", "b"):
        with StateDir.open(tmp_path / run) as s:
            assert s.step == 4
        export(out, tmp_path / f"exp-{run}", state=tmp_path / run)
        exported[run] = {n: np.asarray(v) for n, (v, _) in _read_checkpoint(tmp_path / f"exp-{run}" / "checkpoint",
                                                                           artifact=True).items()}
    assert sorted(exported["a"]) == sorted(graph.parameter_names + graph.frozen_parameter_names)
    for name, value in exported["a"].items():
        assert value.shape == graph.tensors[name].shape
        assert value.tobytes() == exported["b"][name].tobytes(), name


def test_slice_heaviest_update_cuts_the_largest_trainable_weight_one_more_time(mlp_graph):
    """When no schedule fits although the bound does (what ONNX Runtime holds across the step), compile
    re-plans with one more slice of the update that holds the most: (2 + 2/k) x the weight's bytes.
    Deterministic, never a frozen parameter, never past MAX_UPDATE_SLICES."""
    from poetc.api import MAX_UPDATE_SLICES, slice_heaviest_update
    _, graph = mlp_graph
    params = {n: t.nbytes for n, t in graph.tensors.items() if t.kind is TensorKind.PARAMETER}
    largest = max(sorted(params), key=lambda n: params[n])
    assert slice_heaviest_update(graph, {}) == {largest: 2}
    # once the largest is cut, the next-largest whole update may hold more
    slices = {largest: 2}
    for _ in range(40):
        more = slice_heaviest_update(graph, slices)
        if more is None:
            break
        assert [more.get(n, 1) - slices.get(n, 1) for n in sorted(params) if more.get(n, 1) != slices.get(n, 1)] == [1]
        held = {n: params[n] * (2 + 2 / slices.get(n, 1)) for n in params
                if slices.get(n, 1) < MAX_UPDATE_SLICES}
        grown = next(n for n in more if more[n] != slices.get(n, 1))
        assert held[grown] == max(held.values())
        slices = more
    assert all(k <= MAX_UPDATE_SLICES for k in slices.values())
    graph.frozen_parameter_names.append(largest)
    try:
        assert largest not in (slice_heaviest_update(graph, {}) or {})
    finally:
        graph.frozen_parameter_names.remove(largest)
