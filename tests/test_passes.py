"""Rewrite passes: structure (golden files), numerics (ONNX Runtime before and after), validity.

Every rewrite gets three tests (STYLE.md):

1. structure: the rewritten graph's node list (name and `onnx.printer` text of each node, plus the
   opset imports) against `tests/golden/passes/<case>.txt`; a mismatch prints before, after, expected
   and a diff; `pytest --update-golden` rewrites the goldens. Goldens hold structure only, never sizes.
2. numerics: three AdamW steps in ONNX Runtime (poetc's session contract, seeded inputs) on the
   original training model and on the rewritten one give bitwise-identical losses and parameters.
3. validity: `onnx.checker` accepts the rewritten model; `poetc.schedule.simulate` replays the
   schedule's steps without reading a tensor that is not resident (never produced, or already freed)
   and its peak is within the budget; and the rewritten node list is the schedule's step list, step for
   step (same op, same reads, same writes, same order).

Schedules come from rules over the IR (`graph.saved_activations()`, `graph.decidable_tensors()`, no
tensor names) through
`Schedule.from_decisions`, or from `poetc.api.compile_model` with a strategy (slow: each compile imports
and lowers the model again).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from poetc.api import CompileOptions, compile_model, rewrite
from poetc.ir.graph import TrainGraph
from poetc.ir.lower import load_artifacts
from poetc.passes import (AsyncPaging, Cleanup, DropUnreadOutputs, InsertRecompute, InsertSpillRestore, InsertStateIO,
                          OrderNodes, PassContext, PassError, PassManager, default_pipeline)
from poetc.runtime.contract import SPILL_DOMAIN, make_restore_node_spec, make_spill_node_spec
from poetc.schedule import Decision, Schedule, ScheduleError, StepKind, fixed_state_bytes, simulate, simulate_keep_all

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MLP = ROOT / "examples" / "mlp.onnx"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "passes"
TRAIN_STEPS = 3
ARTIFACT_COPIES = ("eval_model.onnx", "optimizer_model.onnx", "checkpoint")

PASSES = {p.name: p for p in (InsertRecompute, InsertSpillRestore, InsertStateIO, DropUnreadOutputs, OrderNodes, AsyncPaging,
                               Cleanup)}
DEFAULT_ORDER = [p.name for p in default_pipeline()]

# case -> (schedule rule, passes run in that order; "default" = the pipeline poetc.api.rewrite runs)
CASES = {
    "insert-recompute": ("remat", ("insert-recompute",)),
    "insert-spill-restore": ("paging", ("insert-spill-restore",)),
    "order-nodes": ("remat", ("insert-recompute", "order-nodes")),
    "cleanup": ("paging", ("insert-spill-restore", "order-nodes", "cleanup")),
    "default-pipeline": ("mixed", "default"),
}


# ---------------------------------------------------------------------------------------------------
# schedules by rule


def rule_decisions(graph: TrainGraph, rule: str) -> dict[str, Decision]:
    """Decisions over the saved activations in producer order.

    remat: recompute every other one (the first, third, ...), keep the rest;
    paging: page all of them;
    mixed: recompute the first, third, ..., page the second, fourth, ... On the MLP this recomputes a
    ReLU from a ReLU that is paged (the recompute reads a restored tensor) and pages one of the two
    outputs of the loss op;
    gradients: over the gradients read across a gap (`graph.decidable_tensors()`), recompute the
    first, third, ... (a backward op reruns, reading a gradient kept alive for it), page the others
    (the MLP has none: see test_gradient_decisions_on_a_residual_block).
    """
    if rule == "gradients":
        held = [h.name for h in graph.decidable_tensors() if h.gradient]
        return {name: Decision.RECOMPUTE if i % 2 == 0 else Decision.PAGE for i, name in enumerate(held)}
    saved = graph.saved_activations()
    if rule == "remat":
        return {t.name: Decision.RECOMPUTE for t in saved[::2]}
    if rule == "paging":
        return {t.name: Decision.PAGE for t in saved}
    if rule == "mixed":
        return {t.name: Decision.RECOMPUTE if i % 2 == 0 else Decision.PAGE for i, t in enumerate(saved)}
    raise ValueError(rule)


def rule_schedule(graph: TrainGraph, rule: str) -> Schedule:
    schedule = Schedule.from_decisions(graph, rule_decisions(graph, rule), f"rule:{rule}")
    kinds = {s.kind for s in schedule.steps}
    if rule in ("remat", "mixed", "gradients"):
        assert StepKind.RECOMPUTE in kinds, f"rule {rule} recomputes nothing on this graph"
    if rule in ("paging", "mixed", "gradients"):
        assert StepKind.PAGE_IN in kinds, f"rule {rule} pages nothing on this graph"
    return schedule


# ---------------------------------------------------------------------------------------------------
# running passes


def run_passes(graph: TrainGraph, schedule: Schedule, names) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    """Run the named passes on a fresh copy of the graph. Returns (model before the last pass, model
    after it, the pass manager's records)."""
    if names == "default":
        options = CompileOptions(ram_bytes=0, out_dir=Path("unused"))
        model, records = rewrite(graph, schedule, options, Path("unused-dumps"))
        return graph.model, model, records
    ctx = PassContext(graph, schedule, gs.import_onnx(graph.model))
    before = PassManager([PASSES[n]() for n in names[:-1]]).run(ctx)
    last = PassManager([PASSES[names[-1]]()])
    after = last.run(ctx)
    return before, after, last.records


def completed(names) -> tuple[str, ...] | str:
    """The case's passes followed by the default-pipeline passes after its last one: the case's
    rewrite made executable (topologically ordered, checked)."""
    if names == "default":
        return names
    rest = DEFAULT_ORDER[DEFAULT_ORDER.index(names[-1]) + 1:]
    return tuple(names) + tuple(rest)


# ---------------------------------------------------------------------------------------------------
# structure


def graph_text(model: onnx.ModelProto) -> str:
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in sorted(model.opset_import, key=lambda o: o.domain))
    lines = [f"opset_import: {opsets}"]
    lines += [f"{n.name} :: {node_text(n)}" for n in model.graph.node]
    return "\n".join(lines) + "\n"


