"""Exact, schedule-independent rewrites: of the user's forward model before onnxruntime-training
builds the training graph (ops it cannot differentiate, optional outputs it needs), and of the
training model before lowering.

`hoist_accumulators`: onnxruntime-training appends every InPlaceAccumulator (gradient -> persistent
buffer) at the very end of the graph, so each parameter gradient stays alive until the end of the
backward pass: the full gradient size on top of the activation peak. Moving each accumulator right
after the node producing its last input frees every gradient as soon as it is accumulated. The
computation is unchanged (each accumulator reads the same values), only the node order moves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx

ACCUMULATOR_OPS = {"InPlaceAccumulator", "InPlaceAccumulatorV2"}


def hoist_accumulators(model: onnx.ModelProto) -> int:
    """Reorder model.graph.node in place; return how many accumulators moved."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    body = [n for n in nodes if n.op_type not in ACCUMULATOR_OPS]
    after: dict[int, list[onnx.NodeProto]] = {}
    moved = 0
    for i, n in enumerate(nodes):
        if n.op_type not in ACCUMULATOR_OPS:
            continue
        last = max((producer[x] for x in n.input if x in producer), default=-1)
        after.setdefault(last, []).append(n)
        moved += int(last != i - 1)
    position = {id(n): i for i, n in enumerate(nodes)}
    ordered = list(after.get(-1, []))
    for n in body:
        ordered.append(n)
        ordered.extend(after.get(position[id(n)], []))
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return moved


# ---------------------------------------------------------------------------------------------------
# Forward-model rewrites (before onnxruntime-training builds the training graph)
#
# onnxruntime-training 1.19.2 has no gradient builder for some common ops, and asserts on optional
# outputs that exporters leave out. Each rewrite below replaces such a node by an exactly equivalent
# sub-graph of ops that do have gradients (equal in exact arithmetic; in float32 the results agree to
# rounding, tested in tests/test_canonicalize_forward.py), and reports the nodes it changed.


@dataclass
class Canonicalization:
    """One rewrite applied to the user's model: its name, the nodes it changed, why."""

    name: str
    why: str
    nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "count": len(self.nodes), "nodes": self.nodes[:20], "why": self.why}


class _Names:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {x for n in graph.node for x in list(n.input) + list(n.output)} | \
            {n.name for n in graph.node} | {t.name for t in graph.initializer} | \
            {v.name for v in list(graph.input) + list(graph.output)}

    def __call__(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.taken:
            name, k = f"{stem}_{k}", k + 1
        self.taken.add(name)
        return name


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Builder:
    """Emits replacement nodes for one original node, named after it."""

    def __init__(self, names: _Names, node: onnx.NodeProto, opset: int):
        self.names, self.node, self.opset, self.nodes = names, node, opset, []
        self.stem = node.name or node.op_type
        self.rule: tuple[str, str] | None = None  # (name, why) when a function applied another rewrite

    def const(self, value: np.ndarray, tag: str) -> str:
        out = self.names(f"{self.stem}/{tag}")
        self.nodes.append(onnx.helper.make_node(
            "Constant", [], [out], name=self.names(f"{self.stem}/{tag}_const"),
            value=onnx.numpy_helper.from_array(np.asarray(value), out)))
        return out

    def op(self, op_type: str, inputs: list[str], tag: str, output: str | None = None, **attrs) -> str:
        out = output or self.names(f"{self.stem}/{tag}")
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [out], name=self.names(f"{self.stem}/{tag}"),
                                                **attrs))
        return out

    def scalar(self, value: float, dtype: np.dtype, tag: str) -> str:
        return self.const(np.array(value, dtype=dtype), tag)


