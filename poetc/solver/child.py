"""Run a solver in a forked child whose wall clock is enforced from outside: HiGHS does not interrupt
presolve, the root LP or cut rounds, so a time limit given to it alone is not a hard limit. The one
fork-and-kill runner of poetc's solvers (poetc.solver.backend) and of the POET reference harness."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable


def run_in_child(target: Callable[..., None], args: tuple, deadline: float,
                 on_message: Callable[[tuple], bool], meanwhile: Callable[[], object] | None = None) -> bool:
    """Call `target(*args, send)` in a forked child with stdout sent to /dev/null (solvers print
    banners there whatever their verbosity); `send(message)` passes a picklable tuple to the parent,
    where `on_message(message)` handles it and returns True once it needs no more. An exception in the
    child arrives as ("error", repr(exc)); a child that dies without a word as ("error", "the solver
    process ended unexpectedly"). At `deadline` (time.perf_counter clock) the parent stops waiting and
    kills the child. Returns True if `on_message` said it was done before the deadline.
    `meanwhile`: called in the parent once the child runs, before any message is read; its (picklable)
    result is what the child's `receive()` returns: the target is then called as
    `target(*args, send, receive)` (receive blocks until the parent has it)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    inbox_out = inbox_in = None
    if meanwhile is not None:
        inbox_out, inbox_in = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, args, child, inbox_out), daemon=True)
    proc.start()
    child.close()
    done = False
    try:
        if meanwhile is not None:
            inbox_out.close()
            try:
                inbox_in.send(meanwhile())
            except (BrokenPipeError, OSError):
                pass  # the child has already ended; its messages say why
        while not done:
            left = deadline - time.perf_counter()
            if left <= 0 or not parent.poll(left):
                break
            try:
                message = parent.recv()
            except EOFError:
                on_message(("error", "the solver process ended unexpectedly"))
                done = True
                break
            done = bool(on_message(message))
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
        if inbox_in is not None:
            inbox_in.close()
    return done


def run_once_in_child(target: Callable[..., Any], args: tuple, wait_s: float) -> tuple[Any, float]:
    """`target(*args)` in a child (run_in_child); (its return value, or ("error", repr(exc)) if it
    raised, or None if it did not answer within `wait_s` seconds; elapsed seconds)."""
    t0 = time.perf_counter()
    answer: list = []

    def body(*call_args):
        *real, send = call_args
        send(("result", target(*real)))

    def on_message(message: tuple) -> bool:
        answer.append(message[1] if message[0] == "result" else message)
        return True

    run_in_child(body, args, t0 + max(wait_s, 0.0), on_message)
    return (answer[0] if answer else None), time.perf_counter() - t0


def _child_main(target, args, conn, inbox=None) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        target(*args, conn.send, *(() if inbox is None else (inbox.recv,)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", repr(exc)))
    finally:
        conn.close()
