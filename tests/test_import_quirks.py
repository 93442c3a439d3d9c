"""Import quirks found by exporting torch layers nobody on this project wrote (issue #15's "look for the
next such classes yourself"):

- ConvTranspose (decoders, U-Nets, GAN generators): no CPU gradient in onnxruntime-training 1.19.2;
  rewritten as a Conv over the zero-interleaved input (`convtranspose-to-conv`);
- 1-D grouped and depthwise Conv (audio and sequence models): ORT's CPU ConvGrad corrupts the heap
  computing its input gradient and the process aborts; rewritten as the same Conv over [N, C, 1, L]
  (`grouped-conv1d-to-2d`);
- a Div whose divisor depends on a parameter (GroupNorm through torch's InstanceNormalization export,
  hand-written normalisations and softmaxes): its gradient, DivGrad, has no CPU kernel and ONNX Runtime
  inlines a function body for it, so the node poetc scheduled never ran (`importer.inline_function_ops`).

Each rewrite: forward against ORT's own kernel for the original op, gradients of ORT's training graph
against torch autograd. Each model class: the whole pipeline (compile at half the keep-all
activations, verify bitwise and within budget).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from torch import nn

from poetc.importer import ImportOptions, canonicalize, generate_training_artifacts

from tests.test_canonicalize_forward import ort_forward, ort_gradients


def _conv_model(op: str, x_shape, weight: np.ndarray, attrs: dict) -> onnx.ModelProto:
    """x -> x * S (S trainable, per channel) -> op(., K trainable, B trainable) -> y."""
    rng = np.random.default_rng(3)
    scale = (rng.standard_normal((1, x_shape[1]) + (1,) * (len(x_shape) - 2)) * 0.3 + 1).astype(np.float32)
    out_channels = weight.shape[1] * attrs.get("group", 1) if op == "ConvTranspose" else weight.shape[0]
    bias = (rng.standard_normal(out_channels) * 0.1).astype(np.float32)
    nodes = [oh.make_node("Mul", ["x", "S"], ["xs"], name="scale"),
             oh.make_node(op, ["xs", "K", "B"], ["y"], name="the_op", **attrs)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [nh.from_array(scale, "S"), nh.from_array(weight, "K"), nh.from_array(bias, "B")])
    model = onnx.shape_inference.infer_shapes(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    model.ir_version = 8
    return model


def _torch_step(fn, x: np.ndarray, labels: np.ndarray, model: onnx.ModelProto) -> tuple[float, dict]:
    params = {t.name: torch.tensor(nh.to_array(t), requires_grad=True) for t in model.graph.initializer}
    loss = F.mse_loss(fn(torch.tensor(x) * params["S"], params["K"], params["B"]), torch.tensor(labels))
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in params.items()}


CONV_CASES = {
    # name: (op, x shape, weight shape, ONNX attributes, torch function of (x, K, B))
    "transpose2d_s2_p1_op1": ("ConvTranspose", (2, 4, 5, 6), (4, 3, 3, 3),
                              dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
                              lambda v, K, B: F.conv_transpose2d(v, K, B, stride=2, padding=1, output_padding=1)),
    "transpose2d_k4_s2_p1": ("ConvTranspose", (2, 4, 5, 5), (4, 3, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1]),
                             lambda v, K, B: F.conv_transpose2d(v, K, B, stride=2, padding=1)),
    "transpose2d_groups_dilation": ("ConvTranspose", (2, 4, 5, 5), (4, 2, 3, 2),
                                    dict(strides=[3, 1], dilations=[2, 1], group=2, pads=[0, 1, 2, 0]),
                                    lambda v, K, B: F.conv_transpose2d(v, K, B, stride=(3, 1), dilation=(2, 1),
                                                                       groups=2)[:, :, :-2, 1:]),
    "transpose1d_crop": ("ConvTranspose", (2, 3, 7), (3, 5, 2), dict(strides=[2], pads=[2, 3]),
                         lambda v, K, B: F.conv_transpose1d(v, K, B, stride=2)[:, :, 2:-3]),
    "transpose3d": ("ConvTranspose", (1, 2, 3, 4, 3), (2, 2, 2, 3, 2), dict(strides=[2, 1, 2]),
                    lambda v, K, B: F.conv_transpose3d(v, K, B, stride=(2, 1, 2))),
    "conv1d_depthwise": ("Conv", (2, 6, 11), (6, 1, 3), dict(group=6, pads=[1, 1]),
                         lambda v, K, B: F.conv1d(v, K, B, padding=1, groups=6)),
    "conv1d_grouped_strided_dilated": ("Conv", (2, 6, 13), (4, 3, 3), dict(group=2, strides=[2], dilations=[2],
                                                                             pads=[2, 1]),
                                       lambda v, K, B: F.conv1d(F.pad(v, (2, 1)), K, B, stride=2, dilation=2,
                                                                groups=2)),
}
REWRITE = {"ConvTranspose": "convtranspose-to-conv", "Conv": "grouped-conv1d-to-2d"}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_rewrite_matches_ort_kernel_and_torch_gradients(case, tmp_path):
    op, x_shape, w_shape, attrs, fn = CONV_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    x = rng.standard_normal(x_shape).astype(np.float32)
    model = _conv_model(op, x_shape, (rng.standard_normal(w_shape) * 0.5).astype(np.float32), attrs)
    canonical, notes = canonicalize(copy.deepcopy(model), ImportOptions(loss="mse"))
    assert [(n.name, n.nodes) for n in notes] == [(REWRITE[op], ["the_op"])]
    assert [n for n in canonical.graph.node if n.op_type == op and n.name == "the_op"] == []
    onnx.checker.check_model(canonical)
    want = ort_forward(model, {"x": x})
    got = ort_forward(canonical, {"x": x})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    labels = rng.standard_normal(want.shape).astype(np.float32)
    loss, grads = ort_gradients(canonical, tmp_path, labels, inputs={"x": x})
    ref_loss, ref = _torch_step(fn, x, labels, model)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == {"S", "K", "B"}
    for name in grads:
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_convtranspose_with_output_shape_keeps_the_op_and_names_it(tmp_path):
    """Implicit geometry (output_shape) is not rewritten: the error names the op and what to do."""
    from poetc.errors import UnsupportedModelError
    model = _conv_model("ConvTranspose", (2, 4, 5, 5), np.ones((4, 3, 3, 3), np.float32),
                        dict(strides=[2, 2], output_shape=[10, 10]))
    canonical, notes = canonicalize(model, ImportOptions(loss="mse"))
    assert not notes and "ConvTranspose" in {n.op_type for n in canonical.graph.node}
    with pytest.raises(UnsupportedModelError) as err:
        generate_training_artifacts(canonical, tmp_path / "art", ImportOptions(loss="mse"))
    assert "ConvTranspose" in str(err.value) and "output_shape" in err.value.hint
    assert "mode" not in str(err.value)  # ConvTranspose has no mode attribute to report


def test_div_gradient_runs_as_named_nodes_poetc_can_schedule(tmp_path):
    """y = a(x) / b(x) with both trainable: ORT inlines DivGrad's function body at session creation.
    After import the training graph holds that body as ordinary named nodes, every one of which runs."""
    from poetc.importer import import_model
    from poetc.ir.lower import load_artifacts
    w1 = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["a"], name="num"), oh.make_node("MatMul", ["x", "W2"], ["b0"], name="den0"),
             oh.make_node("Abs", ["b0"], ["b1"], name="abs"), oh.make_node("Add", ["b1", "one"], ["b"], name="den"),
             oh.make_node("Div", ["a", "b"], ["y"], name="ratio")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [nh.from_array(w1, "W1"), nh.from_array(w1.T.copy(), "W2"),
                           nh.from_array(np.ones(1, np.float32), "one")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "div.onnx"
    onnx.save(model, str(path))
    art = import_model(path, tmp_path / "work", ImportOptions(loss="mse"))
    training = onnx.load(str(art / "training_model.onnx"))
    assert "DivGrad" not in {n.op_type for n in training.graph.node}
    body = [n for n in training.graph.node if n.name.startswith("ratio_Grad/DivGrad_0/")]
    assert body and {"Div", "Mul", "Neg"} <= {n.op_type for n in body}
    lowered = load_artifacts(art)  # every node ran in the probe (it raises otherwise)
    assert {n.name for n in body} <= {op.name for op in lowered.ops}


class _ReflectBilinear(nn.Module):
    """F.pad(mode='reflect') (torch computes its pads through a chain of constants, so ONNX shape
    inference leaves every shape after it open) -> Conv -> bilinear downscale (align_corners)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        return F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=True).mean((2, 3))


