"""Paging that overlaps compute (issue #19): which Spill/Restore steps of a schedule become asynchronous,
where each prefetch is issued and where each write-behind is waited for, and what that costs in RAM.

The native ops (poetc/runtime/native/async_ops.c) give the runtime meaning: `SpillAsync` copies the
tensor into a staging buffer and queues its write on the process's one I/O thread; `Flush` waits for
that write; `Prefetch` queues a read into a staging buffer; `Await` waits for it and copies it into the
output. Correctness comes from the handles and tickets the graph passes, never from timing.

The memory model (exact under the executor's file order, conservative in time):
- an asynchronous spill at step s holds |T| more bytes over steps [s, wait) — `wait` is the step before
  which its Flush runs, or, without a Flush, the step before which the tensor's first Prefetch is issued
  (the I/O thread runs jobs in order, so the read never starts before the write has freed its buffer) or
  its first synchronous Restore;
- a prefetch issued before step p for the Restore at step r holds |T| more over [p, r] (at r the staged
  copy and the output coexist for the copy).
The planner never lets those extra bytes take a step above the activation budget the schedule was planned
for, so the budget holds whatever it decides.

The time model (one channel, first come first served, next to compute): compute steps take their cost;
a synchronous transfer occupies both the step and the channel; an asynchronous one occupies the channel
from when it is queued (or the channel frees up) and the step only for the staging copy; Flush and Await
wait for their transfer. Energy is the blocking schedule's plus the staging copies: overlap saves time,
not joules.

Two placements:
- the MILP's (poetc/solver/overlap_rows.py): the solver chooses, per paged tensor, an asynchronous window
  for its Spill and for its first Restore among a few candidates (`Window`), with the staging bytes in its
  memory rows and the hidden time in its deadline row; `plan_from_windows` realises exactly those windows;
- the greedy fallback (`plan_overlap`, when the MILP part is off: heuristic strategies): a pass over the
  transfers in step order (a write is waited for once the compute after it covers its transfer time, a
  read is issued as late as still hides it), each bounded by the budget's headroom; a transfer that
  cannot hide more than its staging copy costs stays synchronous.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

import numpy as np

from .schedule import SimResult, Step, StepCosts, StepKind


@dataclass(frozen=True)
class OverlapCosts:
    """What an asynchronous transfer costs besides its transfer: the staging copy (read + write of the
    bytes at the device's memory bandwidth) on the main thread, at the device's active power; and the
    share of the transfer that is CPU work (`cpu_out_fraction`, `cpu_in_fraction`: MAC, copies into
    and out of the kernel), which the I/O thread takes from compute on a host whose compute uses every
    core, so overlap cannot hide it (measured by poetc.cost.paging; 0 where the device does DMA)."""

    copy_bytes_per_s: float
    copy_power_w: float = 0.0
    cpu_out_fraction: float = 0.0
    cpu_in_fraction: float = 0.0

    def copy_s(self, nbytes: int) -> float:
        return 2.0 * nbytes / self.copy_bytes_per_s

    def cpu_s(self, kind: str, transfer_s: float) -> float:
        """The CPU work of a transfer of `transfer_s` ("out" or "in") that compute pays for."""
        return (self.cpu_out_fraction if kind == "out" else self.cpu_in_fraction) * transfer_s

    @classmethod
    def for_target(cls, target, measured=None) -> OverlapCosts:
        """The target's figures, with the CPU shares of `measured` (a costs file, poetc.cost.load_costs)
        when it carries paging measured through poetc's ops."""
        paging = getattr(measured, "paging", None)
        if paging is None:
            return cls(target.mem_bytes_per_s, target.active_power_w)
        return cls(target.mem_bytes_per_s, target.active_power_w, paging.out_cpu_fraction, paging.in_cpu_fraction)


@dataclass(frozen=True)
class Window:
    """One asynchronous transfer the MILP may choose, in positions (op indices; "slot" q = the steps
    from the end of op q-1's steps up to and including op q and the Spills right after it).

    kind "out": the Spill right after op `start` (the tensor's producer) becomes a SpillAsync, its Flush
    runs before slot `end`; kind "in": the Restore in slot `end` (the tensor's first backward reader)
    becomes an Await of a Prefetch issued before slot `start`. Either way the staging buffer (`nbytes`)
    is live from the issue to the wait, and the transfer (`transfer_s`) runs on the storage channel while
    the ops strictly between issue and wait (`hidden_by_s` of compute) run on the main thread.
    The step pays the staging copy plus what the compute does not hide: `delta_s` (< 0) against the
    blocking transfer. Exact under the channel model when no other transfer is queued while the window
    is open (the MILP's channel rows, `exclusive_slots`) and no recompute runs inside it (a recompute
    only hides more, so the MILP's time is then an upper bound)."""

    kind: str  # "out" | "in"
    cand: int  # candidate index in the Problem
    tensor: str
    nbytes: int
    start: int
    end: int
    transfer_s: float
    hidden_by_s: float
    copy_s: float
    copy_energy_j: float
    cpu_s: float = 0.0  # the transfer's CPU work, which compute pays for (OverlapCosts.cpu_s)

    @property
    def delta_s(self) -> float:
        """Against the blocking transfer: the copy, the CPU work, and what neither the compute nor the
        CPU work hides (the window takes max(hidden + cpu, transfer) + copy instead of hidden + transfer)."""
        return self.copy_s + self.cpu_s + max(0.0, self.transfer_s - self.hidden_by_s - self.cpu_s) - self.transfer_s

    def op_positions(self) -> range:
        """Positions whose op rows count the staging buffer (an "out" window counts it at its producer
        too: the SpillAsync step after the producer holds the tensor and its copy, and has no row)."""
        return range(self.start, self.end)

    def stage_positions(self) -> range:
        """Positions whose regeneration (stage) rows count it: "in" up to the Await's own stage."""
        return range(self.start, self.end + 1) if self.kind == "in" else range(self.start + 1, self.end)

    def exclusive_slots(self) -> range:
        """Slots in which no other transfer may be issued while this one holds the channel."""
        return range(self.start, self.end)

    def to_json(self) -> list:
        return [self.kind, self.tensor, self.start, self.end]


@dataclass(frozen=True)
class AsyncTransfer:
    """One Spill (kind "out") or Restore (kind "in") of the schedule made asynchronous."""

    kind: str  # "out" | "in"
    step: int  # the schedule step of the Spill / Restore
    tensor: str
    nbytes: int
    issue: int  # "in": the step before which its Prefetch is queued; "out": == step
    wait: int | None = None  # "out": the step before which its Flush runs; None: its first reader waits

    def to_json(self) -> dict:
        return {"kind": self.kind, "step": self.step, "tensor": self.tensor, "nbytes": self.nbytes,
                "issue": self.issue, "wait": self.wait}


@dataclass
class OverlapPlan:
    transfers: list[AsyncTransfer]
    extra_bytes: list[int]  # staging bytes during each step
    peak_bytes: int  # activation peak with the staging buffers
    peak_step: int
    time_s: float  # the overlapped step (channel model)
    energy_j: float
    blocking_time_s: float  # the same schedule with every transfer blocking (the channel model, no overlap)
    notes: list[str] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)  # the MILP's windows it realises ([]: the greedy's plan)

    @property
    def asynchronous(self) -> bool:
        return bool(self.transfers)

    def adjusted(self, sim: SimResult) -> SimResult:
        """`sim` with the staging buffers in its memory profile and the overlapped time and energy."""
        live = [a + b for a, b in zip(sim.live_bytes, self.extra_bytes)]
        # (slice engineer) every other field carried over: the fused mode's resident_state_bytes was dropped
        # (reset to 0), so verify compared a peak that includes the resident state against one that does not
        classes = {c: list(v) for c, v in sim.class_bytes.items()}
        if "other" in classes:  # the staging buffers
            classes["other"] = [a + b for a, b in zip(classes["other"], self.extra_bytes)]
        return dataclasses.replace(sim, peak_bytes=self.peak_bytes, peak_step=self.peak_step, live_bytes=live,
                                   time_s=self.time_s, energy_j=self.energy_j, before_bytes=list(sim.before_bytes),
                                   class_bytes=classes)

    def to_json(self) -> dict:
        return {"transfers": [t.to_json() for t in self.transfers], "peak_bytes": self.peak_bytes,
                "time_s": self.time_s, "energy_j": self.energy_j, "blocking_time_s": self.blocking_time_s,
                "asynchronous_spills": sum(t.kind == "out" for t in self.transfers),
                "prefetched_restores": sum(t.kind == "in" for t in self.transfers), "notes": list(self.notes),
                "placed_by": "milp" if self.windows else "greedy"}


