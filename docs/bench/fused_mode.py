"""Fused vs unfused optimizer mode (issue #16): fixed state before/after for every model, and fused
compiles verified bitwise against the unfused reference in ONNX Runtime.

    python docs/bench/fused_mode.py fixed  [--batch 8]            > docs/bench/fused_fixed.json
    python docs/bench/fused_mode.py verify [--batch 8] [--models mlp,cnn,...] > docs/bench/fused_verify.json

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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from poetc.api import CompileOptions, compile_model, keep_all, lower_bound_bytes, open_graph, verify  # noqa: E402
from poetc.importer import ImportOptions  # noqa: E402
from poetc.ir.fused import fuse_optimizer, read_optimizer_spec  # noqa: E402
from poetc.schedule import StepCosts, fixed_state_bytes  # noqa: E402
from poetc.solver import RESERVE_BYTES, RESERVE_FRACTION, build_problem  # noqa: E402
from poetc.solver.strategies import floor_bytes  # noqa: E402
from poetc.units import Deadline  # noqa: E402


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
                row[mode] = {"fixed_state_bytes": fixed_state_bytes(g), "lower_bound_bytes": lower_bound_bytes(g)[0],
                             "keep_all_peak_bytes": keep_all(g).total_peak_bytes}
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
                keep = keep_all(fused)
                floor, _ = floor_bytes(build_problem(fused, _costs(fused)))
                ram = int(floor + 0.3 * (keep.total_peak_bytes - floor) + keep.peak_bytes * 2 * RESERVE_FRACTION
                          + RESERVE_BYTES)
                options = CompileOptions(ram_bytes=ram, out_dir=work / "out", baselines=(), time_limit_s=30,
                                         deadline=Deadline(factor=3.0), optimizer_mode="fused",
                                         import_options=ImportOptions(optimizer=optimizer))
                report = compile_model(path, options).report
                v = verify(work / "out", steps=3).doc
                row = {"model": name, "batch": args.batch, "optimizer": optimizer, "ram_budget_bytes": ram,
                       "decisions": report["result"]["decisions"],
                       "bitwise_identical_params": v["bitwise_identical_params"],
                       "max_abs_loss_diff": v["max_abs_loss_diff"],
                       "predicted_step_peak_bytes": v["predicted_step_peak_bytes"],
                       "measured_step_peak_bytes": max(v["measured_step_peak_bytes"][1:]),
                       "reference_step_peak_bytes": max(v["reference_step_peak_bytes"][1:]),
                       "fixed_total_bytes": v["fixed_total_bytes"], "within_budget": v["within_budget"]}
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
