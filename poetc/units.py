"""Parsing and formatting of sizes, times and deadlines at the edges of poetc.

Inside poetc sizes are integer bytes and times float seconds. Accepted spellings:
sizes "8MB" (10^6), "8MiB" (2^20), "512kB", "512KiB", "1.5GB", "4096" or "4096B" (bytes);
times "250ms", "1.5s", "20us", "2min" (a bare "60" is seconds only where the caller allows it:
--time-limit); deadlines "1.3x" (relative to keep-all) or a time, never a bare number.
Unit letters are case-sensitive where case carries meaning ("mb" would be millibits: rejected).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError

_SIZE_UNITS = {
    "B": 1, "": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
MAX_SIZE_BYTES = 2**50  # 1 PiB: far above any device poetc targets, far below int64 and float precision
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0}
_NUMBER = r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+))"


def parse_size(text: str, *, what: str = "size") -> int:
    """'8MB' -> 8_000_000. Rejects spaces, signs, exponents and unknown or miscased units."""
    m = re.fullmatch(_NUMBER + r"(?P<unit>[A-Za-z]*)", text.strip()) if isinstance(text, str) else None
    if not m or m.group("unit") not in _SIZE_UNITS or text != text.strip():
        raise UsageError(
            f"cannot read {what} {text!r}",
            hint="write a number followed by B, kB, MB, GB (powers of 10) or KiB, MiB, GiB "
            "(powers of 2), with no space: e.g. 8MB or 512KiB",
        )
    value = float(m.group("num")) * _SIZE_UNITS[m.group("unit")]
    if value <= 0 or not math.isfinite(value):
        raise UsageError(f"{what} {text!r} must be positive")
    if value < 1 or (_SIZE_UNITS[m.group("unit")] == 1 and value != int(value)):
        raise UsageError(f"{what} {text!r} is not a whole number of bytes" if value >= 1 else
                         f"{what} {text!r} is less than one byte", hint="sizes are whole bytes: e.g. 1B, 512KiB, 8MB")
    if value > MAX_SIZE_BYTES:
        raise UsageError(f"{what} {text!r} is larger than poetc handles (1 PiB, 2^50 bytes)",
                         hint="a RAM or flash size of a real device, e.g. 8MB or 4GiB")
    return int(round(value))


def parse_time(text: str, *, what: str = "time", bare_seconds: bool = False) -> float:
    """'250ms' -> 0.25 (seconds). With bare_seconds, a number without a unit is seconds (as a bare
    size is bytes): only for options where a bare number cannot mean anything else (--time-limit,
    not --deadline, where '1.3' could be a factor)."""
    m = re.fullmatch(_NUMBER + r"(?P<unit>[a-z]*)", text) if isinstance(text, str) else None
    unit = m.group("unit") if m else None
    if unit == "" and bare_seconds:
        unit = "s"
    if unit not in _TIME_UNITS:
        bare = m is not None and unit == ""
        raise UsageError(
            f"cannot read {what} {text!r}" + (": a number needs a unit here" if bare else ""),
            hint=f"write a number followed by s, ms, us or min, with no space: e.g. {text}s or 250ms"
            if bare else "write a number followed by s, ms, us or min, with no space: e.g. 250ms"
            + (" (a bare number means seconds)" if bare_seconds else ""),
        )
    value = float(m.group("num")) * _TIME_UNITS[unit]
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    return value


@dataclass(frozen=True)
class Deadline:
    """A step-time limit: either `factor` x the keep-all step time or an absolute `seconds`."""

    factor: float | None = None
    seconds: float | None = None

    def resolve(self, keep_all_time_s: float) -> float:
        return self.seconds if self.seconds is not None else self.factor * keep_all_time_s

    def __str__(self) -> str:
        return f"{self.factor:g}x" if self.factor is not None else format_time(self.seconds)


def parse_deadline(text: str) -> Deadline:
    """'1.3x' -> Deadline(factor=1.3); '2s' -> Deadline(seconds=2.0)."""
    m = re.fullmatch(_NUMBER + r"x", text) if isinstance(text, str) else None
    if m:
        factor = float(m.group("num"))
        if factor < 1.0:
            raise UsageError(
                f"deadline {text!r} is below 1x: no schedule can be faster than keeping everything",
                hint="use a factor of at least 1.0, e.g. --deadline 1.3x",
            )
        return Deadline(factor=factor)
    if isinstance(text, str) and re.fullmatch(_NUMBER, text):
        raise UsageError(f"cannot read deadline {text!r}: a bare number could be a factor or seconds",
                         hint=f"write {text}x for {text} times the keep-all step time, or {text}s for seconds")
    return Deadline(seconds=parse_time(text, what="deadline"))


def format_size(num_bytes: float) -> str:
    """Human-readable size in MiB/KiB (binary units, as memory is reported)."""
    n = float(num_bytes)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"
