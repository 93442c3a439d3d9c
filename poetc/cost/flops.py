"""FLOP and memory-traffic counts for the ops of an ONNX Runtime training graph.

`count_flops(graph, op)` returns `(flops, bytes_moved)` from the concrete shapes in the IR and the
node attributes in `graph.model`:

* flops: floating-point operations (a multiply-add counts 2). Matrix products and convolutions are
  counted exactly from their shapes; elementwise, normalisation and reduction ops use the
  per-element constants below. Transcendental functions (exp, log, erf, tanh, pow) count as
  `TRANSCENDENTAL_FLOPS` each: a vectorised implementation is a range reduction plus a short
  polynomial, about ten multiplies and adds.
* bytes_moved: bytes the op must read and write at least once: every distinct input plus every
  output it materialises. Ops whose output aliases their input (Reshape, Identity, Squeeze, ...;
  see `poetc.ir.graph.ALIAS_OPS`) move nothing but their small shape inputs; Gather reads only the
  rows it gathers; InPlaceAccumulator reads and rewrites its buffer.

Ops not in the tables are priced as one FLOP per output element (plus the default traffic) and
logged once per op type at debug level; counting never raises.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import onnx

from ..ir.graph import ALIAS_OPS, Op, TrainGraph

log = logging.getLogger(__name__)

TRANSCENDENTAL_FLOPS = 10
_T = TRANSCENDENTAL_FLOPS

# FLOPs per element of output 0 (elementwise ops, activations and their gradients, normalisations).
PER_OUTPUT_ELEMENT: dict[str, int] = {
    # arithmetic, comparison and logic: one operation per element
    **{k: 1 for k in (
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "ReluGrad", "Where", "Equal", "Less",
        "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Sign", "Floor",
        "Ceil", "Round", "Mod", "Scale", "Sqrt", "Reciprocal", "IsNaN", "IsInf", "ThresholdedRelu",
        "BiasAdd", "Range", "CumSum", "DropoutGrad", "BitmaskDropoutGrad")},
    "Clip": 2, "LeakyRelu": 2, "PRelu": 2, "LeakyReluGrad": 2, "Shrink": 2,
    "HardSigmoid": 3, "HardSwish": 4, "Softsign": 3,
    "SigmoidGrad": 3, "TanhGrad": 3, "QuickGeluGrad": 2 * (_T + 4),
    "Dropout": 3, "BitmaskDropout": 3, "BiasDropout": 4,
    # transcendental
    **{k: _T for k in ("Exp", "Log", "Erf", "Tanh", "Sin", "Cos", "Tan", "Pow", "Asin", "Acos",
                       "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh")},
    "Sigmoid": _T + 2, "Elu": _T + 2, "Selu": _T + 3, "Celu": _T + 3, "Mish": 2 * _T + 3,
    "Softplus": 2 * _T + 1, "Swish": _T + 3, "QuickGelu": _T + 4,
    # GELU: x/sqrt2, erf, +1, x*0.5*(...); FastGelu (tanh form): x^3, mul-add, tanh, +1, 2 muls
    "Gelu": _T + 4, "BiasGelu": _T + 5, "FastGelu": _T + 7,
    "GeluGrad": 2 * (_T + 4), "BiasGeluGrad_dX": 2 * (_T + 5), "FastGeluGrad": 2 * (_T + 7),
    "BiasFastGeluGrad_dX": 2 * (_T + 7),
    # softmax over a row: max, subtract, exp, sum, divide
    "Softmax": _T + 4, "LogSoftmax": _T + 4, "BiasSoftmax": _T + 5,
    "SoftmaxGrad": 4, "SoftmaxGrad_13": 4,  # dX = Y * (dY - sum(dY * Y))
    "LogSoftmaxGrad": _T + 3, "LogSoftmaxGrad_13": _T + 3,  # dX = dY - exp(Y) * sum(dY)
    # normalisation with batch/row statistics: mean (1), variance (3), normalise (2), affine (2)
    "LayerNormalization": 8, "BatchNormInternal": 8, "InstanceNormalization": 8,
    "GroupNormalization": 8, "SkipLayerNormalization": 9, "SimplifiedLayerNormalization": 5,
    "SkipSimplifiedLayerNormalization": 6,
    # their gradients: bias grad (1), scale grad (4), input grad (~9)
    "LayerNormalizationGrad": 14, "BatchNormalizationGrad": 14, "InvertibleLayerNormalizationGrad": 15,
    "SimplifiedLayerNormalizationGrad": 9,
}

# FLOPs per element of input 0 (reductions and losses, whose output is smaller than their input).
PER_INPUT_ELEMENT: dict[str, int] = {
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1,
    "ReduceSumSquare": 2, "ReduceL1": 2, "ReduceL2": 2, "ReduceLogSum": 1, "ReduceLogSumExp": _T + 1,
    "ReduceSumTraining": 1, "ArgMax": 1, "ArgMin": 1,
    "GlobalAveragePool": 1, "GlobalMaxPool": 1, "GlobalLpPool": 2,
    # log-softmax of the logits, then pick and average the label entries
    "SoftmaxCrossEntropyLoss": _T + 4, "SoftmaxCrossEntropyLossInternal": _T + 4,
    "SparseSoftmaxCrossEntropy": _T + 4, "SoftmaxCrossEntropy": _T + 4,
    "NegativeLogLikelihoodLoss": 1,
}
# FLOPs per element of output 0 on top of PER_INPUT_ELEMENT (final divide, sqrt or log per row)
_PER_REDUCED_OUTPUT = {"ReduceMean": 1, "ReduceL2": 1, "ReduceLogSum": _T, "GlobalAveragePool": 1}

# Loss gradients: dX = exp(log_prob) - one_hot(label), scaled by dY / N
_LOSS_GRADS = {"SoftmaxCrossEntropyLossGrad", "SoftmaxCrossEntropyLossInternalGrad",
               "SparseSoftmaxCrossEntropyGrad", "SoftmaxCrossEntropyGrad"}

# Pure data movement and metadata: no arithmetic, cost is memory traffic only.
DATA_MOVEMENT = frozenset({
    "Transpose", "Concat", "Split", "Slice", "Pad", "Expand", "Tile", "Cast", "CastLike", "Shape",
    "Size", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "ExpandDims",
    "ConstantOfShape", "SliceGrad", "SplitTraining", "ConcatTraining", "DepthToSpace",
    "SpaceToDepth", "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND",
    "OneHot", "Resize", "Upsample", "Trilu", "EyeLike", "YieldOp", "PassThrough", "Constant",
    "Compress", "ReverseSequence", "NonZero",
})
_METADATA_ONLY = {"Shape", "Size"}  # read only their input's shape, never its data
_GATHERS = {"Gather", "GatherElements", "GatherND"}
# Gather gradients scatter-add dY into a zeroed tensor: one add per dY element. Position of dY:
_GATHER_GRADS = {"GatherGrad": 2, "GatherNDGrad": 2, "GatherElementsGrad": 0}
_ACCUMULATORS = {"InPlaceAccumulator", "InPlaceAccumulatorV2"}
_VARIADIC = {"Sum": -1, "Max": -1, "Min": -1, "Mean": 0}  # FLOPs per element = n_inputs + this

_unknown_logged: set[str] = set()


def _numel(shape: tuple[int, ...] | None) -> int:
    if shape is None:
        return 0
    return int(math.prod(shape)) if shape else 1


class _View:
    """Shapes and attributes of one op, by input/output position (omitted optionals are None)."""

    def __init__(self, graph: TrainGraph, op: Op, node: onnx.NodeProto | None):
        self.graph = graph
        self.op = op
        self.node = node
        # node.output keeps "" for omitted optional outputs; Op.outputs drops them
        self.inputs = list(node.input) if node is not None else list(op.inputs)
        self.outputs = list(node.output) if node is not None else list(op.outputs)
        self._attrs: dict | None = None

    def _shape(self, names: list[str], i: int) -> tuple[int, ...] | None:
        if i >= len(names) or not names[i]:
            return None
        tensor = self.graph.tensors.get(names[i])
        return tensor.shape if tensor is not None else None

    def in_shape(self, i: int) -> tuple[int, ...] | None:
        return self._shape(self.inputs, i)

    def out_shape(self, i: int) -> tuple[int, ...] | None:
        return self._shape(self.outputs, i)

    def in_numel(self, i: int) -> int:
        return _numel(self.in_shape(i))

    def out_numel(self, i: int) -> int:
        return _numel(self.out_shape(i))

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and bool(self.inputs[i])

    def has_output(self, i: int) -> bool:
        return i < len(self.outputs) and bool(self.outputs[i])

    def attr(self, name: str, default=None):
        if self._attrs is None:
            self._attrs = {}
            if self.node is not None:
                for a in self.node.attribute:
                    try:
                        self._attrs[a.name] = onnx.helper.get_attribute_value(a)
                    except Exception:  # an attribute kind we cannot decode: treat as absent
                        pass
        return self._attrs.get(name, default)

    def nbytes(self, name: str) -> int:
        tensor = self.graph.tensors.get(name) if name else None
        return tensor.nbytes if tensor is not None else 0


# ---- FLOP rules --------------------------------------------------------------------------------
def _gemm(v: _View) -> int:
    a, y = v.in_shape(0), v.out_shape(0)
    if a is None or y is None or len(a) != 2 or len(y) != 2:
        return v.out_numel(0)
    k = a[0] if v.attr("transA", 0) else a[1]
    m_n = y[0] * y[1]
    flops = 2 * m_n * k
    if v.has_input(2) and v.attr("beta", 1.0) != 0:
        flops += m_n
    if v.attr("alpha", 1.0) != 1.0:
        flops += m_n
    return flops


def _matmul_k(a: tuple[int, ...], trans_a: bool = False, trans_batch_a: bool = False) -> int:
    if len(a) == 1:
        return a[0]
    if not trans_a:
        return a[-1]
    # transBatchA moves dim 0 next to the last: [d0, d1.., dn-1] -> [d1.., d0, dn-1]; transA swaps
    # the last two, so the contracted dim is d0 with transBatchA and dn-2 without.
    return a[0] if trans_batch_a else a[-2]


def _matmul(v: _View) -> int:
    a = v.in_shape(0)
    if a is None or not a:
        return v.out_numel(0)
    return 2 * v.out_numel(0) * _matmul_k(a)


def _fused_matmul(v: _View) -> int:
    a = v.in_shape(0)
    if a is None or not a:
        return v.out_numel(0)
    k = _matmul_k(a, bool(v.attr("transA", 0)), bool(v.attr("transBatchA", 0)))
    flops = 2 * v.out_numel(0) * k
    if v.attr("alpha", 1.0) != 1.0:
        flops += v.out_numel(0)
    return flops


def _kernel_volume(w: tuple[int, ...] | None) -> int:
    """Multiply-adds per output element of a convolution with weight `w` = (M, C/group, k...)."""
    return _numel(w[1:]) if w is not None and len(w) >= 2 else 0


def _conv(v: _View) -> int:
    y = v.out_numel(0)
    flops = 2 * y * _kernel_volume(v.in_shape(1))
    if v.has_input(2):
        flops += y
    return flops or y


def _conv_transpose(v: _View) -> int:
    # W = (C, M/group, k...): every input element scatters into M/group x k outputs
    flops = 2 * v.in_numel(0) * _kernel_volume(v.in_shape(1))
    if v.has_input(2):
        flops += v.out_numel(0)
    return flops or v.out_numel(0)


def _conv_grad(v: _View) -> int:
    # inputs (dY, X, W); outputs (dX, dW, dB), each optional. dX and dW each cost one forward conv.
    dy = v.in_numel(0)
    per = 2 * dy * _kernel_volume(v.in_shape(2))
    if v.node is not None:
        wants = [v.has_output(i) for i in range(3)]
    else:  # without the node we only know how many outputs are present: assume the trailing ones
        n = len(v.outputs)
        wants = [n >= 3, n >= 2, n >= 1]
    return per * (wants[0] + wants[1]) + dy * wants[2]


def _pool(per_window_element: int, extra_per_output: int = 0) -> Callable[[_View], int]:
    def rule(v: _View) -> int:
        kernel = v.attr("kernel_shape") or []
        window = _numel(tuple(kernel)) if kernel else 1
        return v.out_numel(0) * (per_window_element * window + extra_per_output)
    return rule


def _average_pool_grad(v: _View) -> int:
    kernel = v.attr("kernel_shape") or []
    return v.in_numel(0) * (_numel(tuple(kernel)) if kernel else 1)


def _batch_norm(v: _View) -> int:
    per = PER_OUTPUT_ELEMENT["BatchNormInternal"] if v.attr("training_mode", 0) else 2
    return per * v.out_numel(0)


def _loss_grad(v: _View) -> int:
    return (_T + 2) * v.out_numel(0)


def _accumulated_numel(v: _View) -> int:
    # InPlaceAccumulator(V2)(buffer, value, ...): one add per element of value
    return v.in_numel(1) if len(v.inputs) > 1 else v.in_numel(0)


def _gather_grad(position: int) -> Callable[[_View], int]:
    return lambda v: v.in_numel(position)


_RULES: dict[str, Callable[[_View], int]] = {
    "Gemm": _gemm, "MatMul": _matmul, "FusedMatMul": _fused_matmul, "TransposeMatMul": _fused_matmul,
    "Conv": _conv, "ConvGrad": _conv_grad, "ConvTranspose": _conv_transpose,
    "MaxPool": _pool(1), "AveragePool": _pool(1, 1), "LpPool": _pool(2, 1),
    "MaxPoolGrad": lambda v: v.in_numel(0), "AveragePoolGrad": _average_pool_grad,
    "BatchNormalization": _batch_norm,
    **{k: _loss_grad for k in _LOSS_GRADS},
    **{k: _gather_grad(pos) for k, pos in _GATHER_GRADS.items()},
    **{k: _accumulated_numel for k in _ACCUMULATORS},
}


def _flops(v: _View) -> int | None:
    """FLOPs of the op, or None if its type is unknown."""
    t = v.op.op_type
    rule = _RULES.get(t)
    if rule is not None:
        return int(rule(v))
    if t in PER_OUTPUT_ELEMENT:
        return PER_OUTPUT_ELEMENT[t] * v.out_numel(0)
    if t in PER_INPUT_ELEMENT:
        return PER_INPUT_ELEMENT[t] * v.in_numel(0) + _PER_REDUCED_OUTPUT.get(t, 0) * v.out_numel(0)
    if t in _VARIADIC:
        n = sum(1 for x in v.inputs if x)
        return max(0, n + _VARIADIC[t]) * v.out_numel(0)
    if t in DATA_MOVEMENT:
        return 0
    return None


# ---- memory traffic ----------------------------------------------------------------------------
def _bytes_moved(v: _View) -> int:
    op = v.op
    t = op.op_type
    ins = [x for x in dict.fromkeys(v.inputs) if x]
    outs = [x for x in dict.fromkeys(v.outputs) if x]
    if t in _METADATA_ONLY:
        return sum(v.nbytes(x) for x in outs)
    if (op.domain if op.domain != "ai.onnx" else "", t) in ALIAS_OPS and outs:
        out0 = v.graph.tensors.get(outs[0])
        if out0 is not None and out0.alias_of is not None:  # shares its input's buffer: no copy
            return sum(v.nbytes(x) for x in ins[1:])
    if t in _GATHERS:
        # reads the gathered rows (as many bytes as it writes) and the indices, not the whole table
        return 2 * sum(v.nbytes(x) for x in outs) + sum(v.nbytes(x) for x in ins[1:])
    if t in _ACCUMULATORS and len(v.inputs) > 1:
        # reads buffer and value, writes the buffer back in place, plus the small flags
        value = v.nbytes(v.inputs[1])
        flags = sum(v.nbytes(x) for x in ins[2:]) + sum(v.nbytes(x) for x in outs)
        return 3 * value + flags
    return sum(v.nbytes(x) for x in ins) + sum(v.nbytes(x) for x in outs)


# ---- public ------------------------------------------------------------------------------------
def node_map(graph: TrainGraph) -> dict[str, onnx.NodeProto]:
    """Node name -> NodeProto of the graph's training model (Op.name is the node name)."""
    return {n.name: n for n in graph.model.graph.node}


