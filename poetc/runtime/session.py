"""ONNX Runtime sessions under poetc's execution contract.

poetc's memory model assumes that ORT executes a training graph's nodes in
file order with no graph rewrites and no memory arena.  That holds with

* ``execution_order = PRIORITY_BASED`` (keeps ``graph.node`` order),
* ``graph_optimization_level = ORT_DISABLE_ALL`` (no fusions/reorders),
* ``enable_cpu_mem_arena = False`` (every tensor is a real malloc/free, so
  the step's heap peak equals a live-tensor simulation of the graph).

:func:`contract_session_options` builds such options (optionally with the
Spill/Restore library registered) and :func:`open_training` opens an
artifacts directory produced by ``onnxruntime.training.artifacts``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
# fused optimizer mode (poetc/ir/fused.py): the checkpoint also holds the optimizer state, every name of
# which contains this mark; there is no optimizer model and the training graph updates the parameters
OPTIMIZER_STATE_MARK = "__poet_"


def contract_session_options(spill_library: str | os.PathLike | None = None,
                             intra_op_threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions that make ORT follow poetc's execution contract.

    PRIORITY_BASED order, ORT_DISABLE_ALL, CPU arena, memory pattern and
    buffer reuse off, log severity 3 (errors only), and ``spill_library``
    (path of the poet Spill/Restore ``.so``) registered if given.
    ``intra_op_threads``: ORT's default (None) uses every core; some kernels
    then split reductions by thread timing, so two runs of the same graph can
    differ in the last bits (seen on the transformer); 1 makes runs bitwise
    reproducible, which is how ``poetc verify`` compares numerics.
    """
    so = ort.SessionOptions()
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False  # a static pattern block is held for the whole run: peaks add up
    so.enable_mem_reuse = False
    so.log_severity_level = 3
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if spill_library is not None:
        lib = Path(spill_library)
        if not lib.is_file():
            raise FileNotFoundError(f"spill library not found: {lib}")
        so.register_custom_ops_library(str(lib))
    return so