def test_shapes_left_open_by_inference_come_from_a_forward_run(tmp_path):
    """The linear Resize after a reflect pad is rewritten (it needs its input's static shape) and the
    rewritten model computes what ORT's Resize kernel computes."""
    torch.manual_seed(0)
    path = tmp_path / "reflect.onnx"
    x = torch.randn(2, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ReflectBilinear().train(), (x,), str(path), input_names=["x"], output_names=["y"],
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)
    original = onnx.load(str(path))
    assert _shape_of_input_of(onnx.shape_inference.infer_shapes(original, data_prop=True), "Resize") is None
    canonical, notes = canonicalize(copy.deepcopy(original), ImportOptions(loss="mse"))
    assert "linear-resize-to-matmul" in {n.name for n in notes}
    assert "Resize" not in {n.op_type for n in canonical.graph.node}
    np.testing.assert_allclose(ort_forward(canonical, {"x": x.numpy()}), ort_forward(original, {"x": x.numpy()}),
                               rtol=1e-5, atol=1e-6)


def _shape_of_input_of(model: onnx.ModelProto, op_type: str):
    from poetc.ir.canonicalize import _shape_of
    return _shape_of(model, next(n for n in model.graph.node if n.op_type == op_type).input[0])


class _Decoder(nn.Module):
    """Conv -> GroupNorm -> SiLU -> ConvTranspose -> depthwise Conv1d over the flattened rows -> mean -> head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.seq = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = self.up(F.silu(self.norm(self.enc(x))))
        y = self.seq(y.flatten(2))
        return self.head(y.mean(2))


def test_decoder_of_the_three_classes_compiles_and_trains_bitwise_within_budget(tmp_path):
    from poetc.api import CompileOptions, compile_model, inspect_model
    from poetc.run import verify
    torch.manual_seed(0)
    path = tmp_path / "decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Decoder().train(), (torch.randn(2, 3, 32, 32),), str(path), input_names=["x"],
                          output_names=["y"], training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          dynamo=False)
    options = ImportOptions(loss="cross_entropy")
    doc = inspect_model(path, options)
    names = {c["name"] for c in doc["canonicalizations"]}
    assert {"convtranspose-to-conv", "grouped-conv1d-to-2d", "instancenorm-decompose"} <= names
    # half the keep-all activations, or just above the lower bound where that is higher (the transposed
    # convolution's backward holds its zero-interleaved input, four times its input, next to the rest)
    keep_all = doc["fixed_total_bytes"] + doc["keep_all_activation_peak_bytes"]
    ram = max(int(doc["fixed_total_bytes"] + 0.5 * doc["keep_all_activation_peak_bytes"]),
              int(doc["lower_bound"]["ram_bytes"] + 0.3 * (keep_all - doc["lower_bound"]["ram_bytes"])))
    assert ram < keep_all, doc["lower_bound"]  # a real squeeze
    out = tmp_path / "out"
    compile_model(path, CompileOptions(ram_bytes=ram, out_dir=out, target="host", time_limit_s=20,
                                       import_options=options, baselines=(), overlap=False))
    check = verify(out, steps=3).to_json()
    assert check["bitwise_identical_params"] and check["identical_results"] and check["within_budget"], check


def _external_data_model(tmp_path) -> Path:
    """A small trainable model saved with every initializer in one external data file."""
    rng = np.random.default_rng(2)
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"], name="fc"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "V"], ["y"], name="head")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
                          [nh.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W"),
                           nh.from_array(rng.standard_normal((32, 3)).astype(np.float32), "V")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
              size_threshold=0)
    return path


def test_a_model_with_external_data_is_read_from_the_files_next_to_it(tmp_path):
    from poetc.api import inspect_model
    from poetc.importer import load_onnx
    path = _external_data_model(tmp_path)
    model = load_onnx(path)
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in model.graph.initializer)
    doc = inspect_model(path, ImportOptions(loss="mse"))
    assert doc["ops"] > 3  # lowered: the training graph ran in ONNX Runtime


@pytest.mark.parametrize("damage", ["missing", "truncated", "outside"])
def test_external_data_that_cannot_be_read_is_named(damage, tmp_path):
    from poetc.errors import InputFileError
    from poetc.importer import load_onnx
    path = _external_data_model(tmp_path)
    data = tmp_path / "ext.bin"
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    else:
        model = onnx.load(str(path), load_external_data=False)
        for e in model.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = "../elsewhere.bin"
        path.write_bytes(model.SerializeToString())
    with pytest.raises(InputFileError) as err:
        load_onnx(path)
    assert "'W'" in str(err.value) or "ext.bin" in str(err.value)
    assert err.value.exit_code == 3
