"""Run a solver in a forked child whose wall clock is enforced from outside: HiGHS does not interrupt
presolve, the root LP or cut rounds, so a time limit given to it alone is not a hard limit."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable


def run_in_child(target: Callable[..., Any], args: tuple, wait_s: float) -> tuple[Any, float]:
    """Call `target(*args)` in a forked child with stdout sent to /dev/null (HiGHS prints its banner
    there whatever the verbosity); return (its return value, or None if it did not answer within
    `wait_s` seconds and was killed; elapsed seconds). `target` must return something picklable and
    report its own failures in that value: an exception in the child is returned as
    ("ERROR", repr(exc))."""
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, args, child), daemon=True)
    proc.start()
    child.close()
    message = parent.recv() if parent.poll(max(wait_s, 0.0)) else None
    if message is None:
        proc.kill()
    proc.join(5)
    parent.close()
    return message, time.perf_counter() - t0


def _child_main(target, args, conn) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        conn.send(target(*args))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("ERROR", repr(exc)))
    finally:
        conn.close()
