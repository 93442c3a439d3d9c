"""compile's fallbacks between plans (poetc/api.py): what it does when the plan it tried first does
not fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import poetc.plan
from poetc.api import CompileOptions, compile_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlp.onnx"


def test_an_overlapped_schedule_that_does_not_fit_falls_back_to_the_blocking_milp(monkeypatch, tmp_path):
    """The overlapped schedule is judged on the simulator after the MILP chose its windows; when it does
    not fit there, compile plans again without overlap rows and keeps that plan when it fits (before,
    the compile failed although --no-overlap found a schedule: ResNet-18-CIFAR b16 on host at 25%)."""
    real, calls = poetc.plan.plan, []

    def overlapped_never_fits(problem, budget, deadline, **kw):
        calls.append(kw.get("overlap") is not None)
        planned = real(problem, budget, deadline, **kw)
        if kw.get("overlap") is not None:
            planned = dataclasses.replace(planned, result=dataclasses.replace(planned.result, fits=False))
        return planned

    monkeypatch.setattr(poetc.plan, "plan", overlapped_never_fits)
    result = compile_model(EXAMPLE, CompileOptions(ram_bytes=20_000_000, out_dir=tmp_path / "out", baselines=(),
                                                   optimizer_mode="unfused", time_limit_s=10))
    assert calls[:2] == [True, False]
    assert result.report.to_json()["result"]["fits"]
