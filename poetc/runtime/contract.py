"""The runtime contract of compiled artifacts: the Spill/Restore ops (domain, op types, node
attributes) the rewrite passes insert, and the session options a runtime must use. Pure data and
small functions: the passes import it without the native-library builder (poetc.runtime.nativelib,
which compiles the ops and may download the ONNX Runtime headers)."""

from __future__ import annotations

#: Custom-op domain of Spill/Restore and the opset version to import it with.
SPILL_DOMAIN = "poet"
SPILL_OPSET_VERSION = 1
#: ONNX TensorProto element types accepted by Spill / produced by Restore*.
#: FLOAT=1, UINT8=2, INT8=3, INT32=6, INT64=7, BOOL=9, FLOAT16=10, DOUBLE=11.
RESTORE_OP_TYPES: dict[int, str] = {
    1: "Restore",
    11: "Restore_double",
    10: "Restore_float16",
    7: "Restore_int64",
    6: "Restore_int32",
    3: "Restore_int8",
    2: "Restore_uint8",
    9: "Restore_bool",
}
SUPPORTED_DTYPES: frozenset[int] = frozenset(RESTORE_OP_TYPES)
SPILL_OP_TYPE = "Spill"

#: The session options a runtime must use (runtime.json; poetc.runtime.session.contract_session_options
#: builds them for ONNX Runtime's Python API).
RUNTIME_CONTRACT = {
    "graph_optimization_level": "ORT_DISABLE_ALL",
    "execution_order": "PRIORITY_BASED",
    "enable_cpu_mem_arena": False,
    "enable_mem_pattern": False,
    "enable_mem_reuse": False,
    "custom_op_library": "libpoet_spill.so (host) / aarch64/libpoet_spill.so",
    "spill_dir_env": "POETC_SPILL_DIR",
    "why": "ONNX Runtime executes graph.node in file order only with PRIORITY_BASED at ORT_DISABLE_ALL; "
           "higher levels fuse nodes, reorder them and merge recompute duplicates; the arena hides frees; the "
           "memory pattern and buffer reuse keep dead buffers reserved for later tensors of the same size",
}


def _check_dtype(dtype: int) -> int:
    d = int(dtype)
    if d not in SUPPORTED_DTYPES:
        raise ValueError(
            f"poet Spill/Restore do not support ONNX element type {dtype}; supported: "
            f"{sorted(SUPPORTED_DTYPES)} (float, uint8, int8, int32, int64, bool, float16, double)")
    return d


def make_spill_node_spec(dtype: int, key: str | None = None) -> tuple[str, dict]:
    """``(op_type, attrs)`` of the node that spills a tensor of ``dtype``.

    One ``Spill`` op accepts every supported dtype; its output is an int64
    handle of shape ``[2]``.  The node goes in domain :data:`SPILL_DOMAIN`.
    ``key`` (optional) is echoed in error messages only.
    """
    _check_dtype(dtype)
    attrs = {"key": str(key)} if key else {}
    return SPILL_OP_TYPE, attrs


def make_restore_node_spec(dtype: int, key: str | None = None, keep_file: bool = False) -> tuple[str, dict]:
    """``(op_type, attrs)`` of the node that restores a tensor of ``dtype``.

    ONNX Runtime 1.19 custom ops need a static output element type (an
    UNDEFINED output type is only accepted together with exactly one
    UNDEFINED input, from which ORT copies the type), so there is one op type
    per dtype: ``Restore`` (float) and ``Restore_<dtype>`` for the others.
    Input: the int64[2] handle from ``Spill``; output: the tensor with its
    original shape.  Domain :data:`SPILL_DOMAIN`.  ``keep_file``: leave the
    spill file for a later Restore of the same handle (the last one deletes it).
    """
    d = _check_dtype(dtype)
    attrs = {"key": str(key)} if key else {}
    if keep_file:
        attrs["keep_file"] = 1
    return RESTORE_OP_TYPES[d], attrs


# ---------------------------------------------------------------------------------------------------
# the state directory's ops (poetc/runtime/native/state_ops.c; the directory itself: poetc.runtime.statedir)

#: StateRead op type per produced ONNX element type (same dtype set as Restore).
STATE_READ_OP_TYPES: dict[int, str] = {d: "StateRead" + t[len("Restore"):] for d, t in RESTORE_OP_TYPES.items()}
STATE_WRITE_OP_TYPE = "StateWrite"
#: StateWrite's output: int64 [1], the generation written. Make it a graph output (nothing consumes it).
STATE_WRITE_OUTPUT_SHAPE = (1,)
#: Longest state key (the tensor's name) in bytes; the file header stores it.
STATE_KEY_MAX_BYTES = 255


def _check_key(key: str) -> str:
    k = str(key)
    if not k or len(k.encode()) > STATE_KEY_MAX_BYTES or "\0" in k:
        raise ValueError(f"state key {key!r} must be a non-empty name of at most {STATE_KEY_MAX_BYTES} bytes")
    return k


