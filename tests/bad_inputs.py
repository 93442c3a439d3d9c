"""Every bad input of issue #6, as data: what is tried, the expected exit code and a phrase the message
must contain. tests/test_robustness.py runs each case through the CLI; run this file to regenerate the
table in docs/errors.md from real runs of `python -m poetc` (one fresh process per case):

    python tests/bad_inputs.py              # print the table
    python tests/bad_inputs.py --write      # replace the table between the markers in docs/errors.md

Cases marked `root` mount a small tmpfs (read-only, or 64 KiB to fill up) and are skipped where that is
not allowed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "examples" / "mlp.onnx"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


def _tiny(path: Path, *, mid_op: str | None = None, dtype: int = TensorProto.FLOAT, np_dtype=np.float32,
          dims=(4, 8), weight=None) -> Path:
    """x[dims] -> Gemm(w) [-> mid_op] -> output: the smallest trainable model, or a broken variant."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm")]
    out = "y"
    if mid_op:
        nodes.append(helper.make_node(mid_op, ["y"], ["z"], name="mid"))
        out = "z"
    w = weight if weight is not None else numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np_dtype), "w")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, list(dims))],
                              [helper.make_tensor_value_info(out, dtype, [dims[0], 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        p = d / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def _truncated(d: Path) -> None:
    data = (d / "mlp.onnx").read_bytes()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])


def _dangling(d: Path) -> None:
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w_missing"], ["y"], name="gemm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "dangling.onnx"))


def _short_initializer(d: Path) -> None:
    model = onnx.load(str(_tiny(d / "short.onnx")))
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-8]
    onnx.save(model, str(d / "short.onnx"))


def _external_missing(d: Path) -> None:
    model = onnx.load(str(_tiny(d / "ext.onnx")))
    onnx.save(model, str(d / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (d / "ext.bin").unlink()


def _opset99(d: Path) -> None:
    model = onnx.load(str(_tiny(d / "opset99.onnx")))
    model.opset_import[0].version = 99
    onnx.save(model, str(d / "opset99.onnx"))


def _dynamic(d: Path) -> None:
    _tiny(d / "dyn.onnx", dims=("N", 8))
    _tiny(d / "dyn2.onnx", dims=("N", "F"))


def _targets(d: Path) -> None:
    (d / "bad_syntax.toml").write_text('name = "x"\n[compute\n')
    (d / "no_compute.toml").write_text('name = "x"\ndescription = "x"\nram_bytes = 1000000\nflash_bytes = 1000000\n')
    host = (ROOT / "poetc" / "targets" / "host.toml").read_text()
    (d / "negative.toml").write_text(host.replace("flops_per_s = 1.4e11", "flops_per_s = -1.0"))
    (d / "costs.json").write_text("{not json")


def _output_fixtures(d: Path) -> None:
    (d / "afile").write_text("not a directory\n")
    (d / "done").mkdir()
    (d / "notmine").mkdir()
    (d / "notmine" / "keep.txt").write_text("someone else's file\n")


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """Mount a tmpfs at `where` for the duration (root only); yields False if mounting is not allowed."""
    where.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                        capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(where)], capture_output=True)


@dataclass
class Case:
    id: str
    tried: str  # the table's "input tried" column
    args: list[str]  # relative to the case directory, which holds mlp.onnx and whatever setup made
    code: int
    expect: str  # a phrase the message must contain (case-insensitive)
    setup: Callable[[Path], None] | None = None
    mount: str | None = None  # tmpfs options for d/"mnt" (root only)
    no_output: list[str] = field(default_factory=list)  # paths that must not exist afterwards


