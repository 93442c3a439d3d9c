"""Planning: from the user's RAM figure to a chosen schedule, in one place.

`Budget` splits the RAM budget once: the fixed state (parameters, gradient buffers, optimizer state,
inputs), the planning reserve (what the simulator does not model) and the activation budget every
strategy plans against. `Limits` is the solver's view of a budget, a deadline and the flash.
`lower_bound` is the one bound poetc reports: no budget below it can hold any schedule.
`plan` runs the chosen strategy and the baselines on one problem (whose keep-all simulation is done
once, by `build_problem`) against one `Limits`. `compile`, `bench`, the POET comparison and the tests
all go through here; nothing else computes a budget, a bound or a keep-all figure.
"""

from __future__ import annotations

import dataclasses

import logging
import math

import numpy as np
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import InfeasibleError
from .schedule import SPILL_HANDLE_BYTES
from .units import Deadline, format_size

if TYPE_CHECKING:  # the solver imports this module for Limits
    from .schedule import SimResult
    from .solver.problem import Problem
    from .solver.strategies import StrategyResult

log = logging.getLogger(__name__)

# What the simulator does not model, measured (docs/memory-model.md, "The reserve"): since ONNX
# Runtime's per-step bookkeeping (frame, Tensor objects, the paged step's StateSession blocks), in-place
# ops and Conv's per-thread scratch are modelled, the corpus's compiled steps (docs/corpus.md, branch
# mem5) measure at most 4.7 KB above their prediction (lenet_opset9 at batch 8, a paged step; 10.0 KB,
# mobilenet_v3 at batch 1, in the run before). Plans keep this much of the activation budget spare.
RESERVE_FRACTION = 0.005
RESERVE_BYTES = 16 * 1024

STRATEGIES = ("poet", "keep-all", "chen", "capuchin", "remat-only", "paging-only")
BASELINES = ("keep-all", "chen", "capuchin", "remat-only", "paging-only")


@dataclass(frozen=True)
class Budget:
    """A RAM budget split into what no schedule changes and what a schedule plans for.

    ram_bytes = fixed_bytes + reserve_bytes + activation_bytes. A schedule fits when its simulated
    activation peak is at most `activation_bytes`; it may be negative (nothing fits)."""

    ram_bytes: int  # the user's --ram figure
    fixed_bytes: int  # resident for the whole step: parameters, gradient buffers, optimizer state, inputs
    reserve_bytes: int  # kept spare: RESERVE_FRACTION of what is left after the fixed state, plus RESERVE_BYTES
    activation_bytes: int  # what the schedule's simulated activation peak may reach

    @classmethod
    def from_ram(cls, ram_bytes: int, fixed_bytes: int) -> Budget:
        free = ram_bytes - fixed_bytes
        activation = math.floor(free - RESERVE_FRACTION * max(free, 0) - RESERVE_BYTES)
        return cls(ram_bytes, fixed_bytes, free - activation, activation)

    @classmethod
    def activations_only(cls, activation_bytes: int) -> Budget:
        """A budget on activation memory alone, with no fixed state and no reserve: for comparisons
        with formulations that count activations only (POET's) and for solver tests."""
        return cls(int(activation_bytes), 0, 0, int(activation_bytes))

    @classmethod
    def smallest_for(cls, activation_bytes: int, fixed_bytes: int) -> Budget:
        """The smallest RAM budget whose activation budget is at least `activation_bytes`."""
        ram = fixed_bytes + math.ceil((max(activation_bytes, 0) + RESERVE_BYTES) / (1 - RESERVE_FRACTION))
        while cls.from_ram(ram - 1, fixed_bytes).activation_bytes >= activation_bytes:
            ram -= 1
        while cls.from_ram(ram, fixed_bytes).activation_bytes < activation_bytes:
            ram += 1
        return cls.from_ram(ram, fixed_bytes)

    def fits(self, activation_peak_bytes: int) -> bool:
        return activation_peak_bytes <= self.activation_bytes

    def to_json(self) -> dict:
        return {"ram_bytes": self.ram_bytes, "fixed_bytes": self.fixed_bytes, "reserve_bytes": self.reserve_bytes,
                "activation_bytes": self.activation_bytes}

    @classmethod
    def from_json(cls, doc: dict) -> Budget:
        return cls(int(doc["ram_bytes"]), int(doc["fixed_bytes"]), int(doc["reserve_bytes"]),
                   int(doc["activation_bytes"]))


