"""Build and describe poetc's native libraries.

Three native artefacts live in ``poetc/runtime/native``:

* ``spill_ops.c`` + ``io_core.c`` -> the ONNX Runtime custom-op library with
  the ``poet`` domain's ``Spill`` and ``Restore*`` ops (see the op contract at
  the top of ``spill_ops.c`` and :func:`make_spill_node_spec` /
  :func:`make_restore_node_spec` below);
* ``heap_counter.c`` -> an ``LD_PRELOAD`` heap counter used by
  :mod:`poetc.runtime.measure`;
* ``test_io_core.c`` -> native tests of the spill-file I/O core, runnable on
  the host or, cross-compiled, under ``qemu-aarch64``.

The custom-op library needs the ONNX Runtime C API header, which no PyPI
package ships.  :func:`ensure_headers` fetches Debian trixie's
``libonnxruntime-dev`` with a *private* apt configuration (nothing is
installed on the system; only the ``.deb`` is downloaded and unpacked into the
cache).  The library is compiled against those (newer) headers but asks the
runtime for C API version :data:`ORT_C_API_VERSION` (19, ORT 1.19), so it
loads in onnxruntime-training 1.19.2.

Everything is cached under ``$POETC_CACHE`` (default ``~/.cache/poetc``) and
keyed by a hash of sources, flags and compiler, so repeated calls are cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).resolve().parent / "native"

#: C API version requested from ONNX Runtime (== ORT 1.19).
ORT_C_API_VERSION = 19


_CFLAGS = ["-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"]
_TEST_CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
_HEADER_PACKAGE = "libonnxruntime-dev"
_HEADER_SUITE = "trixie"
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_CROSS_CC = "aarch64-linux-gnu-gcc"
_AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


class NativeBuildError(RuntimeError):
    """A native build step (header fetch, compile, native test) failed.

    ``command`` is the failing command line (list) if there was one and
    ``stderr`` its captured error output.
    """

    def __init__(self, message: str, *, command: Sequence[str] | None = None,
                 stderr: str = "") -> None:
        self.command = list(command) if command else None
        self.stderr = stderr or ""
        full = message
        if self.command:
            full += f"\n  command: {' '.join(self.command)}"
        if self.stderr.strip():
            tail = self.stderr.strip()[-4000:]
            full += f"\n  stderr:\n{tail}"
        super().__init__(full)


def default_spill_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory the native ops use (same rule as ``spill_ops.c``): ``POETC_SPILL_DIR``, else
    ``${TMPDIR:-/tmp}/poetc-spill-<uid>``, private to the user (the ops refuse any other)."""
    env = os.environ if env is None else env
    if env.get("POETC_SPILL_DIR"):
        return Path(env["POETC_SPILL_DIR"])
    return Path(env.get("TMPDIR") or "/tmp") / f"poetc-spill-{os.geteuid()}"


# --------------------------------------------------------------------------- #
# cache and subprocess helpers


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$POETC_CACHE``, else ``~/.cache/poetc`` (created)."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("POETC_CACHE"):
        root = Path(os.environ["POETC_CACHE"])
    else:
        root = Path.home() / ".cache" / "poetc"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str, *, cwd: Path | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    logger.debug("running %s", " ".join(map(str, cmd)))
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError as exc:
        raise NativeBuildError(f"{what}: program not found ({exc.filename})",
                               command=[str(c) for c in cmd]) from exc
    except subprocess.TimeoutExpired as exc:
        raise NativeBuildError(f"{what}: timed out after {timeout:.0f} s",
                               command=[str(c) for c in cmd],
                               stderr=str(exc.stderr or "")) from exc
    if proc.returncode != 0:
        raise NativeBuildError(f"{what} failed with exit status {proc.returncode}",
                               command=[str(c) for c in cmd],
                               stderr=(proc.stderr or "") + (proc.stdout or ""))
    return proc


# --------------------------------------------------------------------------- #
# ORT C API headers


def _find_header_dir(root: Path) -> Path | None:
    for cand in (root / "usr" / "include" / "onnxruntime", root):
        if (cand / "onnxruntime_c_api.h").is_file():
            return cand
    return None


def _header_api_version(include_dir: Path) -> int:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    return int(m.group(1)) if m else -1