def node_text(node: onnx.NodeProto) -> str:
    """`outputs = domain.Op <attributes> (inputs)` on one line (onnx.printer prints graphs, not nodes)."""
    text = onnx.printer.to_text(onnx.helper.make_graph([node], "node", [], []))
    return " ".join(text[text.index("{") + 1:text.rindex("}")].split())


def check_golden(name: str, header: str, before: str, after: str, update: bool) -> None:
    path = GOLDEN_DIR / f"{name}.txt"
    text = "".join(f"# {line}\n" for line in header.splitlines()) + after
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; create it with `pytest tests/test_passes.py --update-golden` "
                    f"and review it.\nafter:\n{after}")
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"expected ({path.name})", "after"))
        pytest.fail(f"rewritten graph differs from {path}\n\n--- before ---\n{before}\n--- after ---\n{after}\n"
                    f"--- expected ---\n{expected}\n--- diff expected -> after ---\n{diff}\n"
                    f"if the change is intended: pytest tests/test_passes.py --update-golden")


# ---------------------------------------------------------------------------------------------------
# numerics


def user_feeds(graph: TrainGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, class labels in [0, classes)."""
    rng = np.random.default_rng(seed)
    classes = next(graph.tensors[op.inputs[0]].shape[1] for op in graph.ops if op.op_type.startswith("SoftmaxCrossEntropyLoss"))
    feeds = {}
    for name in sorted(graph.user_inputs):
        t = graph.tensors[name]
        if name == "lazy_reset_grad":
            continue
        if t.dtype_name in ("float", "double"):
            feeds[name] = rng.standard_normal(t.shape).astype(np.float32 if t.dtype_name == "float" else np.float64)
        else:
            feeds[name] = rng.integers(0, classes, t.shape).astype(np.int64 if t.dtype_name == "int64" else np.int32)
    return feeds


def train_in_ort(artifacts: Path, feeds: dict, spill_library: Path | None = None) -> tuple[list[float], dict]:
    from poetc.runtime.session import open_training
    session = open_training(artifacts, spill_library)
    losses = [session.step(feeds) for _ in range(TRAIN_STEPS)]
    params = session.parameters()
    del session
    return losses, params


def with_training_model(directory: Path, artifacts: Path, model: onnx.ModelProto) -> Path:
    directory.mkdir(parents=True)
    for name in ARTIFACT_COPIES:
        os.symlink((artifacts / name).resolve(), directory / name)
    onnx.save(model, str(directory / "training_model.onnx"))
    return directory


def assert_same_training(reference: tuple[list[float], dict], rewritten: tuple[list[float], dict]) -> None:
    (ref_losses, ref_params), (losses, params) = reference, rewritten
    assert losses == ref_losses, f"losses differ: reference {ref_losses}, rewritten {losses}"
    assert sorted(params) == sorted(ref_params)
    differing = {}
    for name, ref in ref_params.items():
        if ref.dtype != params[name].dtype or ref.shape != params[name].shape or ref.tobytes() != params[name].tobytes():
            differing[name] = float(np.max(np.abs(ref.astype(np.float64) - params[name].astype(np.float64))))
    assert not differing, f"parameters not bitwise identical after {TRAIN_STEPS} steps (max abs diff): {differing}"


def needs_spill_library(model: onnx.ModelProto) -> bool:
    return any(n.domain == SPILL_DOMAIN for n in model.graph.node)


# ---------------------------------------------------------------------------------------------------
# validity


def assert_valid(graph: TrainGraph, schedule: Schedule, model: onnx.ModelProto, budget_bytes: int) -> None:
    """checker, simulator (resident reads, peak within budget_bytes of activations) and node order ==
    step list."""
    check_model(model)
    sim = simulate(graph, schedule.steps, schedule.origin)  # raises ScheduleError on a non-resident read
    assert sim.peak_bytes <= budget_bytes, f"simulated activation peak {sim.peak_bytes} > budget {budget_bytes}"
    assert_nodes_are_steps(graph, schedule, model)


UNREGISTERED_DOMAIN = "poetc.test.unregistered"


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model on a copy in which default-domain ops ONNX has no schema for are moved
    to a private domain: ORT registers some gradient ops (MaxPoolGrad, ...) in the default domain, and
    the checker rejects those in the unrewritten training graph too. Everything else (topological
    order, single assignment, every standard op's schema) is checked."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    moved = False
    for node in copy.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            node.domain, moved = UNREGISTERED_DOMAIN, True
    if moved:
        copy.opset_import.append(onnx.helper.make_opsetid(UNREGISTERED_DOMAIN, 1))
    onnx.checker.check_model(copy)


def assert_nodes_are_steps(graph: TrainGraph, schedule: Schedule, model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node)
    constants = 0
    while constants < len(nodes) and nodes[constants].op_type == "Constant":
        constants += 1
    nodes = nodes[constants:]
    read_anywhere = {x for step in schedule.steps for x in step.reads} | {o.name for o in model.graph.output}
    assert len(nodes) == len(schedule.steps), \
        f"{len(nodes)} non-Constant nodes for {len(schedule.steps)} schedule steps"
    for i, (node, step) in enumerate(zip(nodes, schedule.steps)):
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            op = graph.ops[step.op]
            expected = (op.domain, op.op_type)
        elif step.kind is StepKind.PAGE_OUT:
            expected = (SPILL_DOMAIN, make_spill_node_spec(graph.tensors[step.tensor].dtype)[0])
        else:
            expected = (SPILL_DOMAIN, make_restore_node_spec(graph.tensors[step.tensor].dtype)[0])
        where = f"node {constants + i} {node.name!r} vs step {i} {step.to_json()}"
        assert (node.domain, node.op_type) == expected, where
        assert list(node.input) == list(step.reads), where
        # drop-unread-outputs leaves out optional outputs no step reads (ORT would hold them to the end)
        written = [o for o in node.output if o]
        assert written == [w for w in step.writes if w in written], where
        assert not {w for w in step.writes if w not in written} & read_anywhere, where


def keep_all_peak_bytes(graph: TrainGraph) -> int:
    return simulate_keep_all(graph).peak_bytes


# ---------------------------------------------------------------------------------------------------
# fixtures


def import_in_fresh_process(model_path: Path, work_dir: Path) -> tuple[Path, TrainGraph]:
    """Import `model_path` (poetc.importer, default options) in a new Python process and lower the
    artifacts here. onnxruntime-training names the loss op's tensors with a per-process counter
    (`onnx::loss::2` in a fresh process, `onnx::loss::8` after a few imports), so an in-process import
    would make the goldens depend on which tests ran before."""
    code = ("import sys; from pathlib import Path; from poetc.importer import ImportOptions, import_model; "
            "print(import_model(Path(sys.argv[1]), Path(sys.argv[2]), ImportOptions()))")
    proc = subprocess.run([sys.executable, "-c", code, str(model_path), str(work_dir)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, f"importing {model_path} failed:\n{proc.stderr[-3000:]}"
    artifacts = Path(proc.stdout.strip().splitlines()[-1])
    return artifacts, load_artifacts(artifacts)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, TrainGraph]:
    """examples/mlp.onnx (MLP 784-512-512-512-10, batch 512) imported and lowered."""
    if not EXAMPLE_MLP.exists():
        pytest.skip(f"bundled example {EXAMPLE_MLP} is missing")
    return import_in_fresh_process(EXAMPLE_MLP, tmp_path_factory.mktemp("mlp-passes"))


@pytest.fixture(scope="module")
def mlp_feeds(mlp) -> dict[str, np.ndarray]:
    return user_feeds(mlp[1])


@pytest.fixture(scope="module")
def mlp_reference(mlp, mlp_feeds):
    """Losses and parameters of the training model onnxruntime-training wrote (before any rewrite)."""
    return train_in_ort(mlp[0], mlp_feeds)



@pytest.fixture
def spill_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "spill"
    d.mkdir()
    d.chmod(0o700)  # the ops refuse a spill directory other users can reach
    monkeypatch.setenv("POETC_SPILL_DIR", str(d))  # read when the Spill kernels are created
    return d


def train_rewritten(tmp_path: Path, artifacts: Path, model: onnx.ModelProto, feeds: dict,
                    request, spill_dir_name: str = "spill_dir"):
    """Train the rewritten model; resolves the spill library (or skips) only when it pages."""
    library = None
    if needs_spill_library(model):
        library = request.getfixturevalue("spill_lib")
        spill = request.getfixturevalue(spill_dir_name)
    run_dir = with_training_model(tmp_path / "rewritten", artifacts, model)
    result = train_in_ort(run_dir, feeds, library)
    if library is not None:
        assert not list(spill.iterdir()), f"spill files left behind: {sorted(p.name for p in spill.iterdir())}"
    return result


# ---------------------------------------------------------------------------------------------------
# 1. structure


@pytest.mark.parametrize("case", list(CASES))
def test_structure_matches_golden(mlp, case, update_golden):
    _, graph = mlp
    rule, names = CASES[case]
    schedule = rule_schedule(graph, rule)
    before, after, records = run_passes(graph, schedule, names)
    passes = ", ".join(DEFAULT_ORDER if names == "default" else names)
    header = (f"{case}: examples/mlp.onnx, schedule rule {rule!r} ({schedule.counts()}), passes: {passes}\n"
              f"refresh: python3 -m pytest tests/test_passes.py --update-golden")
    check_golden(case, header, graph_text(before), graph_text(after), update_golden)


def test_pass_results_report_their_changes(mlp):
    """Each pass says whether it changed the graph, with counts that match the schedule."""
    _, graph = mlp
    schedule = rule_schedule(graph, "mixed")
    recomputes = sum(s.kind is StepKind.RECOMPUTE for s in schedule.steps)
    spills = sum(s.kind is StepKind.PAGE_OUT for s in schedule.steps)
    restores = sum(s.kind is StepKind.PAGE_IN for s in schedule.steps)
    _, _, records = run_passes(graph, schedule, "default")
    by_name = {r["name"]: r for r in records}
    assert [r["name"] for r in records] == DEFAULT_ORDER
    assert by_name["insert-recompute"]["modified"] and by_name["insert-recompute"]["stats"]["recompute_nodes"] == recomputes
    stats = by_name["insert-spill-restore"]["stats"]
    assert by_name["insert-spill-restore"]["modified"] and (stats["spill_nodes"], stats["restore_nodes"]) == (spills, restores)
    assert by_name["order-nodes"]["modified"]
    assert not by_name["cleanup"]["modified"]

    keep = Schedule.from_decisions(graph, {}, "keep-all")
    _, after, records = run_passes(graph, keep, "default")
    assert not any(r["modified"] for r in records), records
    assert graph_text(after).split("\n", 1)[1] == graph_text(graph.model).split("\n", 1)[1]


# ---------------------------------------------------------------------------------------------------
# 2. numerics


@pytest.mark.parametrize("case", list(CASES))
def test_numerics_identical_in_ort(mlp, mlp_feeds, mlp_reference, case, tmp_path, request):
    """The graph right after the case's passes (ORT sorts a graph whose new nodes are appended)."""
    artifacts, graph = mlp
    rule, names = CASES[case]
    _, after, _ = run_passes(graph, rule_schedule(graph, rule), names)
    assert_same_training(mlp_reference, train_rewritten(tmp_path, artifacts, after, mlp_feeds, request))


# ---------------------------------------------------------------------------------------------------
# 3. validity


@pytest.mark.parametrize("case", list(CASES))
def test_validity(mlp, case):
    """checker, simulator and step order on the case's rewrite completed by the rest of the default
    pipeline; the budget is keep-all's activation peak (these rules only ever save memory)."""
    _, graph = mlp
    rule, names = CASES[case]
    schedule = rule_schedule(graph, rule)
    _, after, _ = run_passes(graph, schedule, completed(names))
    assert_valid(graph, schedule, after, keep_all_peak_bytes(graph))


def all_decision_combinations(graph: TrainGraph):
    saved = [t.name for t in graph.saved_activations()]
    for combo in itertools.product(list(Decision), repeat=len(saved)):
        yield dict(zip(saved, combo))


def test_every_decision_combination_rewrites_validly(mlp):
    """All 3^n keep/recompute/page combinations over the MLP's saved activations: the default pipeline
    succeeds and gives a checked graph whose node list is the schedule's step list."""
    _, graph = mlp
    combos = list(all_decision_combinations(graph))
    assert len(combos) <= 3 ** 6, "graph too large for an exhaustive test"
    for decisions in combos:
        schedule = Schedule.from_decisions(graph, decisions, "exhaustive")
        try:
            _, after, _ = run_passes(graph, schedule, "default")
            check_model(after)
            simulate(graph, schedule.steps, schedule.origin)
            assert_nodes_are_steps(graph, schedule, after)
        except Exception as exc:
            raise AssertionError(f"decisions {json.dumps({k: v.value for k, v in decisions.items()})}: {exc}") from exc


def test_simulator_rejects_reads_of_absent_tensors(mlp):
    """The validity check has teeth. simulate frees a buffer after the last step that reads it, so a
    read after a free or before a regeneration is a read of a non-resident tensor: a Restore moved after
    its readers, or a recompute moved after its first reader, raises ScheduleError."""
    _, graph = mlp
    schedule = rule_schedule(graph, "mixed")
    steps = list(schedule.steps)
    for kind in (StepKind.PAGE_IN, StepKind.RECOMPUTE):
        i = next(i for i, s in enumerate(steps) if s.kind is kind)
        reader = next(j for j in range(i + 1, len(steps)) if set(steps[i].writes) & set(steps[j].reads))
        moved = steps[:i] + steps[i + 1:reader + 1] + [steps[i]] + steps[reader + 1:]
        with pytest.raises(ScheduleError, match="not resident"):
            simulate(graph, moved, schedule.origin)


def test_rewrite_leaves_the_ir_model_alone(mlp):
    """Passes work on a graph-surgeon copy: the TrainGraph's model (shared by later rewrites) is untouched."""
    _, graph = mlp
    original = graph.model.SerializeToString()
    for rule in ("remat", "paging", "mixed"):
        run_passes(graph, rule_schedule(graph, rule), "default")
        assert graph.model.SerializeToString() == original, f"rewriting rule {rule} changed graph.model"
    _, after, _ = run_passes(graph, rule_schedule(graph, "remat"), "default")
    assert all(o.domain != SPILL_DOMAIN for o in after.opset_import), "a schedule without paging imports the poet domain"


def test_cleanup_rejects_out_of_order_and_duplicate_nodes(mlp):
    _, graph = mlp
    schedule = rule_schedule(graph, "remat")
    ctx = PassContext(graph, schedule, gs.import_onnx(graph.model))
    ctx.gs_graph.nodes = list(reversed(ctx.gs_graph.nodes))
    with pytest.raises(PassError, match=r"pass cleanup failed \(passes run before it: none\).*before any node produces it"):
        PassManager([Cleanup()]).run(ctx)

    ctx = PassContext(graph, schedule, gs.import_onnx(graph.model))
    ctx.gs_graph.nodes[1].name = ctx.gs_graph.nodes[0].name
    with pytest.raises(PassError, match="duplicate node names"):
        PassManager([Cleanup()]).run(ctx)


# ---------------------------------------------------------------------------------------------------
# slow: every combination in ORT, schedules from the solver, a CNN


@pytest.mark.slow
def test_every_decision_combination_trains_identically(mlp, mlp_feeds, mlp_reference, tmp_path, request):
    artifacts, graph = mlp
    for k, decisions in enumerate(all_decision_combinations(graph)):
        schedule = Schedule.from_decisions(graph, decisions, "exhaustive")
        _, after, _ = run_passes(graph, schedule, "default")
        try:
            assert_same_training(mlp_reference, train_rewritten(tmp_path / str(k), artifacts, after, mlp_feeds, request))
        except AssertionError as exc:
            raise AssertionError(f"decisions {json.dumps({n: d.value for n, d in decisions.items()})}: {exc}") from exc
        for p in request.getfixturevalue("spill_dir").iterdir():
            p.unlink()


@pytest.fixture(scope="module")
def mlp_budget_bytes(mlp) -> int:
    """A RAM budget 60% of the way from the lower bound up to keep-all's total peak."""
    from poetc.plan import Budget, lower_bound
    from poetc.solver import build_problem
    from test_lower_bound import zero_costs
    _, graph = mlp
    problem = build_problem(graph, zero_costs(graph))
    bound = lower_bound(problem).ram_bytes
    keep_all = Budget.smallest_for(problem.keep_all_peak_bytes, problem.fixed_bytes).ram_bytes
    return bound + (keep_all - bound) * 6 // 10


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["remat-only", "paging-only", "poet"])
def test_compiled_schedule(mlp_feeds, mlp_budget_bytes, strategy, tmp_path, request):
    """compile_model end to end: the written training model trains like reference/ and is the written
    schedule, node for node; the schedule fits the budget in the simulator."""
    out = tmp_path / "out"
    options = CompileOptions(ram_bytes=mlp_budget_bytes, out_dir=out, strategy=strategy, baselines=(),
                             time_limit_s=30, optimizer_mode="unfused")  # the budget is the unfused graph's
    compile_model(EXAMPLE_MLP, options)  # above the lower bound with a 1.3x deadline: every strategy must fit
    reference_dir = with_training_model(tmp_path / "reference", out, onnx.load(str(out / "reference" / "training_model.onnx")))
    graph = load_artifacts(reference_dir)  # the graph compile scheduled (tensor names depend on the process)
    doc = json.loads((out / "schedule.json").read_text())
    schedule = Schedule.from_decisions(graph, {k: Decision(v) for k, v in doc["decisions"].items()}, strategy)
    assert doc["graph_fingerprint"] == schedule.graph_fingerprint, "compile lowered a different graph"
    assert doc["steps"] == [s.to_json() for s in schedule.steps]
    wanted = {"remat-only": Decision.RECOMPUTE, "paging-only": Decision.PAGE}.get(strategy)
    assert schedule.decisions and (wanted is None or set(schedule.decisions.values()) == {wanted}), doc["decisions"]

    model = onnx.load(str(out / "training_model.onnx"))
    from poetc.plan import Budget
    assert_valid(graph, schedule, model, Budget.from_ram(mlp_budget_bytes, sum(fixed_state_bytes(graph).values())).activation_bytes)

    library = out / "libpoet_spill.so"
    if needs_spill_library(model):
        if not library.exists():
            pytest.skip(f"compile could not build the Spill/Restore library: {json.loads((out / 'report.json').read_text())['native_libraries']}")
        request.getfixturevalue("spill_dir")
    reference = train_in_ort(reference_dir, mlp_feeds)
    assert_same_training(reference, train_in_ort(out, mlp_feeds, library if library.exists() else None))


