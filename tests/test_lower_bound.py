"""The lower bound (fixed state + the largest single-op working set) is valid for any schedule: it is
never above the peak ONNX Runtime really reaches. Property test on random small ONNX graphs."""

from __future__ import annotations

import onnx
from hypothesis import HealthCheck, given, settings

from poetc.api import keep_all, lower_bound_bytes, measure_artifacts, open_graph
from poetc.importer import ImportOptions
from poetc.schedule import fixed_state_bytes
from random_onnx import build, graph_specs


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=graph_specs())
def test_lower_bound_never_above_measured_peak(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("lb")
    path = work / "model.onnx"
    onnx.save(build(spec), str(path))
    artifacts, graph = open_graph(path, work / "art", ImportOptions())
    bound, where = lower_bound_bytes(graph)
    fixed = sum(fixed_state_bytes(graph).values())
    run = measure_artifacts(artifacts, graph, steps=2)
    measured = fixed + run.steps[1].peak_heap_bytes
    assert where
    assert bound <= measured, (spec, bound, measured)
    # and the bound is not vacuous: it is at least the fixed state plus one real op's working set
    assert bound > fixed
    assert keep_all(graph).total_peak_bytes >= bound

