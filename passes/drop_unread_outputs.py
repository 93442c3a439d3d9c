"""drop-unread-outputs: no node keeps an optional output that nothing reads.

ONNX Runtime frees a tensor after its last consumer; a node output that no node consumes (and that is
not a graph output) is never released during the run: it stays allocated until the step ends. The
rewrite leaves such outputs behind whenever a schedule recomputes one output of a multi-output op and
nothing reads the original before its gap: the forward MaxPool's Indices (read only by MaxPoolGrad,
which now reads the recomputed mask), ConcatTraining's per_input_length. Measured on the corpus U-Net
at batch 8 (docs/memory-model.md): the two forward MaxPool masks, 0.38 MiB, stayed allocated through
the backward peak, 6% above the simulator's prediction, which frees a write nobody reads at once.

Rewrites: such an output, where it is optional and ONNX Runtime's kernel runs without it (`_DROPPABLE`:
MaxPool's Indices, ConcatTraining's per_input_length), is replaced by the empty name
(ONNX's "not produced"); the kernel then does not compute or allocate it. Values of the other outputs
are unchanged (MaxPool's Y and ConcatTraining's concatenation do not depend on whether the optional
output is requested). A required output nothing reads is left and counted
in the stats (`unread_required`): on the corpus these are the fused optimizer's update outputs
(in-place aliases of the parameters, no bytes of their own) and BatchNormInternal's running statistics
(4 bytes per channel, within the planning reserve).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .manager import PassContext, PassResult

# op type -> indices of outputs that may be left out, checked against ONNX Runtime 1.19.2's CPU kernels
# (the training step loads, runs and trains bitwise identically on the corpus). Not every output the
# schemas call optional can be: BatchNormInternal without its running statistics fails to load.
_DROPPABLE = {
    ("", "MaxPool"): {1},  # Indices
    ("com.microsoft", "ConcatTraining"): {1},  # per_input_length
}


def optional_output(node: gs.Node, index: int) -> bool:
    """Whether output `index` of `node` may be left unproduced (empty name)."""
    domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
    return index in _DROPPABLE.get((domain, node.op), ())


class DropUnreadOutputs:
    name = "drop-unread-outputs"

    def run(self, ctx: PassContext) -> PassResult:
        graph = ctx.gs_graph
        read = {x.name for n in graph.nodes for x in n.inputs if x.name}
        read |= {t.name for t in graph.outputs}
        dropped, required = [], []
        for node in graph.nodes:
            for i, out in enumerate(node.outputs):
                if not out.name or out.name in read:
                    continue
                if optional_output(node, i):
                    node.outputs[i] = gs.Variable.empty()
                    dropped.append(out.name)
                else:
                    required.append(out.name)
        # trailing empty outputs are the same as absent ones; drop them so the node reads naturally
        for node in graph.nodes:
            while node.outputs and not node.outputs[-1].name:
                node.outputs.pop()
        return PassResult(modified=bool(dropped), stats={"dropped": len(dropped), "unread_required": len(required),
                                                         "dropped_names": sorted(dropped)[:20]})
