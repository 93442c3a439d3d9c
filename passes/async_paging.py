"""async-paging: make the transfers an OverlapPlan (poetc.overlap) chose asynchronous.

Runs after order-nodes, on the node list in step order. Rewrites: each chosen Spill becomes a
`SpillAsync` (same handle), with a `Flush` of its handle placed before the step the plan waits at (the
readers after it read the flushed handle); each chosen Restore becomes an `Await` of a ticket from a
`Prefetch` of the same handle placed before the plan's issue step, keeping the Restore's `keep_file`.
Guarantees: every new node reads only what an earlier node produced (the plan issues a prefetch after
its spill); the schedule's steps keep their order; with no plan, or an empty one, nothing changes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from poetc.runtime.contract import (AWAIT_OP_TYPES, RESTORE_OP_TYPES, SPILL_ASYNC_OP_TYPE, SPILL_DOMAIN,
                                    make_flush_node_spec, make_prefetch_node_spec)

from .manager import PassContext, PassResult
from .order import step_node_name

_AWAIT_FOR_RESTORE = {RESTORE_OP_TYPES[d]: AWAIT_OP_TYPES[d] for d in RESTORE_OP_TYPES}


class AsyncPaging:
    name = "async-paging"

    def run(self, ctx: PassContext) -> PassResult:
        plan = ctx.overlap
        if plan is None or not plan.transfers:
            return PassResult(modified=False, stats={"async_spills": 0, "prefetches": 0})
        nodes = ctx.nodes_by_name()
        steps = ctx.schedule.steps
        step_node = [nodes[step_node_name(ctx, s)] for s in steps]
        before: dict[int, list[gs.Node]] = {}
        handle_after: list[tuple[int, gs.Variable, gs.Variable]] = []  # (step, handle, flushed handle)
        for t in plan.transfers:
            node = step_node[t.step]
            if t.kind == "out":
                node.op = SPILL_ASYNC_OP_TYPE
                if t.wait is not None:
                    handle = node.outputs[0]
                    flushed = gs.Variable(f"{handle.name}__flushed", dtype=np.int64, shape=[2])
                    op, attrs = make_flush_node_spec(key=t.tensor)
                    before.setdefault(t.wait, []).append(
                        gs.Node(op=op, name=f"{handle.name}__flush", domain=SPILL_DOMAIN, attrs=attrs,
                                inputs=[handle], outputs=[flushed]))
                    handle_after.append((t.wait, handle, flushed))
        for t in plan.transfers:
            if t.kind != "in":
                continue
            node = step_node[t.step]
            handle = node.inputs[0]
            for wait, h, flushed in handle_after:
                if h is handle and wait <= t.issue:
                    handle = flushed
            ticket = gs.Variable(f"{node.outputs[0].name}__ticket", dtype=np.int64, shape=[2])
            op, attrs = make_prefetch_node_spec(key=t.tensor)
            before.setdefault(t.issue, []).append(
                gs.Node(op=op, name=f"{node.outputs[0].name}__prefetch", domain=SPILL_DOMAIN, attrs=attrs,
                        inputs=[handle], outputs=[ticket]))
            node.op = _AWAIT_FOR_RESTORE[node.op]
            node.inputs[0] = ticket
        # synchronous Restores after a Flush read the flushed handle too (their order is the same)
        position = {id(n): i for i, n in enumerate(step_node)}
        for wait, h, flushed in handle_after:
            for consumer in list(h.outputs):
                i = position.get(id(consumer))
                if i is not None and i >= wait and consumer.op.startswith("Restore"):
                    consumer.inputs[0] = flushed
        ordered: list[gs.Node] = []
        step_ids = {id(n) for n in step_node}
        ordered.extend(n for n in ctx.gs_graph.nodes if id(n) not in step_ids)  # Constants, first as before
        for i, n in enumerate(step_node):
            ordered.extend(before.get(i, ()))
            ordered.append(n)
        ctx.gs_graph.nodes = ordered
        return PassResult(modified=True, stats={
            "async_spills": sum(t.kind == "out" for t in plan.transfers),
            "flushes": len(handle_after),
            "prefetches": sum(t.kind == "in" for t in plan.transfers)})