@pytest.mark.slow
def test_default_pipeline_on_cnn(cnn_onnx, tmp_path, request, update_golden):
    """Conv + BatchNorm (training mode) + MaxPool + Flatten: the mixed rule through the default pipeline."""
    artifacts, graph = import_in_fresh_process(cnn_onnx, tmp_path / "cnn")
    schedule = rule_schedule(graph, "mixed")
    before, after, _ = run_passes(graph, schedule, "default")
    check_golden("default-pipeline-cnn", f"default-pipeline: models cnn (batch 8, seed 0), schedule rule 'mixed' "
                 f"({schedule.counts()})\nrefresh: python3 -m pytest tests/test_passes.py -m slow --update-golden",
                 graph_text(before), graph_text(after), update_golden)
    assert_valid(graph, schedule, after, keep_all_peak_bytes(graph))
    feeds = user_feeds(graph)
    assert_same_training(train_in_ort(artifacts, feeds),
                         train_rewritten(tmp_path, artifacts, after, feeds, request))


# ---------------------------------------------------------------------------------------------------
# decisions about gradients (the MLP has no gradient worth deciding about: its gradients' readers are
# separated only by in-place accumulators)


@pytest.fixture(scope="module")
def residual(tmp_path_factory) -> tuple[Path, TrainGraph]:
    """The tiny residual block of benchmarks.poet_reference (Gemm, Relu, Gemm, Relu, Gemm + skip, head):
    the skip's gradient is read on both sides of the block's backward pass."""
    from benchmarks.poet_reference import tiny_onnx
    work = tmp_path_factory.mktemp("residual-passes")
    return import_in_fresh_process(tiny_onnx("residual", work / "model.onnx", layers=2), work / "import")


