"""Fused vs unfused optimizer mode (issue #16): fixed state before/after for every model, and fused
compiles verified bitwise against the unfused reference in ONNX Runtime.

    python -m benchmarks.fused_mode fixed  [--batch 8]            > docs/bench/fused_fixed.json
    python -m benchmarks.fused_mode verify [--batch 8] [--models mlp,cnn,...] > docs/bench/fused_verify.json

`verify` compiles each model in the fused mode (AdamW and SGD) at a budget 30% of the way from the
least any fused schedule needs to fused keep-all (so the schedule recomputes and/or pages), target
rpi4, deadline 3x, then runs `poetc verify` (3 steps, one-thread numerics)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path

import onnx

import models
from poetc.api import CompileOptions, compile_model, open_graph
from poetc.importer import ImportOptions
from poetc.ir.fused import fuse_optimizer, read_optimizer_spec
from poetc.plan import Budget, lower_bound
from poetc.run import verify
from poetc.schedule import StepCosts, fixed_state_bytes, simulate_keep_all
from poetc.solver import build_problem
from poetc.units import Deadline


def _costs(graph) -> StepCosts:  # only used to find the floor: costs do not move it
    times = [1e-4 * (1 + zlib.crc32(op.name.encode()) % 50) for op in graph.ops]
    return StepCosts(times, times, lambda n: (n / 24.5e6, n / 24.5e6), lambda n: (n / 45.5e6, n / 45.5e6))


def graphs(name: str, batch: int, work: Path, optimizer: str = "adamw"):
    path = models.export_onnx(name, work / f"{name}.onnx", batch=batch, seed=0)
    artifacts, graph = open_graph(path, work / f"{name}-{optimizer}-art", ImportOptions(optimizer=optimizer))
    spec = read_optimizer_spec(onnx.load(str(artifacts / "optimizer_model.onnx")))
    return path, graph, fuse_optimizer(graph, spec)


def fixed(args) -> list[dict]:
    rows = []
    for name in models.MODELS:
        with tempfile.TemporaryDirectory() as work:
            _, graph, fused = graphs(name, args.batch, Path(work))
            row = {"model": name, "batch": args.batch}
            for mode, g in (("unfused", graph), ("fused", fused)):
                bound = lower_bound(build_problem(g, _costs(g)))
                row[mode] = {"fixed_state_bytes": fixed_state_bytes(g), "lower_bound_bytes": bound.ram_bytes,
                             "largest_op_bound_bytes": bound.fixed_bytes + bound.largest_op_bytes,
                             "keep_all_peak_bytes": simulate_keep_all(g).total_peak_bytes}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def verify_all(args) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        for optimizer in ("adamw", "sgd"):
            with tempfile.TemporaryDirectory() as work:
                work = Path(work)
                path, _, fused = graphs(name, args.batch, work, optimizer)
                problem = build_problem(fused, _costs(fused))
                least = lower_bound(problem).ram_bytes
                keep = Budget.smallest_for(problem.keep_all_peak_bytes, problem.fixed_bytes).ram_bytes
                ram = int(least + 0.3 * (keep - least))
                options = CompileOptions(ram_bytes=ram, out_dir=work / "out", baselines=(), time_limit_s=30,
                                         deadline=Deadline(factor=3.0), optimizer_mode="fused",
                                         import_options=ImportOptions(optimizer=optimizer))
                report = compile_model(path, options).report
                v = verify(work / "out", steps=3).to_json()
                row = {"model": name, "batch": args.batch, "optimizer": optimizer, "ram_budget_bytes": ram,
                       "decisions": report.result.decisions,
                       "bitwise_identical_params": v["bitwise_identical_params"],
                       "max_abs_loss_diff": v["max_abs_loss_diff"],
                       "predicted_step_peak_bytes": v["predicted_step_peak_bytes"],
                       "measured_step_peak_bytes": max(v["measured_step_peak_bytes"][1:]),
                       "reference_step_peak_bytes": max(v["reference_step_peak_bytes"][1:]),
                       "fixed_total_bytes": v["budget"]["fixed_bytes"], "within_budget": v["within_budget"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("fixed", "verify"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", default="mlp,cnn,resnet18_cifar,mobilenetv2,bert_tiny")
    args = ap.parse_args()
    rows = fixed(args) if args.what == "fixed" else verify_all(args)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
