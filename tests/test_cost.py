"""Cost model: FLOP counts, cost tables on every target, host profiling and cost files.

The test graphs are small torch models exported here (independent of `models/`): an MLP, a CNN
(Conv + BatchNorm + ReLU + MaxPool, a depthwise Conv with Clip and a residual Add, global average
pooling) and an attention block (Embedding, MatMul, Softmax, LayerNorm, GELU, mean).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from poetc.cost import (MIN_MEASURED_OP_TIME_S, CostTable, OpCost, build_cost_table,  # noqa: E402
                        count_flops, graph_fingerprint, is_known_op_type, load_costs,
                        measure_storage, profile_host, random_feeds, save_costs)
from poetc.errors import TargetError  # noqa: E402
from poetc.ir.graph import Op, Role  # noqa: E402
from poetc.targets import list_targets, load_target  # noqa: E402


# ---- test models -------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # 1x3x8x8 -> 1x4x8x8
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.c1(x))))
        y = torch.clamp(self.c2(y), 0.0, 6.0) + y
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.ff = nn.Linear(16, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, ids):
        x = self.emb(ids)
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, dim=-1)
        h = self.norm(x + scores @ self.v(x))
        return self.out(nn.functional.gelu(self.ff(h)).mean(1))


def _artifacts(module: nn.Module, example, directory: str) -> str:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "forward.onnx")
    torch.manual_seed(0)
    module.train()
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"])
    model = onnx.load(path)
    for node in model.graph.node:  # ORT's LayerNorm gradient needs the mean / inv-std outputs
        if node.op_type == "LayerNormalization":
            while len(node.output) < 3:
                node.output.append(f"{node.output[0]}_stat{len(node.output)}")
    stats = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:5]}
    trainable = [t.name for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and t.name not in stats]
    artifacts.generate_artifacts(model, requires_grad=trainable, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=directory)
    # ORT 1.19 leaves the running-stat outputs on inference-mode BN in the eval model: drop them
    eval_path = os.path.join(directory, "eval_model.onnx")
    eval_model = onnx.load(eval_path)
    for node in eval_model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            del node.output[1:]
    onnx.save(eval_model, eval_path)
    return directory


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from poetc.ir import load_artifacts

    root = tmp_path_factory.mktemp("cost-models")
    torch.manual_seed(0)
    built = {
        "mlp": (MLP(), torch.randn(4, 16)),
        "cnn": (CNN(), torch.randn(1, 3, 8, 8)),
        "attention": (Attention(), torch.randint(0, 50, (2, 6))),
    }
    return {name: load_artifacts(_artifacts(m, x, str(root / name))) for name, (m, x) in built.items()}


def _forward(graph, op_type, weight_prefix):
    return next(op for op in graph.ops if op.role is Role.FORWARD and op.op_type == op_type
                and any(x.startswith(weight_prefix) for x in op.inputs))


def _flops(graph, op):
    return count_flops(graph, op)[0]


# ---- FLOP counts on hand-checked shapes --------------------------------------------------------
def test_conv_flops_hand_checked(graphs):
    g = graphs["cnn"]
    conv = _forward(g, "Conv", "c1.")
    assert g.tensors[conv.inputs[0]].shape == (1, 3, 8, 8)
    assert g.tensors[conv.outputs[0]].shape == (1, 4, 8, 8)
    # 4 filters x 3 input channels x 3x3 window x 64 output positions, 2 FLOPs per multiply-add
    assert _flops(g, conv) == 2 * 4 * 3 * 9 * 64 == 13824


def test_conv_with_bias_flops(graphs):
    g = graphs["cnn"]
    conv = _forward(g, "Conv", "c2.")  # 1x4x4x4 -> 1x4x4x4, 3x3, pad 1, bias
    assert _flops(g, conv) == 2 * 4 * 4 * 9 * 16 + 4 * 16


def test_gemm_flops_hand_checked(graphs):
    g = graphs["mlp"]
    gemm = _forward(g, "Gemm", "a.")  # (4x16) @ (16x32)^T + bias
    assert _flops(g, gemm) == 2 * 4 * 32 * 16 + 4 * 32


def test_matmul_flops_hand_checked(graphs):
    g = graphs["attention"]
    projections = [op for op in g.ops if op.op_type == "MatMul" and op.role is Role.FORWARD
                   and g.tensors[op.inputs[1]].shape == (16, 16)]
    assert projections
    for op in projections:  # (2x6x16) @ (16x16)
        assert _flops(g, op) == 2 * (2 * 6 * 16) * 16
    scores = next(op for op in g.ops if op.op_type == "MatMul" and g.tensors[op.outputs[0]].shape == (2, 6, 6))
    assert _flops(g, scores) == 2 * (2 * 6 * 6) * 16  # (2x6x16) @ (2x16x6)


def test_conv_grad_is_about_twice_conv(graphs):
    g = graphs["cnn"]
    conv = _forward(g, "Conv", "c2.")
    grad = next(op for op in g.ops if op.op_type == "ConvGrad" and op.inputs[2] == conv.inputs[1])
    assert len(grad.outputs) == 3  # dX, dW, dB
    assert 1.9 <= _flops(g, grad) / _flops(g, conv) <= 2.1
    # the first conv's input needs no gradient: its ConvGrad computes dW only, about one conv
    first = _forward(g, "Conv", "c1.")
    grad1 = next(op for op in g.ops if op.op_type == "ConvGrad" and op.inputs[2] == first.inputs[1])
    assert _flops(g, grad1) == _flops(g, first)


def test_gemm_grads_are_about_twice_gemm(graphs):
    g = graphs["mlp"]
    gemm = _forward(g, "Gemm", "b.")
    weight = gemm.inputs[1]
    grads = [op for op in g.ops if op.role is Role.BACKWARD and op.op_type in ("Gemm", "MatMul", "FusedMatMul")
             and (weight in op.inputs or f"{weight}_grad" in op.outputs)]
    assert len(grads) == 2  # dX and dW
    ratio = sum(_flops(g, op) for op in grads) / _flops(g, gemm)
    assert 1.9 <= ratio <= 2.1


def test_every_op_type_has_a_rule(graphs):
    for g in graphs.values():
        for op in g.ops:
            assert is_known_op_type(op.op_type), op.qualified_type


def test_other_op_counts(graphs):
    g = graphs["cnn"]
    by_type = {op.op_type: op for op in g.ops}
    pool = by_type["MaxPool"]  # 2x2 windows over 1x4x8x8 -> 1x4x4x4
    assert _flops(g, pool) == 4 * 4 * 4 * 4
    relu = by_type["Relu"]
    assert count_flops(g, relu) == (256, 2 * 256 * 4)
    bn = by_type["BatchNormInternal"]
    assert _flops(g, bn) == 8 * 256
    assert _flops(g, by_type["BatchNormalizationGrad"]) == 14 * 256
    flatten = by_type["Flatten"]  # aliases its input: no FLOPs, no data movement
    assert count_flops(g, flatten) == (0, 0)
    shape = by_type["Shape"]
    assert count_flops(g, shape)[0] == 0
    acc = by_type["InPlaceAccumulatorV2"]
    value = g.tensors[acc.inputs[1]]
    assert count_flops(g, acc)[0] == math.prod(value.shape)
    a = graphs["attention"]
    gather = next(op for op in a.ops if op.op_type == "Gather")
    flops, moved = count_flops(a, gather)
    assert flops == 0
    assert moved < a.tensors[gather.inputs[0]].nbytes + 2 * a.tensors[gather.outputs[0]].nbytes
    softmax = next(op for op in a.ops if op.op_type == "Softmax")
    assert _flops(a, softmax) == 14 * 2 * 6 * 6


def test_unknown_op_falls_back_and_logs_once(graphs, caplog):
    g = graphs["mlp"]
    out = g.ops[0].outputs[0]  # 4 x 32
    made_up = f"MadeUp{uuid.uuid4().hex[:8]}"
    fake = Op(index=99, name="not-in-model", op_type=made_up, domain="example.org",
              inputs=[g.ops[0].inputs[0]], outputs=[out], role=Role.FORWARD)
    with caplog.at_level(logging.DEBUG, logger="poetc.cost.flops"):
        assert count_flops(g, fake)[0] == 4 * 32
        assert count_flops(g, fake)[0] == 4 * 32
    assert sum(made_up in r.getMessage() for r in caplog.records) == 1
    broken = Op(index=100, name="x", op_type="Conv", domain="", inputs=["missing", ""], outputs=["gone"],
                role=Role.FORWARD)
    assert count_flops(g, broken) == (0, 0)


# ---- cost tables -------------------------------------------------------------------------------
def test_every_op_has_positive_cost_on_every_target(graphs):
    for name, g in graphs.items():
        for target in list_targets():
            table = build_cost_table(g, target)
            assert isinstance(table, CostTable) and len(table) == len(g.ops)
            assert table.op_names == tuple(op.name for op in g.ops)
            for op, cost in zip(g.ops, table):
                assert isinstance(cost, OpCost)
                assert cost.time_s > 0 and math.isfinite(cost.time_s), (name, target.name, op.name)
                assert cost.energy_j == pytest.approx(cost.time_s * target.active_power_w)
                assert cost.flops >= 0 and cost.bytes_moved >= 0
            assert table.total_time_s > 0 and table.total_energy_j > 0
            assert table.page_in(1000) == target.page_in(1000)
            assert table.page_out(1000) == target.page_out(1000)


def test_analytic_roofline(graphs):
    g = graphs["cnn"]
    rpi4 = load_target("rpi4")
    table = build_cost_table(g, rpi4)
    conv = _forward(g, "Conv", "c1.")
    cost = table[conv.index]
    assert table.time_sources[conv.index] == "analytic"
    assert cost.time_s == pytest.approx(max(cost.flops / 2e9, cost.bytes_moved / 5.5e9))
    # a compute-bound op's energy is flops x J/FLOP of the target: time and energy agree
    assert cost.flops / 2e9 > cost.bytes_moved / 5.5e9
    assert cost.energy_j == pytest.approx(cost.flops * rpi4.energy_per_flop_j)
    relu = next(op for op in g.ops if op.op_type == "Relu")  # memory-bound on the Pi
    assert table[relu.index].time_s == pytest.approx(table[relu.index].bytes_moved / 5.5e9)
    # the M0 is 12000x slower than the Pi at compute
    m0 = build_cost_table(g, load_target("m0"))
    assert m0[conv.index].time_s == pytest.approx(cost.flops / (2000 / 0.012), rel=1e-3)


def test_host_uses_measured_times(graphs):
    g = graphs["mlp"]
    host = load_target("host")
    table = build_cost_table(g, host)  # no measurement given: the lowering probe's times
    for op, cost, source in zip(g.ops, table, table.time_sources):
        assert source == "probe"
        assert cost.time_s == pytest.approx(max(op.host_time_s, MIN_MEASURED_OP_TIME_S))
        assert cost.energy_j == pytest.approx(cost.time_s * host.active_power_w)
    measured = {op.name: 1e-3 * (i + 1) for i, op in enumerate(g.ops)}
    measured[g.ops[0].name] = 0.0  # below the profiler's resolution
    table = build_cost_table(g, host, measured)
    assert table[1].time_s == pytest.approx(2e-3)
    assert table[0].time_s == MIN_MEASURED_OP_TIME_S
    assert set(table.time_sources) == {"measured"}
    with pytest.raises(TargetError):
        build_cost_table(g, host, {g.ops[0].name: float("nan")})


def test_profile_host_times_every_op(graphs):
    for g in graphs.values():
        times = profile_host(g, repeats=3, seed=0)
        assert set(times) == {op.name for op in g.ops}
        assert all(t > 0 and math.isfinite(t) for t in times.values())
        table = build_cost_table(g, load_target("host"), times)
        assert all(c.time_s > 0 for c in table)


def test_random_feeds_are_seeded(graphs):
    g = graphs["attention"]
    a, b = random_feeds(g, seed=3), random_feeds(g, seed=3)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].shape == g.tensors[name].shape
    assert not a["input"].any()  # integer token ids are zeros
    assert a["lazy_reset_grad"].dtype == np.bool_ and a["lazy_reset_grad"].all()


# ---- cost files --------------------------------------------------------------------------------
def test_costs_round_trip(graphs, tmp_path):
    g = graphs["cnn"]
    times = {op.name: 1e-6 * (op.index + 1) for op in g.ops}
    path = tmp_path / "costs.json"
    save_costs(path, g, times, target="host", meta={"repeats": 5})
    first = path.read_bytes()
    loaded = load_costs(path, g)
    assert loaded.times == times and dict(loaded) == times
    assert loaded.target == "host" and loaded.meta == {"repeats": 5}
    assert loaded.fingerprint == graph_fingerprint(g)
    save_costs(path, g, dict(reversed(list(times.items()))), target="host", meta={"repeats": 5})
    assert path.read_bytes() == first  # stable: graph order, sorted keys
    doc = json.loads(first)
    assert list(doc) == sorted(doc)
    # a loaded file prices the graph exactly like the dict it was saved from
    host = load_target("host")
    assert build_cost_table(g, host, loaded).times_s == build_cost_table(g, host, times).times_s
    with pytest.raises(TargetError, match="measured on target 'host'"):
        build_cost_table(g, load_target("rpi4"), loaded)  # host times cannot price the Pi


def test_cost_table_round_trip(graphs, tmp_path):
    g = graphs["mlp"]
    table = build_cost_table(g, load_target("rpi4"))
    path = tmp_path / "table.json"
    save_costs(path, g, table)
    loaded = load_costs(path, g)
    assert loaded.target == "rpi4"
    assert [loaded.times[n] for n in table.op_names] == list(table.times_s)
    assert loaded.ops[0]["flops"] == table[0].flops


def test_fingerprint_mismatch_rejected(graphs, tmp_path):
    path = tmp_path / "costs.json"
    save_costs(path, graphs["mlp"], {op.name: 1e-6 for op in graphs["mlp"].ops})
    assert graph_fingerprint(graphs["mlp"]) != graph_fingerprint(graphs["cnn"])
    with pytest.raises(TargetError, match="different training graph") as info:
        load_costs(path, graphs["cnn"])
    assert str(path) in str(info.value)
    load_costs(path)  # without a graph there is nothing to compare


@pytest.mark.parametrize("content, problem", [
    ("{not json", "malformed JSON"),
    ('{"format": "other"}', "format"),
    ('{"format": "poetc-costs", "version": 99}', "version"),
    ('{"format": "poetc-costs", "version": 1, "fingerprint": "ab", "ops": []}', "fingerprint"),
    ('{"format": "poetc-costs", "version": 1, "fingerprint": "' + "0" * 64
     + '", "ops": [{"name": "x", "time_s": -1}]}', "time_s"),
])
def test_malformed_costs_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TargetError, match=problem) as info:
        load_costs(path)
    assert str(path) in str(info.value)


def test_measure_storage_quick(tmp_path):
    figures = measure_storage(tmp_path, large_bytes=1 << 20, repeats=2)
    assert set(figures) == {"page_in_bytes_per_s", "page_in_latency_s", "page_out_bytes_per_s",
                            "page_out_latency_s"}
    assert all(v > 0 and math.isfinite(v) for v in figures.values())
    assert not list(tmp_path.iterdir())  # probe files removed
