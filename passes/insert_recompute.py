"""insert-recompute: duplicate forward nodes for every RECOMPUTE step of the schedule.

Rewrites: each RECOMPUTE step becomes a copy of its forward node (same op, domain and attributes)
with new node and output names, reading the versions the step names; backward nodes then read the
recomputed outputs. Guarantees: original nodes are untouched except for the inputs of backward nodes
the schedule redirects; no attribute is added to any node (attributes on duplicates break fusions).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from poetc.schedule import StepKind, recompute_node_name

from .manager import PassContext, PassResult


class InsertRecompute:
    name = "insert-recompute"

    def run(self, ctx: PassContext) -> PassResult:
        nodes = ctx.nodes_by_name()
        tensors = ctx.gs_graph.tensors()
        introduced: set[str] = set()
        count = 0
        for step in ctx.schedule.steps:
            if step.kind is not StepKind.RECOMPUTE:
                continue
            op = ctx.graph.ops[step.op]
            original = nodes[op.name]
            outputs = []
            for w, orig_name in zip(step.writes, op.outputs):
                t = ctx.graph.tensors[orig_name]
                var = gs.Variable(w, dtype=tensors[orig_name].dtype, shape=list(t.shape))
                tensors[w] = var
                outputs.append(var)
                introduced.add(w)
            inputs = [read_tensor(ctx, tensors, r) for r in step.reads]
            node = gs.Node(op=original.op, name=recompute_node_name(op.name, step.writes[0]),
                           attrs=dict(original.attrs),
                           inputs=inputs, outputs=outputs, domain=original.domain)
            ctx.gs_graph.nodes.append(node)
            count += 1
        rewired = ctx.rewire_reads(introduced)
        return PassResult(modified=count > 0, stats={"recompute_nodes": count, "rewired_inputs": rewired})


def read_tensor(ctx: PassContext, tensors: dict, name: str) -> gs.Tensor:
    """The tensor a recompute step reads. A version no node produces yet (a Restore output, which
    insert-spill-restore adds later) is created here with its original's dtype and shape."""
    if not name:
        return gs.Variable.empty()
    if name not in tensors:
        original = ctx.graph.tensors[ctx.schedule.origin[name]]
        tensors[name] = gs.Variable(name, dtype=tensors[original.name].dtype, shape=list(original.shape))
    return tensors[name]
