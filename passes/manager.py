"""Pass manager: runs rewrite passes in order, times and logs them, can skip or dump after one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from poetc.errors import InternalError
from poetc.ir.graph import TrainGraph
from poetc.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share: the IR (for locating nodes), the schedule and the graph being rewritten."""

    graph: TrainGraph
    schedule: Schedule
    gs_graph: gs.Graph
    custom_domains: dict[str, int] = field(default_factory=dict)
    overlap: object = None  # poetc.overlap.OverlapPlan: the transfers async-paging makes asynchronous

    def node(self, op_index: int) -> gs.Node:
        """The graph-surgeon node of IR op `op_index` (located by the IR's node name)."""
        return self.nodes_by_name()[self.graph.ops[op_index].name]

    def nodes_by_name(self) -> dict[str, gs.Node]:
        return {n.name: n for n in self.gs_graph.nodes}

    def tensor(self, name: str) -> gs.Tensor:
        return self.gs_graph.tensors()[name]

    def rewire_reads(self, introduced: set[str]) -> int:
        """Point every compute step's inputs at the versioned tensors the schedule says it reads,
        for the reads in `introduced`. Returns the number of inputs changed."""
        nodes = self.nodes_by_name()
        tensors = self.gs_graph.tensors()
        changed = 0
        for step in self.schedule.steps:
            if step.kind.value != "compute":
                continue
            node = nodes[self.graph.ops[step.op].name]
            for i, read in enumerate(step.reads):
                if read in introduced and node.inputs[i].name != read:
                    node.inputs[i] = tensors[read]
                    changed += 1
        return changed


class PassError(InternalError):
    """A pass failed; the message names it and the passes that ran before it."""


class PassManager:
    def __init__(self, passes: list, disabled: set[str] | None = None, dump_after: set[str] | None = None,
                 dump_dir: Path | None = None):
        self.passes = passes
        self.disabled = disabled or set()
        self.dump_after = dump_after or set()
        self.dump_dir = dump_dir
        self.records: list[dict] = []
        unknown = (self.disabled | self.dump_after) - {p.name for p in passes}
        if unknown:
            from poetc.errors import UsageError
            raise UsageError(f"unknown pass name(s): {', '.join(sorted(unknown))}",
                             hint=f"passes: {', '.join(p.name for p in passes)}")

    def run(self, ctx: PassContext) -> onnx.ModelProto:
        ran: list[str] = []
        for p in self.passes:
            if p.name in self.disabled:
                log.info("pass %s: disabled", p.name)
                self.records.append({"name": p.name, "disabled": True})
                continue
            start = time.perf_counter()
            try:
                result = p.run(ctx)
            except Exception as exc:
                before = ", ".join(ran) or "none"
                raise PassError(f"pass {p.name} failed (passes run before it: {before}): {exc}") from exc
            elapsed = time.perf_counter() - start
            ran.append(p.name)
            self.records.append({"name": p.name, "modified": result.modified, "seconds": round(elapsed, 4),
                                 "stats": result.stats})
            log.info("pass %s: modified=%s %.3fs %s", p.name, result.modified, elapsed, result.stats)
            if p.name in self.dump_after and self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                path = self.dump_dir / f"after-{p.name}.onnx"
                onnx.save(export(ctx), str(path))
                log.info("dumped graph after %s to %s", p.name, path)
        return export(ctx)


def export(ctx: PassContext) -> onnx.ModelProto:
    source = ctx.graph.model
    # opset_imports given explicitly: without it graph-surgeon appends every custom domain the nodes use
    # to the imported graph's import_domains, which is the source model's own opset_import list (it
    # mutated ctx.graph.model, so later rewrites of the same graph declared `poet` without using it)
    model = gs.export_onnx(ctx.gs_graph, do_type_check=False, opset_imports=list(source.opset_import))
    model.ir_version = min(source.ir_version, 10)
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    for domain, version in sorted(ctx.custom_domains.items()):
        if all(o.domain != domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    model.producer_name = "poetc"
    return model
