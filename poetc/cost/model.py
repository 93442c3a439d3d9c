"""Per-op time and energy of a training step on a target, and the cost of paging.

Analytic targets (m0, m4f, rpi4, jetson-tx2) price an op with a roofline:

    time   = max(flops / flops_per_s, bytes_moved / mem_bytes_per_s, 1 / flops_per_s)
    energy = time x active_power_w

The last term is a floor of one FLOP's time, so that ops that move no data (an aliasing Reshape,
Identity) still cost a positive, negligible amount. Energy is always time x active power: for a
compute-bound op that is flops x (active_power_w / flops_per_s), the target's J/FLOP figure, so
time and energy never disagree (see docs/targets.md for why POET's rpi4 figures had to be made
consistent).

Measured targets (host) take each op's time from `measured` (e.g. `profile_host`) or, failing that,
from the lowering probe's `Op.host_time_s`; energy is that time x the target's active power. ONNX
Runtime's profiler reports whole microseconds, so a reading of 0 is priced as
`MIN_MEASURED_OP_TIME_S` (half a microsecond). An op with no measurement falls back to the
analytic roofline with the target's figures.

A `measured` dict passed for an analytic target overrides its analytic times too: use that only with
times measured on that device (e.g. a costs file written by profiling on the device itself).

Paging n bytes: time = latency + n / bandwidth, energy = time x storage_power_w (POET's formula).
With a costs file that carries paging measured through poetc's own Spill/Restore ops (`meta.paging`,
poetc.cost.paging), the host's latency and bandwidth are those instead of the target file's raw I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

from ..errors import TargetError
from ..ir.graph import TrainGraph
from ..targets import Target
from .flops import count_flops, node_map
from .timemodel import output_bytes

log = logging.getLogger(__name__)

MIN_MEASURED_OP_TIME_S = 0.5e-6


@dataclass(frozen=True)
class OpCost:
    """Cost of running one op once."""

    time_s: float
    energy_j: float
    flops: int
    bytes_moved: int


@dataclass(frozen=True)
class CostTable:
    """Per-op costs of a graph on a target, index-aligned with `graph.ops`, plus paging costs."""

    target: Target
    ops: tuple[OpCost, ...]
    op_names: tuple[str, ...]
    time_sources: tuple[str, ...]  # per op: "analytic", "measured" (from `measured`) or "probe"

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, index: int) -> OpCost:
        return self.ops[index]

    def __iter__(self) -> Iterator[OpCost]:
        return iter(self.ops)

    def cost_of(self, op_name: str) -> OpCost:
        try:
            return self.ops[self.op_names.index(op_name)]
        except ValueError:
            raise KeyError(op_name) from None

    @property
    def times_s(self) -> tuple[float, ...]:
        return tuple(c.time_s for c in self.ops)

    @property
    def energies_j(self) -> tuple[float, ...]:
        return tuple(c.energy_j for c in self.ops)

    @property
    def total_time_s(self) -> float:
        """Time of one training step with every op run once (keep-all schedule)."""
        return math.fsum(c.time_s for c in self.ops)

    @property
    def total_energy_j(self) -> float:
        return math.fsum(c.energy_j for c in self.ops)

    @property
    def total_flops(self) -> int:
        return sum(c.flops for c in self.ops)

    def page_out(self, nbytes: int) -> tuple[float, float]:
        """(seconds, joules) to page `nbytes` out to flash on this target."""
        return self.target.page_out(nbytes)

    def page_in(self, nbytes: int) -> tuple[float, float]:
        """(seconds, joules) to page `nbytes` back in from flash on this target."""
        return self.target.page_in(nbytes)


def analytic_time_s(target: Target, flops: int, bytes_moved: int) -> float:
    """Roofline time of an op on `target`, at least one FLOP's worth."""
    return max(target.compute_time_s(flops, bytes_moved), 1.0 / target.flops_per_s)


def _checked_time(value: object, op_name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise TargetError(f"{what} time for op {op_name!r} is {value!r}, not a finite non-negative number")
    return max(float(value), MIN_MEASURED_OP_TIME_S)


def build_cost_table(graph: TrainGraph, target: Target,
                     measured: Mapping[str, float] | None = None) -> CostTable:
    """Price every op of `graph` on `target` (see the module docstring for the formulas).

    `measured` maps op name -> seconds, e.g. from `profile_host` or `load_costs(...)`. A loaded
    costs file that records the target it was measured on must match `target` (TargetError). When
    `measured` carries a host overhead (`.overhead`), each measured op's share of it is added; when it
    carries measured paging (`.paging`), the table's page_out/page_in use it.
    """
    measured_on = getattr(measured, "target", None)
    if isinstance(measured_on, str) and measured_on != target.name:
        raise TargetError(
            f"the per-op costs were measured on target {measured_on!r}, not {target.name!r}",
            hint=f"use --target {measured_on}, or profile on the {target.name} device itself")
    paging = getattr(measured, "paging", None)  # poetc.cost.paging.PagingCosts: Spill/Restore as measured
    if paging is not None:
        target = dataclasses.replace(target, page_out_bytes_per_s=paging.out_bytes_per_s,
                                     page_out_latency_s=paging.out_latency_s,
                                     page_in_bytes_per_s=paging.in_bytes_per_s, page_in_latency_s=paging.in_latency_s)
    nodes = node_map(graph)
    overhead = getattr(measured, "overhead", None)  # poetc.cost.timemodel.HostOverhead (docs/time-model.md)
    costs: list[OpCost] = []
    sources: list[str] = []
    fallbacks = 0
    for op in graph.ops:
        flops, moved = count_flops(graph, op, nodes.get(op.name))
        if measured is not None and op.name in measured:
            time_s, source = _checked_time(measured[op.name], op.name, "measured"), "measured"
            if overhead is not None:  # the host time model: what the node costs besides its kernel
                time_s += overhead.op_s(output_bytes(graph, op))
        elif target.is_measured and op.host_time_s is not None:
            time_s, source = _checked_time(op.host_time_s, op.name, "probe"), "probe"
        else:
            time_s, source = analytic_time_s(target, flops, moved), "analytic"
            if target.is_measured:
                fallbacks += 1
        costs.append(OpCost(time_s=time_s, energy_j=time_s * target.active_power_w,
                            flops=flops, bytes_moved=moved))
        sources.append(source)
    if fallbacks:
        log.debug("%d op(s) had no measured time on target %s; priced analytically", fallbacks, target.name)
    if measured is not None:
        unknown = set(measured) - {op.name for op in graph.ops}
        if unknown:
            log.debug("%d measured op time(s) name no op of the graph (ignored), e.g. %s",
                      len(unknown), sorted(unknown)[0])
    return CostTable(target=target, ops=tuple(costs), op_names=tuple(op.name for op in graph.ops),
                     time_sources=tuple(sources))