@dataclass(frozen=True)
class Limits:
    """What a strategy must respect: the activation budget, the overhead time the deadline leaves,
    the flash capacity; the objective and which tactics are allowed."""

    activation_budget_bytes: float  # Budget.activation_bytes: the simulated activation peak's limit
    overhead_time_s: float  # deadline minus keep-all step time
    flash_bytes: float
    objective: str = "energy"  # or "time"
    allow_recompute: bool = True
    allow_page: bool = True
    # issue #19: asynchronous paging in the MILP (poetc.overlap.OverlapCosts: the staging copy's cost);
    # None: every transfer blocking in the MILP (poetc.overlap's greedy may still overlap afterwards)
    overlap: object = None

    @classmethod
    def of(cls, budget: Budget, overhead_time_s: float, flash_bytes: float, objective: str = "energy") -> Limits:
        return cls(budget.activation_bytes, overhead_time_s, flash_bytes, objective)

    def milp_budget_bytes(self, decidable: int) -> float:
        """The budget of the MILP's memory rows: the MILP does not model Spill handles (16 bytes each)
        per position, so it sets one aside for every decidable tensor."""
        return self.activation_budget_bytes - SPILL_HANDLE_BYTES * decidable


# ---------------------------------------------------------------------------------------------------
# the lower bound


@dataclass(frozen=True)
class LowerBound:
    """No RAM budget below `ram_bytes` can hold any schedule poetc plans.

    At op `set_by` (position `position`), `floor_activation_bytes` of tensors are resident whatever is
    decided (the op's own inputs, outputs and workspace, and every tensor no decision can drop there);
    `ram_bytes` adds the fixed state and the planning reserve. `largest_op_bytes` (op
    `largest_op`) is the largest single-op working set: inputs, outputs and workspace of one op."""

    ram_bytes: int
    fixed_bytes: int
    floor_activation_bytes: int
    position: int
    set_by: str
    largest_op_bytes: int
    largest_op: str
    largest_tensor: str = ""  # the largest tensor op `set_by` reads or writes
    largest_tensor_bytes: int = 0
    floor_state_bytes: int = 0  # fused mode: pageable parameters and moments in the floor (op set_by reads them)

    def to_json(self) -> dict:
        return {"ram_bytes": self.ram_bytes, "fixed_bytes": self.fixed_bytes,
                "floor_activation_bytes": self.floor_activation_bytes, "position": self.position,
                "set_by": self.set_by, "largest_op_bytes": self.largest_op_bytes, "largest_op": self.largest_op,
                "largest_tensor": self.largest_tensor, "largest_tensor_bytes": self.largest_tensor_bytes,
                "floor_state_bytes": self.floor_state_bytes}

    @classmethod
    def from_json(cls, doc: dict) -> LowerBound:
        return cls(int(doc["ram_bytes"]), int(doc["fixed_bytes"]), int(doc["floor_activation_bytes"]),
                   int(doc["position"]), doc["set_by"], int(doc["largest_op_bytes"]), doc["largest_op"],
                   doc.get("largest_tensor", ""), int(doc.get("largest_tensor_bytes", 0)),
                   int(doc.get("floor_state_bytes", 0)))


def lower_bound(problem: Problem) -> LowerBound:
    """The bound of `LowerBound`, from the problem's decision-independent memory: at each position,
    what stays resident when every decidable tensor is dropped wherever a decision can drop it."""
    graph = problem.graph
    floor = problem.const_bytes.copy()
    state_floor = np.zeros(problem.positions)  # pageable state that stays resident at each position (its uses)
    for c in problem.candidates:
        if c.fixed:
            continue
        if c.state:  # resident in const everywhere; paged, only during its groups (the smaller of the two)
            outside = np.ones(problem.positions, dtype=bool)
            for a, b in c.state_groups:
                outside[a: b + 1] = False
            floor[outside] -= c.nbytes
            state_floor[~outside] += min(c.nbytes, c.mem_bytes)
            floor[~outside] += min(c.nbytes, c.mem_bytes) - c.nbytes
            continue
        floor[c.prod: c.last_before_gap + 1] += c.mem_bytes
        floor[c.first_after_gap: c.last_read + 1] += c.mem_bytes
        for a, b in c.inner:  # paged, it can be dropped between these readers
            floor[a + 1: b] -= c.mem_bytes
    p = int(floor.argmax())
    floor_bytes = int(floor[p])
    largest, largest_op = 0, ""
    for op in graph.ops:
        roots = {graph.storage_root(x) for x in op.inputs + op.outputs if x}
        size = sum(graph.tensors[r].alloc_bytes for r in roots if not graph.tensors[r].kind.is_persistent) \
            + op.workspace_bytes
        if size > largest:
            largest, largest_op = size, f"{op.op_type} {op.name}"
    op = graph.ops[p]
    ram = Budget.smallest_for(floor_bytes, problem.fixed_bytes).ram_bytes
    # what it holds there: the largest tensor the op reads or writes (a weight, for instance), and the
    # state no decision can drop there
    sizes = {}
    for x in op.inputs + op.outputs:
        if x:
            r = graph.storage_root(x)
            sizes[r] = graph.tensors[r].nbytes
    largest_tensor = max(sorted(sizes), key=lambda r: sizes[r], default="")
    return LowerBound(ram, problem.fixed_bytes, floor_bytes, p, f"{op.op_type} {op.name}", largest, largest_op,
                      largest_tensor, sizes.get(largest_tensor, 0), int(state_floor[p]))


