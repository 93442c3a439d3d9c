"""The corpus of architectures poetc was not designed for (models/corpus.py), end to end: each model
exported as its users would export it goes through inspect -> compile (rpi4, 50% of keep-all
activations) -> compile (host, same budget) + verify, at batch 1 and batch 8 (where no schedule fits 50% within the default 1.3x deadline, 70%, then
90%: small models at batch 1 hold a few KB of activations): identical parameters
(bitwise), measured step peak within the budget and within 1% of the prediction.

Slow (tens of seconds per case on 2 cores): `python -m pytest -m slow tests/test_corpus.py`.
`python tests/test_corpus.py [-o results.json] [NAME...]` runs the same cases and prints the
table of docs/corpus.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.corpus import CORPUS, export_corpus  # noqa: E402
from poetc.units import Deadline  # noqa: E402

BATCHES = (1, 8)
FRACTIONS = (0.5, 0.7, 0.9)
PREDICTION_TOLERANCE = 0.01


def run_case(name: str, batch: int, work: Path) -> dict:
    """inspect, compile for rpi4 and for host at 50% of the keep-all activations, verify the host
    output; the figures of one corpus row."""
    from poetc.api import CompileOptions, compile_model, inspect_model
    from poetc.errors import InfeasibleError
    from poetc.importer import ImportOptions, canonicalize, load_onnx
    from poetc.run import verify

    entry = CORPUS[name]
    path = export_corpus(name, work / f"{name}.onnx", batch)
    options = ImportOptions(loss=entry.loss)
    doc = inspect_model(path, options)
    _, notes = canonicalize(load_onnx(path), options)
    row = {"name": name, "batch": batch, "ops": doc["ops"], "canonicalizations": [n.to_json() for n in notes],
           "fixed_bytes": doc["fixed_total_bytes"], "keep_all_activation_bytes": doc["keep_all_activation_peak_bytes"]}
    for fraction in FRACTIONS:
        # 50% first; small models at batch 1 (activations a fraction of the fixed state) may have no
        # schedule there within the 1.3x deadline: the next fraction then
        ram = int(doc["fixed_total_bytes"] + fraction * doc["keep_all_activation_peak_bytes"])
        try:
            for target in ("rpi4", "host"):
                out = work / f"{name}-b{batch}-{target}"
                shutil.rmtree(out, ignore_errors=True)
                # the deadline explicit (strict): the fractions ladder is about fitting within 1.3x.
                # Blocking transfers: an asynchronous spill's staging buffer lives until its write ends,
                # which depends on the machine's speed; the overlap planner charges it up to its Flush
                # (an upper bound, tests/test_overlap.py), so the prediction checked here is the blocking one
                result = compile_model(path, CompileOptions(ram_bytes=ram, out_dir=out, target=target,
                                                            time_limit_s=20, import_options=options, baselines=(),
                                                            deadline=Deadline(factor=1.3), overlap=False))
                summary = result.report.to_json()["result"]
                row[target] = {"status": summary["status"], "fits": summary["fits"],
                               "decisions": summary["decisions"],
                               "predicted_activation_peak_bytes": summary["activation_peak_bytes"]}
        except InfeasibleError:
            if fraction == FRACTIONS[-1]:
                raise
            continue
        row["ram_budget_bytes"], row["budget_fraction"] = ram, fraction
        break
    check = verify(work / f"{name}-b{batch}-host", steps=3).to_json()
    predicted = check["predicted_step_peak_bytes"]
    steady = check["measured_step_peak_bytes"][check["steady_state_from_step"]:]
    row["verify"] = {
        "bitwise_identical_params": check["bitwise_identical_params"],
        "identical_results": check["identical_results"],
        "within_budget": check["within_budget"],
        "predicted_step_peak_bytes": predicted,
        "measured_step_peak_bytes": max(steady),
        "prediction_error": max(abs(m - predicted) for m in steady) / predicted,
    }
    return row


# Known misses, measured (docs/corpus.md; branch mem5 at 404a4dc, both batches, all 28 cases); strict=False because a
# case may pass with another schedule. 15 of 28 are within 1%; all misses but one are over-predictions (in budget). Traced with
# tools/memtrace.py (resnet_sum and alexnet_lrn at batch 1): blocks of 64 KiB and more that glibc serves
# from the heap's top take their size + 8 B, those it maps take whole pages; which one a block gets depends
# on the heap's history (resnet_sum b1: 23 of 35 65,536 B tensors from the top), and the simulator counts
# whole pages, as it must not count less: up to 4 KiB over per live large tensor. Kernel scratch is
# measured in whole pages too (65,544 B Conv scratch counted as 69,632 B).
_UNDER = "under-predicted: "
_OVER = ("over-predicted (in budget): large blocks served from the heap's top at their size + 8 B, counted "
         "in whole pages: ")
KNOWN = {
    ("alexnet_lrn", 1): _OVER + "keep-all, a steady step 1.04% (11.8 KB) below the prediction on a 1.08 MiB step",
    ("googlenet", 1): _OVER + "a steady step 1.51% (24.8 KB) below the prediction on a 1.57 MiB step",
    ("mobilenet_v3", 1): _OVER + "a steady step 1.18% (7.4 KB) below the prediction on a 0.60 MiB step",
    ("resnet_sum", 1): _OVER + "a steady step 2.11% (23.7 KB) below the prediction on a 1.07 MiB step",
    ("shufflenet_v1", 1): _OVER + "a steady step 2.72% (15.7 KB) below the prediction on a 0.55 MiB step",
    ("squeezenet", 1): _OVER + "a steady step 1.75% (4.0 KB) below the prediction on a 0.22 MiB step",
    ("torch_encoder", 1): _OVER + "attention steps not traced: a steady step 4.39% (22.5 KB) below the "
                                  "prediction on a 0.49 MiB step",
    ("vit", 1): _OVER + "a steady step 2.21% (16.5 KB) below the prediction on a 0.71 MiB step",
    ("embed_attention", 8): _OVER + "a steady step 2.44% (22.7 KB) below the prediction on a 0.89 MiB step",
    ("lenet_opset9", 8): _UNDER + "a paged step (StateSession, 1 paged tensor): measured +1.01% (+4.7 KB) over the "
                                  "prediction on a 0.45 MiB step; part of run_with_ort_values's blocks is not modelled",
    ("mobilenet_v3", 8): _OVER + "a steady step 1.55% (52.3 KB) below the prediction on a 3.23 MiB step",
    ("squeezenet", 8): _OVER + "a steady step 1.65% (14.5 KB) below the prediction on a 0.84 MiB step",
    ("textcnn", 8): _OVER + "a steady step 1.13% (3.7 KB) below the prediction on a 0.31 MiB step",
}


def _cases():
    for name in sorted(CORPUS):
        for batch in BATCHES:
            reason = KNOWN.get((name, batch))
            yield pytest.param(name, batch, marks=[pytest.mark.xfail(reason=reason, strict=False)] if reason else [])


@pytest.mark.slow
@pytest.mark.parametrize("name,batch", list(_cases()))
def test_corpus_model_compiles_and_trains_identically_within_budget(name, batch, tmp_path):
    row = run_case(name, batch, tmp_path)
    for target in ("rpi4", "host"):
        assert row[target]["fits"], row
    v = row["verify"]
    assert v["bitwise_identical_params"] and v["identical_results"], row
    assert v["within_budget"], row
    assert v["prediction_error"] <= PREDICTION_TOLERANCE, row


def _forward(model, x):
    import onnxruntime as ort
    from poetc.runtime.session import contract_session_options
    session = ort.InferenceSession(model.SerializeToString(), contract_session_options(intra_op_threads=1),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_model_canonicalizes_exactly(name):
    """The fast part of the corpus (default suite): each model as exported goes through poetc's
    import rewrites, every rewrite is listed, and the rewritten forward model computes what the
    export computes in ONNX Runtime (the same random masks: the export's Dropouts get the seeds the
    rewrite gives them)."""
    import copy

    import numpy as np

    from models.corpus import example_input, export_proto
    from poetc.importer import ImportOptions, canonicalize
    from poetc.ir.canonicalize import seed_random_ops

    entry = CORPUS[name]
    original = export_proto(name, 2)
    canonical, notes = canonicalize(copy.deepcopy(original), ImportOptions(loss=entry.loss))
    names = [n.name for n in notes]
    assert len(names) == len(set(names)), names
    rewritten = {"sum-to-add": "Sum", "lrn-decompose": "LRN", "hardswish-to-clip": "HardSwish",
                 "prelu-decompose": "PRelu", "elu-decompose": "Elu", "nearest-resize-to-expand": "Resize"}
    for note, op in rewritten.items():
        assert (note in names) == any(n.op_type == op for n in original.graph.node), (note, names)
        assert not any(n.op_type == op for n in canonical.graph.node)
    if "opset-conversion" in names:
        return  # the converted model's opset-9 original runs in ORT too, but is compared in the slow test
    seed_random_ops(original)  # the same seeds canonicalize derives: the same masks
    x = example_input(name, 2).numpy()
    want, got = _forward(original, x), _forward(canonical, x)
    got = got.reshape(want.shape) if "flatten-logits" in names else got
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _table(rows: list[dict]) -> str:
    def mib(x):
        return f"{x / 2**20:.2f}"
    lines = ["| model | batch | ops | rewrites | keep-all act. MiB | budget MiB | rpi4 r/p | host r/p | predicted MiB "
             "| measured MiB | abs. error | bitwise | in budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | failed: {r['error']} |" + " |" * 10)
            continue
        rewrites = ", ".join(c["name"] for c in r["canonicalizations"] or []) or "-"
        d = {t: r[t]["decisions"] for t in ("rpi4", "host")}
        v = r["verify"]
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['ops']} | {rewrites} | {mib(r['keep_all_activation_bytes'])} | "
            f"{mib(r['ram_budget_bytes'])} ({100 * r['budget_fraction']:.0f}%) | {d['rpi4']['recompute']}/{d['rpi4']['page']} | "
            f"{d['host']['recompute']}/{d['host']['page']} | {mib(v['predicted_step_peak_bytes'])} | "
            f"{mib(v['measured_step_peak_bytes'])} | {100 * v['prediction_error']:.2f}% | "
            f"{'yes' if v['bitwise_identical_params'] else 'NO'} | {'yes' if v['within_budget'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse
    import logging
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=sorted(CORPUS))
    parser.add_argument("-o", "--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.names:
        for batch in args.batch or BATCHES:
            with tempfile.TemporaryDirectory(prefix="poetc-corpus-") as work:
                try:
                    row = run_case(name, batch, Path(work))
                except Exception as exc:  # noqa: BLE001 - a table row says what failed
                    row = {"name": name, "batch": batch, "error": " ".join(str(exc).split())[:200]}
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
