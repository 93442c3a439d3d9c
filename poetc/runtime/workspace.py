"""Kernel workspace: heap an op's ONNX Runtime kernel allocates beyond its own outputs while it runs.

Some CPU kernels allocate scratch for the duration of one call: ConvGrad an im2col buffer,
LayerNormalizationGrad several row-sized temporaries, Sum a partial-sum buffer. Under poetc's
runtime contract (no arena, no memory reuse) those are plain mallocs that add to the step's peak at
the op's position, so the simulator has to know them; without them the predicted peak of the
tiny transformer's step was 4.6% low (docs/memory-model.md).

The sizes are measured, not guessed: a worker process with poetc's heap counter preloaded runs each
distinct op (same type, attributes, input shapes and dtypes) alone in an InferenceSession under the
contract and records peak heap during the run minus the heap held by the outputs it returned,
counting blocks of 4 KiB and more, each in whole pages: application buffers (tensors, kernel scratch)
whose page count is the same in every run, while the small bookkeeping blocks below that vary by a
few bytes between runs and would make the output of a compile differ. Counting from 64 KiB only (the
mmapped blocks, as until issue #15) missed scratch that matters on small feature maps: a Sum of two
gradients of 61,440 B each allocates a 64,424 B partial sum, a Conv1d's ConvGrad a 25-38 KB im2col
buffer (corpus textcnn at batch 8: the keep-all step measured 12.7% above the simulator; 2.2% with
this; docs/memory-model.md). Integer
inputs (shapes, indices) get the values they have in the real step, read from one run of the whole
graph; float inputs are seeded random. Each op runs with one intra-op thread: with more, whether a
worker thread takes part (and allocates its own buffer) depends on timing, and ConvGrad's scratch
differed by 4 KB between two measurements, which would make two compiles differ. Conv
(PER_THREAD_OPS) is measured at ORT's default thread count too, the larger kept: its scratch is one
block sized by the thread count, not by timing (64 KiB per thread on small feature maps: squeezenet
at batch 1 measured 76 KB above the prediction without it). The small per-thread part left out
elsewhere is within poetc's planning reserve. The numbers belong to ONNX Runtime's CPU
kernels, so they carry to an ONNX Runtime build for another CPU.

    python -m poetc.runtime.workspace MODEL.onnx FEEDS.npz RESULT.json   (types.json beside MODEL)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx

log = logging.getLogger(__name__)

_TIMEOUT_S = 900


# Ops whose scratch is one buffer sized by the intra-op thread count, measured at one thread and at ONNX
# Runtime's default count (every core, as `verify` and a deployed step run; the larger is kept): MLAS's
# segmented im2col convolution allocates 64 KiB per thread in one block (lenet_opset9 batch 1's first
# Conv: 65,544 B at one thread, 131,080 B at two), so the size does not depend on timing.
PER_THREAD_OPS = frozenset({"Conv"})


class WorkspaceError(RuntimeError):
    """The workspace worker failed; carries the tail of its stderr."""


def measure_workspace(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      types: dict[str, tuple[int, tuple[int, ...]]]) -> dict[str, int]:
    """Node name -> workspace bytes for every node of `model` (a training model with concrete input
    shapes). `feeds` holds a value for every graph input that is not an initializer, `types` the
    (ONNX dtype, shape) of every tensor the nodes produce."""
    from . import nativelib
    from .measure import heap_counter_env

    counter = nativelib.build_heap_counter()
    with tempfile.TemporaryDirectory(prefix="poetc-workspace-") as tmp:
        model_path, feeds_path, result_path = (os.path.join(tmp, f) for f in ("m.onnx", "f.npz", "r.json"))
        onnx.save(model, model_path)
        np.savez(feeds_path, **feeds)
        with open(os.path.join(tmp, "types.json"), "w") as fh:
            json.dump({k: [int(d), list(map(int, s))] for k, (d, s) in types.items()}, fh)
        try:
            proc = subprocess.run([sys.executable, "-m", "poetc.runtime.workspace", model_path, feeds_path,
                                   result_path], env=heap_counter_env(counter), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise WorkspaceError(f"the workspace worker did not finish within {_TIMEOUT_S} s") from None
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise WorkspaceError(f"the workspace worker exited with status {proc.returncode}: {tail}")
        with open(result_path) as fh:
            return {k: int(v) for k, v in json.load(fh).items()}


# ---------------------------------------------------------------------------------------------------
# worker side


def _signature(node: onnx.NodeProto, types: dict[str, tuple[int, tuple[int, ...]]],
               constants: dict[str, np.ndarray]) -> str:
    """Identity of a kernel call: op, attributes, input types and the values of integer inputs."""
    parts = [node.domain, node.op_type]
    parts += sorted(onnx.helper.printable_attribute(a) for a in node.attribute)
    for x in node.input:
        if not x:
            parts.append("-")
            continue
        dtype, shape = types[x]
        parts.append(f"{dtype}:{shape}")
        if x in constants:
            parts.append(constants[x].tobytes().hex())
    parts.append(str(len([o for o in node.output if o])))
    return "|".join(parts)


def _run_worker(model_path: str, feeds_path: str, result_path: str) -> None:
    import onnxruntime as ort

    from ._worker import HeapCounter
    from .session import contract_session_options

    heap = _MidCounter(HeapCounter())
    model = onnx.load(model_path)
    g = model.graph
    with np.load(feeds_path) as npz:
        feeds = {k: npz[k] for k in npz.files}
    with open(os.path.join(os.path.dirname(model_path), "types.json")) as fh:
        types = {k: (d, tuple(s)) for k, (d, s) in json.load(fh).items()}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    for name, value in list(feeds.items()) + list(initializers.items()):
        types[name] = (onnx.helper.np_dtype_to_tensor_dtype(value.dtype), tuple(value.shape))

    # one run of the whole graph for the values of small integer tensors (shapes, axes, indices)
    small_ints = [o for n in g.node for o in n.output
                  if o in types and not _is_float(types[o][0]) and int(np.prod(types[o][1])) <= 4096]
    known = {vi.name for vi in g.output}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(o, *types[o]) for o in small_ints if o not in known)
    session = ort.InferenceSession(probe.SerializeToString(), contract_session_options(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = set(small_ints)
    values = {k: v for k, v in zip(names, session.run(None, feeds)) if k in wanted}
    del session
    constants = {k: v for k, v in {**values, **feeds, **initializers}.items()
                 if not _is_float(onnx.helper.np_dtype_to_tensor_dtype(v.dtype)) and v.size <= 4096}

    rng = np.random.default_rng(0)
    measured: dict[str, int] = {}
    result: dict[str, int] = {}
    opsets = list(model.opset_import)
    for node in g.node:
        if node.op_type == "Constant":
            result[node.name] = 0
            continue
        key = _signature(node, types, constants)
        if key not in measured:
            measured[key] = _measure_one(node, types, constants, feeds, initializers, opsets,
                                         model.ir_version, heap, rng)
        result[node.name] = measured[key]
    with open(result_path + ".tmp", "w") as fh:
        json.dump(result, fh, sort_keys=True)
    os.replace(result_path + ".tmp", result_path)


class _MidCounter:
    """The heap counter's blocks-from-4-KiB view (heap_counter.c: poetc_heap_mid_*)."""

    def __init__(self, heap) -> None:
        import ctypes
        lib = ctypes.CDLL(None)
        self._heap = heap
        self._peak, self._cur = lib.poetc_heap_mid_peak_bytes, lib.poetc_heap_mid_current_bytes
        for fn in (self._peak, self._cur):
            fn.restype, fn.argtypes = ctypes.c_uint64, []

    def mid_current(self) -> int:
        return int(self._cur())

    def mid_peak(self) -> int:
        return int(self._peak())

    def reset_peak(self) -> None:
        self._heap.reset_peak()