def make_state_read_node_spec(dtype: int, key: str) -> tuple[str, dict]:
    """``(op_type, attrs)`` of the node that reads the paged state tensor ``key`` (domain
    :data:`SPILL_DOMAIN`).

    Rules both sides rely on:

    - Output: the value of ``key`` as of the START of the current step (the state directory's last
      committed generation g), with the static shape the graph declares for it (the stored shape must
      match; the node should declare it). One op type per element type: ``StateRead`` (float),
      ``StateRead_<dtype>`` for the others, as for Restore.
    - Inputs: zero or more tensors of any type, read by nobody: explicit ordering dependencies
      (ORT runs nodes in file order under the contract; the dependencies make the order a data
      dependency too). The first input may be omitted entirely.
    - May run any number of times in one step for the same key (a parameter dropped after its forward
      use and read again before its backward use): every read returns the generation-g value, never a
      value StateWrite wrote in this step.
    - A frozen parameter is read from the directory's ``frozen/`` files (written once by
      :func:`poetc.runtime.statedir.write_initial_state`); the op finds it there by itself.
    - Any problem (missing, torn, truncated, foreign, stale-generation or mismatched file) fails the
      run with a message naming the file; poetc reports it as a RuntimeFailure (exit 9).
    """
    d = _check_dtype(dtype)
    return STATE_READ_OP_TYPES[d], {"key": _check_key(key)}


def make_state_write_node_spec(dtype: int, key: str) -> tuple[str, dict]:
    """``(op_type, attrs)`` of the node that writes the new value of the paged state tensor ``key``.

    - Inputs: ``X`` (any supported dtype; ``dtype`` is checked here), then zero or more ordering
      dependencies of any type (e.g. the bool flag of the AdamWUpdate that updated X in place, so the
      write runs after the update).
    - Output: int64 [1] (the generation written, g+1); make it a graph output so no pass prunes the node.
    - Writes X as the value of ``key`` for generation g+1 (the step being run). A trainable parameter is
      written once per step right after its update; a moment is read (StateRead) right before its
      update, updated in place and written right after; a frozen parameter is never written. Every
      non-frozen paged tensor must be written exactly once per step: the runtime refuses to commit a
      generation that lacks one.
    - Nothing written is visible before the runtime commits the generation after the run (fsync, atomic
      rename of CURRENT); a crash at any point leaves generation g committed.
    """
    _check_dtype(dtype)
    return STATE_WRITE_OP_TYPE, {"key": _check_key(key)}


# asynchronous paging (poetc/runtime/native/async_ops.c): write-behind spills and prefetched restores

SPILL_ASYNC_OP_TYPE = "SpillAsync"
FLUSH_OP_TYPE = "Flush"
PREFETCH_OP_TYPE = "Prefetch"
#: Await op type per produced ONNX element type (same dtype set as Restore).
AWAIT_OP_TYPES: dict[int, str] = {d: "Await" + t[len("Restore"):] for d, t in RESTORE_OP_TYPES.items()}


def make_spill_async_node_spec(dtype: int, key: str | None = None) -> tuple[str, dict]:
    """``(op_type, attrs)`` of the node that spills a tensor of ``dtype`` behind the step's back.

    ``SpillAsync(X) -> H``: the same int64[2] handle and file as ``Spill``; X is copied into a staging
    buffer and written by the process's I/O thread while later ops run. The staging buffer (|X| bytes)
    lives until the write completes: at the latest at the handle's ``Flush`` or first Restore/Prefetch,
    which wait for the write (a failed write fails them). Domain :data:`SPILL_DOMAIN`.
    """
    _check_dtype(dtype)
    return SPILL_ASYNC_OP_TYPE, ({"key": str(key)} if key else {})


def make_flush_node_spec(key: str | None = None) -> tuple[str, dict]:
    """``Flush(H) -> H2``: waits until H's write is complete and returns a copy of H."""
    return FLUSH_OP_TYPE, ({"key": str(key)} if key else {})


def make_prefetch_node_spec(key: str | None = None) -> tuple[str, dict]:
    """``Prefetch(H) -> P``: queues the read of H's file on the I/O thread and returns a ticket
    (int64[2]); the read runs after every write queued before it. |Y| bytes are staged from here to the
    ticket's ``Await``."""
    return PREFETCH_OP_TYPE, ({"key": str(key)} if key else {})


def make_await_node_spec(dtype: int, key: str | None = None, keep_file: bool = False) -> tuple[str, dict]:
    """``Await(P) -> Y`` (one op type per dtype, as Restore): waits for the read of ticket P, checks the
    file's dtype and shape against Y's declared static shape, and copies the staged data into Y (both
    live for the copy). A failed read, a bad header or a checksum mismatch fails the run naming the file:
    nothing unauthenticated reaches a reader. ``keep_file`` as for Restore."""
    d = _check_dtype(dtype)
    attrs = {"key": str(key)} if key else {}
    if keep_file:
        attrs["keep_file"] = 1
    return AWAIT_OP_TYPES[d], attrs