C = "compile"
OUT = ["-o", "out"]
CASES: list[Case] = [
    # 3: input file
    Case("missing-file", "`inspect nope.onnx` (no such file)", ["inspect", "nope.onnx"], 3, "does not exist"),
    Case("empty-file", "an empty file", [C, "empty.onnx", "--ram", "8MB", *OUT], 3, "is empty",
         _write("empty.onnx", b""), no_output=["out"]),
    Case("text-file", "a text file named .onnx", ["inspect", "text.onnx"], 3, "not an ONNX model",
         _write("text.onnx", "hello, not onnx\n")),
    Case("other-protobuf", "a valid protobuf that is not a model (a TensorProto)", ["inspect", "tensor.onnx"], 3,
         "does not contain an ONNX graph", _write("tensor.onnx", numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString())),
    Case("truncated", "the first half of a real ONNX file", [C, "cut.onnx", "--ram", "8MB", *OUT], 3,
         "truncated or corrupt", _truncated, no_output=["out"]),
    Case("invalid-graph", "parses, but a node reads a tensor nothing defines", ["inspect", "dangling.onnx"], 3,
         "not a valid ONNX model", _dangling),
    Case("short-initializer", "parses and passes onnx.checker, but a weight's raw data is 8 bytes short",
         ["inspect", "short.onnx"], 3, "is corrupt: initializer 'w'", _short_initializer),
    Case("missing-external-data", "external weight file missing", ["inspect", "ext.onnx"], 3, "ext.bin",
         _external_missing),
    Case("unknown-op", "an op no opset defines (FooBar)", ["inspect", "foobar.onnx"], 3, "FooBar",
         lambda d: _tiny(d / "foobar.onnx", mid_op="FooBar")),
    # 4: model not supported
    Case("no-gradient", "an op without a gradient builder (Round) between a weight and the loss",
         [C, "round.onnx", "--ram", "8MB", *OUT], 4, "has no gradient", lambda d: _tiny(d / "round.onnx", mid_op="Round"),
         no_output=["out"]),
    Case("dtype-float16", "a float16 model", ["inspect", "fp16.onnx"], 4, "float32 models only",
         lambda d: _tiny(d / "fp16.onnx", dtype=TensorProto.FLOAT16, np_dtype=np.float16)),
    Case("dtype-double", "a float64 model", ["inspect", "fp64.onnx"], 4, "float32 models only",
         lambda d: _tiny(d / "fp64.onnx", dtype=TensorProto.DOUBLE, np_dtype=np.float64)),
    Case("dynamic-batch", "a symbolic batch dimension, no `--batch`", ["inspect", "dyn.onnx"], 4, "--batch", _dynamic),
    Case("dynamic-feature", "`--batch 4`, but axis 1 is symbolic too", ["inspect", "dyn2.onnx", "--batch", "4"], 4,
         "--input-shape x=", _dynamic),
    Case("opset-99", "opset 99 (cannot be converted)", ["inspect", "opset99.onnx"], 4, "opset 99", _opset99),
    # 2: usage
    *[Case(f"ram-{i}", f"`--ram={v}`", [C, "mlp.onnx", f"--ram={v}", *OUT], 2, repr(v), no_output=["out"])
      for i, v in enumerate(["8 MB", "8mb", "-1MB", "1e3MB", "12parsecs", "0MB"])],
    Case("ram-negative-separate", "`--ram -1MB` (separate word)", [C, "mlp.onnx", "--ram", "-1MB", *OUT], 2,
         "--ram=VALUE"),
    Case("flash-bad", "`--flash 8mb`", [C, "mlp.onnx", "--ram", "100MB", "--flash", "8mb", *OUT], 2, "--flash"),
    Case("time-limit-bad", "`--time-limit soon`", [C, "mlp.onnx", "--ram", "100MB", "--time-limit", "soon", *OUT], 2,
         "--time-limit"),
    Case("deadline-bare", "`--deadline 1.3` (factor or seconds?)", [C, "mlp.onnx", "--ram", "100MB", "--deadline", "1.3",
                                                                     *OUT], 2, "1.3x"),
    Case("deadline-below-1x", "`--deadline 0.5x`", [C, "mlp.onnx", "--ram", "100MB", "--deadline", "0.5x", *OUT], 2,
         "below 1x"),
    Case("loss-unknown", "`--loss hinge`", ["inspect", "mlp.onnx", "--loss", "hinge"], 2, "hinge"),
    Case("optimizer-unknown", "`--optimizer lion`", ["inspect", "mlp.onnx", "--optimizer", "lion"], 2, "lion"),
    Case("strategy-unknown", "`--strategy magic`", [C, "mlp.onnx", "--ram", "100MB", "--strategy", "magic", *OUT], 2,
         "invalid choice"),
    Case("input-shape-bad", "`--input-shape x`", ["inspect", "mlp.onnx", "--input-shape", "x"], 2, "NAME=d0"),
    Case("input-shape-unknown", "`--input-shape nope=1,2`", ["inspect", "mlp.onnx", "--input-shape", "nope=1,2"], 2,
         "unknown input"),
    Case("batch-zero", "`--batch 0`", ["inspect", "mlp.onnx", "--batch", "0"], 2, "positive integer"),
    # 5: target / costs
    Case("target-unknown", "`--target cray`", [C, "mlp.onnx", "--ram", "100MB", "--target", "cray", *OUT], 5, "cray"),
    Case("target-syntax", "`--target-file` with a TOML syntax error",
         [C, "mlp.onnx", "--ram", "100MB", "--target-file", "bad_syntax.toml", *OUT], 5, "malformed TOML", _targets),
    Case("target-missing-table", "`--target-file` without its [compute] table",
         [C, "mlp.onnx", "--ram", "100MB", "--target-file", "no_compute.toml", *OUT], 5, "compute", _targets),
    Case("target-negative", "`--target-file` with flops_per_s = -1.0",
         [C, "mlp.onnx", "--ram", "100MB", "--target-file", "negative.toml", *OUT], 5, "flops_per_s", _targets),
    Case("target-file-missing", "`--target-file nope.toml`",
         [C, "mlp.onnx", "--ram", "100MB", "--target-file", "nope.toml", *OUT], 5, "nope.toml"),
    Case("costs-malformed", "`--costs` file that is not JSON",
         [C, "mlp.onnx", "--ram", "100MB", "--costs", "costs.json", *OUT], 5, "costs", _targets, no_output=["out"]),
    # 6: infeasible
    Case("below-lower-bound", "`--ram 1MB` (below the lower bound)", [C, "mlp.onnx", "--ram", "1MB", *OUT], 6,
         "lower bound", no_output=["out"]),
    Case("deadline-impossible", "`--deadline 1ms` (below the keep-all step time)",
         [C, "mlp.onnx", "--ram", "100MB", "--deadline", "1ms", *OUT], 6, "below the keep-all step time",
         no_output=["out"]),
    Case("budget-and-deadline", "`--ram 19.5MiB --deadline 1.0x --optimizer-mode unfused` (each alone is "
         "feasible; the fused mode would fit without overhead)",
         [C, "mlp.onnx", "--ram", "19.5MiB", "--deadline", "1.0x", "--optimizer-mode", "unfused", *OUT], 6, "no schedule found", no_output=["out"]),
    # 7: output
    Case("out-exists", "`-o` an existing directory, no `--force`", [C, "mlp.onnx", "--ram", "100MB", "-o", "done"], 7,
         "already exists", _output_fixtures),
    Case("out-force-file", "`-o afile --force` (a regular file)", [C, "mlp.onnx", "--ram", "100MB", "-o", "afile",
                                                                     "--force"], 7, "not a directory", _output_fixtures),
    Case("out-force-foreign", "`-o notmine --force` (a non-empty directory poetc did not write)",
         [C, "mlp.onnx", "--ram", "100MB", "-o", "notmine", "--force"], 7, "not written by poetc", _output_fixtures),
    Case("out-parent-file", "`-o afile/out` (parent is a file)", [C, "mlp.onnx", "--ram", "100MB", "-o", "afile/out"],
         7, "not a directory", _output_fixtures),
    Case("out-proc", "`-o /proc/poetc-out` (a file system that takes no directories)",
         [C, "mlp.onnx", "--ram", "100MB", "-o", "/proc/poetc-out"], 7, "cannot write"),
    Case("out-read-only", "`-o mnt/out` on a read-only tmpfs", [C, "mlp.onnx", "--ram", "100MB", "-o", "mnt/out"], 7,
         "not writable", mount="ro,size=1m", no_output=["mnt/out"]),
    Case("out-disk-full", "`-o mnt/out` on a 64 KiB tmpfs (disk full while writing)",
         [C, "mlp.onnx", "--ram", "100MB", "-o", "mnt/out"], 7, "No space left", mount="size=64k",
         no_output=["mnt/out"]),
]


