"""The compile report (`report.json`) as a typed value: `CompileReport.to_json` writes the versioned
format documented in docs/report.md, `CompileReport.from_json` reads it back and refuses another
format. cli, bench, verify and plots read its fields, never string keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import InputFileError
from .plan import Budget, LowerBound

if TYPE_CHECKING:
    from .solver.strategies import StrategyResult

REPORT_FORMAT = "poetc-report/3"


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's schedule as the simulator sees it."""

    strategy: str
    status: str  # optimal / feasible / heuristic / heuristic-fallback / infeasible
    fits: bool  # activation peak within the budget, time within the deadline, paged bytes within the flash
    peak_bytes: int  # fixed state + resident parameters and moments (fused mode) + activation peak
    activation_peak_bytes: int  # what the step allocates above what exists before it (what verify measures)
    time_s: float
    energy_j: float
    overhead_time_s: float  # above keep-all
    overhead_energy_j: float
    decisions: dict[str, int]  # recompute, page, page_in_again, regenerate_early
    bound: float | None  # lower bound on the overhead objective (MILPs)
    gap: float | None  # on the overhead
    notes: list[str]
    # fused mode: parameters and moments resident for the whole step (bound as graph inputs before it)
    resident_state_bytes: int = 0

    @classmethod
    def of(cls, r: StrategyResult) -> StrategySummary:
        resident = r.sim.resident_state_bytes
        return cls(r.strategy, r.status, bool(r.fits), r.sim.total_peak_bytes, r.sim.peak_bytes - resident,
                   r.sim.time_s, r.sim.energy_j, r.overhead_time_s, r.overhead_energy_j, dict(r.schedule.counts()),
                   r.bound, r.gap, list(r.notes), resident)

    @classmethod
    def from_json(cls, doc: dict) -> StrategySummary:
        return cls(**doc)


@dataclass(frozen=True)
class KeepAllSummary:
    peak_bytes: int  # fixed state + resident parameters and moments (fused mode) + activation peak
    activation_peak_bytes: int  # above what exists before the step
    time_s: float
    energy_j: float
    resident_state_bytes: int = 0  # fused mode: every parameter and moment


@dataclass(frozen=True)
class InputSpec:
    shape: list[int]
    dtype: str  # ONNX element type name: float, int64, ...


@dataclass(frozen=True)
class CompileReport:
    """What `poetc compile` decided and predicts; deterministic for the same inputs and options."""

    model: str  # the model file's name
    target: str
    objective: str  # energy or time
    budget: Budget
    deadline: str  # as given: 1.3x or 2s (the default relaxed: the deadline used, see deadline_note)
    deadline_s: float
    flash_bytes: int
    fixed_state_bytes: dict[str, int]  # parameters, gradient_buffers, optimizer_state, inputs, constants
    lower_bound: LowerBound
    keep_all: KeepAllSummary
    result: StrategySummary
    baselines: dict[str, StrategySummary]
    candidates: int  # decidable tensors
    granularity: str
    schedule_encoding_bytes: int
    passes: list[dict]
    native_libraries: dict[str, str]
    runtime_contract: dict
    label_classes: int | None  # classes of a cross-entropy loss: the range of generated labels
    inputs: dict[str, InputSpec]  # the training graph's user inputs
    optimizer_mode: str = "unfused"  # fused: each update inside the step (Module alone drives it)
    optimizer_mode_reason: str = ""
    canonicalizations: list[dict] = field(default_factory=list)  # exact rewrites import applied: name, count, nodes, why
    # asynchronous paging (poetc.overlap.OverlapPlan.to_json): which transfers overlap compute, the staging
    # bytes they add (already in `result`'s peak) and the overlapped step time (already in `result`'s time)
    overlap: dict | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # file -> SHA-256, checked by train and verify
    # the step's RAM and flash traffic by class (parameters, moments, gradients, activations, other):
    # see memory_breakdown and docs/report.md
    memory_classes: dict[str, dict] = field(default_factory=dict)
    # fused mode: every parameter and moment, resident or paged (name, role, shape, dtype, bytes, paged,
    # reads_per_step, writes_per_step), and the state directory poetc wrote ("" if none)
    state_tensors: list[dict] = field(default_factory=list)
    state_dir: str = ""
    # no --deadline given and the default 1.3x not reachable at this budget: why `deadline` is larger
    deadline_note: str = ""
    # fused AdamW: parameter -> number of sliced updates (its moments are then state tensors per slice)
    update_slices: dict[str, int] = field(default_factory=dict)
    format: str = REPORT_FORMAT

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["budget"] = self.budget.to_json()
        doc["lower_bound"] = self.lower_bound.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict, *, where: str = "report.json") -> CompileReport:
        if not isinstance(doc, dict) or doc.get("format") != REPORT_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InputFileError(f"{where} has format {found!r}, not {REPORT_FORMAT!r}",
                                 hint="compile the model again with this poetc version")
        try:
            d = dict(doc)
            d["budget"] = Budget.from_json(d["budget"])
            d["lower_bound"] = LowerBound.from_json(d["lower_bound"])
            d["keep_all"] = KeepAllSummary(**d["keep_all"])
            d["result"] = StrategySummary.from_json(d["result"])
            d["baselines"] = {k: StrategySummary.from_json(v) for k, v in d["baselines"].items()}
            d["inputs"] = {k: InputSpec(**v) for k, v in d["inputs"].items()}
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{where} is not a valid poetc report: {type(exc).__name__}: {exc}",
                                 hint="compile the model again; do not edit report.json") from None


