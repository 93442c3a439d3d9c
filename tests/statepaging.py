"""Test support: page a compiled fused output's state by hand (what the compiler's paging rewrite does for
real), so the runtime side of the state directory can be tested on a real training graph.

`page_by_hand(out_dir, params)` turns each named trainable parameter and its two AdamW moments from graph
inputs into StateRead nodes placed right before every node that reads them (a parameter is read again
before its backward use: several reads per step), adds StateWrite(W), StateWrite(m1), StateWrite(m2) right
after the parameter's AdamWUpdate (ordered after it by its flag), writes DIR/initial_state (generation 0,
the paged tensors marked paged) and records the changed training_model.onnx in report.json so
`poetc train` / `verify` accept the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from poetc import output
from poetc.export import _read_checkpoint
from poetc.ir.fused import is_optimizer_state, moment_names
from poetc.run import INITIAL_STATE
from poetc.runtime import contract, statedir


def page_by_hand(out_dir: Path, params: list[str], library: Path) -> set[str]:
    out_dir = Path(out_dir)
    path = out_dir / "training_model.onnx"
    m = onnx.load(str(path))
    g = m.graph
    inputs = {i.name for i in g.input}
    paged = set()
    for p in params:
        paged |= {p} | ({*moment_names(p)} & inputs)  # a frozen parameter has no moments
    types = {i.name: i for i in g.input if i.name in paged}
    assert set(types) == paged, f"not all of {sorted(paged)} are graph inputs"
    kept_inputs = [i for i in g.input if i.name not in paged]
    del g.input[:]
    g.input.extend(kept_inputs)
    nodes, outputs, value_info = [], [], []
    count = 0
    for node in list(g.node):
        for j, x in enumerate(node.input):
            if x in paged:
                count += 1
                name = f"{x}__read{count}"
                op, attrs = contract.make_state_read_node_spec(TensorProto.FLOAT, x)
                nodes.append(helper.make_node(op, [], [name], domain=contract.SPILL_DOMAIN, name=f"read{count}", **attrs))
                t = types[x].type.tensor_type
                value_info.append(helper.make_tensor_value_info(name, t.elem_type, [d.dim_value for d in t.shape.dim]))
                node.input[j] = name
        nodes.append(node)
        if node.op_type == "AdamWUpdate" and any(x.split("__read")[0] in params for x in node.input[:1]):
            key = node.input[0].split("__read")[0]
            for src, k in ((node.input[0], key), (node.input[2], moment_names(key)[0]), (node.input[3], moment_names(key)[1])):
                op, attrs = contract.make_state_write_node_spec(TensorProto.FLOAT, k)
                tok = f"{k}__written"
                nodes.append(helper.make_node(op, [src, node.output[0]], [tok], domain=contract.SPILL_DOMAIN,
                                              name=f"write_{k}", **attrs))
                outputs.append(helper.make_tensor_value_info(tok, TensorProto.INT64, [1]))
    del g.node[:]
    g.node.extend(nodes)
    g.output.extend(outputs)
    g.value_info.extend(value_info)
    onnx.save(m, str(path))
    # the initial state: every checkpoint tensor, the paged ones marked paged
    values = _read_checkpoint(out_dir / "checkpoint", artifact=True)
    declared = _read_checkpoint(out_dir / "reference" / "checkpoint", artifact=True)
    frozen = {n for n, (_, t) in declared.items() if not t and not is_optimizer_state(n)}
    shutil.rmtree(out_dir / INITIAL_STATE, ignore_errors=True)  # a compile's own (all resident, or its paging)
    statedir.write_initial_state(out_dir / INITIAL_STATE, {n: np.asarray(v) for n, (v, _) in values.items()},
                                 {"source": "tests/statepaging.py"}, frozen=frozen & set(values), paged=paged,
                                 library=library)
    report_path = out_dir / "report.json"
    doc = json.loads(report_path.read_text())
    doc["artifacts"]["training_model.onnx"] = output.sha256_file(path)
    report_path.write_text(json.dumps(doc, indent=1))
    return paged
