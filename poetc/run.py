"""Running compiled artifacts: `poetc verify` and `poetc train`, and the pieces they share.

Before anything runs, the output directory is checked against report.json: every artifact's SHA-256
must match what compile recorded (`ArtifactError` otherwise), and the Spill/Restore library is copied
into a private directory and checked there, so the file that is loaded is the file that was checked.
Training inputs come from one seeded generator (`training_feeds`) or a user's `.npz` (`load_data`,
checked against the model's inputs). Measurements run in a worker process (poetc.runtime.measure)
whose files live in a temporary directory removed afterwards.

Nothing here prints or exits; errors are `poetc.errors` types.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import output
from .errors import ArtifactError, InputFileError, OutputError, RuntimeFailure, UsageError
from .plan import Budget
from .report import CompileReport, InputSpec

log = logging.getLogger(__name__)

LIBRARY = "libpoet_spill.so"
TRAINED_CHECKPOINT = "trained_checkpoint"
#: the state directory `poetc train` uses for a paged output when --state is not given
STATE_DIR = "state"
#: where compile writes the initial state (generation 0) of a paged output (poetc.runtime.statedir)
INITIAL_STATE = "initial_state"  # == poetc.runtime.statedir.INITIAL_STATE (run.py does not import it eagerly)
_STATE_HINT = "the state directory stays at its last committed step; nothing was trained on the refused data"


# ---------------------------------------------------------------------------------------------------
# the report and the artifacts


def load_report(out_dir: Path) -> CompileReport:
    path = Path(out_dir) / "report.json"
    if not path.is_file():
        raise InputFileError(f"{out_dir} is not a poetc output directory (no report.json)",
                             hint="pass the directory written by `poetc compile -o DIR`")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON ({exc}); it was damaged after compile",
                            hint="recompile with `poetc compile ... -o DIR --force`") from None
    try:
        return CompileReport.from_json(doc, where=str(path))
    except InputFileError as exc:
        raise ArtifactError(exc.message, hint="recompile with `poetc compile ... -o DIR --force`") from None


def check_artifacts(out_dir: Path, report: CompileReport) -> None:
    """Every file compile recorded in report.json's `artifacts` still has its SHA-256."""
    out_dir = Path(out_dir)
    recorded = report.artifacts
    if not recorded:
        raise ArtifactError(f"{out_dir}/report.json records no artifact hashes (written by a poetc before "
                            f"artifact checks), so its files cannot be checked",
                            hint="recompile with `poetc compile ... -o DIR --force`")
    for rel, digest in sorted(recorded.items()):
        path = out_dir / rel
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{path} is missing (or not a regular file); compile wrote it and report.json "
                                f"records it", hint="recompile with `poetc compile ... -o DIR --force`")
        actual = output.sha256_file(path)
        if actual != digest:
            raise ArtifactError(f"{path} was modified after compile: its SHA-256 is {actual[:16]}..., "
                                f"report.json records {str(digest)[:16]}...; poetc runs only the artifacts it "
                                f"wrote", hint="recompile with `poetc compile ... -o DIR --force`")


def private_library(out_dir: Path, report: CompileReport, into: Path) -> Path | None:
    """Copy the output's Spill/Restore library into the private directory `into` and check the copy's
    SHA-256 against report.json (so the checked file is the loaded file). None if there is none."""
    src = Path(out_dir) / LIBRARY
    digest = report.artifacts.get(LIBRARY)
    if digest is None:
        return None
    dst = Path(into) / LIBRARY
    shutil.copyfile(src, dst)
    if output.sha256_file(dst) != digest:
        raise ArtifactError(f"{src} was modified after compile (SHA-256 differs from report.json); it was "
                            f"not loaded", hint="recompile with `poetc compile ... -o DIR --force`")
    return dst


# ---------------------------------------------------------------------------------------------------
# training inputs


def input_specs(graph) -> dict[str, InputSpec]:
    """The training graph's user inputs (what a step is fed), without ORT's lazy_reset_grad flag."""
    return {n: InputSpec(list(graph.tensors[n].shape), graph.tensors[n].dtype_name)
            for n in graph.user_inputs if n != "lazy_reset_grad"}


