"""cleanup: final consistency checks on the rewritten graph. An analysis pass: it changes nothing
(graph-surgeon's export already leaves out tensors no node references, and the step list is exact, so
no node may go). Guarantees, or raises: node names are unique and every node input is a graph input,
a constant or an output of an earlier node.
"""

from __future__ import annotations

from collections import Counter

from .manager import PassContext, PassResult


class Cleanup:
    name = "cleanup"

    def run(self, ctx: PassContext) -> PassResult:
        names = Counter(n.name for n in ctx.gs_graph.nodes)
        duplicates = [n for n, c in names.items() if c > 1]
        if duplicates:
            raise ValueError(f"duplicate node names: {duplicates[:5]}")
        produced = {t.name for t in ctx.gs_graph.inputs}
        produced |= {name for name, t in ctx.gs_graph.tensors().items() if t.__class__.__name__ == "Constant"}
        for node in ctx.gs_graph.nodes:
            missing = [x.name for x in node.inputs if x.name and x.name not in produced]
            if missing:
                raise ValueError(f"node {node.name} reads {missing} before any node produces it")
            produced.update(o.name for o in node.outputs)
        return PassResult(modified=False, stats={"nodes": len(ctx.gs_graph.nodes)})
