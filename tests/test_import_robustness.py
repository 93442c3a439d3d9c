"""Import-side robustness (issue #14): inputs that used to crash ONNX Runtime, leak a Python error or
say something misleading. Each case runs the real CLI in a fresh process (exit code, one
`poetc: error:` paragraph naming the problem, no traceback) or, where the model is fine after
canonicalization, imports and lowers it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from poetc.importer import ImportOptions, canonicalize, load_onnx


def linear_model(x_shape=(4, 8), *, ir: int = 8, opset: int = 17, node_name: str = "fc",
                 initializers_as_inputs: bool = False, outputs: int = 1, reduce: bool = False) -> onnx.ModelProto:
    w = nh.from_array(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32), "W")
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if initializers_as_inputs:  # IR 3 style
        inputs.append(oh.make_tensor_value_info("W", TensorProto.FLOAT, [8, 3]))
    nodes = [oh.make_node("MatMul", ["x", "W"], ["y"], name=node_name)]
    out_shape = [x_shape[0], 3]
    outs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    if reduce:
        nodes.append(oh.make_node("ReduceSum", ["y"], ["s"], keepdims=0))
        outs = [oh.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    if outputs == 2:
        nodes.append(oh.make_node("Relu", ["y"], ["z"]))
        outs.append(oh.make_tensor_value_info("z", TensorProto.FLOAT, out_shape))
    model = oh.make_model(oh.make_graph(nodes, "g", inputs, outs, [w]), opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def run_cli(tmp_path: Path, model: onnx.ModelProto, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return subprocess.run([sys.executable, "-m", "poetc", "inspect", str(path), *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)


def assert_one_paragraph(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("poetc: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_zero_sized_dimension_is_named_before_onnx_runtime_runs(tmp_path):
    """Used to die with SIGFPE inside ORT's probe run (exit 136, nothing on stderr)."""
    proc = run_cli(tmp_path, linear_model((0, 8)))
    assert_one_paragraph(proc, 4, "input 'x' has a zero-sized dimension", "[0, 8]")


def test_batch_larger_than_the_machine_is_a_usage_error_naming_the_size(tmp_path):
    """Used to exit 70 (MemoryError) while allocating the probe inputs."""
    proc = run_cli(tmp_path, linear_model(), "--batch", "1000000000000")
    assert_one_paragraph(proc, 2, "--batch 1000000000000", "32,000,000,000,000 bytes", "input 'x'")


def test_ir11_model_is_lowered_and_reported(tmp_path):
    """onnx's checker here stops at IR 10; the model used to be called 'not a valid ONNX model'."""
    path = tmp_path / "ir11.onnx"
    path.write_bytes(linear_model(ir=11).SerializeToString())
    model, notes = canonicalize(load_onnx(path), ImportOptions())
    assert model.ir_version == 10
    assert [n.name for n in notes] == ["ir-version"] and "IR version 11" in notes[0].why


def test_invalid_model_with_a_new_ir_says_which_ir_onnx_runtime_loads(tmp_path):
    model = linear_model(ir=11)
    model.graph.node[0].input[1] = "missing"
    proc = run_cli(tmp_path, model)
    assert_one_paragraph(proc, 3, "IR version 11", "ONNX Runtime 1.19.2 loads IR 3..10")


def test_opset7_ir3_model_is_converted_and_trains(tmp_path):
    """Initializers listed as graph inputs (IR 3) used to fail the conversion with an internal
    initializer message."""
    from poetc.api import open_graph
    path = tmp_path / "op7.onnx"
    path.write_bytes(linear_model(ir=3, opset=7, initializers_as_inputs=True).SerializeToString())
    artifacts, graph = open_graph(path, tmp_path / "work", ImportOptions())
    from poetc.importer import canonicalizations
    assert [c["name"] for c in canonicalizations(artifacts)] == ["opset-conversion"]
    assert graph.parameter_names == ["W"]


def test_scalar_output_with_cross_entropy_names_the_problem(tmp_path):
    """Used to say 'list index out of range'."""
    proc = run_cli(tmp_path, linear_model(reduce=True))
    assert_one_paragraph(proc, 4, "output 's' has shape []", "--loss cross_entropy needs class scores")


def test_two_output_model_trains_its_first_output(tmp_path):
    """Used to fail inside ORT's loss block with a type error on 'labels'."""
    from poetc.api import open_graph
    from poetc.importer import canonicalizations
    path = tmp_path / "two.onnx"
    path.write_bytes(linear_model(outputs=2).SerializeToString())
    artifacts, graph = open_graph(path, tmp_path / "work", ImportOptions())
    assert [(c["name"], c["nodes"]) for c in canonicalizations(artifacts)] == [("extra-outputs-dropped", ["z"])]
    assert graph.tensors["labels"].shape == (4,)


def test_control_characters_in_node_names(tmp_path):
    """Used to fail with an internal JSON error reading ORT's profile."""
    from poetc.api import open_graph
    path = tmp_path / "ctrl.onnx"
    path.write_bytes(linear_model(node_name="fc\x01\x1b[31m\n").SerializeToString())
    artifacts, graph = open_graph(path, tmp_path / "work", ImportOptions())
    assert any(op.name == "fc__[31m_" for op in graph.ops)


@pytest.mark.parametrize("batch", [1, 3])
def test_labels_take_a_concrete_shape_when_inference_cannot_give_one(tmp_path, batch):
    """An output whose shape ONNX shape inference leaves open (a Reshape to a computed shape): the
    labels input onnxruntime-training derives from it used to keep an 'unk__' dim."""
    nodes = [oh.make_node("MatMul", ["x", "W"], ["y"]), oh.make_node("Shape", ["x"], ["sx"]),
             oh.make_node("Gather", ["sx", "zero"], ["n"], axis=0),
             oh.make_node("Concat", ["n", "three"], ["target"], axis=0),
             oh.make_node("Add", ["target", "nothing"], ["target2"]),
             oh.make_node("Reshape", ["y", "target2"], ["out"])]
    inits = [nh.from_array(np.ones((8, 3), np.float32), "W"), nh.from_array(np.array([0], np.int64), "zero"),
             nh.from_array(np.array([3], np.int64), "three"), nh.from_array(np.zeros(2, np.int64), "nothing")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [oh.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "unk__66"])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    canonical, _ = canonicalize(model, ImportOptions(batch=batch))
    assert [d.dim_value for d in canonical.graph.output[0].type.tensor_type.shape.dim] == [batch, 3]