def label_classes(graph) -> int | None:
    """Classes of a cross-entropy loss (the range of generated labels), else None."""
    from .ir.graph import Role
    for op in graph.ops:
        if op.role is Role.LOSS and op.op_type.startswith("SoftmaxCrossEntropyLoss"):
            shape = graph.tensors[op.inputs[0]].shape
            return int(shape[1]) if len(shape) > 1 else None
    return None


_NP_DTYPES = {"float": np.float32, "double": np.float64, "float16": np.float16, "bool": np.bool_,
              "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8}


def training_feeds(inputs: dict[str, InputSpec], classes: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """The one seeded input generator for running artifacts: floats ~ N(0, 1), integers (labels) in
    [0, classes), bools 0/1, in name order."""
    from .runtime.feeds import generated_feeds
    return generated_feeds({n: (tuple(s.shape), s.dtype) for n, s in inputs.items()}, classes, seed)


def feed_spec(inputs: dict[str, InputSpec], classes: int | None, seed: int) -> dict:
    """What a worker needs to generate step i's batch as `training_feeds(inputs, classes, [seed, i])`."""
    return {"inputs": {n: [list(s.shape), s.dtype] for n, s in sorted(inputs.items())}, "classes": classes,
            "seed": int(seed)}




def load_data(path: Path, expected: dict[str, InputSpec]) -> dict[str, np.ndarray]:
    """A user's `--data` file: an .npz (no pickled objects) holding every training input with the
    compiled shape and dtype."""
    path = Path(path)
    what = f"--data file {path}"
    if not path.is_file():
        raise InputFileError(f"{what} does not exist" if not path.exists() else f"{what} is not a file",
                             hint="pass an .npz written by numpy.savez with one array per training input")
    hint = "write it with numpy.savez(path, name=array, ...), one numeric array per training input"
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if not magic.startswith(b"PK\x03\x04"):
        kind = "a single .npy array" if magic == b"\x93NUMPY" else "not a NumPy .npz archive"
        raise InputFileError(f"cannot read {what}: it is {kind}", hint=hint)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" not in str(exc).lower() and "object" not in str(exc).lower():
            raise InputFileError(f"cannot read {what}: {' '.join(str(exc).split())[:160]}", hint=hint) from None
        raise InputFileError(f"cannot read {what}: it holds an array of Python objects, which poetc does not "
                             f"load (unpickling can run code)", hint=hint) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputFileError(f"cannot read {what}: a damaged .npz archive ({' '.join(str(exc).split())[:120]})",
                             hint=hint) from None
    missing = sorted(set(expected) - set(data))
    if missing:
        raise InputFileError(f"{what} lacks the training input(s) {missing}; it holds {sorted(data)}",
                             hint=f"save one array per input: {', '.join(sorted(expected))}")
    for name, spec in sorted(expected.items()):
        a, shape, dtype = data[name], tuple(spec.shape), spec.dtype
        want = _NP_DTYPES.get(dtype)
        if a.shape != shape or (want is not None and a.dtype != np.dtype(want)):
            raise InputFileError(f"{what}: input '{name}' is {a.dtype}{list(a.shape)}, the compiled model "
                                 f"takes {np.dtype(want).name if want else dtype}{list(shape)}",
                                 hint="compile for that shape (--batch, --input-shape) or convert the array")
    return {k: data[k] for k in expected}


# ---------------------------------------------------------------------------------------------------
# measuring


def measure_artifacts(artifacts: Path, graph=None, steps: int = 2, feeds=None,
                      spill_library: Path | None = None, spill_dir: Path | None = None,
                      intra_op_threads: int | None = None, workdir: Path | None = None,
                      checkpoint_out: Path | None = None, state_dir: Path | None = None,
                      spec: dict | None = None, keep_generations: bool = False, commit_every: int = 1):
    """Run `steps` training steps in a worker (on `state_dir`: up to step `steps`, see
    poetc.runtime.measure.measure_training). Without `workdir` its files go to a temporary directory
    that is removed before returning (then the returned run's params_npz no longer exists)."""
    from .runtime.measure import MeasurementError, measure_training
    if feeds is None and spec is None:
        feeds = training_feeds(input_specs(graph), label_classes(graph))
    with tempfile.TemporaryDirectory(prefix="poetc-measure-") as tmp:
        try:
            return measure_training(artifacts, feeds, steps=steps, spill_library=spill_library,
                                    spill_dir=spill_dir, intra_op_threads=intra_op_threads,
                                    workdir=workdir if workdir is not None else tmp, checkpoint_out=checkpoint_out,
                                    state_dir=state_dir, feed_spec=spec, keep_generations=keep_generations,
                                    commit_every=commit_every)
        except MeasurementError as exc:
            raise _runtime_failure(exc, _STATE_HINT if state_dir is not None else None) from exc


# ---------------------------------------------------------------------------------------------------
# state directories (poetc.runtime.statedir)


def is_paged(out_dir: Path) -> bool:
    """The compiled training graph reads or writes state with StateRead/StateWrite."""
    from .runtime.statedir import graph_state_ops
    reads, writes = graph_state_ops(Path(out_dir) / "training_model.onnx")
    return bool(reads or writes)


def create_state_dir(out_dir: Path, report: CompileReport, state_dir: Path, library: Path) -> None:
    """A new state directory at step 0 from the compile output: its initial_state (a paged output; the
    tensors are rewritten under a fresh MAC key, so no two runs' files are interchangeable), else the
    fused-optimizer checkpoint (every tensor resident)."""
    from .runtime import statedir
    out_dir = Path(out_dir)
    init = out_dir / INITIAL_STATE
    if statedir.is_state_dir(init):
        with statedir.StateDir.open(init, library=library, lock=False, clean=False) as src:
            if src.generation != 0:
                raise ArtifactError(f"{init} is at step {src.generation}, not the initial state", hint=_RECOMPILE_HINT)
            infos = src.tensors
            tensors = src.read_all()
            meta = src.meta
        meta = {**meta, _MODEL_DIGEST: report.artifacts.get("training_model.onnx", "")}
        statedir.write_initial_state(state_dir, tensors, meta, frozen={n for n, i in infos.items() if i.frozen},
                                     paged={n for n, i in infos.items() if i.paged},
                                     trainable={n for n, i in infos.items() if i.trainable}, library=library)
        return
    if report.optimizer_mode != "fused":
        raise UsageError(f"{out_dir} was compiled with the unfused optimizer: ONNX Runtime's Optimizer holds its "
                         f"moments, so it cannot train on a state directory",
                         hint="recompile with --optimizer-mode fused, or train without --state")
    from .export import _read_checkpoint
    from .ir.fused import is_optimizer_state
    values = _read_checkpoint(out_dir / "checkpoint", artifact=True)
    declared = _read_checkpoint(out_dir / "reference" / "checkpoint", artifact=True)
    trainable = {n for n, (_, t) in declared.items() if t}
    frozen = {n for n, (_, t) in declared.items() if not t and not is_optimizer_state(n)}
    meta = {"source": "checkpoint", _MODEL_DIGEST: report.artifacts.get("training_model.onnx", "")}
    statedir.write_initial_state(state_dir, {n: v for n, (v, _) in values.items()}, meta,
                                 frozen=frozen & set(values), trainable=trainable, library=library)


_RECOMPILE_HINT = "recompile with `poetc compile ... -o DIR --force`"
#: manifest meta of a state directory: the SHA-256 of the training graph it was created for
_MODEL_DIGEST = "training_model_sha256"


def _check_state_matches(out_dir: Path, report: CompileReport, state: Path) -> None:
    from .runtime import statedir
    with statedir.StateDir.open(state, lock=False, clean=False) as s:
        made_for = s.meta.get(_MODEL_DIGEST)
    if made_for and made_for != report.artifacts.get("training_model.onnx"):
        raise UsageError(f"the state directory {state} was created for another compile output (its training graph "
                         f"differs from {out_dir}/training_model.onnx); it was left untouched",
                         hint="train it with the output it was created from, or pass a new --state directory")


def _runtime_failure(exc, hint: str | None = None) -> RuntimeFailure:
    """One paragraph from a MeasurementError: the custom op's or ONNX Runtime's own message without
    the C++ source locations, the Python traceback and the worker's stderr (logged at -v)."""
    text = " ".join(str(exc).split("\n--- worker stderr", 1)[0].split())
    if "Status Message: " in text:
        text = text.rsplit("Status Message: ", 1)[1]
    elif "[ONNXRuntimeError] : " in text:
        text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text.rsplit("[ONNXRuntimeError] : ", 1)[1])
    if getattr(exc, "stderr_tail", ""):
        log.info("worker stderr:\n%s", exc.stderr_tail)
    text = re.sub(r"^(StateError|RuntimeFailure): ", "", text)
    where = "the training step failed" if hint else "the training step failed in ONNX Runtime"
    return RuntimeFailure(f"{where}: {text[:900]}",
                          hint=hint or "the run stopped there: no parameters were saved and the checkpoint is unchanged")


# ---------------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    """What `poetc verify` measured: reference and compiled artifacts trained side by side."""

    steps: int
    numerics_intra_op_threads: int
    losses_reference: list[float]
    losses_compiled: list[float]
    max_abs_loss_diff_default_threads: float
    max_abs_loss_diff: float
    max_rel_loss_diff: float
    max_abs_param_diff: float
    max_rel_param_diff: float
    bitwise_identical_params: bool
    budget: Budget  # the compile's, from report.json
    predicted_step_peak_bytes: int
    measured_step_peak_bytes: list[int]
    steady_state_from_step: int
    reference_step_peak_bytes: list[int]
    measured_total_peak_bytes: int
    within_budget: bool
    prediction_within_3pct_or_1MiB: bool
    step_seconds_reference: list[float]
    step_seconds_compiled: list[float]
    identical_results: bool
    rtol: float = 1e-6

    @property
    def ok(self) -> bool:
        return self.identical_results and self.within_budget

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["budget"] = self.budget.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> VerifyReport:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in doc.items() if k in names}
        d["budget"] = Budget.from_json(d["budget"])
        return cls(**d)

    def failure(self) -> str | None:
        """One paragraph saying what failed, or None."""
        from .units import format_size
        problems = []
        if not self.identical_results:
            problems.append(f"the compiled artifacts train differently from the reference: max relative loss "
                            f"difference {self.max_rel_loss_diff:.3g}, max relative parameter difference "
                            f"{self.max_rel_param_diff:.3g} after {self.steps} steps (tolerance {self.rtol:g})")
        if not self.within_budget:
            problems.append(f"the measured peak {format_size(self.measured_total_peak_bytes)} (fixed state plus "
                            f"the largest steady-state step peak) is above the budget "
                            f"{format_size(self.budget.ram_bytes)}")
        return "verification failed: " + "; and ".join(problems) if problems else None