def memory_breakdown(graph, schedule, sim, costs) -> dict[str, dict]:
    """report.json's memory_classes for a compiled schedule: per class (poetc.schedule.MEMORY_CLASSES)
    `resident_bytes` (parameters and moments resident for the whole step; gradients and activations
    the schedule decides about and keeps), `paged_bytes` (paged state; paged gradients and
    activations), `recomputed_bytes`, `peak_step_bytes` (its share of RAM at the step's simulated
    peak), `max_bytes` (its own largest share during the step), and the step's flash traffic:
    `flash_read_bytes`, `flash_write_bytes`, `io_time_s`, `io_energy_j`."""
    from .ir.fused import state_tensors
    from .schedule import MEMORY_CLASSES, Decision, StepKind, io_by_class, memory_class
    roles = {st.name: st.role for st in state_tensors(graph)}
    paged_state = {s.tensor for s in schedule.steps if s.kind is StepKind.STATE_READ}
    out = {c: {"resident_bytes": 0, "paged_bytes": 0, "recomputed_bytes": 0} for c in MEMORY_CLASSES}
    for name in roles:
        out[memory_class(graph, name, roles)]["paged_bytes" if name in paged_state else "resident_bytes"] += \
            graph.tensors[name].nbytes
    for h in graph.decidable_tensors():
        d = schedule.decisions.get(h.name, Decision.KEEP)
        key = {Decision.KEEP: "resident_bytes", Decision.PAGE: "paged_bytes", Decision.RECOMPUTE: "recomputed_bytes"}[d]
        out[memory_class(graph, h.name, roles)][key] += graph.tensors[h.name].nbytes
    io = io_by_class(graph, schedule.steps, costs)
    for c in MEMORY_CLASSES:
        series = sim.class_bytes.get(c) or [0]
        out[c]["peak_step_bytes"] = int(series[sim.peak_step]) if sim.peak_step < len(series) else 0
        out[c]["max_bytes"] = int(max(series))
        out[c].update(io[c])
    return out


def state_tensor_list(graph, schedule) -> list[dict]:
    """report.json's state_tensors: every parameter and moment of a fused-mode graph (empty otherwise)."""
    from .ir.fused import state_tensors
    from .schedule import StepKind
    reads: dict[str, int] = {}
    writes: dict[str, int] = {}
    for s in schedule.steps:
        if s.kind is StepKind.STATE_READ:
            reads[s.tensor] = reads.get(s.tensor, 0) + 1
        elif s.kind is StepKind.STATE_WRITE:
            writes[s.tensor] = writes.get(s.tensor, 0) + 1
    out = []
    from .ir.fused import slice_parent
    for st in state_tensors(graph):
        t = graph.tensors[st.name]
        out.append({"name": st.name, "role": st.role, "parent": slice_parent(st.name), "shape": list(t.shape),
                    "dtype": t.dtype_name,
                    "bytes": st.nbytes, "trainable": st.trainable, "paged": st.name in reads,
                    "reads_per_step": reads.get(st.name, 0), "writes_per_step": writes.get(st.name, 0)})
    return out


__all__ = ["REPORT_FORMAT", "memory_breakdown", "state_tensor_list", "CompileReport", "InputSpec", "KeepAllSummary", "StrategySummary"]
