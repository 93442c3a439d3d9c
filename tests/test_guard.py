"""poetc.runtime.guard: a fault in native code run for a user's graph becomes an error poetc explains."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from poetc.runtime.guard import ChildCrashed, run_guarded


def _abort():
    os.kill(os.getpid(), signal.SIGSEGV)


def _no_memory():
    raise MemoryError("Unable to allocate 4 EiB")


def _fails():
    raise ValueError("[ONNXRuntimeError] : 1 : FAIL : something about node 'x'")


def test_values_and_errors_cross_the_fork():
    assert run_guarded(np.add, np.arange(3), 1).tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError, match="something about node 'x'"):
        run_guarded(_fails)
    with pytest.raises(MemoryError):
        run_guarded(_no_memory)


def test_a_crash_is_reported_with_its_signal():
    with pytest.raises(ChildCrashed) as err:
        run_guarded(_abort)
    assert err.value.cause == "signal SIGSEGV"


def test_the_probe_turns_an_onnx_runtime_crash_into_an_unsupported_model_error(monkeypatch):
    import poetc.runtime.profiling
    from poetc.errors import UnsupportedModelError
    from poetc.ir.lower import probe_run
    monkeypatch.setattr(poetc.runtime.profiling, "profile_kernels", lambda *a, **k: _abort())
    with pytest.raises(UnsupportedModelError) as err:
        probe_run(None, {})
    assert "crashed (signal SIGSEGV)" in str(err.value) and err.value.exit_code == 4