#: transfers that stay blocking (the fused mode's paged parameters and moments): they hold the channel too
_BLOCKING_OUT = (StepKind.PAGE_OUT, StepKind.STATE_WRITE)
_BLOCKING_IN = (StepKind.PAGE_IN, StepKind.STATE_READ)


def _durations(steps: list[Step], costs: StepCosts, nbytes: dict[str, int]) -> np.ndarray:
    """Each step's own time, blocking: its op's cost, or its transfer's (`nbytes`: every transferred
    tensor's size)."""
    d = np.zeros(len(steps))
    for i, s in enumerate(steps):
        if s.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            d[i] = costs.op_time_s[s.op]
        elif s.kind in _BLOCKING_OUT:
            d[i] = costs.page_out(nbytes[s.tensor])[0]
        elif s.kind in _BLOCKING_IN:
            d[i] = costs.page_in(nbytes[s.tensor])[0]
    return d


def channel_time(steps: list[Step], durations, transfers: list[AsyncTransfer], nbytes: dict[str, int],
                 costs: StepCosts, copy_s, cpu_s=None) -> float:
    """The step's time under the one-channel model (see the module docstring). `cpu_s(kind, transfer
    seconds)`: the CPU work of an asynchronous transfer that the main thread pays at its issue
    (OverlapCosts.cpu_s; None: none)."""
    cpu = cpu_s or (lambda kind, t: 0.0)
    by_step = {(t.kind, t.step): t for t in transfers}
    issue_before: dict[int, list[AsyncTransfer]] = {}
    wait_before: dict[int, list[AsyncTransfer]] = {}
    for t in transfers:
        if t.kind == "in":
            issue_before.setdefault(t.issue, []).append(t)
        elif t.wait is not None:
            wait_before.setdefault(t.wait, []).append(t)
    now = free = 0.0
    write_end: dict[str, float] = {}
    read_end: dict[int, float] = {}
    for i, s in enumerate(steps):
        for t in wait_before.get(i, ()):
            now = max(now, write_end[t.tensor])
        for t in issue_before.get(i, ()):
            start = max(now, free, write_end.get(t.tensor, 0.0))
            free = start + costs.page_in(t.nbytes)[0]
            read_end[t.step] = free
            now += cpu("in", costs.page_in(t.nbytes)[0])
        if s.kind is StepKind.PAGE_OUT:
            t = by_step.get(("out", i))
            if t is None:
                now = max(now, free) + durations[i]
                free = now
            else:
                now += copy_s(t.nbytes)
                free = max(now, free) + durations[i]
                write_end[s.tensor] = free
                now += cpu("out", durations[i])
        elif s.kind is StepKind.PAGE_IN:
            t = by_step.get(("in", i))
            if t is None:
                now = max(now, free, write_end.get(s.tensor, 0.0)) + durations[i]
                free = now
            else:
                now = max(now, read_end[i]) + copy_s(t.nbytes)
        elif s.kind in (StepKind.STATE_READ, StepKind.STATE_WRITE):
            now = max(now, free) + durations[i]
            free = now
        else:
            now += durations[i]
    return now


