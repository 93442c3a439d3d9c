"""The output directory transaction of `poetc compile -o DIR`: poetc only ever removes what it can prove
it wrote, never data that appeared while it ran, never the directory holding its input; one compile at a
time per DIR; DIR holds the old or the new output completely at every instant (a crash included).

- Marker: every output holds `.poetc-manifest.json`, the SHA-256 of every file poetc wrote there.
  `--force` replaces DIR only if its files are exactly those, unchanged (an empty DIR also qualifies).
- Lock: `.poetc-lock-<name>` beside DIR, held (flock) from the check to the install; a second compile
  to the same DIR fails at once with OutputError (exit 7).
- Stage: the output is written into `.poetc-stage-<name>-XXXX` beside DIR (same file system), then
  swapped in with renameat2(RENAME_EXCHANGE) where the kernel and file system have it (Linux >= 3.15,
  glibc >= 2.28), else by two renames through `.poetc-old-<name>`: a crash between them leaves the old
  output complete there and the next compile to DIR moves it back first (`repair`).
- Removal of an old output deletes only files whose content still matches the manifest; anything else
  found (written during the run) is kept in a visible `<name>.poetc-kept-N` directory and logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import secrets
from pathlib import Path
from typing import Iterable

from .errors import OutputError

log = logging.getLogger(__name__)

MANIFEST = ".poetc-manifest.json"
MANIFEST_FORMAT = "poetc-output/1"
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_HINT_OTHER = "remove it yourself or choose another -o"


# ---------------------------------------------------------------------------------------------------
# hashes and the manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(out_dir: Path) -> dict[str, str]:
    """SHA-256 of every regular file under out_dir, by relative path (the manifest included)."""
    out = {}
    for path in sorted(Path(out_dir).rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[path.relative_to(out_dir).as_posix()] = sha256_file(path)
    return out


def artifact_hashes(stage: Path) -> dict[str, str]:
    """What report.json records: SHA-256 of every file written so far except report.json itself."""
    return {k: v for k, v in file_hashes(stage).items() if k not in ("report.json", MANIFEST)}


def write_manifest(directory: Path) -> None:
    """Record every file in directory (written last, after everything else)."""
    files = {k: v for k, v in file_hashes(directory).items() if k != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files},
                                                 indent=1, sort_keys=True) + "\n")


def add_to_manifest(directory: Path, paths: Iterable[Path]) -> None:
    """Record files a later command (`poetc train`) wrote into a poetc output directory, so a later
    `--force` may still replace it."""
    manifest = read_manifest(directory)
    if manifest is None:
        return
    for p in paths:
        for f in ([p] if Path(p).is_file() else sorted(Path(p).rglob("*"))):
            if f.is_file():
                manifest[f.relative_to(directory).as_posix()] = sha256_file(f)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": manifest}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, str] | None:
    path = Path(directory) / MANIFEST
    try:
        if path.is_symlink() or not path.is_file():
            return None
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
        return None
    return {str(k): str(v) for k, v in doc["files"].items()}


def foreign_content(directory: Path) -> str | None:
    """None if directory holds exactly the files its manifest lists, unchanged (or nothing at all);
    otherwise the first reason it is not provably poetc's."""
    directory = Path(directory)
    entries = sorted(directory.rglob("*"))
    if not entries:
        return None
    manifest = read_manifest(directory)
    if manifest is None:
        return f"it holds no poetc manifest ({MANIFEST})"
    seen = set()
    for path in entries:
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            # an empty directory holds no data (a fused output's initial_state/frozen when no parameter
            # is frozen): removing it loses nothing
            if not any(f.startswith(rel + "/") for f in manifest) and any(path.iterdir()):
                return f"it holds a directory poetc did not write ({rel})"
            continue
        if not stat.S_ISREG(mode):
            return f"it holds {rel}, which is not a regular file"
        if rel not in manifest:
            return f"it holds a file poetc did not write ({rel})"
        if sha256_file(path) != manifest[rel]:
            return f"{rel} was changed after poetc wrote it"
        seen.add(rel)
    missing = sorted(set(manifest) - seen)
    if missing:
        return f"{missing[0]} that poetc wrote is missing"
    return None


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------------
# renameat2


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True if done, False if this system cannot do it (then the caller
    falls back to plain renames); other failures raise OSError."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


# ---------------------------------------------------------------------------------------------------
# the lock


