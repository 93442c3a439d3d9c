"""`poetc bench` on a tiny configuration: files written, rows consistent with each other and with the
simulator's rules; `poetc compile --plot` draws the memory-over-time figure; progress stays silent
when stdout is not a terminal."""

import csv
import json

import pytest

from poetc.bench import BenchConfig, check_rows, render_tables, run_bench
from poetc.cli import main

PNG = b"\x89PNG\r\n\x1a\n"

TINY = BenchConfig(
    name="tiny", models=("cnn",), targets=("rpi4", "m0"), fractions=(0.9, 0.8),
    deadline_models=("cnn",), deadline_fraction=0.9, deadline_factors=(1.3, 2.0),
    measure_models=("cnn",), measure_fractions=(0.9,), timeline=("cnn", "rpi4", 0.9),
    batches={"cnn": 16}, time_limit_s=20.0,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run_bench(TINY, out / "run", cache_dir=out / "models")


def test_bench_writes_every_file(bench):
    for name in ("results.csv", "results.json", "tables.md", "energy_vs_budget.png", "deadline_sweep.png",
                 "baselines.png", "solver_scaling.png", "memory_timeline.png", "measured_vs_predicted.png"):
        assert name in bench.files, name
        path = bench.files[name]
        assert path.exists() and path.stat().st_size > 0, path
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG
    assert (bench.out_dir / "figures" / "baselines.png").exists()


def test_bench_rows(bench):
    rows = bench.rows
    # budget sweep: targets x fractions x 6 strategies; deadline sweep: factors x 3 MILPs; 1 measured row
    assert len(rows) == 2 * 2 * 6 + 2 * 3 + 1
    with open(bench.files["results.csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    doc = json.loads(bench.files["results.json"].read_text())
    assert doc["format"] == "poetc-bench/1" and len(doc["rows"]) == len(rows)
    assert doc["machine"]["cpus"] >= 1 and doc["wall_s"]["total"] > 0
    assert check_rows(rows) == []
    for r in rows:
        if r["experiment"] != "measured":  # compile lowers again and measures host op times anew
            assert r["ram_budget_bytes"] == r["fixed_bytes"] + int(r["budget_fraction"] * r["keep_all_activation_bytes"])
        if r.get("fits"):
            assert r["peak_bytes"] <= r["ram_budget_bytes"]
            assert r["time_s"] <= r["deadline_s"] * (1 + 1e-9)
    # keep-all never fits below 100%, and poet fits wherever anything does
    by_config = {}
    for r in rows:
        if r["experiment"] != "measured":
            by_config.setdefault((r["experiment"], r["target"], r["budget_fraction"], r["deadline_factor"]), {})[
                r["strategy"]] = r
    for key, strategies in by_config.items():
        assert "keep-all" not in strategies or not strategies["keep-all"]["fits"]
        poet = strategies["poet"]
        for name, r in strategies.items():
            if r["fits"]:
                assert poet["fits"], (key, name)
                assert poet["energy_j"] <= r["energy_j"] * (1 + 1e-6), (key, name)
    assert any(r["strategy"] == "poet" and r["fits"] for r in rows)


def test_bench_measured_row(bench):
    (m,) = [r for r in bench.rows if r["experiment"] == "measured"]
    assert m["target"] == "host" and m["identical"] is True
    assert m["measured_activation_peak_bytes"] > 0 and m["measured_keep_all_activation_peak_bytes"] > 0
    assert m["measured_step_s"] > 0


def test_tables_name_every_model_and_section(bench):
    text = render_tables(bench.rows, TINY)
    assert "| cnn | 90% |" in text
    for heading in ("Strategies at each budget", "poet energy overhead by device", "Deadline sweep",
                    "Solver time and gap", "Measured on this machine"):
        assert heading in text
    assert bench.files["tables.md"].read_text() == text


def test_bench_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    code = main(["bench", "--quick", "-o", str(tmp_path)])
    assert code == 7 and "--force" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_bench_unknown_model(tmp_path, capsys):
    code = main(["bench", "--models", "alexnet", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "alexnet" in err and "resnet18_cifar" in err


# ---------------------------------------------------------------------------------------------------
# compile --plot and progress


def test_compile_plot(cnn_onnx, tmp_path, capsys):
    plot = tmp_path / "plots" / "memory.png"
    code = main(["compile", str(cnn_onnx), "--ram", "6MB", "-o", str(tmp_path / "out"), "--plot", str(plot),
                 "--baselines", ""])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert plot.read_bytes()[:8] == PNG
    assert f"wrote {plot}" in out.out
    assert "\r" not in out.err  # stdout is not a terminal here: no progress line
    assert not (tmp_path / "out" / "memory.png").exists()  # the plot is not part of the artifacts
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "timelines" not in report


def test_compile_timelines_match_the_report(cnn_onnx, tmp_path):
    from poetc.api import CompileOptions, compile_model
    from poetc.plots import step_positions
    phases = []
    result = compile_model(cnn_onnx, CompileOptions(ram_bytes=6_000_000, out_dir=tmp_path / "o", baselines=()),
                           progress=phases.append)
    assert phases[0].startswith("importing") and any(p.startswith("solving") for p in phases)
    tl = result.timelines
    assert tl.compiled.total_peak_bytes == result.report.result.peak_bytes
    assert tl.keep_all.total_peak_bytes == result.report.keep_all.peak_bytes
    assert len(tl.compiled.live_bytes) == len(tl.steps) and len(tl.keep_all.live_bytes) == len(tl.steps) - sum(
        s.kind.value != "compute" for s in tl.steps)
    xs = step_positions(tl.steps)
    assert xs == sorted(xs) and all(s.kind.value != "compute" or x == s.op for x, s in zip(xs, tl.steps))


def test_progress_silent_without_a_terminal(mlp_onnx, tmp_path, capsys):
    code = main(["compile", str(mlp_onnx), "--ram", "100MB", "-o", str(tmp_path / "o"), "--json"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    json.loads(out.out)


class _Planned(Exception):
    pass


@pytest.mark.parametrize("overlap", [True, False])
def test_the_bench_solves_the_problem_compile_solves(cnn_onnx, tmp_path, monkeypatch, overlap):
    """`poetc bench` (the scaling sweep included) passes the MILP the same overlap costs as `poetc
    compile` (issue #19's windows), and `--no-overlap` turns them off in both."""
    import poetc.plan
    from poetc.api import CompileOptions, compile_model
    from poetc.bench import _LoweredModel, _solve_all, override
    seen = {}

    def fake_plan(*args, **kw):
        seen.setdefault("calls", []).append(kw.get("overlap"))
        raise _Planned
    monkeypatch.setattr(poetc.plan, "plan", fake_plan)
    with pytest.raises(_Planned):
        compile_model(cnn_onnx, CompileOptions(ram_bytes=6_000_000, out_dir=tmp_path / "o", baselines=(),
                                               overlap=overlap, deadline=None))
    from poetc.api import open_graph
    from poetc.importer import ImportOptions
    _, graph = open_graph(cnn_onnx, tmp_path / "w", ImportOptions())
    g = _LoweredModel("cnn", 16, cnn_onnx, graph, 0.0)
    with pytest.raises(_Planned):
        _solve_all([], "scaling", g, "rpi4", 0.9, 1.3, ["poet"], override(TINY, overlap=overlap))
    compiled, benched = seen["calls"]
    assert compiled == benched
    assert (compiled is not None) is overlap
