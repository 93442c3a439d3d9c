"""Device targets: what a training step costs on a given device.

A target is a TOML file (see docs/targets.md for the format and the provenance of every figure):

    name = "rpi4"
    description = "..."
    ram_bytes = 4294967296
    flash_bytes = 32000000000

    [compute]
    cost_model = "analytic"        # or "measured": per-op times come from profiling (host)
    flops_per_s = 2.0e9            # sustained FLOP/s used for op time
    active_power_w = 3.0           # op energy = op time x active power
    mem_bytes_per_s = 5.5e9        # sustained read+write bandwidth for memory-bound ops
    energy_per_flop_j = 1.5e-9     # optional cross-check: must equal active_power_w / flops_per_s

    [storage]
    medium = "microSD card"
    page_in_bytes_per_s = 45.5e6
    page_in_latency_s = 5.1e-6
    page_out_bytes_per_s = 24.5e6
    page_out_latency_s = 18.5e-6
    storage_power_w = 0.15

    [sources]
    flops_per_s = "where the figure comes from"
    ...                            # one citation per numeric figure, all required

All figures are SI: bytes, seconds, watts, joules. Paging a tensor of n bytes takes
latency + n / bandwidth seconds and (latency + n / bandwidth) x storage_power_w joules.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import TargetError

PACKAGE = "poetc.targets"
COST_MODELS = ("analytic", "measured")

# Numeric figures: section -> (field, must be an integer)
_FIELDS: dict[str | None, tuple[tuple[str, bool], ...]] = {
    None: (("ram_bytes", True), ("flash_bytes", True)),
    "compute": (("flops_per_s", False), ("active_power_w", False), ("mem_bytes_per_s", False)),
    "storage": (("page_in_bytes_per_s", False), ("page_in_latency_s", False),
                ("page_out_bytes_per_s", False), ("page_out_latency_s", False),
                ("storage_power_w", False)),
}
_ALLOWED_KEYS = {
    None: {"name", "description", "ram_bytes", "flash_bytes", "compute", "storage", "sources"},
    "compute": {"cost_model", "flops_per_s", "active_power_w", "mem_bytes_per_s", "energy_per_flop_j"},
    "storage": {"medium", "page_in_bytes_per_s", "page_in_latency_s", "page_out_bytes_per_s",
                "page_out_latency_s", "storage_power_w"},
}
# energy_per_flop_j, when given, must match active_power_w / flops_per_s to this relative tolerance
ENERGY_CONSISTENCY_RTOL = 0.02


@dataclass(frozen=True)
class Target:
    """A device: memory, compute and storage figures (SI units). Immutable."""

    name: str
    description: str
    ram_bytes: int
    flash_bytes: int
    cost_model: str  # "analytic": op costs from FLOP counts; "measured": from profiled op times
    flops_per_s: float
    active_power_w: float
    mem_bytes_per_s: float
    storage_medium: str
    page_in_bytes_per_s: float
    page_in_latency_s: float
    page_out_bytes_per_s: float
    page_out_latency_s: float
    storage_power_w: float
    sources: tuple[tuple[str, str], ...] = ()  # (figure name, citation), in file order
    path: str = ""  # the TOML file the target was read from

    # ---- derived figures -----------------------------------------------------------------------
    @property
    def is_measured(self) -> bool:
        return self.cost_model == "measured"

    @property
    def energy_per_flop_j(self) -> float:
        """Joules per FLOP at the sustained rate: active_power_w / flops_per_s."""
        return self.active_power_w / self.flops_per_s

    @property
    def flops_per_j(self) -> float:
        return self.flops_per_s / self.active_power_w

    def source(self, figure: str) -> str:
        """The citation for `figure` (e.g. "flops_per_s"); "" if none."""
        return dict(self.sources).get(figure, "")

    # ---- costs ---------------------------------------------------------------------------------
    def compute_time_s(self, flops: float, bytes_moved: float = 0) -> float:
        """Roofline time: the larger of compute time and memory time."""
        return max(flops / self.flops_per_s, bytes_moved / self.mem_bytes_per_s)

    def page_out(self, nbytes: int) -> tuple[float, float]:
        """(seconds, joules) to write `nbytes` from RAM to flash. Zero bytes cost nothing."""
        return _transfer(nbytes, self.page_out_bytes_per_s, self.page_out_latency_s, self.storage_power_w)

    def page_in(self, nbytes: int) -> tuple[float, float]:
        """(seconds, joules) to read `nbytes` from flash back into RAM. Zero bytes cost nothing."""
        return _transfer(nbytes, self.page_in_bytes_per_s, self.page_in_latency_s, self.storage_power_w)

    def summary(self) -> str:
        """A few human-readable lines (for `poetc targets` and reports)."""
        return (
            f"{self.name}: {self.description}\n"
            f"  RAM {self.ram_bytes:,} B, flash {self.flash_bytes:,} B ({self.storage_medium})\n"
            f"  compute {self.flops_per_s:.4g} FLOP/s at {self.active_power_w:.4g} W "
            f"({self.flops_per_j:.4g} FLOP/J), memory {self.mem_bytes_per_s:.4g} B/s, "
            f"op costs {self.cost_model}\n"
            f"  page-in {self.page_in_bytes_per_s:.4g} B/s + {self.page_in_latency_s:.4g} s, "
            f"page-out {self.page_out_bytes_per_s:.4g} B/s + {self.page_out_latency_s:.4g} s, "
            f"storage {self.storage_power_w:.4g} W"
        )


def _transfer(nbytes: int, bytes_per_s: float, latency_s: float, power_w: float) -> tuple[float, float]:
    if nbytes < 0:
        raise ValueError(f"cannot page a negative number of bytes ({nbytes})")
    if nbytes == 0:
        return 0.0, 0.0
    time_s = latency_s + nbytes / bytes_per_s
    return time_s, time_s * power_w


# ---- discovery ---------------------------------------------------------------------------------
def _builtin_files() -> dict[str, Any]:
    """name -> Traversable of every packaged target TOML."""
    root = resources.files(PACKAGE)
    return {entry.name[: -len(".toml")]: entry for entry in root.iterdir()
            if entry.name.endswith(".toml") and entry.is_file()}


def known_target_names() -> list[str]:
    return sorted(_builtin_files())


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or os.sep in text or (os.altsep is not None and os.altsep in text)


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A packaged target by name ("m0", "m4f", "rpi4", "jetson-tx2", "host") or a TOML file path.

    Raises TargetError for an unknown name (listing the known ones), an unreadable or malformed
    file, or a missing, mistyped or non-positive figure (naming the file and the field).
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TargetError(f"cannot read target file {path}: {exc.strerror or exc}") from exc
        return parse_target(text, str(path))
    name = str(name_or_path).strip().lower().replace("_", "-")
    files = _builtin_files()
    if name not in files:
        raise TargetError(
            f"unknown target {str(name_or_path)!r}; known targets: {', '.join(sorted(files))}",
            hint="or pass the path of a target TOML file (see docs/targets.md)")
    target = parse_target(files[name].read_text(encoding="utf-8"), f"{PACKAGE}/{name}.toml")
    if target.name != name:
        raise TargetError(f"{PACKAGE}/{name}.toml: field 'name' is {target.name!r}, expected {name!r}")
    return target


def list_targets() -> list[Target]:
    """Every packaged target, sorted by name."""
    return [load_target(name) for name in known_target_names()]


# ---- parsing and validation --------------------------------------------------------------------
def parse_target(text: str, origin: str = "<string>") -> Target:
    """Parse and validate target TOML `text`; `origin` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{origin}: malformed TOML: {exc}") from exc

    def fail(field: str, problem: str) -> TargetError:
        return TargetError(f"{origin}: field {field!r} {problem}",
                           hint="see docs/targets.md for the target file format")

    def section(key: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            raise fail(key, "is missing (expected a [" + key + "] table)")
        if not isinstance(value, dict):
            raise fail(key, "must be a table")
        return value

    tables: dict[str | None, dict[str, Any]] = {None: data, "compute": section("compute"),
                                                "storage": section("storage")}
    for sec, allowed in _ALLOWED_KEYS.items():
        for key in tables[sec]:
            if key not in allowed:
                full = key if sec is None else f"{sec}.{key}"
                raise fail(full, f"is not a known target field (known: {', '.join(sorted(allowed))})")

    def string(table: dict[str, Any], key: str, full: str, default: str | None = None) -> str:
        value = table.get(key, default)
        if value is None:
            raise fail(full, "is missing")
        if not isinstance(value, str) or not value.strip():
            raise fail(full, "must be a non-empty string")
        return value.strip()

    def number(table: dict[str, Any], key: str, full: str, integer: bool) -> float | int:
        if key not in table:
            raise fail(full, "is missing")
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(full, f"must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise fail(full, f"must be positive and finite, got {value!r}")
        if integer:
            if float(value) != math.floor(value):
                raise fail(full, f"must be a whole number of bytes, got {value!r}")
            return int(value)
        return float(value)

    name = string(data, "name", "name")
    description = string(data, "description", "description")
    values: dict[str, float | int] = {}
    for sec, fields in _FIELDS.items():
        for key, integer in fields:
            values[key] = number(tables[sec], key, key if sec is None else f"{sec}.{key}", integer)
    cost_model = string(tables["compute"], "cost_model", "compute.cost_model", "analytic")
    if cost_model not in COST_MODELS:
        raise fail("compute.cost_model", f"must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
    medium = string(tables["storage"], "medium", "storage.medium")

    if "energy_per_flop_j" in tables["compute"]:
        stated = number(tables["compute"], "energy_per_flop_j", "compute.energy_per_flop_j", False)
        implied = values["active_power_w"] / values["flops_per_s"]
        if abs(stated - implied) > ENERGY_CONSISTENCY_RTOL * implied:
            raise fail("compute.energy_per_flop_j",
                       f"is {stated:.4g} J/FLOP but active_power_w / flops_per_s = {implied:.4g} J/FLOP; "
                       "op energy is time x active power, so the two must agree")

    raw_sources = data.get("sources")
    if raw_sources is None:
        raise fail("sources", "is missing (expected a [sources] table citing every figure)")
    if not isinstance(raw_sources, dict):
        raise fail("sources", "must be a table")
    figures = [key for fields in _FIELDS.values() for key, _ in fields]
    if "energy_per_flop_j" in tables["compute"]:
        figures.append("energy_per_flop_j")
    for key, value in raw_sources.items():
        if not isinstance(value, str) or not value.strip():
            raise fail(f"sources.{key}", "must be a non-empty citation string")
    for key in figures:
        if key not in raw_sources:
            raise fail(f"sources.{key}", "is missing: every figure needs a citation")

    return Target(
        name=name, description=description,
        ram_bytes=int(values["ram_bytes"]), flash_bytes=int(values["flash_bytes"]),
        cost_model=cost_model,
        flops_per_s=float(values["flops_per_s"]), active_power_w=float(values["active_power_w"]),
        mem_bytes_per_s=float(values["mem_bytes_per_s"]),
        storage_medium=medium,
        page_in_bytes_per_s=float(values["page_in_bytes_per_s"]),
        page_in_latency_s=float(values["page_in_latency_s"]),
        page_out_bytes_per_s=float(values["page_out_bytes_per_s"]),
        page_out_latency_s=float(values["page_out_latency_s"]),
        storage_power_w=float(values["storage_power_w"]),
        sources=tuple((k, v.strip()) for k, v in raw_sources.items()),
        path=origin,
    )