def _elem_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    """numpy dtype of a tensor (from shape inference); float32 when unknown."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.dtype(np.float32)


def _shape_of(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return tuple(int(d.dim_value) for d in dims)
    for t in model.graph.initializer:
        if t.name == name:
            return tuple(int(d) for d in t.dims)
    return None


def _neg_part(b: _Builder, x: str) -> str:
    """min(x, 0) as -Relu(-x): exact, and Relu and Neg have gradients."""
    return b.op("Neg", [b.op("Relu", [b.op("Neg", [x], "neg_x")], "relu_neg_x")], "min_x_0")


def _sum_to_add(b: _Builder, model) -> bool:
    xs = [x for x in b.node.input if x]
    if len(xs) == 1:
        b.op("Identity", xs, "identity", output=b.node.output[0])
        return True
    acc = xs[0]
    for i, x in enumerate(xs[1:], 1):
        last = i == len(xs) - 1 and b.node.op_type == "Sum"
        acc = b.op("Add", [acc, x], f"add{i}", output=b.node.output[0] if last else None)
    if b.node.op_type == "Mean":
        n = b.scalar(len(xs), _elem_dtype(model, xs[0]), "count")
        b.op("Div", [acc, n], "div", output=b.node.output[0])
    return True


def _lrn(b: _Builder, model) -> bool:
    """y = x * (bias + alpha/size * sum of x^2 over the `size` neighbouring channels)^-beta, the
    channel sum as a convolution with a fixed all-ones (1, 1, size, 1, ...) kernel over x^2 with the
    channel axis moved to a spatial position (Unsqueeze at axis 1)."""
    x = b.node.input[0]
    shape = _shape_of(model, x)
    if shape is None or len(shape) < 3:
        return False
    dtype = _elem_dtype(model, x)
    size = int(_attr(b.node, "size", 0))
    alpha, beta, bias = _attr(b.node, "alpha", 1e-4), _attr(b.node, "beta", 0.75), _attr(b.node, "bias", 1.0)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    spatial = len(shape) - 1  # channels + the original spatial axes
    square = b.op("Mul", [x, x], "square")
    lifted = b.op("Unsqueeze", [square, b.const(np.array([1], np.int64), "axis1")], "lift")
    kernel = b.const(np.ones((1, 1, size) + (1,) * (spatial - 1), dtype=dtype), "ones_kernel")
    summed = b.op("Conv", [lifted, kernel], "channel_sum", kernel_shape=[size] + [1] * (spatial - 1),
                  pads=[lo] + [0] * (spatial - 1) + [hi] + [0] * (spatial - 1))
    total = b.op("Squeeze", [summed, b.const(np.array([1], np.int64), "axis1b")], "drop")
    scaled = b.op("Mul", [total, b.scalar(alpha / size, dtype, "alpha_over_size")], "scaled")
    base = b.op("Add", [scaled, b.scalar(bias, dtype, "bias")], "base")
    # x * base^-beta rather than x / base^beta: DivGrad is an ORT function whose nodes never run under
    # their own name, so the probe could not time it
    factor = b.op("Pow", [base, b.scalar(-beta, dtype, "minus_beta")], "factor")
    b.op("Mul", [x, factor], "mul", output=b.node.output[0])
    return True


def _hard_sigmoid(b: _Builder, model, x: str, alpha: float, beta: float, output: str | None) -> str:
    dtype = _elem_dtype(model, x)
    lin = b.op("Add", [b.op("Mul", [x, b.scalar(alpha, dtype, "alpha")], "ax"), b.scalar(beta, dtype, "beta")],
               "ax_plus_b")
    return b.op("Clip", [lin, b.scalar(0.0, dtype, "zero"), b.scalar(1.0, dtype, "one")], "clip", output=output)


def _hardsigmoid(b: _Builder, model) -> bool:
    _hard_sigmoid(b, model, b.node.input[0], _attr(b.node, "alpha", 0.2), _attr(b.node, "beta", 0.5),
                  b.node.output[0])
    return True


def _hardswish(b: _Builder, model) -> bool:
    x = b.node.input[0]
    gate = _hard_sigmoid(b, model, x, 1.0 / 6.0, 0.5, None)
    b.op("Mul", [x, gate], "mul", output=b.node.output[0])
    return True


def _prelu(b: _Builder, model) -> bool:
    """PRelu(x, slope) = Relu(x) + slope * min(x, 0)."""
    x, slope = b.node.input[0], b.node.input[1]
    negative = b.op("Mul", [slope, _neg_part(b, x)], "slope_times_neg")
    b.op("Add", [b.op("Relu", [x], "relu"), negative], "add", output=b.node.output[0])
    return True


def _elu_like(b: _Builder, model) -> bool:
    """Elu(x) = Relu(x) + alpha * (exp(min(x, 0)) - 1); Selu = gamma * Elu(alpha)."""
    x = b.node.input[0]
    dtype = _elem_dtype(model, x)
    selu = b.node.op_type == "Selu"
    alpha = _attr(b.node, "alpha", 1.67326319217681884765625 if selu else 1.0)
    expm1 = b.op("Sub", [b.op("Exp", [_neg_part(b, x)], "exp"), b.scalar(1.0, dtype, "one")], "expm1")
    elu = b.op("Add", [b.op("Relu", [x], "relu"), b.op("Mul", [expm1, b.scalar(alpha, dtype, "alpha")], "neg")],
               "elu", output=None if selu else b.node.output[0])
    if selu:
        gamma = _attr(b.node, "gamma", 1.05070102214813232421875)
        b.op("Mul", [elu, b.scalar(gamma, dtype, "gamma")], "scale", output=b.node.output[0])
    return True


def _softplus_of(b: _Builder, model, x: str, output: str | None) -> str:
    """Softplus(x) = Relu(x) + log(1 + exp(-|x|)), the overflow-free form."""
    dtype = _elem_dtype(model, x)
    tail = b.op("Exp", [b.op("Neg", [b.op("Abs", [x], "abs")], "neg_abs")], "exp")
    log1p = b.op("Log", [b.op("Add", [tail, b.scalar(1.0, dtype, "one")], "one_plus")], "log")
    return b.op("Add", [b.op("Relu", [x], "relu"), log1p], "softplus", output=output)


def _softplus(b: _Builder, model) -> bool:
    _softplus_of(b, model, b.node.input[0], b.node.output[0])
    return True


def _mish(b: _Builder, model) -> bool:
    x = b.node.input[0]
    b.op("Mul", [x, b.op("Tanh", [_softplus_of(b, model, x, None)], "tanh")], "mul", output=b.node.output[0])
    return True


def _global_max_pool(b: _Builder, model) -> bool:
    shape = _shape_of(model, b.node.input[0])
    if shape is None or len(shape) < 3:
        return False
    b.op("MaxPool", [b.node.input[0]], "maxpool", output=b.node.output[0], kernel_shape=list(shape[2:]))
    return True


_FOLDABLE = {"Concat", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Mul", "Div", "Add", "Sub", "Floor", "Gather",
             "Slice", "Identity", "Equal", "Where", "ConstantOfShape"}


def constant_value(model: onnx.ModelProto, name: str, depth: int = 0) -> np.ndarray | None:
    """The value of a tensor computed from initializers and Constant nodes only (exporters build
    Resize scales with Concat and Cast), or None."""
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in model.graph.node:
        if name not in n.output:
            continue
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return onnx.numpy_helper.to_array(n.attribute[0].t)
        if n.op_type not in _FOLDABLE or n.domain not in ("", "ai.onnx") or depth > 8:
            return None
        values = [constant_value(model, x, depth + 1) if x else None for x in n.input]
        if any(v is None for v, x in zip(values, n.input) if x):
            return None
        from onnx.reference import ReferenceEvaluator
        try:
            outputs = ReferenceEvaluator(n).run(None, {x: v for x, v in zip(n.input, values) if x})
        except Exception:  # noqa: BLE001 - anything the reference cannot fold is simply not constant
            return None
        return np.asarray(outputs[list(n.output).index(name)])
    return None


def _nearest_resize(b: _Builder, model) -> bool:
    """Resize/Upsample in nearest mode by whole-number factors: each element repeated s_i times
    along axis i, i.e. Unsqueeze + Expand + Reshape (Expand's gradient is a ReduceSum). Output index
    o reads input o // s exactly for 'asymmetric' + 'floor' (torch's export) and for half_pixel with
    any rounding (no ties at whole-number factors)."""
    node = b.node
    if _attr(node, "mode", b"nearest") not in (b"nearest", "nearest"):
        return False
    ctm = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    rounding = _attr(node, "nearest_mode", b"round_prefer_floor")
    ctm, rounding = (v.decode() if isinstance(v, bytes) else v for v in (ctm, rounding))
    if not (ctm in ("half_pixel", "pytorch_half_pixel") or (ctm == "asymmetric" and rounding == "floor")):
        return False
    x = node.input[0]
    shape = _shape_of(model, x)
    if shape is None:
        return False
    if node.op_type == "Upsample":
        scales = constant_value(model, node.input[1]) if len(node.input) > 1 else None
    else:
        scales = constant_value(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (scales is None or scales.size == 0) and len(node.input) > 3 and node.input[3]:
            sizes = constant_value(model, node.input[3])
            scales = None if sizes is None or len(sizes) != len(shape) else \
                np.array([o / i for o, i in zip(sizes, shape)], dtype=np.float64)
    if scales is None or len(scales) != len(shape) or any(float(v) != int(v) or v < 1 for v in scales):
        return False
    factors = [int(v) for v in scales]
    if all(f == 1 for f in factors):
        b.op("Identity", [x], "identity", output=node.output[0])
        return True
    lifted_axes = [axis + 1 + sum(f > 1 for f in factors[:axis]) for axis, f in enumerate(factors) if f > 1]
    lifted = b.op("Unsqueeze", [x, b.const(np.array(lifted_axes, np.int64), "axes")], "lift")
    expanded_shape = []
    for d, f in zip(shape, factors):
        expanded_shape += [d, f] if f > 1 else [d]
    expanded = b.op("Expand", [lifted, b.const(np.array(expanded_shape, np.int64), "expanded_shape")], "repeat")
    out_shape = [d * f for d, f in zip(shape, factors)]
    b.op("Reshape", [expanded, b.const(np.array(out_shape, np.int64), "out_shape")], "merge",
         output=node.output[0])
    return True


def _reduce(b: _Builder, op_type: str, x: str, axes: list[int], tag: str, output: str | None = None,
            keepdims: int = 1) -> str:
    """A Reduce* node with `axes` as an attribute (opset < 18) or an input (opset >= 18)."""
    if b.opset >= 18 or op_type == "ReduceSum" and b.opset >= 13:
        return b.op(op_type, [x, b.const(np.array(axes, np.int64), f"{tag}_axes")], tag, output=output,
                    keepdims=keepdims)
    return b.op(op_type, [x], tag, output=output, axes=axes, keepdims=keepdims)


def _instance_norm(b: _Builder, model) -> bool:
    """y = scale_c * (x - mean) / sqrt(var + epsilon) + B_c, mean and (population) variance over the
    spatial axes of each (n, c): ReduceMean, Sub, Mul, Add, Sqrt, Div, Mul, Add."""
    x, scale, bias = b.node.input[:3]
    shape = _shape_of(model, x)
    if shape is None or len(shape) < 3:
        return False
    dtype = _elem_dtype(model, x)
    spatial = list(range(2, len(shape)))
    centered = b.op("Sub", [x, _reduce(b, "ReduceMean", x, spatial, "mean")], "centered")
    var = _reduce(b, "ReduceMean", b.op("Mul", [centered, centered], "squared"), spatial, "var")
    std = b.op("Sqrt", [b.op("Add", [var, b.scalar(_attr(b.node, "epsilon", 1e-5), dtype, "epsilon")], "var_eps")],
               "std")
    normed = b.op("Div", [centered, std], "normalized")
    per_channel = np.array([-1] + [1] * len(spatial), np.int64)  # [C, 1, ...] broadcasts over N and space
    s = b.op("Reshape", [scale, b.const(per_channel, "scale_shape")], "scale_c")
    c = b.op("Reshape", [bias, b.const(per_channel, "bias_shape")], "bias_c")
    b.op("Add", [b.op("Mul", [normed, s], "scaled"), c], "shifted", output=b.node.output[0])
    return True


def _reduce_max(b: _Builder, model) -> bool:
    """ReduceMax as TopK(k=1) along one axis (TopK has a gradient; the value is the same max): the
    reduced axes moved to the end and merged when there are several."""
    node = b.node
    x = node.input[0]
    shape = _shape_of(model, x)
    if shape is None:
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = constant_value(model, node.input[1])
        if value is None:
            return False
        axes = [int(a) for a in value.reshape(-1)]
    rank = len(shape)
    if not axes and _attr(node, "noop_with_empty_axes", 0):
        return False  # an identity; left as it is
    axes = sorted({a % rank for a in axes}) if axes else list(range(rank))
    keepdims = _attr(node, "keepdims", 1)
    kept = [a for a in range(rank) if a not in axes]
    flat = b.op("Transpose", [x], "to_end", perm=kept + axes) if kept + axes != list(range(rank)) else x
    if len(axes) > 1:
        flat = b.op("Reshape", [flat, b.const(np.array([shape[a] for a in kept] + [-1], np.int64), "merged_shape")],
                    "merge")
    top = b.names(f"{b.stem}/top")
    b.nodes.append(onnx.helper.make_node("TopK", [flat, b.const(np.array([1], np.int64), "k")],
                                         [top, b.names(f"{b.stem}/top_index")], name=b.names(f"{b.stem}/topk"),
                                         axis=-1, largest=1, sorted=1))
    out_shape = [1 if a in axes else shape[a] for a in range(rank)] if keepdims else [shape[a] for a in kept]
    b.op("Reshape", [top, b.const(np.array(out_shape, np.int64), "out_shape")], "out", output=node.output[0])
    return True


def _cumsum(b: _Builder, model) -> bool:
    """CumSum along an axis of static length L as a MatMul with a fixed L x L 0/1 triangular matrix
    (exclusive: strictly triangular; reverse: the transposed triangle), the axis moved last."""
    node = b.node
    x = node.input[0]
    shape = _shape_of(model, x)
    axis = constant_value(model, node.input[1]) if len(node.input) > 1 else None
    if shape is None or axis is None:
        return False
    rank = len(shape)
    axis = int(np.asarray(axis).reshape(-1)[0]) % rank
    n = shape[axis]
    exclusive, reverse = _attr(node, "exclusive", 0), _attr(node, "reverse", 0)
    i, j = np.indices((n, n))  # y[..., j] = sum over i of x[..., i] * m[i, j]
    m = (i > j) if reverse else (i < j)
    if not exclusive:
        m = m | (i == j)
    matrix = b.const(m.astype(_elem_dtype(model, x)), "triangle")
    perm = [a for a in range(rank) if a != axis] + [axis]
    moved = b.op("Transpose", [x], "to_end", perm=perm) if axis != rank - 1 else x
    summed = b.op("MatMul", [moved, matrix], "matmul", output=node.output[0] if axis == rank - 1 else None)
    if axis != rank - 1:
        b.op("Transpose", [summed], "back", output=node.output[0], perm=list(np.argsort(perm)))
    return True


def _depth_space(b: _Builder, model) -> bool:
    """DepthToSpace / SpaceToDepth by their definition in the ONNX spec: Reshape, Transpose, Reshape."""
    node = b.node
    x = node.input[0]
    shape = _shape_of(model, x)
    if shape is None or len(shape) != 4:
        return False
    _, c, h, w = shape
    k = int(_attr(node, "blocksize", 1))
    if node.op_type == "DepthToSpace":
        crd = _attr(node, "mode", b"DCR") in (b"CRD", "CRD")
        if crd:
            split, perm = [-1, c // (k * k), k, k, h, w], [0, 1, 4, 2, 5, 3]
        else:
            split, perm = [-1, k, k, c // (k * k), h, w], [0, 3, 4, 1, 5, 2]
        out = [-1, c // (k * k), h * k, w * k]
    else:
        split, perm, out = [-1, c, h // k, k, w // k, k], [0, 3, 5, 1, 2, 4], [-1, c * k * k, h // k, w // k]
    t = b.op("Reshape", [x, b.const(np.array(split, np.int64), "split_shape")], "split")
    t = b.op("Transpose", [t], "move", perm=perm)
    b.op("Reshape", [t, b.const(np.array(out, np.int64), "out_shape")], "merge", output=node.output[0])
    return True


def _linear_weights(n_in: int, n_out: int, scale: float, ctm: str) -> np.ndarray | None:
    """The [n_out, n_in] matrix of 1-D linear interpolation ONNX Resize computes for one axis."""
    m = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        if ctm == "half_pixel":
            src = (o + 0.5) / scale - 0.5
        elif ctm == "pytorch_half_pixel":
            src = (o + 0.5) / scale - 0.5 if n_out > 1 else 0.0
        elif ctm == "align_corners":
            src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        elif ctm == "asymmetric":
            src = o / scale
        else:
            return None
        src = min(max(src, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[o, lo] += 1 - frac
        m[o, hi] += frac
    return m


def _linear_resize(b: _Builder, model) -> bool:
    """Resize in linear mode (no antialias) over the last two axes of a static shape as two MatMuls
    with fixed interpolation matrices: Y = A_h @ X @ A_w^T (MatMul has a gradient; ResizeGrad is
    CUDA-only in ORT 1.19)."""
    node = b.node
    if _attr(node, "mode", b"nearest") not in (b"linear", "linear") or _attr(node, "antialias", 0):
        return False
    ctm = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    x = node.input[0]
    shape = _shape_of(model, x)
    if shape is None or len(shape) < 3 or node.op_type != "Resize":
        return False
    scales = constant_value(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = constant_value(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size == len(shape):
        scales = [float(v) for v in scales]
        sizes = [int(np.floor(d * s)) for d, s in zip(shape, scales)]
    elif sizes is not None and sizes.size == len(shape):
        sizes = [int(v) for v in sizes]
        scales = [o / i for o, i in zip(sizes, shape)]
    else:
        return False
    if any(s != d for s, d in zip(sizes[:-2], shape[:-2])):
        return False  # only the last two axes are interpolated
    dtype = _elem_dtype(model, x)
    y = x
    for axis in (-2, -1):
        n_in, n_out = shape[axis], sizes[axis]
        if n_in == n_out and scales[axis] == 1.0:
            continue
        m = _linear_weights(n_in, n_out, scales[axis], ctm)
        if m is None:
            return False
        last = axis == -1 or sizes[-1] == shape[-1]
        if axis == -2:
            y = b.op("MatMul", [b.const(m.astype(dtype), "rows"), y], "interp_rows",
                     output=node.output[0] if last else None)
        else:
            y = b.op("MatMul", [y, b.const(m.T.astype(dtype), "columns")], "interp_columns", output=node.output[0])
    if y == x:
        b.op("Identity", [x], "identity", output=node.output[0])
    return True


def _einsum(b: _Builder, model) -> bool:
    """Einsum of one or two operands (no ellipsis, no index repeated within an operand) as ReduceSum,
    Transpose, Reshape and one batched MatMul: the classic contraction of batch, free and summed
    indices. Static shapes only."""
    node = b.node
    eq = _attr(node, "equation", b"")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    if "->" not in eq or "." in eq:
        return False
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    xs = list(node.input)
    shapes = [_shape_of(model, x) for x in xs]
    if len(terms) not in (1, 2) or len(terms) != len(xs) or any(sh is None or len(sh) != len(t)
                                                                    for sh, t in zip(shapes, terms)):
        return False
    if any(len(set(t)) != len(t) for t in terms + [out]):
        return False
    dims = {}
    for t, sh in zip(terms, shapes):
        for c, d in zip(t, sh):
            if dims.setdefault(c, d) != d:
                return False  # broadcasting a 1 against a size: not handled
    # sum away what only one operand has and the output does not
    operands = []
    for k, (t, x) in enumerate(zip(terms, xs)):
        others = set(out) | set("".join(terms[:k] + terms[k + 1:]))
        gone = [i for i, c in enumerate(t) if c not in others]
        if gone:
            x = _reduce(b, "ReduceSum", x, gone, f"sum{k}", keepdims=0)
            t = "".join(c for c in t if c in others)
        operands.append((t, x))

    def arrange(t, x, order, tag):
        perm = [t.index(c) for c in order]
        return b.op("Transpose", [x], tag, perm=perm) if perm != list(range(len(t))) else x

    def finish(t, x):  # t: the indices of x, all in out
        if t == out:
            b.op("Identity", [x], "identity", output=node.output[0])
        else:
            b.op("Transpose", [x], "to_output", output=node.output[0], perm=[t.index(c) for c in out])

    if len(operands) == 1:
        finish(*operands[0])
        return True
    (ta, a), (tb, xb) = operands
    batch = [c for c in out if c in ta and c in tb]
    contract = [c for c in ta if c in tb and c not in out]
    left = [c for c in ta if c not in tb]
    right = [c for c in tb if c not in ta]

    def size(cs):
        return int(np.prod([dims[c] for c in cs], dtype=np.int64))

    bd = [dims[c] for c in batch]
    a = arrange(ta, a, batch + left + contract, "arrange_a")
    a = b.op("Reshape", [a, b.const(np.array(bd + [size(left), size(contract)], np.int64), "a_shape")], "a_matrix")
    xb = arrange(tb, xb, batch + contract + right, "arrange_b")
    xb = b.op("Reshape", [xb, b.const(np.array(bd + [size(contract), size(right)], np.int64), "b_shape")], "b_matrix")
    product = b.op("MatMul", [a, xb], "matmul")
    result = "".join(batch + left + right)
    shaped = b.op("Reshape", [product, b.const(np.array([dims[c] for c in result], np.int64), "result_shape")],
                  "result")
    finish(result, shaped)
    return True


def _resize(b: _Builder, model) -> bool:
    if _nearest_resize(b, model):
        return True
    if _linear_resize(b, model):
        b.rule = ("linear-resize-to-matmul", "Resize in linear mode has no CPU gradient kernel in "
                  "onnxruntime-training 1.19; two MatMuls with fixed interpolation matrices")
        return True
    return False


def _conv_attrs(node: onnx.NodeProto, spatial: int) -> dict:
    """A Conv/ConvTranspose node's geometry with ONNX's defaults filled in."""
    return dict(strides=list(_attr(node, "strides", [1] * spatial)),
                dilations=list(_attr(node, "dilations", [1] * spatial)),
                pads=list(_attr(node, "pads", [0] * (2 * spatial))),
                group=int(_attr(node, "group", 1)))


def _auto_pad(node: onnx.NodeProto) -> str:
    value = _attr(node, "auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _grouped_conv1d(b: _Builder, model) -> bool:
    """A 1-D Conv with group > 1 (grouped or depthwise) as the same Conv over [N, C, 1, L]: Unsqueeze the
    input and the weight at axis 2, a 2-D Conv with a unit first kernel axis (no padding, stride or
    dilation along it), Squeeze axis 2 of the result. Every output element is the same sum of the same
    products. onnxruntime-training 1.19.2's CPU ConvGrad corrupts the heap (the process aborts in malloc)
    when it computes the input gradient of a 1-D grouped Conv; its 2-D path is sound."""
    node = b.node
    if int(_attr(node, "group", 1)) <= 1:
        return False
    w_shape, x_shape = _shape_of(model, node.input[1]), _shape_of(model, node.input[0])
    rank = len(w_shape) if w_shape is not None else len(x_shape) if x_shape is not None else None
    if rank != 3:
        return False
    geo = _conv_attrs(node, 1)
    attrs = dict(strides=[1] + geo["strides"], dilations=[1] + geo["dilations"], group=geo["group"])
    if _auto_pad(node) == "NOTSET":
        attrs["pads"] = [0, geo["pads"][0], 0, geo["pads"][1]]
    else:  # SAME_* / VALID pad the unit axis by nothing
        attrs["auto_pad"] = _auto_pad(node)
    kernel = _attr(node, "kernel_shape", None)
    if kernel is not None:
        attrs["kernel_shape"] = [1] + list(kernel)
    axis = b.const(np.array([2], np.int64), "unit_axis")
    x = b.op("Unsqueeze", [node.input[0], axis], "x_2d")
    w = b.op("Unsqueeze", [node.input[1], axis], "w_2d")
    y = b.op("Conv", [x, w] + [i for i in node.input[2:3] if i], "conv_2d", **attrs)
    b.op("Squeeze", [y, axis], "y_1d", output=node.output[0])
    return True


def _conv_transpose(b: _Builder, model) -> bool:
    """ConvTranspose by its definition, as a Conv over the input with zeros inserted between
    neighbouring elements: each spatial axis is strided by Reshape [.., h, 1] + Pad (s - 1 zeros after
    every element) + Reshape [.., h*s]; the weight [C_in, C_out/g, k..] becomes the Conv weight
    [C_out, C_in/g, k..] (each group's channel axes swapped by Reshape/Transpose) with every kernel axis
    reversed (Gather of k-1..0); the Conv pads each axis by d(k-1) - pad (plus output_padding at the
    end, less the s - 1 trailing zeros), cropping with Slice where that is negative; stride 1, the same
    dilation and groups. Every output element is the same sum of the same products (float rounding may
    differ: another summation order). Explicit pads and static shapes only: with auto_pad or
    output_shape the node is kept and check_cpu_gradients names it."""
    node = b.node
    if _auto_pad(node) != "NOTSET" or _attr(node, "output_shape", None) is not None:
        return False
    x, w = node.input[0], node.input[1]
    x_shape, w_shape = _shape_of(model, x), _shape_of(model, w)
    if x_shape is None or w_shape is None or len(x_shape) != len(w_shape) or len(w_shape) < 3:
        return False
    spatial = len(w_shape) - 2
    geo = _conv_attrs(node, spatial)
    kernel = list(_attr(node, "kernel_shape", w_shape[2:]))
    extra = list(_attr(node, "output_padding", [0] * spatial))
    s, d, g = geo["strides"], geo["dilations"], geo["group"]
    c_in, c_out_g = w_shape[0], w_shape[1]
    lengths = list(x_shape[2:])
    if any(step > 1 for step in s):  # s - 1 zeros after every element
        inter = [0, 0] + [v for h in lengths for v in (h, 1)]
        t = b.op("Reshape", [x, b.const(np.array(inter, np.int64), "interleave_shape")], "interleave")
        pads = [0] * (2 + 2 * spatial) + [0, 0] + [v for step in s for v in (0, step - 1)]
        t = b.op("Pad", [t, b.const(np.array(pads, np.int64), "stride_pads")], "insert_zeros")
        lengths = [h * step for h, step in zip(lengths, s)]
        x = b.op("Reshape", [t, b.const(np.array([0, 0] + lengths, np.int64), "strided_shape")], "strided")
    begin = [dd * (k - 1) - p for dd, k, p in zip(d, kernel, geo["pads"][:spatial])]
    end = [dd * (k - 1) - p + e - (step - 1)
           for dd, k, p, e, step in zip(d, kernel, geo["pads"][spatial:], extra, s)]
    if any(v < 0 for v in begin + end):
        starts = [max(-v, 0) for v in begin]
        ends = [h - max(-v, 0) for h, v in zip(lengths, end)]
        x = b.op("Slice", [x, b.const(np.array(starts, np.int64), "crop_starts"),
                           b.const(np.array(ends, np.int64), "crop_ends"),
                           b.const(np.arange(2, 2 + spatial, dtype=np.int64), "crop_axes")], "crop")
    if g == 1:
        wt = b.op("Transpose", [w], "swap_channels", perm=[1, 0] + list(range(2, 2 + spatial)))
    else:
        split = [g, c_in // g, c_out_g] + list(w_shape[2:])
        wt = b.op("Reshape", [w, b.const(np.array(split, np.int64), "group_shape")], "group_split")
        wt = b.op("Transpose", [wt], "swap_channels", perm=[0, 2, 1] + list(range(3, 3 + spatial)))
        merged = [g * c_out_g, c_in // g] + list(w_shape[2:])
        wt = b.op("Reshape", [wt, b.const(np.array(merged, np.int64), "conv_weight_shape")], "group_merge")
    for a, k in enumerate(w_shape[2:]):
        if k > 1:
            wt = b.op("Gather", [wt, b.const(np.arange(k - 1, -1, -1, dtype=np.int64), f"reverse{a}")],
                      f"flip{a}", axis=2 + a)
    b.op("Conv", [x, wt] + [i for i in node.input[2:3] if i], "conv", output=node.output[0],
         kernel_shape=kernel, strides=[1] * spatial, dilations=d, group=g,
         pads=[max(v, 0) for v in begin] + [max(v, 0) for v in end])
    return True



# op type -> (rewrite name, why, function). The function appends replacement nodes to the builder
# and returns False when it cannot rewrite this instance (the node is then kept unchanged).
_NO_GRADIENT_REWRITES = {
    "Sum": ("sum-to-add", "Sum has no gradient in onnxruntime-training 1.19; a Sum of n inputs is n-1 Adds",
            _sum_to_add),
    "Mean": ("mean-to-add-div", "Mean has no gradient in onnxruntime-training 1.19; n-1 Adds and a Div by n",
             _sum_to_add),
    "LRN": ("lrn-decompose", "LRN has no gradient in onnxruntime-training 1.19; x * (bias + alpha/size * "
            "channel-window sum of x^2)^-beta with the window sum as a fixed all-ones convolution", _lrn),
    "HardSigmoid": ("hardsigmoid-to-clip", "HardSigmoid has no gradient in onnxruntime-training 1.19; "
                    "Clip(alpha*x + beta, 0, 1)", _hardsigmoid),
    "HardSwish": ("hardswish-to-clip", "HardSwish has no gradient in onnxruntime-training 1.19; "
                  "x * Clip(x/6 + 1/2, 0, 1)", _hardswish),
    "PRelu": ("prelu-decompose", "PRelu has no gradient in onnxruntime-training 1.19; Relu(x) + slope * min(x, 0)",
              _prelu),
    "Elu": ("elu-decompose", "Elu has no gradient in onnxruntime-training 1.19; Relu(x) + alpha*(exp(min(x,0)) - 1)",
            _elu_like),
    "Selu": ("selu-decompose", "Selu has no gradient in onnxruntime-training 1.19; gamma * Elu(x, alpha)",
             _elu_like),
    "Softplus": ("softplus-decompose", "Softplus has no gradient in onnxruntime-training 1.19; "
                 "Relu(x) + log(1 + exp(-|x|))", _softplus),
    "Mish": ("mish-decompose", "Mish has no gradient in onnxruntime-training 1.19; x * tanh(softplus(x))", _mish),
    "Resize": ("nearest-resize-to-expand", "Resize has no CPU gradient kernel in onnxruntime-training 1.19; "
               "nearest upsampling by whole factors is Unsqueeze + Expand + Reshape", _resize),
    "Upsample": ("nearest-resize-to-expand", "Upsample has no gradient in onnxruntime-training 1.19; nearest "
                 "upsampling by whole factors is Unsqueeze + Expand + Reshape", _nearest_resize),
    "InstanceNormalization": ("instancenorm-decompose", "InstanceNormalization has no gradient in "
                              "onnxruntime-training 1.19; ReduceMean/Sub/Mul/Sqrt/Div with a per-channel scale "
                              "and bias", _instance_norm),
    "ReduceMax": ("reducemax-to-topk", "ReduceMax has no gradient in onnxruntime-training 1.19; TopK with k=1 "
                  "over the reduced axes (moved last)", _reduce_max),
    "CumSum": ("cumsum-to-matmul", "CumSum has no gradient in onnxruntime-training 1.19; a MatMul with a fixed "
               "triangular 0/1 matrix", _cumsum),
    "DepthToSpace": ("depthtospace-to-reshape", "DepthToSpace has no gradient in onnxruntime-training 1.19; "
                     "Reshape + Transpose + Reshape (its definition)", _depth_space),
    "SpaceToDepth": ("spacetodepth-to-reshape", "SpaceToDepth has no gradient in onnxruntime-training 1.19; "
                     "Reshape + Transpose + Reshape (its definition)", _depth_space),
    "Einsum": ("einsum-to-matmul", "Einsum has no gradient in onnxruntime-training 1.19; ReduceSum, Transpose, "
               "Reshape and one batched MatMul", _einsum),
    "Conv": ("grouped-conv1d-to-2d", "onnxruntime-training 1.19's CPU ConvGrad corrupts the heap (the process "
             "aborts) computing the input gradient of a 1-D grouped or depthwise Conv; the same Conv over "
             "[N, C, 1, L]", _grouped_conv1d),
    "ConvTranspose": ("convtranspose-to-conv", "ConvTransposeGrad has only a CUDA kernel in onnxruntime-training "
                      "1.19; a Conv over the input with zeros inserted between elements, with the weight's "
                      "channel axes swapped and its kernel reversed", _conv_transpose),
    "GlobalMaxPool": ("globalmaxpool-to-maxpool", "GlobalMaxPool has no gradient in onnxruntime-training 1.19; "
                      "a MaxPool whose kernel is the whole spatial extent", _global_max_pool),
}

# op type -> number of outputs onnxruntime-training's gradient builder reads (optional in ONNX)
_OPTIONAL_OUTPUTS = {"LayerNormalization": 3, "Dropout": 2}


def rewrite_without_gradients(model: onnx.ModelProto) -> list[Canonicalization]:
    """Replace every node of an op listed in `_NO_GRADIENT_REWRITES` by its exact decomposition, in
    place (the node's output names are kept, so nothing downstream changes). Needs shape inference
    already applied where a rewrite reads shapes (LRN, GlobalMaxPool)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    names = _Names(model.graph)
    done: dict[str, Canonicalization] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        rule = _NO_GRADIENT_REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None:
            b = _Builder(names, node, opset)
            if rule[2](b, model):
                name, why = b.rule or rule[:2]
                nodes.extend(b.nodes)
                done.setdefault(name, Canonicalization(name, why)).nodes.append(node.name or node.op_type)
                continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return list(done.values())


# ops left after the rewrites whose gradient onnxruntime-training 1.19 cannot run on CPU, with what to do
_NO_CPU_GRADIENT = {
    "Resize": "ResizeGrad has only a CUDA kernel in onnxruntime-training 1.19; poetc rewrites exactly nearest "
              "Resize by whole-number factors and linear Resize of the last two axes without antialias, both at "
              "static shapes (give --batch N): export one of those (mode='nearest' with an integer scale, or "
              "mode='bilinear')",
    "ConvTranspose": "ConvTransposeGrad has only a CUDA kernel in onnxruntime-training 1.19, and poetc rewrites "
                     "ConvTranspose exactly only with explicit pads and static shapes; export without auto_pad "
                     "or output_shape (torch's ConvTranspose does), with --batch N, or upsample with a nearest "
                     "Resize (integer scale) followed by a Conv",
}


def check_cpu_gradients(model: onnx.ModelProto, trainable: set[str]) -> None:
    """Raise for a node from `_NO_CPU_GRADIENT` that reads a tensor computed from a trainable
    parameter, or the parameter itself (its gradient would have to run)."""
    from ..errors import UnsupportedModelError
    reached = set(trainable)
    for node in model.graph.node:
        if any(x in reached for x in node.input):
            if node.op_type in _NO_CPU_GRADIENT and node.domain in ("", "ai.onnx"):
                mode = _attr(node, "mode", None)
                mode = f", mode {(mode.decode() if isinstance(mode, bytes) else mode)!r}" if mode is not None else ""
                raise UnsupportedModelError(
                    f"op {node.op_type} (node {node.name!r}{mode}) lies between a trainable parameter "
                    f"and the loss, and onnxruntime-training 1.19 cannot compute its gradient on CPU",
                    hint=_NO_CPU_GRADIENT[node.op_type])
            reached.update(o for o in node.output if o)


# random ops and the type of their `seed` attribute
_SEEDABLE = {"Dropout": "int", "RandomNormal": "float", "RandomUniform": "float", "RandomNormalLike": "float",
             "RandomUniformLike": "float", "Bernoulli": "float", "Multinomial": "float"}


def _derived_seed(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """A seed for one node, from the model: its graph name, the op and its first output's name (unique
    in the graph, and unchanged by the other rewrites, which add optional outputs or move nodes)."""
    key = "|".join([model.graph.name, node.op_type, node.output[0]])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


def seed_random_ops(model: onnx.ModelProto) -> list[Canonicalization]:
    """Give every random op without a `seed` attribute one derived from the model.

    Without a seed, ONNX Runtime's CPU Dropout (and the Random* ops) draw from one process-wide
    generator seeded from the clock: two runs of the same training graph draw different masks, and a
    graph whose ops run in another order hands the draws to other nodes. With a seed each node owns a
    generator that advances once per call, so the reference and the compiled training graph draw the
    same masks at every step (poetc never recomputes a random op: a rerun would draw again,
    poetc.solver.problem.RANDOM_OPS). Exact in the sense that matters: the mask is a draw either way,
    and the model's function is unchanged."""
    done = Canonicalization("seed-random-ops", "Dropout/Random* without a seed draw from ONNX Runtime's clock-seeded "
                            "global generator (not reproducible, order-dependent); each got a fixed seed derived from "
                            "the model")
    for node in model.graph.node:
        kind = _SEEDABLE.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if kind is None or any(a.name == "seed" for a in node.attribute):
            continue
        seed = _derived_seed(model, node)
        node.attribute.append(onnx.helper.make_attribute("seed", seed if kind == "int" else float(seed)))
        done.nodes.append(node.name or node.op_type)
    return [done] if done.nodes else []


def expose_optional_outputs(model: onnx.ModelProto) -> list[Canonicalization]:
    """LayerNormalization exported with only Y, Dropout without its mask: onnxruntime-training's
    gradient builders read those optional outputs and assert when they are absent
    (gradient_builder_base.h: i < node_->OutputDefs().size()). Naming them changes no value."""
    names = _Names(model.graph)
    done: dict[str, Canonicalization] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len([x for x in node.input if x]) == 2:
            # torch's LayerNorm(bias=False) exports no B; the gradient builder reads input 2
            scale = constant_value(model, node.input[1])
            if scale is not None:
                b = _Builder(names, node, 0)
                del node.input[2:]
                node.input.append(b.const(np.zeros_like(scale), "zero_bias"))
                nodes.extend(b.nodes)
                done.setdefault("layernormalization-zero-bias", Canonicalization(
                    "layernormalization-zero-bias", "LayerNormalization without a bias input: ORT 1.19's gradient "
                    "reads input B; added a constant zero B (not trained), values unchanged")).nodes.append(b.stem)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for node in model.graph.node:
        want = _OPTIONAL_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if want is None or len([o for o in node.output]) >= want:
            continue
        stem = node.name or node.op_type
        for k in range(len(node.output), want):
            node.output.append(names(f"{stem}/output_{k}"))
        key = f"{node.op_type.lower()}-optional-outputs"
        done.setdefault(key, Canonicalization(
            key, f"{node.op_type}'s gradient in onnxruntime-training 1.19 reads its optional outputs "
            f"(absent in the export); added them, values unchanged")).nodes.append(stem)
    return list(done.values())
