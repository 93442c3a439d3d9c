"""insert-spill-restore: add the native Spill/Restore ops for every PAGE decision.

Rewrites: a Spill node (domain `poet`) right after each paged tensor's producer, whose small int64
handle output feeds a Restore node placed before the tensor's first backward reader (and one more
before each reader it is paged in again for: all but the last keep the spill file); backward nodes
read the restored tensor. Guarantees: the Restore output has the original's dtype and shape; the
domain's opset import is registered for export.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poetc.runtime.contract import SPILL_DOMAIN, make_restore_node_spec, make_spill_node_spec
from poetc.schedule import StepKind

from .manager import PassContext, PassResult


class InsertSpillRestore:
    name = "insert-spill-restore"

    def run(self, ctx: PassContext) -> PassResult:
        tensors = ctx.gs_graph.tensors()
        introduced: set[str] = set()
        spills = restores = 0
        last_restore = {step.tensor: i for i, step in enumerate(ctx.schedule.steps) if step.kind is StepKind.PAGE_IN}
        for i, step in enumerate(ctx.schedule.steps):
            if step.kind is StepKind.PAGE_OUT:
                t = ctx.graph.tensors[step.tensor]
                op_type, attrs = make_spill_node_spec(t.dtype)
                handle = gs.Variable(step.writes[0], dtype=np.int64, shape=[2])
                tensors[handle.name] = handle
                ctx.gs_graph.nodes.append(gs.Node(op=op_type, name=f"{step.writes[0]}__spill", domain=SPILL_DOMAIN,
                                                  attrs=dict(attrs, key=step.tensor),
                                                  inputs=[tensors[step.reads[0]]], outputs=[handle]))
                spills += 1
            elif step.kind is StepKind.PAGE_IN:
                t = ctx.graph.tensors[step.tensor]
                op_type, attrs = make_restore_node_spec(t.dtype, keep_file=last_restore[step.tensor] != i)
                out = tensors.get(step.writes[0])  # insert-recompute creates it if a recompute reads it
                if out is None:
                    out = tensors[step.writes[0]] = gs.Variable(step.writes[0])
                out.dtype, out.shape = onnx.helper.tensor_dtype_to_np_dtype(t.dtype), list(t.shape)
                ctx.gs_graph.nodes.append(gs.Node(op=op_type, name=f"{step.writes[0]}__restore", domain=SPILL_DOMAIN,
                                                  attrs=dict(attrs, key=step.tensor),
                                                  inputs=[tensors[step.reads[0]]], outputs=[out]))
                introduced.add(out.name)
                restores += 1
        if spills:
            ctx.custom_domains[SPILL_DOMAIN] = 1
        rewired = ctx.rewire_reads(introduced)
        return PassResult(modified=spills > 0, stats={"spill_nodes": spills, "restore_nodes": restores,
                                                      "rewired_inputs": rewired})