def plan_overlap(steps: list[Step], sim: SimResult, costs: StepCosts, nbytes: dict[str, int],
                 activation_budget_bytes: float, *, copy_bytes_per_s: float, copy_power_w: float = 0.0,
                 cpu_out_fraction: float = 0.0, cpu_in_fraction: float = 0.0) -> OverlapPlan:
    """Choose the asynchronous transfers of a schedule (see the module docstring). `nbytes`: the byte size
    of every tensor a step transfers (Spill/Restore, and StateRead/StateWrite, which stay blocking);
    `copy_bytes_per_s`: the device's memory bandwidth (staging copies); `cpu_*_fraction`: the share of a
    transfer that is CPU work overlap cannot hide (OverlapCosts)."""
    n = len(steps)
    oc = OverlapCosts(copy_bytes_per_s, copy_power_w, cpu_out_fraction, cpu_in_fraction)
    copy_s = oc.copy_s
    d = _durations(steps, costs, nbytes)
    live = np.asarray(sim.live_bytes, dtype=np.float64)
    extra = np.zeros(n)
    room = lambda a, b: activation_budget_bytes - (live[a:b] + extra[a:b])  # noqa: E731
    page_ins: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        if s.kind is StepKind.PAGE_IN:
            page_ins.setdefault(s.tensor, []).append(i)
    transfers: list[AsyncTransfer] = []
    notes: list[str] = []

    # writes behind: the staging copy lives until the compute after the spill covers its write
    spill_end: dict[str, int] = {}  # tensor -> first step at which its write no longer holds staging
    for s_idx, s in enumerate(steps):
        if s.kind is not StepKind.PAGE_OUT:
            continue
        b = nbytes[s.tensor]
        first_in = page_ins.get(s.tensor, [n])[0]
        if room(s_idx, s_idx + 1)[0] < b:
            continue
        hideable = d[s_idx] - oc.cpu_s("out", d[s_idx])
        covered, j = 0.0, s_idx + 1
        while j < first_in and covered < hideable and room(j, j + 1)[0] >= b:
            covered += d[j]
            j += 1
        if min(covered, hideable) <= copy_s(b):
            continue  # hides less than its staging copy costs: stays synchronous
        extra[s_idx:j] += b
        spill_end[s.tensor] = j
        transfers.append(AsyncTransfer("out", s_idx, s.tensor, b, s_idx, wait=j if j < first_in else None))

    # reads ahead: issued as late as still hides the read, never before the write's staging is gone
    for r, s in enumerate(steps):
        if s.kind is not StepKind.PAGE_IN:
            continue
        b = nbytes[s.tensor]
        if room(r, r + 1)[0] < b:
            continue
        earliest = spill_end.get(s.tensor)
        if earliest is None:  # synchronous spill: after it
            earliest = next(i for i in range(r - 1, -1, -1)
                            if steps[i].kind is StepKind.PAGE_OUT and steps[i].tensor == s.tensor) + 1
        # a repeated page-in: after the previous Restore of the tensor (its output is what it re-reads)
        prev = [i for i in page_ins[s.tensor] if i < r]
        if prev:
            earliest = max(earliest, prev[-1] + 1)
        hideable = d[r] - oc.cpu_s("in", d[r])
        covered, p = 0.0, r
        while p > earliest and covered < hideable and room(p - 1, p)[0] >= b:
            p -= 1
            covered += d[p]
        if p >= r or min(covered, hideable) <= copy_s(b):
            continue
        extra[p: r + 1] += b
        transfers.append(AsyncTransfer("in", r, s.tensor, b, p))

    # a write whose tensor is prefetched before its Flush needs no Flush: the read queues behind it
    first_issue: dict[str, int] = {}
    for t in transfers:
        if t.kind == "in":
            first_issue[t.tensor] = min(first_issue.get(t.tensor, n), t.issue)
    fixed = []
    for t in transfers:
        if t.kind == "out" and t.wait is not None and first_issue.get(t.tensor, n) <= t.wait:
            t = AsyncTransfer("out", t.step, t.tensor, t.nbytes, t.issue, None)
        fixed.append(t)
    transfers = sorted(fixed, key=lambda t: (t.step, t.kind))

    return _finish(steps, sim, costs, nbytes, transfers, extra, oc, notes)


