"""Measure the heap peak of ORT training steps in a fresh process.

:func:`measure_training` runs ``python -m poetc.runtime._worker`` with the
heap counter preloaded (``LD_PRELOAD``) and ``MALLOC_MMAP_THRESHOLD_=65536``
(large blocks are mmapped and returned on free, so RSS follows the heap and
the VmHWM cross-check is meaningful), then returns a :class:`MeasuredRun`.

Per step it reports the loss, the heap peak above the live heap just before
the step, the step time and the VmHWM-based peak.  After the last step the
parameters are saved to ``<workdir>/params.npz`` with a SHA-256 per
parameter, so two runs (e.g. keep-all vs. a rewritten graph) can be compared
exactly.  Any failure of the worker -- a crash, a signal, a custom-op error
such as a Restore checksum mismatch, a timeout -- raises
:class:`MeasurementError` carrying the tail of the worker's stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from poetc.runtime import nativelib

logger = logging.getLogger(__name__)

_STDERR_TAIL_CHARS = 6000


class MeasurementError(RuntimeError):
    """The measurement worker failed.

    ``stderr_tail`` holds the end of its stderr (the ORT/custom-op error
    message is there), ``returncode`` its exit status (negative: signal),
    ``workdir`` the directory with its files.
    """

    def __init__(self, message: str, *, stderr_tail: str = "", returncode: int | None = None,
                 workdir: Path | None = None) -> None:
        self.stderr_tail = stderr_tail
        self.returncode = returncode
        self.workdir = workdir
        full = message
        if stderr_tail.strip():
            full += "\n--- worker stderr (tail) ---\n" + stderr_tail.rstrip()
        super().__init__(full)


@dataclass
class StepMeasurement:
    index: int
    loss: float
    #: heap high-water mark during the step minus the live heap just before it
    peak_heap_bytes: int
    step_seconds: float
    #: VmHWM after the step minus VmRSS before it (HWM reset via clear_refs);
    #: None if /proc did not allow the reset
    vmhwm_peak_bytes: int | None
    heap_before_bytes: int
    heap_after_bytes: int
    rss_before_bytes: int | None = None
    #: on a state directory: the part of step_seconds spent persisting the resident state and committing
    persist_seconds: float | None = None


@dataclass
class MeasuredRun:
    steps: list[StepMeasurement]
    #: parameters after the last step (np.load-able; keys are parameter names)
    params_npz: Path
    #: SHA-256 over (dtype, shape, bytes) of each parameter
    params_sha256: dict[str, str]
    #: directory holding params_npz, the result JSON and worker logs; the
    #: caller may delete it when done
    workdir: Path
    input_names: list[str] = field(default_factory=list)
    open_seconds: float = 0.0
    wall_seconds: float = 0.0
    stderr_tail: str = ""
    #: spill files of the worker still in spill_dir afterwards (a Spill
    #: without a matching Restore); only checked when spill_dir was given
    spill_leftovers: list[Path] = field(default_factory=list)
    #: on a state directory: the committed step the run started from and the one it ended at
    resumed_from: int = 0
    final_step: int = 0

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]

    @property
    def peak_heap_bytes(self) -> int:
        """Largest per-step heap peak."""
        return max((s.peak_heap_bytes for s in self.steps), default=0)

    @property
    def params_digest(self) -> str:
        """One SHA-256 over all parameter digests (name-sorted)."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.params_sha256):
            h.update(name.encode() + b"\0" + self.params_sha256[name].encode() + b"\n")
        return h.hexdigest()

    def parameters(self) -> dict[str, np.ndarray]:
        with np.load(self.params_npz) as npz:
            return {k: npz[k] for k in npz.files}


