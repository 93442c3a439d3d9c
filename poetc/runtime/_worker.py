"""Measurement worker: runs training steps in a fresh process.

Started by :func:`poetc.runtime.measure.measure_training` as

    python -m poetc.runtime._worker --artifacts DIR --feeds FEEDS.npz \
        --steps N --result RESULT.json --params-out PARAMS.npz \
        [--spill-library LIB.so] [--threads N] [--checkpoint-out PATH]
        [--state-dir DIR [--feed-spec SPEC.json] [--commit-every K] [--keep-generations]]

with ``LD_PRELOAD`` set to poetc's heap counter and
``MALLOC_MMAP_THRESHOLD_=65536``.  For every step it records the loss, the
heap peak above the live heap just before the step (counter peak reset right
before it), the wall time, and -- as an independent cross-check -- the
VmHWM growth after resetting the high-water mark through
``/proc/self/clear_refs``.  After the last step it saves the parameters to
``PARAMS.npz`` and writes everything as JSON to ``RESULT.json``.  Errors
(including custom-op failures such as a Restore checksum mismatch) go to
stderr and make the exit status non-zero.

With ``--state-dir`` it trains on a state directory (poetc.runtime.statedir) through
:class:`poetc.runtime.session.StateSession` instead of ``Module``: ``--steps`` is then the step to
reach, each step commits (or, between ``--commit-every`` commits, advances) a generation, and
``--feed-spec`` makes it generate step i's batch from ``[seed, i]``.

Kept small on purpose: it imports only numpy, onnxruntime and
:mod:`poetc.runtime.session`, so the worker's own footprint stays low.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import logging
import os
import sys
import time

log = logging.getLogger("poetc.worker")


class HeapCounter:
    """ctypes view of the preloaded heap counter (``heap_counter.c``)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None)
        try:
            self._peak = lib.poetc_heap_peak_bytes
            self._cur = lib.poetc_heap_current_bytes
            self._reset = lib.poetc_heap_reset_peak
            active = lib.poetc_heap_active
        except AttributeError as exc:
            raise RuntimeError("poetc heap counter is not preloaded (LD_PRELOAD)") from exc
        self._large_peak = lib.poetc_heap_large_peak_bytes
        self._large_cur = lib.poetc_heap_large_current_bytes
        for fn in (self._peak, self._cur, self._large_peak, self._large_cur):
            fn.restype = ctypes.c_uint64
            fn.argtypes = []
        self._reset.restype = None
        active.restype = ctypes.c_int
        if not active():
            raise RuntimeError("poetc heap counter is loaded but not bound to the allocator")

    def current(self) -> int:
        return int(self._cur())

    def peak(self) -> int:
        return int(self._peak())

    def large_current(self) -> int:
        """Live bytes in blocks of at least 64 KiB (exact across runs, unlike small blocks)."""
        return int(self._large_cur())

    def large_peak(self) -> int:
        return int(self._large_peak())

    def reset_peak(self) -> None:
        self._reset()


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def param_digest(arr) -> str:
    """SHA-256 over dtype, shape and the raw bytes of an array."""
    import numpy as np

    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(a.dtype.str.encode())
    h.update(repr(tuple(a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from poetc.runtime.session import open_training

    heap = HeapCounter()
    t_open = time.perf_counter()
    state = None
    if args.state_dir:
        from poetc.runtime.session import StateSession
        from poetc.runtime.statedir import StateDir
        state = StateDir.open(args.state_dir, library=args.spill_library, lock_wait_s=60)
        sess = StateSession(args.artifacts, state, args.spill_library, intra_op_threads=args.threads,
                            keep_generations=args.keep_generations)
    else:
        sess = open_training(args.artifacts, spill_library=args.spill_library, intra_op_threads=args.threads)
    open_seconds = time.perf_counter() - t_open
    feed_spec = None
    if args.feed_spec:
        with open(args.feed_spec) as fh:
            feed_spec = json.load(fh)
        feeds = None
    else:
        with np.load(args.feeds) as npz:
            feeds = {k: np.ascontiguousarray(npz[k]) for k in npz.files}
        missing = [n for n in sess.input_names if n not in feeds]
        if missing:
            raise KeyError(f"feeds file {args.feeds} lacks training inputs {missing} "
                           f"(model inputs: {sess.input_names}; file has {sorted(feeds)})")
        feeds = {n: feeds[n] for n in sess.input_names}

    # on a state directory, --steps is the step count to reach (a resumed run does the rest)
    resumed_from = state.generation if state is not None else 0
    todo = max(0, args.steps - resumed_from) if state is not None else args.steps
    steps = []
    for i in range(resumed_from, resumed_from + todo):
        if feed_spec is not None:
            from poetc.runtime.feeds import generated_feeds
            feeds = generated_feeds({k: tuple(v) for k, v in feed_spec["inputs"].items()}, feed_spec["classes"],
                                    [int(feed_spec["seed"]), i])
        gc.collect()
        hwm_ok = _reset_hwm()
        rss_before_kib = _proc_status_kib("VmRSS")
        heap_before = heap.current()
        heap.reset_peak()
        t0 = time.perf_counter()
        if state is not None:  # commit every --commit-every steps and at the last one
            loss = sess.step(feeds, commit=(i + 1) % args.commit_every == 0 or i + 1 == resumed_from + todo)
        else:
            loss = sess.step(feeds)
        dt = time.perf_counter() - t0
        heap_peak = heap.peak()
        hwm_kib = _proc_status_kib("VmHWM")
        heap_after = heap.current()
        vm_peak = None
        if hwm_ok and hwm_kib is not None and rss_before_kib is not None:
            vm_peak = max(0, (hwm_kib - rss_before_kib) * 1024)
        steps.append({
            "index": i,
            "loss": loss,
            "peak_heap_bytes": max(0, heap_peak - heap_before),
            "heap_before_bytes": heap_before,
            "heap_after_bytes": heap_after,
            "step_seconds": dt,
            "vmhwm_peak_bytes": vm_peak,
            "rss_before_bytes": None if rss_before_kib is None else rss_before_kib * 1024,
            "persist_seconds": getattr(sess, "last_persist_seconds", None),
        })

    if args.checkpoint_out and state is None:
        from onnxruntime.training.api import CheckpointState
        CheckpointState.save_checkpoint(sess.state, args.checkpoint_out)
    params = sess.parameters()
    tmp = args.params_out + ".tmp.npz"
    np.savez(tmp, **params)
    os.replace(tmp, args.params_out)
    return {
        "ok": True,
        "steps": steps,
        "open_seconds": open_seconds,
        "params_npz": args.params_out,
        "params_sha256": {k: param_digest(v) for k, v in sorted(params.items())},
        "input_names": sess.input_names,
        "pid": os.getpid(),
        "resumed_from": resumed_from,
        "final_step": state.generation if state is not None else len(steps),
    }


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, allow_nan=True)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the poetc process that started it dies (even by SIGKILL), so a
    killed `poetc train` leaves no orphan training on."""
    try:
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get("POETC_WORKER_PARENT")
    if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
        os._exit(1)


def _skip_ortmodule_import() -> None:
    """The training build's import-time package check imports ORTModule and with it torch (about 6 s of
    start-up on the shared test machine, measured with `python -X importtime`); a state-directory run
    uses only InferenceSession and the ctypes state functions, so it tells Python that module is absent
    (the check then skips it)."""
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    if "--state-dir" in (sys.argv[1:] if argv is None else argv):
        _skip_ortmodule_import()
    ap = argparse.ArgumentParser(prog="python -m poetc.runtime._worker")
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--feeds", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--result", required=True)
    ap.add_argument("--params-out", required=True)
    ap.add_argument("--spill-library", default=None)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    ap.add_argument("--checkpoint-out", default=None, help="save the trained state (ORT checkpoint) here")
    ap.add_argument("--state-dir", default=None, help="train on this state directory (--steps: the step to reach)")
    ap.add_argument("--feed-spec", default=None, help="JSON {inputs, classes, seed}: generate each step's batch")
    ap.add_argument("--keep-generations", action="store_true", help="keep every committed generation (tests)")
    ap.add_argument("--commit-every", type=int, default=1, help="state directory: commit every K steps")
    args = ap.parse_args(argv)
    # the worker's stderr is the parent's log of it (poetc.runtime.measure keeps its tail)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        result = run(args)
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        msg = f"{type(exc).__name__}: {exc}"
        log.exception("poetc worker error: %s", msg)
        try:
            _write_json(args.result, {"ok": False, "error": msg})
        except OSError:
            pass
        return 1
    _write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