@pytest.mark.parametrize("rule", ["gradients", "gradients-paged", "mixed"])
def test_gradient_decisions_on_a_residual_block(residual, rule, tmp_path, request, update_golden):
    """A recomputed gradient (its backward op reruns, reading a gradient kept alive for it) or a paged
    one (spilled after a backward op), alone and mixed with decisions about activations: golden
    structure, bitwise-identical training in ONNX Runtime, a valid rewrite."""
    artifacts, graph = residual
    decisions = rule_decisions(graph, "gradients")
    assert decisions and Decision.RECOMPUTE in decisions.values(), "no gradient to decide about"
    if rule == "gradients-paged":
        decisions = dict.fromkeys(decisions, Decision.PAGE)
    if rule == "mixed":
        decisions.update(rule_decisions(graph, "mixed"))
    schedule = Schedule.from_decisions(graph, decisions, f"rule:{rule}")
    backward = [s for s in schedule.steps if s.kind is StepKind.RECOMPUTE and graph.ops[s.op].role.value == "backward"
                or s.kind is StepKind.PAGE_OUT and graph.ops[graph.tensors[s.tensor].producer].role.value == "backward"]
    assert backward
    before, after, _ = run_passes(graph, schedule, "default")
    header = (f"residual-{rule}: poet_reference.tiny_onnx('residual', layers=2), schedule rule {rule!r} "
              f"({schedule.counts()}), passes: {', '.join(DEFAULT_ORDER)}\n"
              f"refresh: python3 -m pytest tests/test_passes.py --update-golden")
    check_golden(f"residual-{rule}", header, graph_text(before), graph_text(after), update_golden)
    assert_valid(graph, schedule, after, keep_all_peak_bytes(graph))
    feeds = user_feeds(graph)
    assert_same_training(train_in_ort(artifacts, feeds), train_rewritten(tmp_path, artifacts, after, feeds, request))


