"""seed-random-ops (poetc/ir/canonicalize.py): an unseeded Dropout draws from ONNX Runtime's
clock-seeded global generator, so two sessions (the reference and the compiled training graph) draw
different masks, and a graph that runs its ops in another order hands the draws to other nodes. After
the rewrite every random op owns a seeded generator: the masks depend on the node and the call count
only. Also checked: the seed survives into onnxruntime-training's training graph and two runs of the
training step are then identical.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from poetc.importer import ImportOptions, canonicalize, generate_training_artifacts
from poetc.ir.canonicalize import seed_random_ops

X = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)


def two_dropouts(seed_first: int | None = None) -> onnx.ModelProto:
    """x -> Dropout a, x -> Dropout b (parallel, training mode, ratio 0.5) -> a + b."""
    attrs = {} if seed_first is None else {"seed": seed_first}
    nodes = [oh.make_node("Dropout", ["x", "ratio", "train"], ["a", "ma"], name="drop_a", **attrs),
             oh.make_node("Dropout", ["x", "ratio", "train"], ["b", "mb"], name="drop_b"),
             oh.make_node("Add", ["a", "b"], ["y"], name="join")]
    graph = oh.make_graph(nodes, "two_dropouts", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [oh.make_tensor_value_info(n, TensorProto.FLOAT, [4, 64]) for n in ("a", "b")],
                          [nh.from_array(np.array(0.5, np.float32), "ratio"), nh.from_array(np.array(True), "train")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, calls: int = 2) -> list[list[np.ndarray]]:
    """Outputs a, b of `calls` runs of one fresh session under poetc's contract (file order)."""
    from poetc.runtime.session import contract_session_options
    session = ort.InferenceSession(model.SerializeToString(), contract_session_options(intra_op_threads=1),
                                   providers=["CPUExecutionProvider"])
    return [session.run(["a", "b"], {"x": X}) for _ in range(calls)]


def swapped(model: onnx.ModelProto) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    nodes = list(out.graph.node)
    nodes[0], nodes[1] = nodes[1], nodes[0]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_unseeded_dropout_is_not_reproducible_between_sessions():
    """The problem the rewrite solves: the same unseeded graph, two sessions, different masks."""
    first, second = run(two_dropouts()), run(two_dropouts())
    assert not np.array_equal(first[0][0], second[0][0])


def test_seeded_dropouts_draw_the_same_masks_in_any_session_and_order():
    model = two_dropouts()
    notes = seed_random_ops(model)
    assert [(n.name, n.nodes) for n in notes] == [("seed-random-ops", ["drop_a", "drop_b"])]
    seeds = [onnx.helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute if a.name == "seed"]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    reference = run(model)
    again, reordered = run(model), run(swapped(model))
    for call in range(2):
        for k in range(2):
            np.testing.assert_array_equal(again[call][k], reference[call][k])
            np.testing.assert_array_equal(reordered[call][k], reference[call][k])
    # each call is a new draw (the generator advances), and the two nodes draw differently
    assert not np.array_equal(reference[0][0], reference[1][0])
    assert not np.array_equal(reference[0][0], reference[0][1])
    # a Dropout of ratio 0.5 zeroes about half and scales the rest by 2
    kept = reference[0][0] != 0
    np.testing.assert_array_equal(reference[0][0][kept], X[kept] * 2)
    assert 0.3 < kept.mean() < 0.7


def test_seeds_are_derived_from_the_model_and_existing_seeds_are_kept():
    a, b = two_dropouts(seed_first=5), two_dropouts(seed_first=5)
    seed_random_ops(a)
    seed_random_ops(b)
    assert a.SerializeToString() == b.SerializeToString()
    assert [onnx.helper.get_attribute_value(x) for x in a.graph.node[0].attribute if x.name == "seed"] == [5]
    renamed = two_dropouts()
    renamed.graph.name = "another_model"
    plain = two_dropouts()
    seed_random_ops(renamed)
    seed_random_ops(plain)
    assert renamed.graph.node[1].attribute != plain.graph.node[1].attribute


def test_the_seed_reaches_the_training_graph_and_two_training_runs_agree(tmp_path):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((1, 64)) + 1).astype(np.float32)
    nodes = [oh.make_node("Mul", ["x", "W"], ["xw"], name="scale"),
             oh.make_node("Dropout", ["xw", "ratio", "train"], ["y"], name="drop")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                          [nh.from_array(w, "W"), nh.from_array(np.array(0.5, np.float32), "ratio"),
                           nh.from_array(np.array(True), "train")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    canonical, notes = canonicalize(model, ImportOptions(loss="mse"))
    assert "seed-random-ops" in [n.name for n in notes]
    out = generate_training_artifacts(canonical, tmp_path / "art", ImportOptions(loss="mse"))
    training = onnx.load(str(out / "training_model.onnx"))
    dropouts = [n for n in training.graph.node if n.op_type == "Dropout"]
    assert len(dropouts) == 1 and any(a.name == "seed" for a in dropouts[0].attribute)

    from poetc.runtime.session import open_training
    labels = rng.standard_normal((4, 64)).astype(np.float32)

    def losses():
        sess = open_training(out, intra_op_threads=1)
        feeds = {"x": X, "target": labels}
        return [sess.step({n: feeds[n] for n in sess.input_names}) for _ in range(3)]

    first, second = losses(), losses()
    assert first == second
    assert len(set(first)) == 3  # the masks (and so the losses) change from step to step



def test_a_seeded_dropout_is_never_recomputed(tmp_path):
    """A seeded Dropout's kernel advances its own generator per call: a recompute node (a second
    kernel with the same seed) would draw the first step's mask again. The problem never offers a
    recompute that reruns it: the Dropout's outputs and everything regenerated through it are not
    recomputable, with the reason."""
    from poetc.api import open_graph, step_costs_for
    from poetc.solver import build_problem
    from poetc.targets import load_target

    rng = np.random.default_rng(6)
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             oh.make_node("Dropout", ["h", "ratio", "train"], ["d", "mask"], name="drop"),
             oh.make_node("Relu", ["d"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                          [nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
                           nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W2"),
                           nh.from_array(np.array(0.5, np.float32), "ratio"), nh.from_array(np.array(True), "train")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    _, g = open_graph(tmp_path / "m.onnx", tmp_path / "work", ImportOptions(loss="mse"))
    problem = build_problem(g, step_costs_for(g, load_target("rpi4"), None))
    drop = next(op for op in g.ops if op.op_type == "Dropout")
    through = [c for c in problem.candidates if g.tensors[c.name].producer == drop.index or c.name == "r"]
    assert {c.name for c in through} >= {"mask", "r"}, [c.name for c in problem.candidates]
    for c in through:
        assert not c.recomputable and "random" in c.why_not_recomputable, (c.name, c.why_not_recomputable)