def _is_float(dtype: int) -> bool:
    return np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(dtype), np.floating)


def _measure_one(node, types, constants, feeds, initializers, opsets, ir_version, heap, rng) -> int:
    import onnxruntime as ort

    from .profiling import probe_array
    from .session import contract_session_options

    inputs = list(dict.fromkeys(x for x in node.input if x))
    outputs = [o for o in node.output if o]
    graph = onnx.helper.make_graph(
        [node], "one_op",
        [onnx.helper.make_tensor_value_info(x, types[x][0], types[x][1]) for x in inputs],
        [onnx.helper.make_tensor_value_info(o, types[o][0], types[o][1]) if o in types
         else onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
    one = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    feed = {}
    for x in inputs:
        if x in constants:
            feed[x] = constants[x]
        elif x in feeds:
            feed[x] = feeds[x]
        elif x in initializers:
            feed[x] = initializers[x]
        else:
            feed[x] = probe_array(types[x][1], types[x][0], rng)
    sizes = []
    for threads in (1, None) if node.op_type in PER_THREAD_OPS and node.domain in ("", "ai.onnx") else (1,):
        try:
            session = ort.InferenceSession(one.SerializeToString(), contract_session_options(intra_op_threads=threads),
                                           providers=["CPUExecutionProvider"])
            session.run(None, feed)  # first call: one-time allocations (kernel state) are not workspace
            before = heap.mid_current()
            heap.reset_peak()
            out = session.run(None, feed)
            peak = heap.mid_peak() - before
            returned = heap.mid_current() - before  # the outputs, still held by `out`
            del out
        except Exception as exc:  # an op that cannot run alone (e.g. needs state): no workspace known
            log.warning("workspace: %s %s: not measured (%s)", node.op_type, node.name, str(exc)[:200])
            return 0
        sizes.append(max(0, int(peak - returned)))
    return max(sizes)


if __name__ == "__main__":  # the worker: its stderr goes to the parent's log
    import onnxruntime

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    onnxruntime.set_default_logger_severity(3)
    _run_worker(*sys.argv[1:4])
