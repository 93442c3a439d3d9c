"""Lowering, roles, the simulator against ONNX Runtime's measured peak, and the lower bound."""

import pytest

from poetc.api import ort_order_keep_all
from poetc.schedule import simulate_keep_all
from poetc.ir import Role, TensorKind
from poetc.schedule import fixed_state_bytes


def test_roles_and_kinds(mlp_graph):
    _, g = mlp_graph
    roles = g.op_counts_by_role()
    assert roles["forward"] == 7 and roles["loss"] == 1 and roles["accumulate"] == 8
    assert all(op.role is Role.ACCUMULATE for op in g.ops if op.op_type.startswith("InPlaceAccumulator"))
    assert len(g.tensors_of_kind(TensorKind.PARAMETER)) == 8
    saved = g.saved_activations()
    assert saved and all(t.kind is TensorKind.ACTIVATION for t in saved)
    # every saved activation is read by a backward op
    for t in saved:
        readers = {c for name, x in g.tensors.items() if g.storage_root(name) == t.name for c in x.consumers}
        assert any(g.ops[c].role is Role.BACKWARD for c in readers)


def test_hoisting_accumulators_never_raises_the_peak(cnn_graph):
    import onnx

    from poetc.ir.lower import ensure_unique_node_names
    artifacts, g = cnn_graph
    original = onnx.load(str(artifacts / "training_model.onnx"))
    ensure_unique_node_names(original)
    assert simulate_keep_all(g).peak_bytes <= ort_order_keep_all(g, original).peak_bytes


@pytest.mark.parametrize("name", ["mlp_graph", "cnn_graph", "bert_tiny_graph"])
def test_simulator_matches_measured_peak(name, request):
    """Keep-all step peak in ORT (LD_PRELOAD heap counter) vs the simulator, in ORT's own order.
    Under the contract (arena, memory pattern and buffer reuse off) the step allocates what the
    simulator counts: tensors between producer and last reader, plus each kernel's workspace."""
    import onnx

    from poetc.run import measure_artifacts
    from poetc.ir.lower import ensure_unique_node_names
    artifacts, g = request.getfixturevalue(name)
    original = onnx.load(str(artifacts / "training_model.onnx"))
    ensure_unique_node_names(original)
    predicted = ort_order_keep_all(g, original).peak_bytes
    run = measure_artifacts(artifacts, g, steps=3)
    for step in run.steps[1:]:
        assert abs(step.peak_heap_bytes - predicted) <= max(0.03 * predicted, 2**20), (step.peak_heap_bytes, predicted)


def test_lower_bound_below_measured_peak(mlp_graph):
    from poetc.run import measure_artifacts
    artifacts, g = mlp_graph
    from poetc.plan import lower_bound
    from poetc.solver import build_problem
    from test_lower_bound import zero_costs
    b = lower_bound(build_problem(g, zero_costs(g)))
    fixed = sum(fixed_state_bytes(g).values())
    run = measure_artifacts(artifacts, g, steps=2)
    assert b.set_by
    assert fixed + b.floor_activation_bytes <= fixed + min(s.peak_heap_bytes for s in run.steps)


def test_workspace_is_measured_and_matters(cnn_graph, bert_tiny_graph):
    """ConvGrad and LayerNormalizationGrad allocate scratch; without it the simulator under-predicts."""
    _, cnn = cnn_graph
    _, bert = bert_tiny_graph
    conv_grad = [op.workspace_bytes for op in cnn.ops if op.op_type == "ConvGrad"]
    ln_grad = [op.workspace_bytes for op in bert.ops if op.op_type == "LayerNormalizationGrad"]
    assert conv_grad and max(conv_grad) > 0
    assert ln_grad and min(ln_grad) > 0
    assert all(op.workspace_bytes == 0 for op in cnn.ops if op.op_type in ("Identity", "Reshape"))


def test_workspace_measurement_is_deterministic(cnn_graph):
    from poetc.ir.lower import probe_feeds, read_checkpoint_parameters
    from poetc.runtime.workspace import measure_workspace
    artifacts, g = cnn_graph
    params = {n: v for n, (v, _) in read_checkpoint_parameters(artifacts / "checkpoint").items()}
    types = {t.name: (t.dtype, t.shape) for t in g.tensors.values() if t.producer is not None}
    again = measure_workspace(g.model, probe_feeds(g.model, params), types)
    assert {op.name: op.workspace_bytes for op in g.ops} == {op.name: again[op.name] for op in g.ops}


def test_importing_twice_in_one_process_gives_the_same_graph(mlp_onnx, tmp_path):
    """onnxruntime-training numbers loss tensors with a per-process counter; poetc renumbers them."""
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    from poetc.schedule import graph_fingerprint
    _, first = open_graph(mlp_onnx, tmp_path / "a", ImportOptions())
    _, second = open_graph(mlp_onnx, tmp_path / "b", ImportOptions())
    assert graph_fingerprint(first) == graph_fingerprint(second)
    assert any(name.startswith("onnx::loss::") for name in first.tensors)
