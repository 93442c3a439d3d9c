"""The crash-safe state directory: parameters, optimizer moments and the step counter between steps.

Layout of a state directory D (mode 0700)::

    D/MANIFEST.json        written once at creation: format, id, the 16-byte MAC key, and every state
                           tensor's dtype, shape, trainable, paged (and free-form meta, e.g. the learning
                           rate); never changed afterwards
    D/CURRENT              the committed generation: JSON {generation, step, manifest_sha256, mac}, the
                           MAC (keyed BLAKE2b, the manifest's key) over the other fields; replaced only by
                           an atomic rename
    D/frozen/<file>        frozen parameters (generation 0, never written again)
    D/gen-<g>/<file>       every other tensor's value after g steps (g zero-padded to 8 digits)
    D/LOCK                 flock'ed by the one process that trains on D

Tensor files are poetc state files (format and file names: poetc/runtime/native/state_ops.c): a header
with key, dtype, shape, generation, flags, and SipHash-2-4 MACs over header and payload keyed with the
manifest's key. The C library writes and checks them for the ops *and* for this module (ctypes), so
there is one implementation of the format.

Commit protocol of one step (g committed, the step writes g+1): remove any leftover gen-<g+1>, create it,
tell the ops (`poet_state_configure`: read g, write g+1); run the graph (StateWrite writes paged tensors
into gen-<g+1>); write every resident tensor into gen-<g+1>; check every non-frozen tensor has its file
there; fsync each file and the directory; write CURRENT.tmp, fsync, rename onto CURRENT, fsync D; remove
gen-<g>. A crash before the rename leaves g committed (gen-<g+1> is garbage, removed on the next open);
after it, g+1. Opening removes every gen-* directory other than the committed one. A step may also only
*advance* (`StateDir.advance`, `poetc train --commit-every K`): its paged files feed the next step, nothing
is persisted or committed, and a crash returns to the last commit.

Refusals (all :class:`StateError`, a RuntimeFailure: exit 9): a missing or damaged MANIFEST.json or
CURRENT, a CURRENT whose MAC fails or that names a missing generation, and any tensor file that is torn,
truncated, altered, of another key, of another generation or from another state directory (its MAC key
differs). Nothing is trained on a refused directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..errors import RuntimeFailure

FORMAT = "poetc-state"
VERSION = 1
MANIFEST = "MANIFEST.json"
CURRENT = "CURRENT"
FROZEN_DIR = "frozen"
LOCK = "LOCK"
#: where a compile writes its output's initial state (generation 0) with write_initial_state:
#: OUT/initial_state; `poetc train` starts every new state directory from it (under a fresh MAC key)
INITIAL_STATE = "initial_state"
_GEN_RE = re.compile(r"^gen-(\d{8,})$")
_ERRBUF = 2048

#: ONNX element type <-> numpy dtype for state tensors.
ONNX_TO_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
                 10: np.float16, 11: np.float64}
NUMPY_TO_ONNX = {np.dtype(v): k for k, v in ONNX_TO_NUMPY.items()}


class StateError(RuntimeFailure):
    """The state directory cannot be used as it is (damaged, foreign, incomplete, in use)."""


def _hint() -> str:
    return ("nothing was trained on it; restore the directory from a copy, or start over from the "
            "compiled initial state with a new --state directory")


# ---------------------------------------------------------------------------------------------------
# the native format functions


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: int  # ONNX element type
    shape: tuple[int, ...]
    trainable: bool  # a parameter the step updates (moments, lr and step counter: False)
    paged: bool  # read/written by StateRead/StateWrite; else resident (a graph input)
    frozen: bool  # never written after generation 0 (a frozen parameter)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "trainable": self.trainable,
                "paged": self.paged, "frozen": self.frozen}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(ONNX_TO_NUMPY[self.dtype]).itemsize


class _Native:
    """ctypes view of the state functions of the poet op library."""

    def __init__(self, library: str | os.PathLike) -> None:
        self.path = str(library)
        lib = ctypes.CDLL(self.path)
        c = ctypes
        self.filename = lib.poet_state_filename
        self.filename.argtypes = [c.c_char_p, c.c_char_p, c.c_size_t]
        self.filename.restype = c.c_int
        self.write = lib.poet_state_write_path
        self.write.argtypes = [c.c_char_p, c.c_char_p, c.c_int32, c.c_uint32, c.POINTER(c.c_int64), c.c_uint64,
                               c.c_uint32, c.c_char_p, c.c_void_p, c.c_int, c.c_char_p, c.c_size_t]
        self.write.restype = c.c_int
        self.read = lib.poet_state_read_path
        self.read.argtypes = [c.c_char_p, c.c_char_p, c.c_int32, c.c_uint32, c.POINTER(c.c_int64), c.c_uint64,
                              c.c_int, c.c_char_p, c.c_void_p, c.c_char_p, c.c_size_t]
        self.read.restype = c.c_int
        self.configure = lib.poet_state_configure
        self.configure.argtypes = [c.c_char_p, c.c_char_p, c.c_uint64, c.c_uint64, c.c_char_p, c.c_size_t]
        self.configure.restype = c.c_int
        self._lib = lib


_NATIVE: dict[str, _Native] = {}


def native(library: str | os.PathLike | None = None) -> _Native:
    """The state functions of ``library`` (default: the host build of the op library)."""
    if library is None:
        from .nativelib import build_spill_library
        library = build_spill_library()
    key = str(library)
    if key not in _NATIVE:
        _NATIVE[key] = _Native(library)
    return _NATIVE[key]


def file_name(key: str, library=None) -> str:
    buf = ctypes.create_string_buffer(256)
    if native(library).filename(key.encode(), buf, len(buf)) != 0:
        raise ValueError(f"state key {key!r} is too long")
    return buf.value.decode()


def _dims(shape) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(shape)))(*[int(d) for d in shape])


def write_tensor(path: Path, key: str, array: np.ndarray, generation: int, mac_key: bytes, *,
                 frozen: bool = False, fsync: bool = False, library=None) -> None:
    a = np.ascontiguousarray(array)
    dtype = NUMPY_TO_ONNX.get(a.dtype)
    if dtype is None:
        raise ValueError(f"state tensor {key!r} has unsupported dtype {a.dtype}")
    err = ctypes.create_string_buffer(_ERRBUF)
    rc = native(library).write(str(path).encode(), key.encode(), dtype, a.ndim, _dims(a.shape), generation,
                               1 if frozen else 0, mac_key, a.ctypes.data if a.size else None,
                               1 if fsync else 0, err, len(err))
    if rc != 0:
        raise StateError(f"cannot write state tensor {key!r}: {err.value.decode(errors='replace')}",
                         hint="check that the state directory's file system is writable and not full")


def read_tensor(path: Path, info: TensorInfo, generation: int, mac_key: bytes, *, library=None,
                out: np.ndarray | None = None) -> np.ndarray:
    a = np.empty(info.shape, ONNX_TO_NUMPY[info.dtype]) if out is None else out
    err = ctypes.create_string_buffer(_ERRBUF)
    rc = native(library).read(str(path).encode(), info.name.encode(), info.dtype, len(info.shape),
                              _dims(info.shape), generation, 1 if info.frozen else 0, mac_key,
                              a.ctypes.data if a.size else None, err, len(err))
    if rc != 0:
        raise StateError(f"the state directory is damaged: {err.value.decode(errors='replace')}", hint=_hint())
    return a


# ---------------------------------------------------------------------------------------------------
# helpers


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# TEST ONLY (tests/test_kill.py): POETC_TEST_KILL_AT="S:PHASE:N" SIGKILLs the process at a fixed point of
# the step that writes generation S, so kill tests land whatever the machine's speed. Phases here:
# "persist" (after the N-th resident tensor is written), "commit" (N=0: files and directories fsync'ed,
# CURRENT not yet renamed; N=1: CURRENT renamed, the older generation not yet removed); the native ops
# add "read" / "write" (after the N-th StateRead / StateWrite of the step). Unset: no effect.
KILL_AT_ENV = "POETC_TEST_KILL_AT"


def _test_kill_point(generation: int, phase: str, n: int) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if spec and spec == f"{generation}:{phase}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def _mac(key: bytes, doc: Mapping) -> str:
    body = json.dumps({k: doc[k] for k in sorted(doc) if k != "mac"}, sort_keys=True).encode()
    return hashlib.blake2b(body, key=key, digest_size=16).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


def gen_dir_name(generation: int) -> str:
    return f"gen-{generation:08d}"


def is_state_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------------
# creating a state directory


def write_initial_state(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                        meta: Mapping | None = None, *, frozen: Iterable[str] = (), paged: Iterable[str] = (),
                        trainable: Iterable[str] | None = None, library=None, mac_key: bytes | None = None,
                        state_id: str | None = None) -> Path:
    """Create the state directory ``directory`` (must not exist, or be empty) at generation 0.

    ``tensors``: every state tensor by name (parameters incl. frozen ones, zero moments, the step counter,
    the learning rate), with its dtype and shape. ``frozen``: the frozen parameters (stored once, never
    written again). ``paged``: names read/written by StateRead/StateWrite (the rest are resident graph
    inputs). ``trainable``: the trainable parameters (default: every name without ``__poet_`` not in
    ``frozen``), recorded for the report. ``meta``: JSON-able facts stored in the manifest (e.g. the
    learning rate, the optimizer). Written to a sibling temporary directory and renamed into place, so a
    crash leaves no half state directory."""
    d = Path(directory)
    frozen, paged = set(frozen), set(paged)
    unknown = (frozen | paged) - set(tensors)
    if unknown:
        raise ValueError(f"frozen/paged names {sorted(unknown)} are not among the state tensors")
    if trainable is None:
        trainable = {n for n in tensors if "__poet_" not in n and n not in frozen}
    trainable = set(trainable)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise StateError(f"cannot create the state directory {d}: it exists and is not empty",
                         hint="choose a new directory (poetc never overwrites a state directory)")
    d.parent.mkdir(parents=True, exist_ok=True)
    stage = d.with_name(f".{d.name}.poetc-tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    try:
        # (mac_key/state_id: a compile output's initial_state is a template, re-keyed on use
        # (poetc.run.create_state_dir); compile derives them from the content so its output is the same
        # bytes for the same input)
        key = mac_key if mac_key is not None else secrets.token_bytes(16)
        infos = {}
        for name, arr in sorted(tensors.items()):
            a = np.asarray(arr)
            if a.dtype not in NUMPY_TO_ONNX:
                raise ValueError(f"state tensor {name!r} has unsupported dtype {a.dtype}")
            infos[name] = TensorInfo(name, NUMPY_TO_ONNX[a.dtype], tuple(int(s) for s in a.shape),
                                     name in trainable, name in paged, name in frozen)
        manifest = {"format": FORMAT, "version": VERSION, "id": state_id or secrets.token_hex(8), "mac_key": key.hex(),
                    "tensors": {n: i.to_json() for n, i in infos.items()}, "meta": dict(meta or {})}
        (stage / FROZEN_DIR).mkdir(mode=0o700)
        g0 = stage / gen_dir_name(0)
        g0.mkdir(mode=0o700)
        for name, info in infos.items():
            where = stage / FROZEN_DIR if info.frozen else g0
            write_tensor(where / file_name(name, library), name, np.asarray(tensors[name]), 0, key,
                         frozen=info.frozen, fsync=True, library=library)
        mbytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _write_atomic(stage / MANIFEST, mbytes)
        current = {"generation": 0, "step": 0, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}
        current["mac"] = _mac(key, current)
        _write_atomic(stage / CURRENT, json.dumps(current, sort_keys=True).encode())
        for sub in (stage / FROZEN_DIR, g0):
            _fsync_path(sub, directory=True)
        if d.exists():
            d.rmdir()  # empty (checked above)
        os.replace(stage, d)
        _fsync_path(d.parent, directory=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return d


# ---------------------------------------------------------------------------------------------------
# an open state directory


class StateDir:
    """An opened state directory at its committed generation (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict, mac_key: bytes, generation: int, library=None) -> None:
        self.path = path
        self._written: dict[int, int] = {}  # generation -> resident tensors written (the test kill hook)
        self.manifest = manifest
        self.mac_key = mac_key
        self.generation = generation
        #: the generation the next step reads: the committed one, or a later one advanced to without commit
        self.latest = generation
        self.library = library
        self.tensors = {n: TensorInfo(n, int(t["dtype"]), tuple(int(s) for s in t["shape"]), bool(t["trainable"]),
                                      bool(t["paged"]), bool(t["frozen"]))
                        for n, t in manifest["tensors"].items()}
        self._lock_fd: int | None = None

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike, *, library=None, lock: bool = True,
             clean: bool = True, lock_wait_s: float = 0.0) -> StateDir:
        """Open the last committed generation. ``lock``: take the directory's training lock (refused if
        another process still holds it after ``lock_wait_s`` seconds: a killed poetc's worker may take a
        moment to die). ``clean``: remove uncommitted and superseded gen-* directories (only with the
        lock)."""
        d = Path(directory)
        if not d.is_dir():
            raise StateError(f"{d} is not a state directory (it does not exist)", hint=_hint())
        mpath, cpath = d / MANIFEST, d / CURRENT
        try:
            mbytes = mpath.read_bytes()
            manifest = json.loads(mbytes)
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
            key = bytes.fromhex(manifest["mac_key"])
            if len(key) != 16 or not isinstance(manifest.get("tensors"), dict):
                raise ValueError("bad key or tensor table")
        except FileNotFoundError:
            raise StateError(f"{d} is not a poetc state directory: {mpath} is missing", hint=_hint()) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"the state directory {d} is damaged: {mpath} cannot be read ({exc})",
                             hint=_hint()) from None
        try:
            current = json.loads(cpath.read_bytes())
            gen = int(current["generation"])
            mac_ok = hmac.compare_digest(str(current.get("mac", "")), _mac(key, current))
        except FileNotFoundError:
            raise StateError(f"the state directory {d} is damaged: {cpath} is missing", hint=_hint()) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"the state directory {d} is damaged: {cpath} cannot be read ({exc})",
                             hint=_hint()) from None
        if not mac_ok or current.get("manifest_sha256") != hashlib.sha256(mbytes).hexdigest():
            raise StateError(f"the state directory {d} is damaged: {cpath} fails its check (altered, or "
                             f"{mpath} was replaced by another state directory's)", hint=_hint())
        if not (d / gen_dir_name(gen)).is_dir():
            raise StateError(f"the state directory {d} is damaged: {cpath} names generation {gen} but "
                             f"{d / gen_dir_name(gen)} is missing", hint=_hint())
        s = cls(d, manifest, key, gen, library)
        if lock:
            s._lock(lock_wait_s)
            # the holder of the lock may have committed while we waited: read CURRENT again
            s.generation = s.latest = cls.open(d, library=library, lock=False, clean=False).generation
            if clean:
                s._remove_other_generations()
        return s

    def _lock(self, wait_s: float) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StateError(f"the state directory {self.path} is in use by another poetc process",
                                     hint="wait for it to finish (or stop it); one process trains on a state "
                                          "directory at a time") from None
                time.sleep(0.05)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _remove_other_generations(self, keep: Iterable[int] = ()) -> None:
        keep = {self.generation, *keep}
        for p in self.path.iterdir():
            m = _GEN_RE.match(p.name)
            if m and int(m.group(1)) not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob("*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()

    # -- reading ------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.generation

    @property
    def meta(self) -> dict:
        return dict(self.manifest.get("meta") or {})

    def tensor_path(self, name: str, generation: int | None = None) -> Path:
        info = self.tensors[name]
        if info.frozen:
            return self.path / FROZEN_DIR / file_name(name, self.library)
        g = self.generation if generation is None else generation
        return self.path / gen_dir_name(g) / file_name(name, self.library)

    def read(self, name: str, generation: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The value of ``name`` at ``generation`` (default: the committed one), checked."""
        info = self.tensors[name]
        g = 0 if info.frozen else (self.generation if generation is None else generation)
        return read_tensor(self.tensor_path(name, generation), info, g, self.mac_key, library=self.library, out=out)

    def read_all(self, names: Iterable[str] | None = None, generation: int | None = None) -> dict[str, np.ndarray]:
        return {n: self.read(n, generation) for n in (sorted(self.tensors) if names is None else names)}

    def verify(self) -> None:
        """Read and check every tensor file of the committed generation."""
        for n in sorted(self.tensors):
            self.read(n)

    def generations_on_disk(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := _GEN_RE.match(p.name)))

    # -- one step -----------------------------------------------------------------------------------

    def begin_step(self) -> int:
        """Prepare gen-<L+1> (empty; L the latest generation: the committed one, or one advanced past it
        without a commit) and point the ops at it: they read L, write L+1. Returns L+1."""
        new = self.latest + 1
        gdir = self.path / gen_dir_name(new)
        shutil.rmtree(gdir, ignore_errors=True)
        gdir.mkdir(mode=0o700)
        self.configure_ops(self.latest, new)
        return new

    def advance(self, generation: int, *, keep_previous: bool = False) -> None:
        """Make ``generation`` (== latest + 1) the one the next step's StateReads see, WITHOUT committing it:
        its paged files must all be there (resident state stays in RAM); a crash before the next commit
        returns to the committed generation. The committed generation's directory is kept until then."""
        if generation != self.latest + 1:
            raise ValueError(f"advance to generation {generation} after {self.latest}")
        self._check_written(generation, [n for n, i in self.tensors.items() if i.paged and not i.frozen])
        old = self.latest
        self.latest = generation
        if not keep_previous and old != self.generation:
            shutil.rmtree(self.path / gen_dir_name(old), ignore_errors=True)

    def _check_written(self, generation: int, names) -> None:
        gdir = self.path / gen_dir_name(generation)
        missing = sorted(n for n in names if not (gdir / file_name(n, self.library)).is_file())
        if missing:
            raise StateError(f"the step did not write every state tensor: {missing[:5]} "
                             f"{'...' if len(missing) > 5 else ''}missing from {gdir}; generation "
                             f"{self.generation} stays committed",
                             hint="the compiled graph must StateWrite every non-frozen paged tensor once per step")

    def configure_ops(self, read_gen: int, write_gen: int) -> None:
        err = ctypes.create_string_buffer(_ERRBUF)
        if native(self.library).configure(str(self.path).encode(), self.mac_key, read_gen, write_gen,
                                          err, len(err)) != 0:
            raise StateError(f"cannot configure the state ops: {err.value.decode(errors='replace')}", hint=_hint())

    def write(self, name: str, array: np.ndarray, generation: int) -> None:
        """Write a resident tensor's value for ``generation`` (not yet committed)."""
        info = self.tensors[name]
        if info.frozen:
            raise ValueError(f"{name!r} is a frozen parameter: it is never written")
        a = np.asarray(array)
        if tuple(a.shape) != info.shape or NUMPY_TO_ONNX.get(a.dtype) != info.dtype:
            raise ValueError(f"state tensor {name!r} is {a.dtype}{list(a.shape)}, the manifest says "
                             f"{np.dtype(ONNX_TO_NUMPY[info.dtype])}{list(info.shape)}")
        write_tensor(self.tensor_path(name, generation), name, a, generation, self.mac_key, library=self.library)
        self._written[generation] = self._written.get(generation, 0) + 1
        _test_kill_point(generation, "persist", self._written[generation])

    def commit(self, generation: int, *, keep_previous: bool = False) -> None:
        """Make ``generation`` (== latest + 1, every non-frozen tensor written) the committed one: fsync its
        files and directory, then write CURRENT.tmp, fsync, rename onto CURRENT, fsync the directory; then
        remove the generations before it (``keep_previous``: keep them, for tests)."""
        if generation != self.latest + 1:
            raise ValueError(f"commit of generation {generation} after {self.latest}")
        gdir = self.path / gen_dir_name(generation)
        self._check_written(generation, [n for n, i in self.tensors.items() if not i.frozen])
        for f in gdir.iterdir():
            _fsync_path(f)
        _fsync_path(gdir, directory=True)
        _fsync_path(self.path, directory=True)  # gen-<g+1>'s own entry is durable before CURRENT names it
        _test_kill_point(generation, "commit", 0)
        current = {"generation": generation, "step": generation,
                   "manifest_sha256": hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()}
        current["mac"] = _mac(self.mac_key, current)
        _write_atomic(self.path / CURRENT, json.dumps(current, sort_keys=True).encode())
        _test_kill_point(generation, "commit", 1)
        self.generation = self.latest = generation
        if not keep_previous:
            self._remove_other_generations()


def graph_state_ops(model_path: str | os.PathLike) -> tuple[set[str], set[str]]:
    """Keys the training graph reads with StateRead and writes with StateWrite (empty: not paged)."""
    import onnx

    from .contract import SPILL_DOMAIN, STATE_READ_OP_TYPES, STATE_WRITE_OP_TYPE
    m = onnx.load(str(model_path), load_external_data=False)
    reads, writes = set(), set()
    for n in m.graph.node:
        if n.domain != SPILL_DOMAIN:
            continue
        key = next((a.s.decode() for a in n.attribute if a.name == "key"), "")
        if n.op_type in STATE_READ_OP_TYPES.values():
            reads.add(key)
        elif n.op_type == STATE_WRITE_OP_TYPE:
            writes.add(key)
    return reads, writes


def committed_step(directory: str | os.PathLike) -> int:
    """The committed step of a state directory (checked as by :meth:`StateDir.open`, without the lock)."""
    return StateDir.open(directory, lock=False, clean=False).generation


__all__ = ["INITIAL_STATE", "StateDir", "StateError", "TensorInfo", "committed_step", "file_name",
           "graph_state_ops", "is_state_dir", "read_tensor", "write_initial_state", "write_tensor"]