class OutputLock:
    """flock on `.poetc-lock-<name>` beside out_dir; the file is removed on release (while held, and a
    taker checks that the file it locked is still the one at the path, so that is race-free)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir.absolute().parent / f".poetc-lock-{self.out_dir.name}"
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise OutputError(f"cannot write {self.out_dir}: cannot create the lock file {self.path}: "
                                  f"{exc.strerror}", hint="choose a writable -o") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(f"another poetc compile is writing {self.out_dir} right now (it holds "
                                  f"{self.path}); this one stopped without touching it",
                                  hint="wait for the other compile to finish, or choose another -o") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # released and removed between our open and flock: take the new file
        raise OutputError(f"cannot lock {self.path}: it keeps being replaced", hint=_HINT_OTHER)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------------
# the transaction


class OutputTransaction:
    """`with OutputTransaction(out_dir, force=..., inputs=[model]) as tx:` write into `tx.stage`, then
    `tx.commit()`. Entering checks DIR and its parent, takes the lock, repairs what a crashed compile
    left, and creates the stage; leaving always removes the stage and the lock. An OSError while
    writing (disk full, read-only file system, permissions) becomes an OutputError."""

    def __init__(self, out_dir: Path, *, force: bool, inputs: Iterable[Path] = ()):
        self.out_dir = Path(out_dir)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self.parent = self.out_dir.absolute().parent
        self.name = self.out_dir.name
        self.old = self.parent / f".poetc-old-{self.name}"
        self.stage: Path | None = None
        self.lock = OutputLock(self.out_dir)

    # entering ------------------------------------------------------------------------------------

    def __enter__(self) -> "OutputTransaction":
        if not self.name or self.name in (".", ".."):
            raise OutputError(f"cannot write {self.out_dir}: name the output directory itself, e.g. -o build/model",
                              hint="choose another -o")
        self._check_parent()
        self._check_existing()  # before the lock: a plain "exists" needs no lock file written
        self.lock.acquire()
        try:
            self.repair()
            self._check_existing()
            try:
                self.stage = self._make_stage()
            except OSError as exc:
                raise OutputError(f"cannot write {self.out_dir}: cannot create a staging directory in "
                                  f"{self.parent}: {exc.strerror or exc}", hint="choose a writable -o") from None
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.stage is not None and os.path.lexists(self.stage):
                _remove_stage(self.stage, self.out_dir)
        finally:
            self.lock.release()
        if exc is not None and isinstance(exc, OSError):
            inside = exc.filename and str(exc.filename).startswith((str(self.stage), str(self.out_dir)))
            if inside or exc.errno in _OUTPUT_ERRNOS:
                raise OutputError(f"cannot write {self.out_dir}: {exc.strerror or exc}; nothing was written there",
                                  hint="free space on that file system or choose another -o") from exc
        return False

    def _make_stage(self) -> Path:
        """A fresh directory (mode from the umask, as DIR itself should get)."""
        for _ in range(100):
            path = self.parent / f".poetc-stage-{self.name}-{secrets.token_hex(4)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise OutputError(f"cannot create a staging directory in {self.parent}", hint="choose another -o")

    def _check_parent(self) -> None:
        parent = self.parent
        if not parent.exists():
            try:  # like `mkdir -p`: a pipeline's fresh `-o build/model` should just work
                parent.mkdir(parents=True)
            except OSError as exc:
                raise OutputError(f"cannot write {self.out_dir}: cannot create its parent directory {parent}: "
                                  f"{exc.strerror}") from None
        if not parent.is_dir():
            raise OutputError(f"cannot write {self.out_dir}: {parent} is not a directory")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write {self.out_dir}: {parent} is not writable")

    def _check_existing(self) -> None:
        """Refuse unless DIR is absent, or --force and DIR is provably poetc's and holds no input."""
        out = self.out_dir
        if not os.path.lexists(out):
            return
        if not self.force:
            raise OutputError(f"output directory {out} already exists", hint="choose another -o or pass --force")
        if out.is_symlink() or not out.is_dir():
            raise OutputError(f"{out} exists and is not a directory; --force replaces only a directory "
                              f"that poetc wrote", hint=_HINT_OTHER)
        for p in self.inputs:
            if _inside(p, out):
                raise OutputError(f"{out} holds this compile's input {p}; poetc never replaces the directory "
                                  f"holding its input", hint="choose another -o, or move the input first")
        reason = foreign_content(out)
        if reason:
            raise OutputError(f"{out} was not written by poetc or was changed since: {reason}; --force "
                              f"replaces only a directory poetc wrote, unchanged", hint=_HINT_OTHER)

    def repair(self) -> None:
        """Under the lock: finish what a compile killed mid-install left. `.poetc-old-<name>` without
        DIR is the old output moved aside: move it back. With DIR present it is a replaced output not
        yet removed: remove it (only what the manifest proves). Stale stages: remove."""
        if os.path.lexists(self.old):
            if not os.path.lexists(self.out_dir):
                os.rename(self.old, self.out_dir)
                log.warning("restored %s from %s, left by an interrupted compile", self.out_dir, self.old)
            else:
                _remove_verified(self.old, self.out_dir)
        for stale in self.parent.glob(f".poetc-stage-{self.name}-*"):
            _remove_stage(stale, self.out_dir)

    # committing ----------------------------------------------------------------------------------

    def commit(self) -> None:
        """Write the manifest into the stage and swap the stage into DIR."""
        assert self.stage is not None
        write_manifest(self.stage)
        out = self.out_dir
        if not os.path.lexists(out):
            try:
                done = _rename2(self.stage, out, _RENAME_NOREPLACE)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise self._appeared() from None
                raise
            if done:
                self.stage = None
                return
            if os.path.lexists(out):  # fallback: the check just above the rename (os.rename replaces an empty dir)
                raise self._appeared()
            os.rename(self.stage, out)
            self.stage = None
            return
        if not self.force:
            raise self._appeared()
        self._check_existing()  # again: DIR may have changed during the run
        try:
            exchanged = _rename2(self.stage, out, _RENAME_EXCHANGE)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # DIR vanished since the check: plain install
                os.rename(self.stage, out)
                self.stage = None
                return
            raise
        if exchanged:  # out is new; the old output now sits at the stage path
            old, self.stage = self.stage, None
            _remove_verified(old, out)
            return
        # fallback: out -> .poetc-old-<name>; stage -> out; remove old. A crash between the renames
        # leaves the old output complete at .poetc-old-<name>, moved back by the next compile's repair.
        os.rename(out, self.old)
        try:
            os.rename(self.stage, out)
        except OSError:
            os.rename(self.old, out)
            raise
        self.stage = None
        _remove_verified(self.old, out)

    def _appeared(self) -> OutputError:
        return OutputError(f"{self.out_dir} appeared while poetc was compiling; it was left untouched and "
                           f"nothing was written", hint="check who else writes there, then rerun with another -o")


