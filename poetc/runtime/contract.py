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