def check_budget(problem: Problem, budget: Budget) -> LowerBound:
    """The lower bound; InfeasibleError when the budget is below it (before any solving)."""
    bound = lower_bound(problem)
    if budget.ram_bytes < bound.ram_bytes:
        raise InfeasibleError(
            f"budget {format_size(budget.ram_bytes)} is below the lower bound {format_size(bound.ram_bytes)} set by "
            f"{bound.set_by!r} (position {bound.position}): fixed state {format_size(bound.fixed_bytes)} plus "
            f"{format_size(bound.floor_activation_bytes)} of tensors no schedule can drop there"
            + (f" (of which {format_size(bound.floor_state_bytes)} of parameters and optimizer moments the op reads)"
               if bound.floor_state_bytes else "")
            + (f"; its largest tensor is {bound.largest_tensor!r} ({format_size(bound.largest_tensor_bytes)})"
               if bound.largest_tensor else "")
            + f", plus the planning reserve ({RESERVE_FRACTION:.1%} of the activation budget and "
            f"{RESERVE_BYTES // 1024} KiB); the smallest budget that can work is {format_size(bound.ram_bytes)}",
            hint=f"try --ram {math.ceil(bound.ram_bytes / 1e4) / 100:.2f}MB")
    return bound


# ---------------------------------------------------------------------------------------------------
# planning


@dataclass
class Plan:
    """The outcome of planning one problem under one budget and deadline."""

    problem: Problem
    budget: Budget
    limits: Limits
    deadline_s: float
    bound: LowerBound
    keep_all: SimResult  # every decidable tensor kept, one step per op (the problem's own simulation)
    result: StrategyResult  # the chosen strategy
    baselines: dict[str, StrategyResult] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.result.fits


def limits_for(problem: Problem, budget: Budget, deadline: Deadline, flash_bytes: float,
               objective: str = "energy") -> tuple[Limits, float]:
    """(Limits, deadline in seconds); InfeasibleError when the deadline is below keep-all's step time."""
    from .ir.fused import state_directory_bytes
    state_dir = state_directory_bytes(problem.graph)
    if state_dir and flash_bytes < state_dir:
        raise InfeasibleError(f"the flash ({format_size(int(flash_bytes))}) cannot hold the state directory: two "
                              f"generations of the parameters and optimizer state need {format_size(state_dir)}",
                              hint="give more flash (--flash) or use --optimizer-mode unfused")
    flash_bytes = flash_bytes - state_dir  # what is left for Spill files
    deadline_s = deadline.resolve(problem.base_time_s)
    overhead = deadline_s - problem.base_time_s
    if overhead < 0:
        raise InfeasibleError(f"deadline {deadline} is below the keep-all step time {problem.base_time_s:.4g} s: "
                              f"no schedule can meet it",
                              hint=f"use --deadline of at least {problem.base_time_s:.4g}s, or a factor of "
                              f"keep-all such as 1.3x")
    return Limits.of(budget, overhead, flash_bytes, objective), deadline_s