def _finish(steps, sim: SimResult, costs: StepCosts, nbytes: dict[str, int], transfers: list[AsyncTransfer],
            extra: np.ndarray, oc: OverlapCosts, notes: list[str]) -> OverlapPlan:
    """The plan of `transfers` (staging bytes `extra` per step): its peak, channel time and energy; no
    transfer at all if the model says it is slower than blocking."""
    n = len(steps)
    d = _durations(steps, costs, nbytes)
    total = np.asarray(sim.live_bytes, dtype=np.float64) + extra
    peak_step = int(np.argmax(total)) if n else 0
    copy_s = oc.copy_s
    time_s = channel_time(steps, d, transfers, nbytes, costs, copy_s, oc.cpu_s)
    blocking = channel_time(steps, d, [], nbytes, costs, copy_s)
    energy = sim.energy_j + oc.copy_power_w * sum(copy_s(t.nbytes) for t in transfers)
    if time_s > blocking:  # the greedy never should; if the model says so, overlap nothing
        notes.append(f"overlap predicted slower ({time_s:.4f} s vs {blocking:.4f} s): kept every transfer blocking")
        return OverlapPlan([], [0] * n, sim.peak_bytes, sim.peak_step, blocking, sim.energy_j, blocking, notes)
    return OverlapPlan(transfers, [int(x) for x in extra], int(total[peak_step]) if n else 0, peak_step,
                       time_s, energy, blocking, notes)