def test_paging_a_tensor_in_again_on_a_residual_block(residual, tmp_path, request, update_golden):
    """relu0 is read by fc2's weight gradient and, much later, by its own ReluGrad: paged, it can be
    dropped in between and paged in again (POET's solution at 80% of keep-all). Two Restore nodes from
    one Spill, the first keeping the spill file; the simulator frees the first copy after its reader;
    training is bitwise identical in ONNX Runtime."""
    from poetc.schedule import FRAME_PER_VALUE_BYTES, SPILL_HANDLE_BYTES, StepCosts
    from poetc.solver.problem import build_problem
    artifacts, graph = residual
    n = len(graph.ops)
    problem = build_problem(graph, StepCosts([1e-6] * n, [1e-6] * n, lambda b: (1e-6, 1e-6), lambda b: (1e-6, 1e-6)))
    cand = next(c for c in problem.candidates if c.name == "relu0_out")
    assert cand.inner, "relu0 has no backward readers far apart"
    (a, b), = cand.inner
    plain = Schedule.from_decisions(graph, {"relu0_out": Decision.PAGE}, "rule:page")
    schedule = Schedule.from_decisions(graph, {"relu0_out": Decision.PAGE}, "rule:page-again",
                                       repage_at={"relu0_out": [b]})
    page_ins = [s for s in schedule.steps if s.kind is StepKind.PAGE_IN]
    assert [s.tensor for s in page_ins] == ["relu0_out"] * 2 and page_ins[0].writes != page_ins[1].writes
    # resident over (a, b) only without the second page-in (whose spill handle lives on, and whose second
    # restored copy is one more value of the graph: the execution frame's 24 B for the whole step)
    live = {name: simulate(graph, s.steps, s.origin).live_bytes for name, s in (("plain", plain), ("again", schedule))}
    at = next(i for i, s in enumerate(schedule.steps) if s.kind is StepKind.COMPUTE and a < s.op < b)
    at_plain = next(i for i, s in enumerate(plain.steps) if s.op == schedule.steps[at].op and s.kind is StepKind.COMPUTE)
    assert live["plain"][at_plain] - live["again"][at] == (graph.tensors["relu0_out"].alloc_bytes - SPILL_HANDLE_BYTES
                                                           - FRAME_PER_VALUE_BYTES)
    before, after, _ = run_passes(graph, schedule, "default")
    restores = [n for n in after.graph.node if n.domain == SPILL_DOMAIN and n.op_type.startswith("Restore")]
    keep = [next((x.i for x in n.attribute if x.name == "keep_file"), 0) for n in restores]
    assert keep == [1, 0]
    header = (f"residual-page-again: poet_reference.tiny_onnx('residual', layers=2), relu0 paged and paged in "
              f"again before op {b} ({schedule.counts()}), passes: {', '.join(DEFAULT_ORDER)}\n"
              f"refresh: python3 -m pytest tests/test_passes.py --update-golden")
    check_golden("residual-page-again", header, graph_text(before), graph_text(after), update_golden)
    assert_valid(graph, schedule, after, keep_all_peak_bytes(graph))
    feeds = user_feeds(graph)
    assert_same_training(train_in_ort(artifacts, feeds), train_rewritten(tmp_path, artifacts, after, feeds, request))


