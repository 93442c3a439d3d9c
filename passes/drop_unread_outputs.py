"""drop-unread-outputs: no node keeps an optional output that nothing reads.

ONNX Runtime frees a tensor after its last consumer; a node output that no node consumes (and that is
not a graph output) is never released during the run: it stays allocated until the step ends. The
rewrite leaves such outputs behind whenever a schedule recomputes one output of a multi-output op and
nothing reads the original before its gap: the forward MaxPool's Indices (read only by MaxPoolGrad,
which now reads the recomputed mask), ConcatTraining's per_input_length. Measured on the corpus U-Net
at batch 8 (docs/memory-model.md): the two forward MaxPool masks, 0.38 MiB, stayed allocated through
the backward peak, 6% above the simulator's prediction, which frees a write nobody reads at once.

Rewrites: such an output, where the op's schema marks it optional, is replaced by the empty name
(ONNX's "not produced"); the kernel then does not compute or allocate it. Values of the other outputs
are unchanged (MaxPool's Y, ConcatTraining's concatenation and BatchNormalization's Y do not depend
on whether the optional outputs are requested). A required output nothing reads is left and counted
in the stats (`unread_required`); on the corpus and the project's models the only ones are the fused
optimizer's update outputs, in-place aliases of the parameters that hold no bytes of their own.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .manager import PassContext, PassResult

# optional outputs of ONNX Runtime's training ops (contrib schemas are not visible from Python):
# op type -> indices of optional outputs
_CONTRIB_OPTIONAL = {
    "ConcatTraining": {1},
    "BatchNormInternal": {1, 2, 3, 4},
    "SoftmaxCrossEntropyLossInternal": {1},
    "LayerNormalization": {1, 2},
    "SimplifiedLayerNormalization": {1},
    "BiasDropout": {1},
    "BitmaskDropout": {1},
}


def optional_output(node: gs.Node, index: int) -> bool:
    """Whether output `index` of `node` may be left unproduced (empty name) per its op's schema."""
    domain = node.domain or ""
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(node.op, domain="")
        except onnx.defs.SchemaError:
            return False
        if index >= len(schema.outputs):
            return schema.outputs and schema.outputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        return schema.outputs[index].option == onnx.defs.OpSchema.FormalParameterOption.Optional
    return index in _CONTRIB_OPTIONAL.get(node.op, ())


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
