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


# Known misses, measured (docs/corpus.md; batch 1 at commit 7ad1fc5 of branch mem, batch 8 where a reason
# says so); strict=False because a case may pass with another schedule. ONNX Runtime's per-step bookkeeping,
# in-place ops and Conv's per-thread scratch are modelled now (docs/memory-model.md); what remains is below.
_UNDER = "small blocks kernels allocate while they run (under 4 KiB, not in the workspace measurement): "
_OVER = "over-predicted (in budget): kernel scratch counted in whole pages / "
KNOWN = {
    ("mobilenet_v3", 1): _OVER + "measured 1.16% (7.2 KB) below the prediction on a 0.60 MiB step (commit "
                                 "d4cc05c; +1.62%, 10.0 KB above, before unread writes were held to the step's end)",
    ("shufflenet_v1", 1): _UNDER + "measured +1.69% (+9.6 KB) over the prediction on a 0.54 MiB step",
    ("squeezenet", 1): _OVER + "one steady step 1.87% (4.2 KB) below the prediction on a 0.21 MiB step",
    ("vit", 1): _OVER + "measured 2.12% (15.8 KB) below the prediction on a 0.71 MiB step",
    ("torch_encoder", 1): _OVER + "attention steps not traced: measured 4.4% (22.5 KB) below the prediction "
                                  "on a 0.49 MiB step",
    ("embed_attention", 8): _OVER + "a steady step 1.28% (11.9 KB) below the prediction on a 0.88 MiB step",
    ("lenet_opset9", 8): _UNDER + "measured +1.92% (+8.9 KB) over the prediction on a 0.44 MiB step",
    ("textcnn", 8): _UNDER + "measured +1.97% (+7.1 KB) over the prediction on a 0.34 MiB step",
    ("squeezenet", 8): _OVER + "a steady step 1.21% (10.5 KB) below the prediction on a 0.83 MiB step",
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
