"""Seeded random forward ONNX models for property tests: small DAGs of dense layers with elementwise
activations, residual adds and two-branch blocks, ending in class logits (the importer adds the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu")
BLOCKS = ("dense", "residual", "branch")


@dataclass(frozen=True)
class GraphSpec:
    batch: int
    width_in: int
    blocks: tuple[tuple[str, int, str], ...]  # (kind, width, activation)
    classes: int
    seed: int


def build(spec: GraphSpec) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = iter(range(10_000))

    def dense(x: str, d_in: int, d_out: int, act: str | None) -> str:
        k = next(counter)
        w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        b = (rng.standard_normal(d_out) * 0.1).astype(np.float32)
        inits.extend([onnx.numpy_helper.from_array(w, f"w{k}"), onnx.numpy_helper.from_array(b, f"b{k}")])
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"MatMul{k}"))
        nodes.append(helper.make_node("Add", [f"mm{k}", f"b{k}"], [f"lin{k}"], name=f"Bias{k}"))
        if act is None:
            return f"lin{k}"
        nodes.append(helper.make_node(act, [f"lin{k}"], [f"act{k}"], name=f"{act}{k}"))
        return f"act{k}"

    x, width = "input", spec.width_in
    for kind, w, act in spec.blocks:
        if kind == "dense":
            x, width = dense(x, width, w, act), w
        elif kind == "residual":  # y = x + act(dense(x)), width kept
            k = next(counter)
            h = dense(x, width, width, act)
            nodes.append(helper.make_node("Add", [x, h], [f"res{k}"], name=f"Residual{k}"))
            x = f"res{k}"
        else:  # two branches of width w, concatenated
            k = next(counter)
            a = dense(x, width, w, act)
            b = dense(x, width, w, "Relu" if act != "Relu" else "Tanh")
            nodes.append(helper.make_node("Concat", [a, b], [f"cat{k}"], axis=1, name=f"Concat{k}"))
            x, width = f"cat{k}", 2 * w
    logits = dense(x, width, spec.classes, None)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="Logits"))
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              [spec.batch, spec.width_in])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [spec.batch, spec.classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def graph_specs():
    """A hypothesis strategy of GraphSpec."""
    from hypothesis import strategies as st

    # big enough that a step's few KB of ORT bookkeeping blocks stay below poetc's 1% planning reserve
    block = st.tuples(st.sampled_from(BLOCKS), st.sampled_from([64, 128, 256, 512]), st.sampled_from(ACTIVATIONS))
    return st.builds(GraphSpec, batch=st.sampled_from([64, 256]), width_in=st.sampled_from([32, 64, 128]),
                     blocks=st.lists(block, min_size=1, max_size=5).map(tuple), classes=st.sampled_from([2, 10]),
                     seed=st.integers(0, 2**16))