def test_drop_unread_outputs_leaves_out_optional_outputs_nobody_reads():
    """A MaxPool's Indices and a ConcatTraining's per_input_length that no node reads are left out
    (ORT would hold them to the end of the run); read ones, graph outputs and required outputs stay."""
    x = gs.Variable("x", np.float32, (1, 2, 4, 4))
    y, mask = gs.Variable("y", np.float32), gs.Variable("mask", np.int64)
    y2, mask2 = gs.Variable("y2", np.float32), gs.Variable("mask2", np.int64)
    cat, lengths = gs.Variable("cat", np.float32), gs.Variable("lengths", np.int64)
    z = gs.Variable("z", np.float32)
    nodes = [gs.Node("MaxPool", "pool", {"kernel_shape": [2, 2]}, [x], [y, mask]),
             gs.Node("MaxPool", "pool2", {"kernel_shape": [2, 2]}, [x], [y2, mask2]),
             gs.Node("ConcatTraining", "cat", {"axis": 1}, [y, y2], [cat, lengths], domain="com.microsoft"),
             gs.Node("Relu", "unread_required", {}, [cat], [z])]
    graph = gs.Graph(nodes, [x], [mask2])
    result = DropUnreadOutputs().run(PassContext(None, None, graph))
    assert [o.name for o in graph.nodes[0].outputs] == ["y"]
    assert [o.name for o in graph.nodes[1].outputs] == ["y2", "mask2"]  # a graph output
    assert [o.name for o in graph.nodes[2].outputs] == ["cat"]
    assert [o.name for o in graph.nodes[3].outputs] == ["z"]
    assert result.stats["dropped"] == 2 and result.stats["unread_required"] == 1