def prepare(case: Case, d: Path) -> None:
    shutil.copy2(MLP, d / "mlp.onnx")
    if case.setup:
        case.setup(d)


def run_process(case: Case, d: Path) -> tuple[int, str]:
    """Run the case as `python -m poetc ...` in d; returns (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "poetc", *case.args], cwd=d, capture_output=True, text=True,
                          env=env, timeout=900)
    return proc.returncode, proc.stderr


def first_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line.removeprefix("poetc: error: ")


def table() -> str:
    rows = ["| input tried | observed message (first line) | exit code |", "|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="poetc-bad-") as tmp:
            d = Path(tmp)
            prepare(case, d)
            with tmpfs(d / "mnt", case.mount) if case.mount else contextlib.nullcontext(True) as mounted:
                if not mounted:
                    rows.append(f"| {case.tried} | (not run: mounting a tmpfs needs root) | {case.code} |")
                    continue
                code, err = run_process(case, d)
        msg = first_line(err).replace("|", "\\|").replace(tmp + "/", "").replace(tmp, ".")
        flag = "" if code == case.code else f" (expected {case.code})"
        rows.append(f"| {case.tried} | {msg} | {code}{flag} |")
        print(f"{case.id}: {code}", file=sys.stderr)
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    text = table()
    if "--write" in argv:
        doc = ROOT / "docs" / "errors.md"
        body = doc.read_text()
        start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
        doc.write_text(body[:start] + "\n" + text + body[end:])
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