def _tail(path: Path, limit: int = _STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _remove_orphan_spills(spill_dir, env: Mapping[str, str], pid: int, keep_named_in: str) -> None:
    """A failed step leaves the spill files its Restores never read: remove the worker's (poet-<pid>-*)
    except any the error names (a damaged file is kept for inspection)."""
    d = Path(spill_dir) if spill_dir is not None else nativelib.default_spill_dir(env)
    if not d.is_dir():
        return
    for path in d.glob(f"poet-{pid}-*.spill"):
        if path.name not in keep_named_in:
            with contextlib.suppress(OSError):
                path.unlink()
                logger.info("removed %s, left by the failed run", path)


def _stop_group(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM the worker's process group, SIGKILL it if still there after grace_s, and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _repo_root() -> Path:
    import poetc

    return Path(poetc.__file__).resolve().parent.parent


def heap_counter_env(counter: Path, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the heap counter preloaded and blocks from 64 KiB up mmapped
    (so RSS follows the heap and large blocks have exact sizes)."""
    env = dict(os.environ)
    if extra_env:
        env.update(extra_env)
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = str(Path(counter).resolve()) + (f":{preload}" if preload else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def measure_training(artifacts_dir: str | os.PathLike,
                     feeds_npz: str | os.PathLike | Mapping[str, np.ndarray],
                     steps: int = 3,
                     spill_library: str | os.PathLike | None = None,
                     spill_dir: str | os.PathLike | None = None,
                     timeout_s: float = 600,
                     workdir: str | os.PathLike | None = None,
                     heap_counter: str | os.PathLike | None = None,
                     extra_env: Mapping[str, str] | None = None,
                     intra_op_threads: int | None = None,
                     checkpoint_out: str | os.PathLike | None = None,
                     state_dir: str | os.PathLike | None = None,
                     feed_spec: Mapping | None = None,
                     keep_generations: bool = False,
                     commit_every: int = 1) -> MeasuredRun:
    """Run ``steps`` training steps of ``artifacts_dir`` in a fresh process.

    ``feeds_npz``: ``.npz`` whose keys are the training model's user input
    names (or a dict of arrays, saved to the workdir first).
    ``spill_library``: Spill/Restore ``.so`` to register (see
    :func:`poetc.runtime.nativelib.build_spill_library`).
    ``spill_dir``: sets ``POETC_SPILL_DIR`` for the worker.
    ``workdir``: where results go (default: a new temp dir, returned as
    ``MeasuredRun.workdir``).  ``heap_counter``: prebuilt counter ``.so``
    (default: built/cached by :func:`nativelib.build_heap_counter`).
    ``intra_op_threads``: ORT intra-op threads (default ORT's; 1 gives
    bitwise-reproducible numerics, see ``contract_session_options``).
    ``checkpoint_out``: the worker also saves the trained state there (an
    ONNX Runtime checkpoint, parameters only).
    ``state_dir``: train on this state directory (poetc.runtime.statedir; it
    must exist): ``steps`` is then the step count to reach, a resumed run
    does only the rest, every step commits a generation.  ``feed_spec``:
    ``{"inputs": {name: [shape, dtype]}, "classes": int|None, "seed": int}``
    -- the worker generates each step's batch from ``[seed, step]``
    (``feeds_npz`` is then ignored).  ``keep_generations``: keep every
    committed generation (to compare a resumed run step by step).
    ``commit_every``: on a state directory, commit every K steps (and at
    the last); the steps between advance without persisting resident state.
    Raises :class:`MeasurementError` if the worker fails or times out.  An
    interrupt (KeyboardInterrupt, poetc's SIGTERM handler) stops the worker's
    whole process group before it propagates: no orphan keeps training.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="poetc-measure-"))
    wd.mkdir(parents=True, exist_ok=True)
    if feed_spec is not None:
        feeds_path = wd / "feed_spec.json"
        feeds_path.write_text(json.dumps(dict(feed_spec), sort_keys=True))
    elif isinstance(feeds_npz, Mapping):
        feeds_path = wd / "feeds.npz"
        np.savez(feeds_path, **{k: np.asarray(v) for k, v in feeds_npz.items()})
    else:
        feeds_path = Path(feeds_npz)
    counter = Path(heap_counter) if heap_counter is not None else nativelib.build_heap_counter()
    result_path = wd / "result.json"
    params_path = wd / "params.npz"
    stderr_path = wd / "worker.stderr"
    stdout_path = wd / "worker.stdout"
    with contextlib.suppress(FileNotFoundError):
        result_path.unlink()

    cmd = [sys.executable, "-m", "poetc.runtime._worker",
           "--artifacts", str(Path(artifacts_dir).resolve()),
           "--feed-spec" if feed_spec is not None else "--feeds", str(feeds_path.resolve()),
           "--steps", str(int(steps)),
           "--result", str(result_path.resolve()),
           "--params-out", str(params_path.resolve())]
    if spill_library is not None:
        cmd += ["--spill-library", str(Path(spill_library).resolve())]
    if intra_op_threads is not None:
        cmd += ["--threads", str(int(intra_op_threads))]
    if checkpoint_out is not None:
        cmd += ["--checkpoint-out", str(Path(checkpoint_out).resolve())]
    if state_dir is not None:
        cmd += ["--state-dir", str(Path(state_dir).resolve())]
    if keep_generations:
        cmd += ["--keep-generations"]
    if commit_every != 1:
        cmd += ["--commit-every", str(int(commit_every))]

    env = heap_counter_env(counter, extra_env)
    root = str(_repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if spill_dir is not None:
        env["POETC_SPILL_DIR"] = str(spill_dir)
    env["POETC_WORKER_PARENT"] = str(os.getpid())

    logger.info("measuring %s (%d steps) in a worker process", artifacts_dir, steps)
    t0 = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise MeasurementError(f"measurement worker timed out after {timeout_s:.0f} s",
                                   stderr_tail=_tail(stderr_path), returncode=None, workdir=wd)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the worker, then unwind
            _stop_group(proc)
            _remove_orphan_spills(spill_dir, env, proc.pid, keep_named_in="")
            raise
    wall = time.perf_counter() - t0
    tail = _tail(stderr_path)

    if rc != 0:
        _remove_orphan_spills(spill_dir, env, proc.pid, keep_named_in=tail)
        if rc < 0:
            try:
                how = f"was killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        reason = ""
        for line in reversed(tail.splitlines()):
            if line.startswith("poetc worker error: "):
                reason = ": " + line[len("poetc worker error: "):]
                break
        raise MeasurementError(f"measurement worker {how}{reason}", stderr_tail=tail,
                               returncode=rc, workdir=wd)
    try:
        data = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise MeasurementError(f"measurement worker wrote no readable result ({exc})",
                               stderr_tail=tail, returncode=rc, workdir=wd) from exc
    if not data.get("ok"):
        raise MeasurementError(f"measurement worker failed: {data.get('error')}",
                               stderr_tail=tail, returncode=rc, workdir=wd)

    leftovers: list[Path] = []
    if spill_dir is not None and Path(spill_dir).is_dir() and data.get("pid"):
        leftovers = sorted(Path(spill_dir).glob(f"poet-{int(data['pid'])}-*.spill"))
        if leftovers:
            logger.warning("%d spill files left in %s after the run", len(leftovers), spill_dir)
    run = MeasuredRun(
        steps=[StepMeasurement(**s) for s in data["steps"]],
        params_npz=Path(data["params_npz"]),
        params_sha256=dict(data["params_sha256"]),
        workdir=wd,
        input_names=list(data.get("input_names", [])),
        open_seconds=float(data.get("open_seconds", 0.0)),
        wall_seconds=wall,
        stderr_tail=tail,
        spill_leftovers=leftovers,
        resumed_from=int(data.get("resumed_from", 0)),
        final_step=int(data.get("final_step", len(data["steps"]))),
    )
    for s in run.steps:
        hwm = "n/a" if s.vmhwm_peak_bytes is None else f"{s.vmhwm_peak_bytes / 2**20:.1f} MiB"
        logger.info("step %d: loss %.6g, heap peak %.1f MiB, VmHWM peak %s, %.3f s", s.index,
                    s.loss, s.peak_heap_bytes / 2**20, hwm, s.step_seconds)
    return run