@dataclass
class TrainingSession:
    """CheckpointState + Module + Optimizer of one artifacts directory (Optimizer None in the fused
    optimizer mode: the training graph updates the parameters itself)."""

    artifacts_dir: Path
    state: object
    module: object
    optimizer: object
    session_options: ort.SessionOptions
    input_names: list[str] = field(default_factory=list)

    def step(self, feeds: Mapping[str, np.ndarray]) -> float:
        """One training step: forward+backward, optimizer step, lazy grad reset.

        ``feeds`` maps each training-model user input name (see
        :attr:`input_names`, e.g. ``input``/``labels``) to an array.
        Returns the loss as a Python float.
        """
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"feeds lack training inputs {missing}; expected {self.input_names}, "
                           f"got {sorted(feeds)}")
        self.module.train()
        outputs = self.module(*[feeds[n] for n in self.input_names])
        loss = outputs[0] if isinstance(outputs, tuple) else outputs
        if self.optimizer is not None:
            self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(np.asarray(loss).reshape(-1)[0])

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameter values by name (copies, safe to keep); optimizer state excluded."""
        return {name: np.array(p.data, copy=True) for name, p in self.state.parameters
                if OPTIMIZER_STATE_MARK not in name}


def open_training(artifacts_dir: str | os.PathLike,
                  spill_library: str | os.PathLike | None = None,
                  intra_op_threads: int | None = None) -> TrainingSession:
    """Open ``training_model.onnx``, ``eval_model.onnx`` (optional),
    ``optimizer_model.onnx`` and ``checkpoint`` in ``artifacts_dir`` with
    :func:`contract_session_options`. Without ``optimizer_model.onnx`` the
    directory is in the fused optimizer mode: ``Module`` alone drives it (the
    op library, which holds the update ops, must then be given)."""
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    d = Path(artifacts_dir)
    fused = not (d / OPTIMIZER_MODEL).exists()
    if fused and spill_library is None:
        raise FileNotFoundError(f"training artifacts in {d} lack {OPTIMIZER_MODEL}; a fused-optimizer "
                                f"directory needs the poet op library (libpoet_spill.so)")
    for name in (TRAINING_MODEL, CHECKPOINT):
        if not (d / name).exists():
            raise FileNotFoundError(f"training artifacts in {d} lack {name}")
    so = contract_session_options(spill_library, intra_op_threads)
    state = CheckpointState.load_checkpoint(str(d / CHECKPOINT))
    eval_path = d / EVAL_MODEL
    module = Module(str(d / TRAINING_MODEL), state,
                    str(eval_path) if eval_path.exists() else None,
                    device="cpu", session_options=so)
    optimizer = None if fused else Optimizer(str(d / OPTIMIZER_MODEL), module)
    names = list(module.input_names())
    logger.debug("opened training artifacts %s; inputs %s", d, names)
    return TrainingSession(artifacts_dir=d, state=state, module=module, optimizer=optimizer,
                           session_options=so, input_names=names)


# ---------------------------------------------------------------------------------------------------
# training on a state directory (poetc.runtime.statedir): resident state bound as graph inputs, paged
# state through StateRead/StateWrite, one crash-safe generation per step


class StateSession:
    """A compiled training graph driven as a plain InferenceSession on a state directory.

    Resident state tensors (graph inputs named in the state manifest) live in numpy buffers this object
    owns, read from the committed generation at open and bound without copies (ORT's in-place updates,
    poet.AdamWUpdate / SGDUpdate / StepCount, write into them). Paged ones are StateRead/StateWrite'd by
    the graph. :meth:`step` runs one step as one generation: begin g+1, run, persist every non-frozen
    resident tensor into g+1, commit (statedir.StateDir.commit), so a crash leaves g or g+1 committed."""

    def __init__(self, artifacts_dir: str | os.PathLike, state, spill_library: str | os.PathLike,
                 intra_op_threads: int | None = None, keep_generations: bool = False) -> None:
        d = Path(artifacts_dir)
        self.state = state
        self.keep_generations = keep_generations
        so = contract_session_options(spill_library, intra_op_threads)
        self.session = ort.InferenceSession(str(d / TRAINING_MODEL), so, providers=["CPUExecutionProvider"])
        graph_inputs = [i.name for i in self.session.get_inputs()]
        self.resident = [n for n in graph_inputs if n in state.tensors]
        paged_inputs = [n for n in self.resident if state.tensors[n].paged]
        if paged_inputs:
            raise ValueError(f"state tensors {paged_inputs} are marked paged in {state.path}/MANIFEST.json "
                             f"but are graph inputs of {d / TRAINING_MODEL}")
        self.input_names = [n for n in graph_inputs if n not in state.tensors and n != "lazy_reset_grad"]
        self.buffers = {n: state.read(n) for n in self.resident}
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.buffers.items()}
        if "lazy_reset_grad" in graph_inputs:
            self._values["lazy_reset_grad"] = ort.OrtValue.ortvalue_from_numpy(np.array([True]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        #: wall time of the last step's persist + commit (resident state written, fsync, CURRENT renamed)
        self.last_persist_seconds = 0.0

    @property
    def step_index(self) -> int:
        """Steps completed (the latest generation, committed or not)."""
        return self.state.latest

    def step(self, feeds: Mapping[str, np.ndarray], commit: bool = True) -> float:
        """One step as generation L+1. ``commit``: persist the resident state into it and commit it (a crash
        then resumes here); False: only advance to it (its paged files feed the next step; a crash returns to
        the last commit, whose steps the resumed run recomputes bit for bit)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"feeds lack training inputs {missing}; expected {self.input_names}")
        gen = self.state.begin_step()
        values = dict(self._values)
        for n in self.input_names:
            values[n] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[n]))
        outputs = self.session.run_with_ort_values(self.output_names, values)
        loss = float(np.asarray(outputs[0].numpy()).reshape(-1)[0])
        del outputs
        t0 = time.perf_counter()
        if commit:
            for n in self.resident:
                if not self.state.tensors[n].frozen:
                    self.state.write(n, self.buffers[n], gen)
            self.state.commit(gen, keep_previous=self.keep_generations)
        else:
            self.state.advance(gen, keep_previous=self.keep_generations)
        self.last_persist_seconds = time.perf_counter() - t0
        return loss

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameter values by name (copies), optimizer state excluded."""
        return {n: (np.array(self.buffers[n]) if n in self.buffers else self.state.read(n))
                for n in sorted(self.state.tensors) if OPTIMIZER_STATE_MARK not in n}