def plan(problem: Problem, budget: Budget, deadline: Deadline, *, flash_bytes: float, objective: str = "energy",
         strategy: str = "poet", baselines: tuple[str, ...] = BASELINES, time_limit_s: float = 120.0,
         baseline_time_limit_s: float | None = None, seed: int = 0, threads: int = 1, solver: str = "highs",
         check: bool = True, progress: Callable[[str], None] | None = None, overlap=None) -> Plan:
    """Run `strategy` and `baselines` (each once; the chosen one is not repeated) on `problem`.
    `overlap` (poetc.overlap.OverlapCosts): the MILPs may make transfers asynchronous (issue #19).

    With `check`, a budget below the lower bound raises InfeasibleError before any solving; without,
    the strategies run anyway (and find nothing that fits). Baselines get `baseline_time_limit_s`
    (default: a quarter of `time_limit_s`, at least 5 s)."""
    from .solver.strategies import run_strategy
    say = progress or (lambda phase: None)
    bound = check_budget(problem, budget) if check else lower_bound(problem)
    limits, deadline_s = limits_for(problem, budget, deadline, flash_bytes, objective)
    if overlap is not None:
        limits = dataclasses.replace(limits, overlap=overlap)
    if baseline_time_limit_s is None:
        baseline_time_limit_s = max(time_limit_s / 4, 5)
    say(f"solving ({strategy})")
    main = run_strategy(problem, limits, strategy, time_limit_s=time_limit_s, seed=seed, threads=threads,
                        solver=solver)
    others = {}
    for name in baselines:
        if name == strategy:
            continue
        say(f"baseline {name}")
        others[name] = run_strategy(problem, limits, name, time_limit_s=baseline_time_limit_s, seed=seed,
                                    threads=threads, solver=solver)
    return Plan(problem, budget, limits, deadline_s, bound, problem.keep_all, main, others)


def add_baselines(chosen: Plan, baselines: tuple[str, ...], *, time_limit_s: float, seed: int = 0,
                  threads: int = 1, solver: str = "highs", progress: Callable[[str], None] | None = None) -> Plan:
    """Run `baselines` (each once; not the chosen strategy) on a plan's problem and limits."""
    from .solver.strategies import run_strategy
    say = progress or (lambda phase: None)
    for name in baselines:
        if name == chosen.result.strategy or name in chosen.baselines:
            continue
        say(f"baseline {name}")
        chosen.baselines[name] = run_strategy(chosen.problem, chosen.limits, name, time_limit_s=time_limit_s,
                                              seed=seed, threads=threads, solver=solver)
    return chosen


# ---------------------------------------------------------------------------------------------------
# the optimizer mode (fused: each parameter's update inside the step, poetc/ir/fused.py)

OPTIMIZER_MODES = ("auto", "fused", "unfused")


def _overhead(p: Plan, objective: str) -> float:
    return p.result.overhead_energy_j if objective == "energy" else p.result.overhead_time_s


def choose_optimizer_mode(mode: str, objective: str, plan_unfused: Callable[[], Plan],
                          plan_fused: Callable[[], Plan]) -> tuple[str, Plan, str]:
    """(mode used, its plan, why). "unfused"/"fused" plan that mode (InfeasibleError propagates).
    "auto": unfused unless it cannot fit (below its lower bound, deadline, or no schedule) where fused
    does, or fused has a lower overhead; fused is not planned when unfused fits with no overhead."""
    if mode not in OPTIMIZER_MODES:
        from .errors import UsageError
        raise UsageError(f"unknown optimizer mode {mode!r}", hint=f"modes: {', '.join(OPTIMIZER_MODES)}")
    if mode == "unfused":
        return "unfused", plan_unfused(), "requested (--optimizer-mode unfused)"
    if mode == "fused":
        return "fused", plan_fused(), "requested (--optimizer-mode fused)"
    try:
        unfused = plan_unfused()
    except InfeasibleError:
        unfused = None
    if unfused is not None and unfused.fits and _overhead(unfused, objective) <= 0:
        return "unfused", unfused, "auto: unfused fits with no overhead"
    try:
        fused = plan_fused()
    except InfeasibleError:
        if unfused is None:
            raise  # the fused mode's requirement is the smaller one: report it
        return "unfused", unfused, "auto: the fused mode does not fit either"
    if unfused is None:
        return "fused", fused, "auto: unfused is below its lower bound or misses the deadline; fused plans"
    if fused.fits and not unfused.fits:
        return "fused", fused, "auto: no unfused schedule fits; a fused one does"
    if fused.fits and _overhead(fused, objective) < _overhead(unfused, objective):
        return "fused", fused, f"auto: fused lowers the {objective} overhead"
    return "unfused", unfused, f"auto: fused does not lower the {objective} overhead"


__all__ = ["BASELINES", "Budget", "Limits", "LowerBound", "OPTIMIZER_MODES", "Plan", "RESERVE_BYTES",
           "RESERVE_FRACTION", "STRATEGIES", "add_baselines", "check_budget", "choose_optimizer_mode", "limits_for",
           "lower_bound", "plan"]
