"""order-nodes: write the node list in the schedule's exact step order.

ONNX Runtime executes graph.node in file order under PRIORITY_BASED + ORT_DISABLE_ALL, so the file
order is the schedule. Rewrites: node order only (Constant nodes, which ORT folds into initializers,
go first). Guarantees: every step maps to exactly one node and every node to a step (cleanup checks that the
result is topological).
"""

from __future__ import annotations

from poetc.schedule import StepKind, recompute_node_name

from .insert_state_io import state_read_node_name, state_write_node_name
from .manager import PassContext, PassResult


def step_node_name(ctx: PassContext, step) -> str:
    if step.kind is StepKind.COMPUTE:
        return ctx.graph.ops[step.op].name
    if step.kind is StepKind.RECOMPUTE:
        return recompute_node_name(ctx.graph.ops[step.op].name, step.writes[0])
    if step.kind is StepKind.STATE_READ:
        return state_read_node_name(step)
    if step.kind is StepKind.STATE_WRITE:
        return state_write_node_name(step)
    return f"{step.writes[0]}__spill" if step.kind is StepKind.PAGE_OUT else f"{step.writes[0]}__restore"


class OrderNodes:
    name = "order-nodes"

    def run(self, ctx: PassContext) -> PassResult:
        nodes = ctx.nodes_by_name()
        ordered = [n for n in ctx.gs_graph.nodes if n.op == "Constant"]
        for step in ctx.schedule.steps:
            ordered.append(nodes.pop(step_node_name(ctx, step)))
        leftovers = [n.name for n in nodes.values() if n.op != "Constant"]
        if leftovers:
            raise ValueError(f"nodes not covered by the schedule: {leftovers[:5]}")
        before = [n.name for n in ctx.gs_graph.nodes]
        ctx.gs_graph.nodes = ordered
        return PassResult(modified=before != [n.name for n in ordered], stats={"nodes": len(ordered)})

