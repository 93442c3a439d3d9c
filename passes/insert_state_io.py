"""insert-state-io: read paged parameters and optimizer moments from the state directory, write the
updated ones back (fused optimizer mode, issue #17).

Rewrites, for every STATE_READ / STATE_WRITE step of the schedule:
- a `poet.StateRead` node (attr `key` = the state tensor's name; the dtype's op type from
  poetc.runtime.contract) producing the step's copy with the tensor's dtype and static shape; its
  inputs are ordering dependencies: the other non-persistent inputs of the node it is read for (alive
  until that node runs anyway, so no tensor lives longer), so the read cannot run before them;
- a `poet.StateWrite` node reading the copy its update changed in place and that update's output
  flag (so the write runs after the update, as a data dependency), whose int64[1] token output is made
  a graph output (nothing is pruned);
- the nodes of the steps read the copies (the schedule's versioned names), and each paged tensor stops
  being a graph input.
Guarantees: no node reads a paged tensor's graph input; every reader of a copy comes after its read;
a paged trainable tensor is written exactly once, after its update (its last use: the simulator
rejects a read of a parameter after its update, so no StateRead follows a StateWrite of the same key).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poetc.runtime.contract import (SPILL_DOMAIN, STATE_WRITE_OUTPUT_SHAPE, make_state_read_node_spec,
                                    make_state_write_node_spec)
from poetc.schedule import StepKind

from .manager import PassContext, PassResult


def state_read_node_name(step) -> str:
    return f"{step.writes[0]}__stateread"


def state_write_node_name(step) -> str:
    return f"{step.writes[0]}__statewrite"


class InsertStateIO:
    name = "insert-state-io"

    def run(self, ctx: PassContext) -> PassResult:
        tensors = ctx.gs_graph.tensors()
        steps = ctx.schedule.steps
        introduced: set[str] = set()
        paged: set[str] = set()
        reads = writes = deps = 0
        written_at = {w: k for k, st in enumerate(steps) for w in st.writes}
        for i, step in enumerate(steps):
            if step.kind is StepKind.STATE_READ:
                t = ctx.graph.tensors[step.tensor]
                op_type, attrs = make_state_read_node_spec(t.dtype, step.tensor)
                out = tensors.get(step.writes[0])  # insert-recompute creates it if a recompute reads it
                if out is None:
                    out = tensors[step.writes[0]] = gs.Variable(step.writes[0])
                out.dtype, out.shape = onnx.helper.tensor_dtype_to_np_dtype(t.dtype), list(t.shape)
                order = [tensors[x] for x in _dependencies(ctx, steps, i, written_at) if x in tensors]
                deps += len(order)
                ctx.gs_graph.nodes.append(gs.Node(op=op_type, name=state_read_node_name(step), domain=SPILL_DOMAIN,
                                                  attrs=attrs, inputs=order, outputs=[out]))
                introduced.add(out.name)
                paged.add(step.tensor)
                reads += 1
            elif step.kind is StepKind.STATE_WRITE:
                t = ctx.graph.tensors[step.tensor]
                op_type, attrs = make_state_write_node_spec(t.dtype, step.tensor)
                token = gs.Variable(step.writes[0], dtype=np.int64, shape=list(STATE_WRITE_OUTPUT_SHAPE))
                tensors[token.name] = token
                ctx.gs_graph.nodes.append(gs.Node(op=op_type, name=state_write_node_name(step), domain=SPILL_DOMAIN,
                                                  attrs=attrs, inputs=[tensors[x] for x in step.reads],
                                                  outputs=[token]))
                ctx.gs_graph.outputs.append(token)
                writes += 1
        if not reads:
            return PassResult(modified=False, stats={"state_reads": 0, "state_writes": 0})
        ctx.custom_domains[SPILL_DOMAIN] = 1
        rewired = ctx.rewire_reads(introduced)
        ctx.gs_graph.inputs = [x for x in ctx.gs_graph.inputs if x.name not in paged]
        return PassResult(modified=True, stats={"state_reads": reads, "state_writes": writes,
                                                "paged_state_tensors": len(paged), "order_dependencies": deps,
                                                "rewired_inputs": rewired})


def _dependencies(ctx: PassContext, steps, i: int, written_at: dict[str, int]) -> list[str]:
    """Ordering inputs of the StateRead at step i: the inputs of the node it is read for (the next
    compute or recompute step) that an earlier step wrote, each once (no graph input, no other copy
    of state read for the same node)."""
    for step in steps[i + 1:]:
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            out: list[str] = []
            for x in step.reads:
                if x and x not in out and written_at.get(x, i) < i and steps[written_at[x]].kind is not StepKind.STATE_READ:
                    out.append(x)
            return out
    return []