def slot_starts(steps: list[Step]) -> dict[int, int]:
    """Position -> index of the first step of its slot (the regeneration steps and StateReads before
    the op, or the op itself): where a Prefetch issued "before slot p", or a Flush "before slot p", goes."""
    starts: dict[int, int] = {}
    first = 0
    for i, s in enumerate(steps):
        if s.kind is StepKind.COMPUTE:
            starts[s.op] = first
            first = i + 1
        elif s.kind in (StepKind.PAGE_OUT, StepKind.STATE_WRITE) and first == i:
            first = i + 1  # the Spills / StateWrites right after an op belong to its slot
    return starts


def _slots(steps: list[Step]) -> list[int | None]:
    """The slot (position) of each step: a step before an op is in that op's slot, the Spills and
    StateWrites right after an op in the op's."""
    slot: list[int | None] = [None] * len(steps)
    trailing = None
    for i, s in enumerate(steps):
        if s.kind is StepKind.COMPUTE:
            trailing = slot[i] = s.op
        elif s.kind in (StepKind.PAGE_OUT, StepKind.STATE_WRITE) and trailing is not None:
            slot[i] = trailing
        else:
            trailing = None
    nxt = None
    for i in range(len(steps) - 1, -1, -1):
        if steps[i].kind is StepKind.COMPUTE:
            nxt = steps[i].op
        elif slot[i] is None:
            slot[i] = nxt
    return slot


def plan_from_windows(steps: list[Step], sim: SimResult, costs: StepCosts, nbytes: dict[str, int],
                      windows: list[Window], overlap_costs: OverlapCosts) -> OverlapPlan:
    """Realise the MILP's chosen windows exactly: each "out" window's Spill becomes a SpillAsync whose
    Flush runs before slot `end`; each "in" window's first Restore of its tensor becomes an Await of a
    Prefetch issued before slot `start`. The staging bytes of each are added to every step from its
    issue to its wait (an "in" window's Await included). A window the schedule does not have where the
    MILP put it (its Restore not in slot `end`) stays blocking, with a note."""
    n = len(steps)
    starts = slot_starts(steps)
    slot_of = _slots(steps)
    extra = np.zeros(n)
    transfers: list[AsyncTransfer] = []
    notes: list[str] = []
    for w in sorted(windows, key=lambda w: (w.start, w.kind, w.tensor)):
        kind = StepKind.PAGE_OUT if w.kind == "out" else StepKind.PAGE_IN
        step = next((i for i, s in enumerate(steps) if s.kind is kind and s.tensor == w.tensor), None)
        if step is None or slot_of[step] != (w.start if w.kind == "out" else w.end) or w.end not in starts:
            notes.append(f"{w.kind} window of {w.tensor} [{w.start}, {w.end}) is not in the schedule: kept blocking")
            continue
        if w.kind == "out":
            wait = starts[w.end]
            extra[step:wait] += w.nbytes
            transfers.append(AsyncTransfer("out", step, w.tensor, w.nbytes, step, wait))
        else:
            issue = starts[w.start]
            extra[issue: step + 1] += w.nbytes
            transfers.append(AsyncTransfer("in", step, w.tensor, w.nbytes, issue))
    transfers.sort(key=lambda t: (t.step, t.kind))
    plan = _finish(steps, sim, costs, nbytes, transfers, extra, overlap_costs, notes)
    if plan.transfers:
        plan.windows = sorted(windows, key=lambda w: (w.start, w.kind, w.tensor))
    return plan


__all__ = ["AsyncTransfer", "OverlapCosts", "OverlapPlan", "Window", "channel_time", "plan_from_windows", "plan_overlap",
           "slot_starts"]
