"""Import-time rewrites of the user's forward model (poetc/ir/canonicalize.py, poetc/importer.py):
each is exact. For every rewrite a one-op model (input * trainable W -> op) is canonicalized; its
forward output in ONNX Runtime equals the original op's own ORT kernel (to float rounding), and the
gradients of ORT's training graph for the rewritten model equal torch autograd on the same function
(ORT cannot differentiate the original op, which is why it is rewritten). The rewrite is listed in
the notes the reports carry, and the original op is gone.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from poetc.importer import IMPORT_NOTES, ImportOptions, canonicalizations, canonicalize, generate_training_artifacts

SHAPE = (2, 6, 5, 5)
RNG = np.random.default_rng(7)
X = RNG.standard_normal(SHAPE).astype(np.float32)
W = (RNG.standard_normal((1, SHAPE[1], 1, 1)) * 0.5 + 1.0).astype(np.float32)
SLOPE = (RNG.standard_normal((SHAPE[1], 1, 1)) * 0.2).astype(np.float32)
GAMMA = (RNG.standard_normal(SHAPE[1]) * 0.3 + 1.0).astype(np.float32)
BETA = (RNG.standard_normal(SHAPE[1]) * 0.3).astype(np.float32)
EXTRA_PARAMS = {"S": SLOPE, "G": GAMMA, "B": BETA}  # trainable initializers a case's model may add


def one_op_model(op: str, attrs: dict | None = None, extra_inputs: list[str] = (), inits: dict | None = None,
                 opset: int = 17, xw_twice: bool = False) -> onnx.ModelProto:
    """x [2,6,5,5] -> xw = x * W (W trainable) -> op(xw, *extra_inputs) -> y."""
    initializers = [nh.from_array(W, "W")] + [nh.from_array(v, k) for k, v in (inits or {}).items()]
    inputs = ["xw", *extra_inputs]
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"], name="scale"), oh.make_node(op, inputs, ["y"], name="the_op",
                                                                               **(attrs or {}))]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 13 else 4
    return onnx.shape_inference.infer_shapes(model)


def ort_forward(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def ort_gradients(model: onnx.ModelProto, tmp_path, labels: np.ndarray, loss: str = "mse",
                  inputs: dict[str, np.ndarray] | None = None) -> tuple[float, dict]:
    """Loss and parameter gradients of one step of onnxruntime-training's graph for `model`, fed
    `inputs` (default: x = X)."""
    inputs = {"x": X} if inputs is None else inputs
    import onnxruntime as ort
    out = generate_training_artifacts(model, tmp_path / "art", ImportOptions(loss=loss))
    training = onnx.load(str(out / "training_model.onnx"))
    inits = {t.name for t in training.graph.initializer}
    feeds = {}
    params = {t.name: nh.to_array(t) for t in model.graph.initializer}
    for vi in training.graph.input:
        if vi.name in inits:
            continue
        if vi.name in inputs:
            feeds[vi.name] = inputs[vi.name]
        elif vi.name in ("labels", "target"):
            feeds[vi.name] = labels
        elif vi.name == "lazy_reset_grad":
            feeds[vi.name] = np.array([True])
        elif vi.name.endswith("_grad.accumulation.buffer"):
            feeds[vi.name] = np.zeros_like(params[vi.name[: -len("_grad.accumulation.buffer")]])
        else:
            feeds[vi.name] = params[vi.name]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    trained = [n[: -len("_grad.accumulation.buffer")] for n in feeds if n.endswith("_grad.accumulation.buffer")]
    for name in trained:  # the gradients themselves (the accumulators' outputs are flags)
        training.graph.output.append(oh.make_tensor_value_info(f"{name}_grad", TensorProto.FLOAT, None))
    names = [o.name for o in training.graph.output]
    values = ort.InferenceSession(training.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    grads = {name: values[names.index(f"{name}_grad")] for name in trained}
    return float(values[0]), grads


def torch_gradients(fn, labels: np.ndarray, params: dict[str, np.ndarray]) -> tuple[float, dict]:
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    y = fn(torch.tensor(X), **tensors)
    loss = F.mse_loss(y, torch.tensor(labels))
    loss.backward()
    return float(loss), {k: t.grad.numpy() for k, t in tensors.items()}


def lrn_reference(v, size, alpha, beta, bias):
    """ONNX LRN: window [c - floor((size-1)/2), c + ceil((size-1)/2)] over channels (ORT's kernel
    takes odd sizes only, so only those are compared with it)."""
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(v * v, (0, 0, 0, 0, lo, hi))
    total = sum(sq[:, k:k + v.shape[1]] for k in range(size))
    return v / (bias + alpha / size * total) ** beta


CASES = {
    # name: (model, rewrite name, torch function of (x, W[, S]), params)
    "Sum3": (lambda: one_op_model("Sum", extra_inputs=["x", "xw"]), "sum-to-add",
             lambda x, W: x * W + x + x * W),
    "Mean2": (lambda: one_op_model("Mean", extra_inputs=["x"]), "mean-to-add-div", lambda x, W: (x * W + x) / 2),
    "LRN5": (lambda: one_op_model("LRN", dict(size=5, alpha=1e-2, beta=0.75, bias=2.0)), "lrn-decompose",
             lambda x, W: lrn_reference(x * W, 5, 1e-2, 0.75, 2.0)),
    "HardSwish": (lambda: one_op_model("HardSwish"), "hardswish-to-clip", lambda x, W: F.hardswish(x * W)),
    "HardSigmoid": (lambda: one_op_model("HardSigmoid", dict(alpha=0.3, beta=0.4)), "hardsigmoid-to-clip",
                    lambda x, W: torch.clamp(0.3 * (x * W) + 0.4, 0, 1)),
    "PRelu": (lambda: one_op_model("PRelu", extra_inputs=["S"], inits={"S": SLOPE}), "prelu-decompose",
              lambda x, W, S: torch.where(x * W >= 0, x * W, S * (x * W))),
    "Elu": (lambda: one_op_model("Elu", dict(alpha=0.7)), "elu-decompose", lambda x, W: F.elu(x * W, 0.7)),
    "Selu": (lambda: one_op_model("Selu"), "selu-decompose", lambda x, W: F.selu(x * W)),
    "Softplus": (lambda: one_op_model("Softplus"), "softplus-decompose", lambda x, W: F.softplus(x * W)),
    "Mish": (lambda: one_op_model("Mish", opset=18), "mish-decompose", lambda x, W: F.mish(x * W)),
    "GlobalMaxPool": (lambda: one_op_model("GlobalMaxPool"), "globalmaxpool-to-maxpool",
                      lambda x, W: (x * W).amax((2, 3), keepdim=True)),
    "ResizeNearest2Torch": (
        lambda: one_op_model("Resize", dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                            nearest_mode="floor"), extra_inputs=["", "scales"],
                             inits={"scales": np.array([1, 1, 2, 2], np.float32)}),
        "nearest-resize-to-expand", lambda x, W: F.interpolate(x * W, scale_factor=2, mode="nearest")),
    "ResizeNearest3HalfPixel": (
        lambda: one_op_model("Resize", dict(mode="nearest"), extra_inputs=["", "scales"],
                             inits={"scales": np.array([1, 1, 3, 1], np.float32)}),
        "nearest-resize-to-expand", lambda x, W: F.interpolate(x * W, scale_factor=(3, 1), mode="nearest")),
    "InstanceNorm": (lambda: one_op_model("InstanceNormalization", dict(epsilon=1e-3), extra_inputs=["G", "B"],
                                          inits={"G": GAMMA, "B": BETA}), "instancenorm-decompose",
                     lambda x, W, G, B: F.instance_norm(x * W, weight=G, bias=B, eps=1e-3)),
    "ReduceMaxAxis1": (lambda: one_op_model("ReduceMax", dict(axes=[1], keepdims=1)), "reducemax-to-topk",
                       lambda x, W: (x * W).amax(1, keepdim=True)),
    "ReduceMaxSpatialOpset18": (lambda: one_op_model("ReduceMax", dict(keepdims=0), extra_inputs=["axes"],
                                                     inits={"axes": np.array([2, 3], np.int64)}, opset=18),
                                "reducemax-to-topk", lambda x, W: (x * W).amax((2, 3))),
    "CumSumAxis2": (lambda: one_op_model("CumSum", extra_inputs=["axis"], inits={"axis": np.array(2, np.int64)}),
                    "cumsum-to-matmul", lambda x, W: torch.cumsum(x * W, 2)),
    "CumSumLastReverseExclusive": (
        lambda: one_op_model("CumSum", dict(exclusive=1, reverse=1), extra_inputs=["axis"],
                             inits={"axis": np.array(-1, np.int64)}),
        "cumsum-to-matmul", lambda x, W: torch.flip(torch.cumsum(torch.flip(x * W, (3,)), 3), (3,)) - x * W),
    "ResizeLinearHalfPixel": (
        lambda: one_op_model("Resize", dict(mode="linear"), extra_inputs=["", "scales"],
                             inits={"scales": np.array([1, 1, 2, 2], np.float32)}),
        "linear-resize-to-matmul",
        lambda x, W: F.interpolate(x * W, scale_factor=2, mode="bilinear", align_corners=False)),
    "ResizeLinearAlignCornersSizes": (
        lambda: one_op_model("Resize", dict(mode="linear", coordinate_transformation_mode="align_corners"),
                             extra_inputs=["", "", "sizes"], inits={"sizes": np.array([2, 6, 3, 8], np.int64)}),
        "linear-resize-to-matmul", lambda x, W: F.interpolate(x * W, size=(3, 8), mode="bilinear", align_corners=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_is_exact(case, tmp_path):
    build, rewrite, fn = CASES[case]
    original = build()
    op_type = original.graph.node[1].op_type
    canonical, notes = canonicalize(copy.deepcopy(original), ImportOptions(loss="mse"))
    # listed, and the op is gone
    assert [n.name for n in notes if n.name == rewrite] == [rewrite], notes
    assert next(n for n in notes if n.name == rewrite).nodes == ["the_op"]
    assert op_type not in {n.op_type for n in canonical.graph.node}
    onnx.checker.check_model(canonical)
    # forward: the rewritten graph against ORT's own kernel for the original op
    want = ort_forward(original, {"x": X})
    got = ort_forward(canonical, {"x": X})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    # gradients: ORT's training graph of the rewritten model against torch autograd
    labels = np.random.default_rng(1).standard_normal(want.shape).astype(np.float32)
    params = {"W": W} | {k: v for k, v in EXTRA_PARAMS.items() if k in fn.__code__.co_varnames}
    loss, grads = ort_gradients(canonical, tmp_path, labels)
    ref_loss, ref_grads = torch_gradients(fn, labels, params)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_two_input_sum_is_bitwise_one_add():
    original = one_op_model("Sum", extra_inputs=["x"])
    canonical, _ = canonicalize(copy.deepcopy(original), ImportOptions(loss="mse"))
    assert [n.op_type for n in canonical.graph.node] == ["Mul", "Add"]
    assert ort_forward(canonical, {"x": X}).tobytes() == ort_forward(original, {"x": X}).tobytes()


def test_cubic_resize_on_a_trained_path_is_named_with_the_fix(tmp_path):
    from poetc.errors import UnsupportedModelError
    model = one_op_model("Resize", dict(mode="cubic"), extra_inputs=["", "scales"],
                         inits={"scales": np.array([1, 1, 2, 2], np.float32)})
    canonical, notes = canonicalize(model, ImportOptions(loss="mse"))
    assert "Resize" in {n.op_type for n in canonical.graph.node} and not notes
    with pytest.raises(UnsupportedModelError) as err:
        generate_training_artifacts(canonical, tmp_path / "art", ImportOptions(loss="mse"))
    assert "Resize" in str(err.value) and "the_op" in str(err.value) and "nearest" in err.value.hint


def test_global_pool_head_logits_are_flattened_for_cross_entropy(tmp_path):
    """[N, C, 1, 1] logits (a head without Flatten) -> Flatten; training equals torch's on the
    flattened logits."""
    model = one_op_model("GlobalAveragePool")
    canonical, notes = canonicalize(copy.deepcopy(model), ImportOptions(loss="cross_entropy"))
    assert [n.name for n in notes] == ["flatten-logits"]
    out = canonical.graph.output[0]
    assert out.name == "y" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [2, 6]
    np.testing.assert_array_equal(ort_forward(canonical, {"x": X}), ort_forward(model, {"x": X}).reshape(2, 6))
    labels = np.array([1, 4], np.int64)
    loss, grads = ort_gradients(canonical, tmp_path, labels, loss="cross_entropy")
    w = torch.tensor(W, requires_grad=True)
    ref = F.cross_entropy((torch.tensor(X) * w).mean((2, 3)), torch.tensor(labels))
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-6)
    np.testing.assert_allclose(grads["W"], w.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_scalar_output_with_cross_entropy_is_named():
    from poetc.errors import UnsupportedModelError
    model = one_op_model("ReduceSum", dict(keepdims=0))
    with pytest.raises(UnsupportedModelError) as err:
        canonicalize(model, ImportOptions(loss="cross_entropy"))
    assert "'y' has shape []" in str(err.value) and "--loss mse" in err.value.hint


def test_extra_outputs_are_dropped_and_listed():
    model = one_op_model("Relu")
    model.graph.output.append(oh.make_tensor_value_info("xw", TensorProto.FLOAT, list(SHAPE)))
    canonical, notes = canonicalize(model, ImportOptions(loss="mse"))
    assert [o.name for o in canonical.graph.output] == ["y"]
    assert [(n.name, n.nodes) for n in notes] == [("extra-outputs-dropped", ["xw"])]


def test_layernorm_and_dropout_get_their_optional_outputs(tmp_path):
    """torch's exports: LayerNormalization with only Y, Dropout without its mask. ORT's gradient
    builders assert without them; with them the training graph builds and matches torch. A
    LayerNorm without bias (torch's bias=False) gets a constant zero bias."""
    ln_scale = (RNG.standard_normal(SHAPE[-1]) * 0.1 + 1).astype(np.float32)
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"]),
             oh.make_node("LayerNormalization", ["xw", "g"], ["ln"], name="ln", axis=-1),
             oh.make_node("Dropout", ["ln", "ratio", "train"], ["y"], name="drop")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [nh.from_array(W, "W"), nh.from_array(ln_scale, "g"),
                           nh.from_array(np.array(0.0, np.float32), "ratio"), nh.from_array(np.array(True), "train")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    canonical, notes = canonicalize(model, ImportOptions(loss="mse"))
    assert sorted(n.name for n in notes) == ["dropout-optional-outputs", "layernormalization-optional-outputs",
                                             "layernormalization-zero-bias", "seed-random-ops"]
    assert [len(n.output) for n in canonical.graph.node if n.op_type != "Constant"] == [1, 3, 2]
    labels = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    loss, grads = ort_gradients(canonical, tmp_path, labels)
    ref_loss, ref = torch_gradients(lambda x, W, g: F.layer_norm(x * W, (SHAPE[-1],), g, eps=1e-5), labels,
                                    {"W": W, "g": ln_scale})
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in ("W", "g"):
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-4, atol=1e-6)


def test_opset9_upsample_is_converted_and_rewritten(tmp_path):
    model = one_op_model("Upsample", dict(mode="nearest"), extra_inputs=["scales"],
                         inits={"scales": np.array([1, 1, 2, 2], np.float32)}, opset=9)
    want = ort_forward(model, {"x": X})
    canonical, notes = canonicalize(copy.deepcopy(model), ImportOptions(loss="mse"))
    assert [n.name for n in notes][:1] == ["opset-conversion"] and "nearest-resize-to-expand" in [n.name for n in notes]
    np.testing.assert_array_equal(ort_forward(canonical, {"x": X}), want)


def test_import_records_the_rewrites_for_the_reports(tmp_path):
    from pathlib import Path

    from poetc.importer import import_model
    path = tmp_path / "m.onnx"
    onnx.save(one_op_model("HardSwish"), str(path))
    out = import_model(path, tmp_path / "work", ImportOptions(loss="mse"))
    assert (Path(out) / IMPORT_NOTES).exists()
    assert [c["name"] for c in canonicalizations(out)] == ["hardswish-to-clip"]
    assert canonicalizations(tmp_path) == []  # an artifacts directory given as input: nothing rewritten


@pytest.mark.parametrize("op,mode,shape", [("DepthToSpace", "DCR", (2, 8, 3, 4)), ("DepthToSpace", "CRD", (2, 8, 3, 4)),
                                           ("SpaceToDepth", None, (2, 3, 4, 6))])
def test_depth_space_rewrites_are_bitwise_and_train_like_torch(op, mode, shape, tmp_path):
    """DepthToSpace/SpaceToDepth by their spec definition (Reshape, Transpose, Reshape): pure data
    movement, so the forward output is bitwise ORT's kernel's; gradients equal torch's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((1, shape[1], 1, 1)) + 1).astype(np.float32)
    attrs = {"blocksize": 2} | ({"mode": mode} if mode else {})
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"], name="scale"), oh.make_node(op, ["xw"], ["y"], name="the_op", **attrs)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], [nh.from_array(w, "W")])
    model = onnx.shape_inference.infer_shapes(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    model.ir_version = 8
    canonical, notes = canonicalize(copy.deepcopy(model), ImportOptions(loss="mse"))
    assert [n.name for n in notes] == [f"{op.lower()}-to-reshape"] and op not in {n.op_type for n in canonical.graph.node}
    want = ort_forward(model, {"x": x})
    assert ort_forward(canonical, {"x": x}).tobytes() == want.tobytes()

    def reference(v):
        n, c, h, wd = v.shape
        if op == "SpaceToDepth":
            return v.reshape(n, c, h // 2, 2, wd // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, c * 4, h // 2, wd // 2)
        if mode == "CRD":
            return F.pixel_shuffle(v, 2)
        return v.reshape(n, 2, 2, c // 4, h, wd).permute(0, 3, 4, 1, 5, 2).reshape(n, c // 4, h * 2, wd * 2)

    np.testing.assert_array_equal(reference(torch.tensor(x) * torch.tensor(w)).numpy(), want)
    labels = rng.standard_normal(want.shape).astype(np.float32)
    global X
    saved, X = X, x  # ort_gradients and torch_gradients feed the module's X
    try:
        loss, grads = ort_gradients(canonical, tmp_path, labels)
        ref_loss, ref = torch_gradients(lambda v, W: reference(v * W), labels, {"W": w})
    finally:
        X = saved
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grads["W"], ref["W"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk->bik", ((3, 4, 5), (3, 5, 2))),          # batched matmul
    ("bhqd,bhkd->bhqk", ((2, 3, 4, 5), (2, 3, 6, 5))),  # attention scores
    ("ij,kj->ki", ((4, 5), (6, 5))),                    # contraction, output order swapped
    ("abc,c->ba", ((2, 3, 4), (4,))),                   # matrix-vector with a transposed output
    ("ijk->ik", ((3, 4, 5),)),                          # one operand: a sum (ORT's own kernel fails on
    ("ijk->kji", ((3, 4, 5),)),                         # a sum and a transpose at once, e.g. ijk->ki)
    ("ab,cd->abd", ((2, 3), (4, 5))),                   # outer product with c summed away
])
def test_einsum_rewrite_matches_ort_and_torch(equation, shapes, tmp_path):
    """Einsum as ReduceSum/Transpose/Reshape/MatMul: forward against ORT's Einsum kernel, the gradient
    of the first operand (times a trained W) against torch.einsum's autograd."""
    rng = np.random.default_rng(11)
    values = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
    w = (rng.standard_normal(shapes[0]) * 0.5 + 1).astype(np.float32)
    names = ["x"] + [f"c{k}" for k in range(1, len(shapes))]
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"], name="scale"),
             oh.make_node("Einsum", ["xw"] + names[1:], ["y"], name="the_op", equation=equation)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(shapes[0]))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [nh.from_array(w, "W")] + [nh.from_array(v, n) for v, n in zip(values[1:], names[1:])])
    model = onnx.shape_inference.infer_shapes(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    model.ir_version = 8
    canonical, notes = canonicalize(copy.deepcopy(model), ImportOptions(loss="mse"))
    assert [n.name for n in notes] == ["einsum-to-matmul"] and "Einsum" not in {n.op_type for n in canonical.graph.node}
    want = ort_forward(model, {"x": values[0]})
    np.testing.assert_allclose(ort_forward(canonical, {"x": values[0]}), want, rtol=2e-6, atol=2e-6)
    labels = rng.standard_normal(want.shape).astype(np.float32)
    global X
    saved, X = X, values[0]
    try:
        consts = [torch.tensor(v) for v in values[1:]]
        loss, grads = ort_gradients(canonical, tmp_path, labels)
        ref_loss, ref = torch_gradients(lambda x, W: torch.einsum(equation, x * W, *consts), labels, {"W": w})
    finally:
        X = saved
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grads["W"], ref["W"], rtol=1e-4, atol=1e-6)
