"""The lower bound's physical part (fixed state + what no decision can drop at its position, which
includes that op's working set) is valid for any schedule: it is never above the peak ONNX Runtime
really reaches. Property test on random small ONNX graphs. (poetc.plan.LowerBound.ram_bytes adds the
planning reserve on top: the least budget poetc plans for, not a physical figure.)"""

from __future__ import annotations

import onnx
from hypothesis import HealthCheck, given, settings

from poetc.api import open_graph
from poetc.run import measure_artifacts
from poetc.importer import ImportOptions
from poetc.plan import lower_bound
from poetc.schedule import StepCosts
from poetc.solver import build_problem
from random_onnx import build, graph_specs


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=graph_specs())
def test_lower_bound_never_above_measured_peak(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("lb")
    path = work / "model.onnx"
    onnx.save(build(spec), str(path))
    artifacts, graph = open_graph(path, work / "art", ImportOptions())
    problem = build_problem(graph, zero_costs(graph))
    b = lower_bound(problem)
    fixed = problem.fixed_bytes
    physical = fixed + b.floor_activation_bytes
    run = measure_artifacts(artifacts, graph, steps=2)
    measured = fixed + run.steps[1].peak_heap_bytes
    assert b.set_by and b.largest_op
    assert physical <= measured, (spec, physical, measured)
    # the floor holds the working set of its own op, and is not vacuous
    assert fixed < fixed + b.largest_op_bytes <= physical
    assert problem.keep_all.total_peak_bytes >= physical
    assert b.ram_bytes > physical  # the planning reserve comes on top


def zero_costs(graph) -> StepCosts:
    n = len(graph.ops)
    return StepCosts([0.0] * n, [0.0] * n, lambda b: (0.0, 0.0), lambda b: (0.0, 0.0))