def verify(out_dir: Path, *, steps: int = 3, data: Path | None = None, rtol: float = 1e-6,
           spill_dir: Path | None = None) -> VerifyReport:
    """Train the reference and the compiled artifacts side by side and compare.

    Numerics come from a run of each with one ORT thread, which is bitwise reproducible (with several
    threads some kernels' reductions depend on thread timing: two runs of the same transformer graph
    differed in the 8th digit of the loss). Memory and step time come from a run of each with ORT's
    default threads, as deployed."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    check_artifacts(out_dir, report)
    feeds = load_data(data, report.inputs) if data else training_feeds(report.inputs, report.label_classes)
    with tempfile.TemporaryDirectory(prefix="poetc-verify-") as work:
        work = Path(work)
        library = private_library(out_dir, report, work)
        ref_dir = work / "reference"
        ref_dir.mkdir()
        for name in ("eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
            src = out_dir / "reference" / name  # a fused-optimizer output keeps ORT's optimizer there
            os.symlink((src if src.exists() else out_dir / name).resolve(), ref_dir / name)
        os.symlink((out_dir / "reference" / "training_model.onnx").resolve(), ref_dir / "training_model.onnx")
        paged = is_paged(out_dir)
        runs = {}
        for key, artifacts, lib, threads in (("ref", ref_dir, None, None), ("comp", out_dir, library, None),
                                             ("ref_1", ref_dir, None, 1), ("comp_1", out_dir, library, 1)):
            wd = work / key
            state = None
            if paged and lib is not None:  # a paged output trains on a fresh state directory
                state = work / f"state-{key}"
                create_state_dir(out_dir, report, state, lib)
            runs[key] = measure_artifacts(artifacts, steps=steps, feeds=feeds, spill_library=lib,
                                          spill_dir=spill_dir if lib else None, intra_op_threads=threads, workdir=wd,
                                          state_dir=state)
        ref, comp, ref_1, comp_1 = runs["ref"], runs["comp"], runs["ref_1"], runs["comp_1"]
        ref_params, comp_params = dict(np.load(ref_1.params_npz)), dict(np.load(comp_1.params_npz))
    loss_diffs = [abs(a.loss - b.loss) for a, b in zip(ref_1.steps, comp_1.steps)]
    loss_rel = max(d / max(abs(a.loss), 1e-30) for d, a in zip(loss_diffs, ref_1.steps))
    param_diff, param_rel, bitwise = 0.0, 0.0, True
    for name, a in ref_params.items():
        b = comp_params[name]
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        param_diff = max(param_diff, diff)
        param_rel = max(param_rel, diff / max(float(np.max(np.abs(a))), 1e-30))
        bitwise &= a.tobytes() == b.tobytes()
    budget = report.budget
    # before the step: the fixed state and (fused mode) the resident parameters and moments
    fixed, predicted = budget.fixed_bytes + report.result.resident_state_bytes, report.result.activation_peak_bytes
    steady = comp.steps[1:] or comp.steps  # step 1 also allocates the optimizer state
    return VerifyReport(
        steps=steps, numerics_intra_op_threads=1,
        losses_reference=[s.loss for s in ref_1.steps], losses_compiled=[s.loss for s in comp_1.steps],
        max_abs_loss_diff_default_threads=max(abs(a.loss - b.loss) for a, b in zip(ref.steps, comp.steps)),
        max_abs_loss_diff=max(loss_diffs), max_rel_loss_diff=loss_rel,
        max_abs_param_diff=param_diff, max_rel_param_diff=param_rel, bitwise_identical_params=bitwise,
        budget=budget, predicted_step_peak_bytes=predicted,
        measured_step_peak_bytes=[s.peak_heap_bytes for s in comp.steps],
        steady_state_from_step=1 if len(comp.steps) > 1 else 0,
        reference_step_peak_bytes=[s.peak_heap_bytes for s in ref.steps],
        measured_total_peak_bytes=fixed + max(s.peak_heap_bytes for s in steady),
        within_budget=fixed + max(s.peak_heap_bytes for s in steady) <= budget.ram_bytes,
        prediction_within_3pct_or_1MiB=all(abs(s.peak_heap_bytes - predicted) <= max(0.03 * predicted, 2**20)
                                           for s in steady),
        step_seconds_reference=[s.step_seconds for s in ref.steps],
        step_seconds_compiled=[s.step_seconds for s in comp.steps],
        identical_results=loss_rel <= rtol and param_rel <= rtol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------
# train


def train(out_dir: Path, *, steps: int, data: Path | None = None, seed: int = 0,
          spill_dir: Path | None = None, save: Path | None = None, state: Path | None = None,
          threads: int | None = None, keep_generations: bool = False, commit_every: int = 1) -> dict:
    """Run training steps of the compiled artifacts.

    Without a state directory (`state` None and an output without state ops): `steps` steps from the
    compiled initial parameters, saved as an ONNX Runtime checkpoint at `save`, which must not exist yet,
    or by default at DIR/trained_checkpoint (replaced only if poetc wrote it, and recorded in DIR's
    manifest).

    With a state directory (`state`, default DIR/state for a paged output): train until its committed
    step is `steps`, one crash-safe generation per step; a missing or empty directory starts from the
    compiled initial state, an existing one resumes from its committed step (see `train_on_state`)."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    check_artifacts(out_dir, report)
    if state is None and is_paged(out_dir):
        state = out_dir / STATE_DIR
    if state is not None:
        if save is not None:
            raise UsageError("--save writes an ONNX Runtime checkpoint and --state trains on a state directory; "
                             "give one of them", hint="export a state directory with `poetc export DIR --state S -o OUT`")
        return train_on_state(out_dir, report, Path(state), steps=steps, data=data, seed=seed, spill_dir=spill_dir,
                              threads=threads, keep_generations=keep_generations, commit_every=commit_every)
    if commit_every != 1:
        raise UsageError("--commit-every applies to training on a state directory", hint="add --state DIR")
    feeds = load_data(data, report.inputs) if data else training_feeds(report.inputs, report.label_classes, seed)
    target = Path(save) if save is not None else out_dir / TRAINED_CHECKPOINT
    _check_checkpoint_target(target, out_dir, explicit=save is not None)
    with tempfile.TemporaryDirectory(prefix="poetc-train-") as work:
        work = Path(work)
        library = private_library(out_dir, report, work)
        produced = work / "trained_checkpoint"
        run = measure_artifacts(out_dir, steps=steps, feeds=feeds, spill_library=library,
                                spill_dir=spill_dir if library else None, workdir=work / "run",
                                checkpoint_out=produced, intra_op_threads=threads)
        try:
            tmp = target.with_name(f".{target.name}.poetc-tmp")
            shutil.copyfile(produced, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot save the trained checkpoint to {target}: {exc.strerror or exc}",
                              hint="choose a writable --save path") from None
    if save is None:
        output.add_to_manifest(out_dir, [target])
    return {"losses": [s.loss for s in run.steps], "step_peak_bytes": [s.peak_heap_bytes for s in run.steps],
            "step_seconds": [s.step_seconds for s in run.steps], "checkpoint": str(target)}