def count_flops(graph: TrainGraph, op: Op, node: onnx.NodeProto | None = None) -> tuple[int, int]:
    """(flops, bytes_moved) of `op`. `node` (the op's NodeProto) is looked up by name if omitted.

    Unknown op types count one FLOP per output element; never raises for an op of the graph.
    """
    if node is None:
        node = next((n for n in graph.model.graph.node if n.name == op.name), None)
    v = _View(graph, op, node)
    try:
        flops = _flops(v)
    except Exception as exc:  # a malformed attribute or shape: price it like an unknown op
        log.debug("cannot count FLOPs of %s (%s): %s; using one per output element", op.name,
                  op.qualified_type, exc)
        flops = None
    if flops is None:
        if op.qualified_type not in _unknown_logged:
            _unknown_logged.add(op.qualified_type)
            log.debug("no FLOP rule for op type %s; estimating one FLOP per output element",
                      op.qualified_type)
        flops = sum(_numel(v.graph.tensors[x].shape) for x in op.outputs if x in v.graph.tensors)
    try:
        moved = _bytes_moved(v)
    except Exception as exc:
        log.debug("cannot count bytes of %s: %s", op.name, exc)
        moved = 0
    return max(0, int(flops)), max(0, int(moved))


def is_known_op_type(op_type: str) -> bool:
    """Whether `count_flops` has a specific rule for this op type (else the elementwise fallback)."""
    return (op_type in _RULES or op_type in PER_OUTPUT_ELEMENT or op_type in PER_INPUT_ELEMENT
            or op_type in _VARIADIC or op_type in DATA_MOVEMENT)