def _debian_mirror() -> str:
    """The Debian archive URI this machine's apt already uses."""
    env = os.environ.get("POETC_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates: list[str] = []
    srcdir = Path("/etc/apt/sources.list.d")
    for f in sorted(srcdir.glob("*.sources")) if srcdir.is_dir() else []:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            suites = fields.get("suites", "").split()
            if any(not s.endswith("-security") for s in suites):
                candidates.extend(fields.get("uris", "").split())
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uri = next((p for p in parts[1:] if not p.startswith("[")), "")
                if uri and "security" not in uri:
                    candidates.append(uri)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return _DEFAULT_MIRROR


def _apt_options(work: Path, sources: Path) -> list[str]:
    lists = work / "lists"
    cache = work / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    opts = [
        "-q",
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache={cache}",
        "-o", "Debug::NoLocking=1",
    ]
    if os.geteuid() == 0:
        # the _apt sandbox user cannot write into a private cache dir
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _fetch_headers(dest: Path, work: Path) -> None:
    """apt-get update (private config) + apt-get download + dpkg -x into dest."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise NativeBuildError(
            "cannot fetch the ONNX Runtime C API headers: apt-get/dpkg-deb not found "
            "(set POETC_ORT_INCLUDE_DIR to a directory containing onnxruntime_c_api.h)")
    mirror = _debian_mirror()
    sources = work / "sources.list"
    shutil.rmtree(work / "lists", ignore_errors=True)  # never trust lists of an earlier try
    sources.write_text(f"deb {mirror} {_HEADER_SUITE} main\n")
    opts = _apt_options(work, sources)
    update = ["apt-get", *opts, "update"]
    try:
        proc = _run(update, f"apt-get update ({mirror} {_HEADER_SUITE})")
    except NativeBuildError as exc:
        if not re.search(r"NO_PUBKEY|not signed|EXPKEYSIG|signature", exc.stderr, re.I):
            raise
        # Only if this machine's keyring cannot verify the suite's Release file.
        logger.warning("apt could not verify %s %s with the local keyring; retrying with "
                       "[trusted=yes] for this private, download-only source", mirror,
                       _HEADER_SUITE)
        sources.write_text(f"deb [trusted=yes] {mirror} {_HEADER_SUITE} main\n")
        proc = _run(update, f"apt-get update ({mirror} {_HEADER_SUITE}, trusted)")
    # apt-get update exits 0 when a fetch fails (it only warns): check the lists.
    if not any((work / "lists").glob("*_Packages*")):
        raise NativeBuildError(f"apt-get update fetched no package list from {mirror} "
                               f"{_HEADER_SUITE}", command=update,
                               stderr=(proc.stderr or "") + (proc.stdout or ""))
    dl = work / "download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir()
    _run(["apt-get", *opts, "download", _HEADER_PACKAGE], f"apt-get download {_HEADER_PACKAGE}",
         cwd=dl)
    debs = sorted(dl.glob(f"{_HEADER_PACKAGE}_*.deb"))
    if not debs:
        raise NativeBuildError(f"apt-get download produced no {_HEADER_PACKAGE} .deb in {dl}")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], f"unpacking {debs[-1].name}")
    (dest / "SOURCE").write_text(f"{debs[-1].name} from {mirror} {_HEADER_SUITE}\n")


def ensure_headers(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory containing ``onnxruntime_c_api.h`` (fetched on first use).

    ``$POETC_ORT_INCLUDE_DIR`` overrides the fetch.  Otherwise Debian
    trixie's ``libonnxruntime-dev`` is downloaded (not installed) with a
    private apt configuration and unpacked into
    ``<cache>/ort-headers/current``.  Idempotent and safe to call from several
    processes at once (file lock).  Raises :class:`NativeBuildError`.
    """
    override = os.environ.get("POETC_ORT_INCLUDE_DIR")
    if override:
        found = _find_header_dir(Path(override))
        if found is None:
            raise NativeBuildError(
                f"POETC_ORT_INCLUDE_DIR={override} does not contain onnxruntime_c_api.h")
        return found
    base = cache_root(cache_dir) / "ort-headers"
    final = base / "current"
    found = _find_header_dir(final)
    if found is not None:
        return found
    with _file_lock(base / ".lock"):
        found = _find_header_dir(final)
        if found is not None:
            return found
        work = base / "apt-work"
        work.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="extract-", dir=base))
        try:
            logger.info("fetching ONNX Runtime C API headers (%s from Debian %s)",
                        _HEADER_PACKAGE, _HEADER_SUITE)
            _fetch_headers(staging, work)
            inc = _find_header_dir(staging)
            if inc is None:
                raise NativeBuildError(f"{_HEADER_PACKAGE} did not contain onnxruntime_c_api.h")
            ver = _header_api_version(inc)
            if ver < ORT_C_API_VERSION:
                raise NativeBuildError(
                    f"fetched headers declare ORT_API_VERSION {ver} < {ORT_C_API_VERSION}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            shutil.rmtree(work, ignore_errors=True)  # ~20 MB of package lists
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        found = _find_header_dir(final)
        assert found is not None
        logger.info("ONNX Runtime C API headers (API %d) in %s", _header_api_version(found),
                    found)
        return found


# --------------------------------------------------------------------------- #
# compilers


def cross_compiler_available() -> bool:
    """True if ``aarch64-linux-gnu-gcc`` is on PATH."""
    return shutil.which(_CROSS_CC) is not None


def qemu_available() -> bool:
    """True if a qemu-aarch64 user-mode emulator is on PATH."""
    return _qemu() is not None


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def _compiler(arch: str) -> str:
    if arch == "host":
        cc = os.environ.get("CC") or "gcc"
        if shutil.which(cc) is None:
            raise NativeBuildError(f"C compiler {cc!r} not found on PATH")
        return cc
    if arch == "aarch64":
        if not cross_compiler_available():
            raise NativeBuildError(
                f"cross compiler {_CROSS_CC} not found; install Debian packages "
                "gcc-aarch64-linux-gnu and libc6-dev-arm64-cross")
        return _CROSS_CC
    raise ValueError(f"arch must be 'host' or 'aarch64', not {arch!r}")


@functools.lru_cache(maxsize=None)
def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        return cc


def _build_key(cc: str, flags: Sequence[str], files: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(_compiler_id(cc).encode())
    h.update(cc.encode())
    h.update("\0".join(flags).encode())
    h.update(extra.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _compile_cached(cc: str, flags: list[str], sources: list[Path], out: Path, what: str,
                    libs: Sequence[str] = ()) -> Path:
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [cc, *flags, *[str(s) for s in sources], "-o", str(tmp), *libs]
    try:
        proc = _run(cmd, f"compiling {what}")
        if proc.stderr.strip():
            logger.warning("compiler diagnostics for %s:\n%s", what, proc.stderr.strip())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info("built %s -> %s", what, out)
    return out


def build_spill_library(arch: str = "host", cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile (or reuse) the Spill/Restore custom-op library for ``arch``.

    ``arch`` is ``"host"`` or ``"aarch64"`` (needs ``aarch64-linux-gnu-gcc``;
    this function never installs it).  Returns the ``.so`` path, cached by a
    hash of the sources, flags, compiler and header.
    """
    cc = _compiler(arch)
    inc = ensure_headers(cache_dir)
    sources = [NATIVE_DIR / "spill_ops.c", NATIVE_DIR / "io_core.c", NATIVE_DIR / "update_ops.c",
               NATIVE_DIR / "state_ops.c", NATIVE_DIR / "async_ops.c", NATIVE_DIR / "op_util.c"]
    deps = sources + [NATIVE_DIR / "io_core.h", NATIVE_DIR / "op_util.h"]
    # nodelete: ORT unloads a custom-op library with the last session options that registered it;
    # staying loaded keeps the per-process MAC key, so one session may restore what another spilled.
    # update_ops.c reproduces ORT's optimizer arithmetic bit for bit: no fused multiply-add
    lib_flags = [*_CFLAGS, "-ffp-contract=off", "-Wl,-z,nodelete"]
    flags = [*lib_flags, "-I", str(inc), "-I", str(NATIVE_DIR)]
    header_hash = hashlib.sha256((inc / "onnxruntime_c_api.h").read_bytes()).hexdigest()
    key = _build_key(cc, lib_flags, deps, extra=arch + header_hash)
    out = cache_root(cache_dir) / "build" / arch / f"libpoetc_spill-{key}.so"
    return _compile_cached(cc, flags, sources, out, f"spill ops ({arch})", libs=["-lm", "-lpthread"])


def build_heap_counter(arch: str = "host", cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile (or reuse) the LD_PRELOAD heap counter; needs no ORT headers."""
    cc = _compiler(arch)
    src = NATIVE_DIR / "heap_counter.c"
    flags = [*_CFLAGS, "-pthread"]
    key = _build_key(cc, flags, [src], extra=arch)
    out = cache_root(cache_dir) / "build" / arch / f"libpoetc_heapcount-{key}.so"
    return _compile_cached(cc, flags, [src], out, f"heap counter ({arch})", libs=["-ldl"])


def build_io_core_tests(arch: str = "host", cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile (or reuse) the ``test_io_core`` executable for ``arch``."""
    cc = _compiler(arch)
    sources = [NATIVE_DIR / "test_io_core.c", NATIVE_DIR / "io_core.c"]
    deps = sources + [NATIVE_DIR / "io_core.h"]
    base_flags = [*_TEST_CFLAGS]
    if arch == "aarch64":
        base_flags.append("-static")  # runs under qemu without a dynamic loader path
    flags = [*base_flags, "-I", str(NATIVE_DIR)]
    key = _build_key(cc, base_flags, deps, extra=arch)
    out = cache_root(cache_dir) / "build" / arch / f"test_io_core-{key}"
    return _compile_cached(cc, flags, sources, out, f"io_core tests ({arch})")


def run_io_core_tests(arch: str = "host", cache_dir: str | os.PathLike | None = None,
                      timeout_s: float = 300) -> str:
    """Build and run the native I/O-core tests; return their output.

    ``arch="aarch64"`` cross-compiles and runs the binary under
    ``qemu-aarch64(-static) -L /usr/aarch64-linux-gnu``.  Raises
    :class:`NativeBuildError` if building fails, qemu is missing, or any
    test fails (the message carries the test output).
    """
    exe = build_io_core_tests(arch, cache_dir)
    if arch == "aarch64":
        qemu = _qemu()
        if qemu is None:
            raise NativeBuildError("qemu-aarch64(-static) not found; install Debian package "
                                   "qemu-user-static")
        prefix = [qemu, "-L", _AARCH64_SYSROOT]
    else:
        prefix = []
    with tempfile.TemporaryDirectory(prefix="poetc-iotest-") as scratch:
        proc = _run([*prefix, str(exe), scratch], f"io_core tests ({arch})", timeout=timeout_s)
    logger.info("io_core tests (%s): %s", arch, proc.stdout.strip().splitlines()[-1:])
    return proc.stdout