def _remove_verified(directory: Path, out_dir: Path) -> None:
    """Delete the files of a replaced output whose content still matches its manifest, then the
    emptied directories. Anything else (it appeared during the run) is kept, moved to a visible
    `<name>.poetc-kept-N` beside out_dir."""
    manifest = read_manifest(directory) or {}
    for rel, digest in manifest.items():
        path = directory / rel
        if path.is_file() and not path.is_symlink() and sha256_file(path) == digest:
            path.unlink()
    with_manifest = directory / MANIFEST
    if with_manifest.is_file() and not with_manifest.is_symlink():
        with_manifest.unlink()
    for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError:
                pass
    try:
        directory.rmdir()
    except OSError:
        kept = _free_name(out_dir.absolute().parent, f"{out_dir.name}.poetc-kept")
        os.rename(directory, kept)
        log.warning("files that poetc did not write were found in the replaced output %s; kept them in %s",
                    out_dir, kept)


def _remove_stage(stage: Path, out_dir: Path) -> None:
    """A stage holds only what this compile wrote, or (after an exchange) a replaced output: the
    latter goes through _remove_verified."""
    if read_manifest(stage) is not None:
        _remove_verified(stage, out_dir)
    else:
        shutil.rmtree(stage, ignore_errors=True)


def _free_name(parent: Path, base: str) -> Path:
    n = 1
    while os.path.lexists(parent / f"{base}-{n}"):
        n += 1
    return parent / f"{base}-{n}"


# ---------------------------------------------------------------------------------------------------
# the native library in the output


def copy_native_libraries(stage: Path, *, required: bool) -> dict:
    """Copy the host (and, with a cross compiler, the aarch64) Spill/Restore library into the stage.
    Returns report.json's `native_libraries` entry."""
    from .errors import RuntimeFailure
    from .runtime import nativelib
    out = {}
    try:
        host = nativelib.build_spill_library("host")
        shutil.copy2(host, stage / "libpoet_spill.so")
        out["host"] = "libpoet_spill.so"
    except Exception as exc:
        if required:
            raise RuntimeFailure(f"the schedule pages tensors but the Spill/Restore library could not be built: {exc}",
                                 hint="check network access to the Debian archive, or use --strategy remat-only") from exc
        out["host"] = f"not built: {exc}"
    if nativelib.cross_compiler_available():
        try:
            arm = nativelib.build_spill_library("aarch64")
            (stage / "aarch64").mkdir()
            shutil.copy2(arm, stage / "aarch64" / "libpoet_spill.so")
            out["aarch64"] = "aarch64/libpoet_spill.so"
        except Exception as exc:
            out["aarch64"] = f"not built: {exc}"
    else:
        out["aarch64"] = "not built: aarch64-linux-gnu-gcc not installed"
    return out