def train_on_state(out_dir: Path, report: CompileReport, state: Path, *, steps: int, data: Path | None = None,
                   seed: int = 0, spill_dir: Path | None = None, threads: int | None = None,
                   keep_generations: bool = False, commit_every: int = 1) -> dict:
    """Train on the state directory `state` until its committed step is `steps`. Step i's batch is
    `training_feeds(inputs, classes, [seed, i])` (or the --data batch every step), so a run resumed after
    a crash computes what an uninterrupted one does. The worker holds the directory's lock; each step
    commits a generation (poetc.runtime.statedir), so a kill at any moment leaves the last committed step;
    with `commit_every` K > 1 only every K-th step (and the last) persists the resident state and commits,
    the others only advance (a kill then loses at most K-1 steps, recomputed identically on resume)."""
    from .runtime import statedir
    with tempfile.TemporaryDirectory(prefix="poetc-train-") as work:
        work = Path(work)
        library = private_library(out_dir, report, work)
        if library is None:
            raise ArtifactError(f"{out_dir} has no {LIBRARY}: a state directory needs the poet op library",
                                hint=_RECOMPILE_HINT)
        created = False
        if statedir.is_state_dir(state):
            pass
        elif os.path.lexists(state) and (not state.is_dir() or any(state.iterdir())):
            raise OutputError(f"{state} exists and is not a poetc state directory (no {statedir.MANIFEST}); it was "
                              f"left untouched", hint="pass a new --state directory, or the one poetc train created")
        else:
            create_state_dir(out_dir, report, state, library)
            created = True
        start = statedir.committed_step(state)  # checks MANIFEST and CURRENT before a worker starts
        _check_state_matches(out_dir, report, state)
        spec = None if data else feed_spec(report.inputs, report.label_classes, seed)
        feeds = load_data(data, report.inputs) if data else None
        run = measure_artifacts(out_dir, steps=steps, feeds=feeds, spec=spec, spill_library=library,
                                spill_dir=spill_dir, workdir=work / "run", intra_op_threads=threads,
                                state_dir=state, keep_generations=keep_generations, commit_every=commit_every)
    return {"state_dir": str(state), "created": created, "resumed_from": run.resumed_from if not created else 0,
            "started_at_step": start, "final_step": run.final_step,
            "steps_run": [s.index for s in run.steps],
            "losses": [s.loss for s in run.steps], "step_peak_bytes": [s.peak_heap_bytes for s in run.steps],
            "step_seconds": [s.step_seconds for s in run.steps],
            "persist_seconds": [s.persist_seconds for s in run.steps]}


def _check_checkpoint_target(target: Path, out_dir: Path, *, explicit: bool) -> None:
    if not os.path.lexists(target):
        if not target.parent.is_dir():
            raise OutputError(f"cannot save the trained checkpoint to {target}: {target.parent} is not a directory",
                              hint="create the directory or choose another --save path")
        return
    if explicit:
        raise OutputError(f"{target} already exists; poetc train does not overwrite a file it did not write",
                          hint="choose another --save path or remove that file")
    manifest = output.read_manifest(out_dir) or {}
    rel = target.relative_to(out_dir).as_posix()
    if target.is_symlink() or not target.is_file() or manifest.get(rel) != output.sha256_file(target):
        raise OutputError(f"{target} exists and was not written by poetc train (or was changed since); "
                          f"it was left untouched", hint="pass --save PATH, or remove that file")


__all__ = ["VerifyReport", "check_artifacts", "input_specs", "label_classes", "load_data", "load_report", "measure_artifacts",
           "training_feeds", "train", "verify"]
