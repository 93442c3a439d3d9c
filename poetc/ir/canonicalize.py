"""Exact, schedule-independent rewrites of a training model before lowering.

`hoist_accumulators`: onnxruntime-training appends every InPlaceAccumulator (gradient -> persistent
buffer) at the very end of the graph, so each parameter gradient stays alive until the end of the
backward pass: the full gradient size on top of the activation peak. Moving each accumulator right
after the node producing its last input frees every gradient as soon as it is accumulated. The
computation is unchanged (each accumulator reads the same values), only the node order moves.
"""

from __future__ import annotations

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
