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

REPORT_FORMAT = "poetc-report/2"


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's schedule as the simulator sees it."""

    strategy: str
    status: str  # optimal / feasible / heuristic / heuristic-fallback / infeasible
    fits: bool  # activation peak within the budget, time within the deadline, paged bytes within the flash
    peak_bytes: int  # fixed state + activation peak
    activation_peak_bytes: int
    time_s: float
    energy_j: float
    overhead_time_s: float  # above keep-all
    overhead_energy_j: float
    decisions: dict[str, int]  # recompute, page, page_in_again, regenerate_early
    bound: float | None  # lower bound on the overhead objective (MILPs)
    gap: float | None  # on the overhead
    notes: list[str]

    @classmethod
    def of(cls, r: StrategyResult) -> StrategySummary:
        return cls(r.strategy, r.status, bool(r.fits), r.sim.total_peak_bytes, r.sim.peak_bytes, r.sim.time_s,
                   r.sim.energy_j, r.overhead_time_s, r.overhead_energy_j, dict(r.schedule.counts()), r.bound, r.gap,
                   list(r.notes))

    @classmethod
    def from_json(cls, doc: dict) -> StrategySummary:
        return cls(**doc)


@dataclass(frozen=True)
class KeepAllSummary:
    peak_bytes: int  # fixed state + activation peak
    activation_peak_bytes: int
    time_s: float
    energy_j: float


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
    deadline: str  # as given: 1.3x or 2s
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


__all__ = ["REPORT_FORMAT", "CompileReport", "InputSpec", "KeepAllSummary", "StrategySummary"]
