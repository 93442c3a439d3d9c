"""Run native code that may crash the process (ONNX Runtime kernels on a user's graph) in a forked
child, so that a fault inside it becomes an error poetc can explain instead of poetc dying by a
signal. Measured reason: onnxruntime-training 1.19.2's CPU ConvGrad corrupts the heap on 1-D grouped
convolutions and the process aborts in malloc (SIGABRT); poetc rewrites that case at import
(poetc/ir/canonicalize.py), and this guard covers the faults nobody has found yet."""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Any, Callable


class ChildCrashed(Exception):
    """The child ended without an answer (killed by a signal, or exited)."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        if exitcode is not None and exitcode < 0:
            try:
                self.cause = f"signal {signal.Signals(-exitcode).name}"
            except ValueError:
                self.cause = f"signal {-exitcode}"
        else:
            self.cause = f"exit status {exitcode}"
        super().__init__(f"the process running ONNX Runtime ended with {self.cause}")


def run_guarded(fn: Callable[..., Any], *args) -> Any:
    """`fn(*args)` in a forked child; its (picklable) return value. An exception in the child is raised
    again in the parent: MemoryError as MemoryError, any other as RuntimeError with the same message
    (ONNX Runtime's exception types do not cross processes). ChildCrashed if the child died."""
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, send), daemon=True)
    proc.start()
    send.close()
    try:
        try:
            kind, value = receive.recv()
        except EOFError:
            proc.join()
            raise ChildCrashed(proc.exitcode) from None
    finally:
        receive.close()
        proc.join()
    if kind == "ok":
        return value
    if kind == "memory":
        raise MemoryError(value)
    raise RuntimeError(value)


def _child(fn, args, conn) -> None:
    try:
        result = ("ok", fn(*args))
    except MemoryError as exc:
        result = ("memory", str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        result = ("error", str(exc))
    try:
        conn.send(result)
    finally:
        conn.close()
