"""Command line: `poetc inspect | compile | verify | train | export | profile | targets | bench`.

The only module that prints or chooses exit codes (see `poetc.errors.EXIT_CODES`, docs/errors.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import EXIT_CODES, InternalError, PoetcError, Terminated, VerificationError
from .plan import BASELINES, STRATEGIES
from .units import format_size, format_time, parse_deadline, parse_size

SOLVER_CHOICES = ("highs", "highs-lns", "cbc")  # poetc.solver.strategies.SOLVERS (tests/test_solver_heuristics.py)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2: same code as UsageError; one paragraph, no usage dump
        print(f"poetc: error: {message}", file=sys.stderr)
        if message.endswith("expected one argument"):
            option = message.split()[1].rstrip(":").split("/")[0]
            print(f"  a value that starts with '-' must be attached: {option}=VALUE", file=sys.stderr)
        print(f"  run '{self.prog} --help' for the options", file=sys.stderr)
        raise SystemExit(2)


def _import_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("import (forward ONNX models)")
    g.add_argument("--loss", default="cross_entropy", help="cross_entropy (default), mse, bce, l1")
    g.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd")
    g.add_argument("--batch", type=_positive_int, help="concrete batch size for a symbolic (or different) axis 0")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete shape of one input (repeatable)")
    g.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                   help="glob of initializers to keep frozen (repeatable)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _import_options(args):
    from .importer import ImportOptions, parse_input_shape
    shapes = dict(parse_input_shape(s) for s in args.input_shape)
    return ImportOptions(loss=args.loss, optimizer=args.optimizer, batch=args.batch, input_shapes=shapes,
                         freeze=list(args.freeze))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poetc", description="Compile ONNX training graphs to fit a RAM budget "
                     "(recompute + paging, POET-style MILP).",
                     epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    parser.add_argument("--version", action="version", version=f"poetc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="where training memory goes: fixed state, keep-all peak, lower bound")
    p.add_argument("model", type=Path, help="forward ONNX model or training artifacts directory")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    p.add_argument("--measure", action="store_true", help="also measure the keep-all step peak in ONNX Runtime")
    _import_args(p)

    p = sub.add_parser("compile", help="schedule keep/recompute/page and write runnable artifacts")
    p.add_argument("model", type=Path)
    p.add_argument("--ram", required=True, help="RAM budget for training, e.g. 8MB or 64MiB")
    p.add_argument("-o", "--out", type=Path, help="output directory (default: <model>.poetc)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--target", default="rpi4", help="device profile name or TOML file (see `poetc targets`)")
    p.add_argument("--target-file", type=Path, help="a device profile TOML file (same as --target PATH)")
    p.add_argument("--costs", type=Path, help="measured per-op costs from `poetc profile`")
    p.add_argument("--deadline", default=None,
                   help="step-time limit: factor of keep-all (1.3x) or a time (2s); strict when given. Default 1.3x, "
                        "soft: when no schedule fits within it at this budget, the fastest schedule that fits")
    p.add_argument("--flash", help="flash capacity for paging (default: the target's)")
    p.add_argument("--objective", choices=("energy", "time"), default="energy")
    p.add_argument("--optimizer-mode", default="auto", choices=["auto", "fused", "unfused"],
                   help="fused: apply each parameter's update inside the backward pass (no gradient buffers; "
                        "Module without Optimizer); unfused: ORT's gradient buffers and Optimizer; auto (default): "
                        "fused when it lets the budget fit or lowers the objective")
    p.add_argument("--no-page-state", action="store_true",
                   help="fused mode: keep every parameter and optimizer moment resident (default: the schedule may "
                        "page them from the state directory with StateRead/StateWrite)")
    p.add_argument("--slice-updates", choices=("auto", "off"), default="auto",
                   help="fused AdamW: auto (default) cuts a parameter's update into row slices, its moments into "
                        "slice tensors, when that update sets the lower bound above --ram (bitwise the same "
                        "update); off: one update per parameter")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="keep every Spill/Restore blocking (default: write-behind spills and prefetched restores "
                        "where they hide transfer time within the budget)")
    p.add_argument("--strategy", default="poet", choices=STRATEGIES)
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma-separated strategies to run for the report ('' for none)")
    p.add_argument("--solver", choices=SOLVER_CHOICES, default="highs",
                   help="highs (default), highs-lns (HiGHS, then a large-neighbourhood search when it stalls above "
                        "a 1%% gap: better schedules on large graphs at tight budgets) or cbc")
    p.add_argument("--time-limit", default="120s", help="solver wall-clock limit: 90s, 2min or seconds (default 120s)")
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="run `poetc verify` on the result")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME")
    p.add_argument("--dump-after", action="append", default=[], metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot-classes", type=Path, metavar="FILE",
                   help="write a PNG of RAM over one step split into parameters, moments, gradients and activations "
                        "(keep-all and compiled)")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="write a PNG of RAM over the step: keep-all vs compiled, budget, recomputes and pages")
    _import_args(p)

    p = sub.add_parser("verify", help="train reference and compiled artifacts side by side and compare")
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=_positive_int, default=3)
    p.add_argument("--data", type=Path, help=".npz with the training inputs (default: seeded random)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="run training steps of compiled artifacts and save the trained checkpoint")
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=_positive_int, default=10,
                   help="steps to run; with a state directory: the step to reach (a resumed run does the rest)")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help="train on this crash-safe state directory: created from the compiled initial state, "
                        "resumed when it exists (default OUT/state for a paged output; see docs/state.md)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default ORT's; 1 is bitwise reproducible)")
    p.add_argument("--commit-every", type=_positive_int, default=1, metavar="K",
                   help="with a state directory: persist the resident state and commit every K steps (default 1; "
                        "a crash loses at most K-1 steps)")
    p.add_argument("--data", type=Path, help=".npz with the training inputs (default: seeded random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, metavar="PATH",
                   help="where to save the trained checkpoint (must not exist; default OUT/trained_checkpoint)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write the trained parameters as an ONNX Runtime checkpoint and an inference model")
    p.add_argument("out", type=Path, help="the directory written by `poetc compile -o DIR`")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="the parameters to export (default DIR/state, else DIR/trained_checkpoint, else DIR/checkpoint)")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help="export the committed step of this state directory (`poetc train --state DIR`)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                   help="directory to write checkpoint and inference_model.onnx into (must not exist)")
    p.add_argument("--force", action="store_true", help="replace OUTDIR if poetc wrote it, unchanged")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profile", help="measure per-op times on this machine (for --costs)")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--repeats", type=_positive_int, default=5)
    _import_args(p)

    sub.add_parser("targets", help="list device profiles")
    _add_bench_parser(sub)
    return parser


def _raise_terminated(signum, frame):
    raise Terminated()


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs its own (coloured) line on stderr for an error it also raises; poetc turns
    the exception into its one paragraph, so keep ORT's logger to fatal messages."""
    try:
        import onnxruntime
        onnxruntime.set_default_logger_severity(4)
    except Exception:  # noqa: BLE001 - ORT missing or too old: its own error comes later
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level={0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG),
                        format="poetc: %(message)s", stream=sys.stderr)
    previous = None
    try:  # SIGTERM unwinds like Ctrl-C: context managers remove temporary and staging directories
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass
    try:
        if args.command in ("inspect", "compile", "profile", "bench") and args.verbose < 2:
            _quiet_onnxruntime()
        return COMMANDS[args.command](args)
    except PoetcError as exc:
        print(f"poetc: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("poetc: terminated (SIGTERM); temporary files and worker processes were cleaned up", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("poetc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a poetc bug: one paragraph and exit 70, traceback with -vv
        if args.verbose >= 2:
            traceback.print_exc(file=sys.stderr)
        print(f"poetc: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        print("  this is a poetc bug: rerun with -vv for the traceback and report it with the command line",
              file=sys.stderr)
        return InternalError.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cmd_inspect(args) -> int:
    from .api import inspect_model
    doc = inspect_model(args.model, _import_options(args), measure=args.measure)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"model {args.model}: {doc['ops']} ops " +
          ", ".join(f"{k} {v}" for k, v in doc["ops_by_role"].items()))
    print("fixed state:")
    for k, v in doc["fixed_state_bytes"].items():
        print(f"  {k:<18} {format_size(v):>12}")
    print(f"  {'total':<18} {format_size(doc['fixed_total_bytes']):>12}")
    print(f"saved activations: {doc['saved_activations']} tensors, {format_size(doc['saved_activation_bytes'])}")
    print(f"gradients held across a gap: {doc['decidable_gradients']} tensors, "
          f"{format_size(doc['decidable_gradient_bytes'])}")
    if doc["keep_all_peak_ort_order_bytes"]:
        print(f"keep-all peak, ORT's order:          {format_size(doc['keep_all_peak_ort_order_bytes'])}")
    print(f"keep-all peak, accumulators hoisted: {format_size(doc['keep_all_peak_bytes'])} "
          f"(activations {format_size(doc['keep_all_activation_peak_bytes'])})")
    if "measured_step_peak_bytes" in doc:
        print(f"measured step peak (ORT order):      {format_size(doc['measured_step_peak_bytes'])} above fixed state")
    b = doc["lower_bound"]
    print(f"lower bound (no schedule fits below): {format_size(b['ram_bytes'])}, set by {b['set_by']} "
          f"(fixed state + {format_size(b['floor_activation_bytes'])} no decision can drop + planning reserve)")
    print(f"largest single-op working set:       {format_size(b['largest_op_bytes'])}, {b['largest_op']}")
    fused = doc.get("fused", {})
    if fused.get("available"):
        fb = fused["lower_bound"]
        print(f"fused optimizer mode (parameters and moments the schedule may page): fixed state "
              f"{format_size(fused['fixed_total_bytes'])}, keep-all {format_size(fused['keep_all_peak_bytes'])}")
        for role, e in fused["state"].items():
            print(f"  {role:<10} {e['tensors']:>4} tensors {format_size(e['bytes']):>12}, pageable {e['pageable_tensors']:>4} "
                  f"{format_size(e['pageable_bytes']):>12}")
        print(f"  lower bound {format_size(fb['ram_bytes'])}, set by {fb['set_by']} (of which "
              f"{format_size(fb['floor_state_bytes'])} of state it reads; largest tensor {fb['largest_tensor']} "
              f"{format_size(fb['largest_tensor_bytes'])}); state directory {format_size(fused['state_directory_bytes'])} "
              f"of flash")
        sb = fused.get("sliced_lower_bound")
        if sb:
            print(f"  with the update of {sb['parameter']} in {sb['slices']} slices (compile --slice-updates auto): "
                  f"lower bound {format_size(sb['ram_bytes'])}, set by {sb['set_by']}")
    _print_canonicalizations(doc["canonicalizations"])
    print("largest saved activations:")
    for a in doc["largest_activations"]:
        print(f"  {format_size(a['bytes']):>12}  {a['producer']:<24} {a['name']}")
    return 0


def cmd_compile(args) -> int:
    from .api import CompileOptions, compile_model
    from .units import parse_time
    target = str(args.target_file) if args.target_file else args.target
    options = CompileOptions(
        ram_bytes=parse_size(args.ram, what="--ram"),
        out_dir=args.out or args.model.with_name(args.model.name + ".poetc"),
        target=target, deadline=parse_deadline(args.deadline) if args.deadline is not None else None,
        flash_bytes=parse_size(args.flash, what="--flash") if args.flash else None,
        objective=args.objective, strategy=args.strategy,
        baselines=tuple(b for b in args.baselines.split(",") if b),
        time_limit_s=parse_time(args.time_limit, what="--time-limit", bare_seconds=True), seed=args.seed, threads=args.threads,
        costs_path=args.costs, import_options=_import_options(args), force=args.force,
        disable_passes=tuple(args.disable_pass), dump_after=tuple(args.dump_after), solver=args.solver,
        optimizer_mode=args.optimizer_mode, page_state=not args.no_page_state, overlap=args.overlap,
        slice_updates=args.slice_updates)
    with _Progress(enabled=not args.json) as progress:
        result = compile_model(args.model, options, progress=progress)
    report = result.report
    if args.plot:
        from .plots import memory_timeline
        memory_timeline(args.plot, result.timelines,
                        title=f"{report.model} on {report.target}, budget {format_size(report.budget.ram_bytes)}, "
                              f"strategy {report.result.strategy}")
    if args.plot_classes:
        from .plots import memory_classes_timeline
        memory_classes_timeline(args.plot_classes, result.timelines,
                                title=f"{report.model} on {report.target}, budget {format_size(report.budget.ram_bytes)}, "
                                      f"{report.optimizer_mode} optimizer: RAM by class over one step")
    verified = None
    if args.verify:
        from .run import verify
        verified = verify(result.out_dir)
    if args.json:
        doc = report.to_json()
        if verified is not None:
            doc["verify"] = verified.to_json()
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_report(report, result.out_dir, result.timings)
        if args.plot:
            print(f"  wrote {args.plot}")
        if args.plot_classes:
            print(f"  wrote {args.plot_classes}")
        if verified is not None:
            _print_verify(verified.to_json())
    if verified is not None and not verified.ok:
        raise VerificationError(verified.failure(), hint=f"the artifacts are in {result.out_dir}; rerun `poetc "
                                f"verify {result.out_dir} -v` for the worker logs")
    return 0


def _print_report(r, out_dir: Path, timings: dict) -> None:
    from .report import StrategySummary
    keep, res, budget = r.keep_all, r.result, r.budget
    print(f"poetc: {r.model} on {r.target}, budget {format_size(budget.ram_bytes)}, "
          f"deadline {r.deadline} ({format_time(r.deadline_s)})")
    if r.deadline_note:
        print(f"  deadline: {r.deadline_note}")
    if r.update_slices:
        print("  sliced updates: " + ", ".join(f"{p} in {k}" for p, k in r.update_slices.items())
              + " (each slice holds 1/k of the AdamW moments)")
    print(f"  fixed state {format_size(budget.fixed_bytes)}, planning reserve {format_size(budget.reserve_bytes)}, "
          f"activation budget {format_size(budget.activation_bytes)}; lower bound {format_size(r.lower_bound.ram_bytes)}")
    print(f"  optimizer: {r.optimizer_mode} ({r.optimizer_mode_reason})")
    _print_memory_classes(r)
    print(f"  {'strategy':<12} {'status':<19} {'fits':<5} {'peak':>12} {'time':>12} {'energy':>12} "
          f"{'overhead':>9}  recompute/page")
    keep_row = StrategySummary("keep-all", "-", keep.peak_bytes <= budget.ram_bytes, keep.peak_bytes,
                               keep.activation_peak_bytes, keep.time_s, keep.energy_j, 0.0, 0.0,
                               {"recompute": 0, "page": 0}, None, None, [])
    rows = [("keep-all*", keep_row), (res.strategy + " <", res)]
    rows += [(k, v) for k, v in r.baselines.items() if k != "keep-all"]
    for name, s in rows:
        over = s.overhead_energy_j / keep.energy_j * 100 if keep.energy_j else 0.0
        print(f"  {name:<12} {s.status:<19} {str(s.fits).lower():<5} {format_size(s.peak_bytes):>12} "
              f"{format_time(s.time_s):>12} {s.energy_j:>10.4g} J {over:>8.2f}%  "
              f"{s.decisions['recompute']}/{s.decisions['page']}"
              + (f" (+{s.decisions['page_in_again']} paged in again)" if s.decisions.get("page_in_again") else ""))
    print(f"  solver: {res.status}, overhead gap {res.gap * 100:.2f}%" if res.gap is not None else
          f"  solver: {res.status}", f"in {timings['solve_s']:.2f} s (compile {timings['compile_s']:.1f} s); "
          f"{r.candidates} candidates, granularity {r.granularity}; schedule encoding {r.schedule_encoding_bytes} B")
    for note in res.notes:
        print(f"  note: {note}")
    _print_canonicalizations(r.canonicalizations, indent="  ")
    print(f"  wrote {out_dir}")


def _print_memory_classes(r) -> None:
    """The step's RAM and flash traffic by class (report.json memory_classes), when anything is paged
    or the parameters and moments are in the step (fused mode)."""
    classes = r.memory_classes
    if not classes or not (r.state_tensors or any(c["paged_bytes"] for c in classes.values())):
        return
    print(f"  {'class':<12} {'resident':>11} {'paged':>11} {'at peak':>11} {'flash read':>11} {'written':>11} "
          f"{'io time':>10} {'io energy':>11}")
    for name in ("parameters", "moments", "gradients", "activations"):
        c = classes[name]
        print(f"  {name:<12} {format_size(c['resident_bytes']):>11} {format_size(c['paged_bytes']):>11} "
              f"{format_size(c['peak_step_bytes']):>11} {format_size(c['flash_read_bytes']):>11} "
              f"{format_size(c['flash_write_bytes']):>11} {format_time(c['io_time_s']):>10} {c['io_energy_j']:>9.4g} J")
    paged = sum(s["paged"] for s in r.state_tensors)
    if r.state_tensors:
        print(f"  state: {paged} of {len(r.state_tensors)} parameters and moments paged (StateRead/StateWrite), "
              f"state directory {r.state_dir}/")


def _print_canonicalizations(rewrites: list[dict], indent: str = "") -> None:
    """The exact rewrites import applied to the model (docs/canonicalization in the importer)."""
    for c in rewrites:
        print(f"{indent}import rewrote: {c.get('name')} x{c.get('count', 1)}"
              + (f" ({c['why']})" if c.get("why") else ""))


def _print_verify(v) -> None:
    v = v.to_json() if hasattr(v, "to_json") else v
    print(f"verify: {v['steps']} steps; max |loss diff| {v['max_abs_loss_diff']:.3g}, max |param diff| "
          f"{v['max_abs_param_diff']:.3g} (bitwise identical: {str(v['bitwise_identical_params']).lower()})")
    k = v["steady_state_from_step"]
    print(f"  measured step peak {format_size(max(v['measured_step_peak_bytes'][k:]))} (reference "
          f"{format_size(max(v['reference_step_peak_bytes'][k:]))}), predicted "
          f"{format_size(v['predicted_step_peak_bytes'])} (steps {k}+); total {format_size(v['measured_total_peak_bytes'])} "
          f"vs budget {format_size(v['budget']['ram_bytes'])}: {'ok' if v['within_budget'] else 'OVER BUDGET'}")
    print(f"  step time reference {format_time(min(v['step_seconds_reference']))}, compiled "
          f"{format_time(min(v['step_seconds_compiled']))}; results "
          f"{'identical' if v['identical_results'] else 'DIFFER'}")


def cmd_verify(args) -> int:
    from .run import verify
    result = verify(args.out, steps=args.steps, data=args.data)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        _print_verify(result)
    if not result.ok:
        raise VerificationError(result.failure(), hint="the report above has the measured values; "
                                "rerun with -v for the worker logs")
    return 0


def cmd_train(args) -> int:
    from .run import train
    doc = train(args.out, steps=args.steps, data=args.data, seed=args.seed, save=args.save, state=args.state,
                threads=args.threads, commit_every=args.commit_every)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if "state_dir" in doc:
        if doc["created"]:
            print(f"created the state directory {doc['state_dir']} from the compiled initial state (step 0)")
        else:
            print(f"resumed from step {doc['resumed_from']} of {doc['state_dir']}")
    indices = doc.get("steps_run") or range(len(doc["losses"]))
    persist = doc.get("persist_seconds") or [None] * len(doc["losses"])
    for i, loss, peak, secs, commit in zip(indices, doc["losses"], doc["step_peak_bytes"], doc["step_seconds"], persist):
        extra = f" (of which persist + commit {format_time(commit)})" if commit is not None else ""
        print(f"step {i}: loss {loss:.6f}  peak {format_size(peak)}  {format_time(secs)}{extra}")
    if "state_dir" in doc:
        print(f"{doc['state_dir']} is at step {doc['final_step']} (committed)")
    else:
        print(f"saved the trained checkpoint to {doc['checkpoint']}")
    return 0


def cmd_export(args) -> int:
    from .export import export
    doc = export(args.out, args.output, checkpoint=args.checkpoint, force=args.force, state=args.state)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"exported {doc['trainable_parameters']} trainable and {doc['frozen_parameters']} frozen parameters "
              f"from {doc['source_checkpoint']}")
        print(f"wrote {doc['out']}/checkpoint (ONNX Runtime checkpoint) and {doc['out']}/inference_model.onnx "
              f"(inputs {', '.join(doc['inputs'])}; outputs {', '.join(doc['outputs'])})")
    return 0


def cmd_profile(args) -> int:
    import tempfile

    from .api import open_graph
    from .cost import profile_host, save_costs
    with tempfile.TemporaryDirectory(prefix="poetc-profile-") as work:
        artifacts, graph = open_graph(args.model, Path(work), _import_options(args))
        times = profile_host(graph, repeats=args.repeats, artifacts=artifacts, paging=True)
        save_costs(args.out, graph, times, target="host", meta={"repeats": args.repeats})
    print(f"wrote {len(times)} op times to {args.out}")
    return 0


def cmd_targets(args) -> int:
    from .targets import list_targets
    for t in list_targets():
        print(t.summary())
    return 0


COMMANDS = {"inspect": cmd_inspect, "compile": cmd_compile, "verify": cmd_verify, "train": cmd_train,
            "export": cmd_export, "profile": cmd_profile, "targets": cmd_targets}


# ---------------------------------------------------------------------------------------------------
# progress on a terminal, and `poetc bench`


class _Progress:
    """Calls as `progress(phase)`; while active, shows "poetc: <phase> 12s" on one line of stderr.
    Silent unless both stdout and stderr are terminals (pipelines and --json get nothing)."""

    def __init__(self, enabled: bool = True, delay_s: float = 1.0):
        self.enabled = enabled and sys.stdout.isatty() and sys.stderr.isatty()
        self.delay_s = delay_s
        self.phase = ""
        self._stop = None
        self._thread = None
        self._shown = False

    def __call__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self):
        if self.enabled:
            import threading
            import time
            self._stop = threading.Event()
            t0 = time.monotonic()

            def tick():
                while not self._stop.wait(0.5):
                    elapsed = time.monotonic() - t0
                    if elapsed >= self.delay_s:
                        sys.stderr.write(f"\r\033[Kpoetc: {self.phase} ... {elapsed:.0f}s")
                        sys.stderr.flush()
                        self._shown = True

            self._thread = threading.Thread(target=tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._shown:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="sweep models x targets x budgets x deadlines x strategies; CSV, JSON, "
                       "tables and figures", description="Regenerates docs/benchmarks.md's tables and figures "
                       "(see that file for the command and its run time).")
    p.add_argument("-o", "--out", type=Path, default=Path("bench-out"),
                   help="output directory: results.csv, results.json, tables.md, figures/ (default bench-out)")
    p.add_argument("--figures-dir", type=Path, help="write the PNG figures here instead of OUT/figures")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--quick", action="store_true", help="a small smoke run (well under a minute)")
    p.add_argument("--scaling", action="store_true", help="the solver-scaling sweep only: every model plus the "
                   "large graphs of models/scaling.py, poet on rpi4 at 70/50/30%%, 60 s a solve (about 40 min)")
    p.add_argument("--models", help="comma-separated models for the budget sweep (see `python -m models list`)")
    p.add_argument("--targets", help="comma-separated targets for the budget sweep")
    p.add_argument("--fractions", help="budgets as fractions of keep-all activation memory, e.g. 0.7,0.5,0.3")
    p.add_argument("--deadlines", help="deadline factors for the deadline sweep, e.g. 1.05,1.3,2")
    p.add_argument("--strategies", help="comma-separated strategies (default: all)")
    p.add_argument("--no-measure", action="store_true", help="skip the measured runs on this machine")
    p.add_argument("--no-scaling", action="store_true", help="skip the extra models of the solver-scaling sweep")
    p.add_argument("--time-limit", help="per-solve limit (default 60s; quick: 20s)")
    p.add_argument("--solver", choices=SOLVER_CHOICES, help="the MILP solver (default highs; see compile --solver)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="no asynchronous paging windows in the MILPs (as compile --no-overlap; default: the "
                        "windows compile plans with)")
    p.add_argument("--strict", action="store_true", help="exit 70 if rows are inconsistent (see tables.md)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def cmd_bench(args) -> int:
    from .bench import BenchConfig, check_rows, override, parse_list, run_bench, solver_anomalies
    from .units import parse_time
    config = BenchConfig.quick() if args.quick else BenchConfig.scaling() if args.scaling else BenchConfig.full()
    config = override(
        config,
        models=parse_list(args.models) if args.models else None,
        targets=parse_list(args.targets) if args.targets else None,
        fractions=parse_list(args.fractions, float) if args.fractions else None,
        deadline_factors=parse_list(args.deadlines, float) if args.deadlines else None,
        strategies=parse_list(args.strategies) if args.strategies else None,
        measure_models=() if args.no_measure else None,
        scaling_models=() if args.no_scaling else None,
        time_limit_s=parse_time(args.time_limit, what="--time-limit") if args.time_limit else None,
        solver=args.solver, overlap=None if args.overlap else False)
    if args.models:  # the other sweeps follow the chosen models
        config = override(config, deadline_models=tuple(m for m in config.deadline_models if m in config.models),
                          measure_models=tuple(m for m in config.measure_models if m in config.models),
                          timeline=(config.models[0], "rpi4" if "rpi4" in config.targets else config.targets[0],
                                    0.5))
    with _Progress(enabled=not args.json, delay_s=0.0) as progress:
        result = run_bench(config, args.out, figures_dir=args.figures_dir, force=args.force, progress=progress)
    problems = check_rows(result.rows)
    anomalies = solver_anomalies(result.rows)
    summary = {"out": str(result.out_dir), "rows": len(result.rows), "wall_s": result.doc["wall_s"],
               "files": {k: str(v) for k, v in result.files.items()}, "consistency_problems": problems,
               "solver_anomalies": len(anomalies)}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"poetc bench ({config.name}): {len(result.rows)} rows in {result.wall_s['total']:.0f} s "
              + ", ".join(f"{k} {v:.0f} s" for k, v in result.wall_s.items() if k != "total"))
        for name, path in result.files.items():
            print(f"  wrote {path}")
        if anomalies:
            print(f"  {len(anomalies)} MILP solutions rejected by the simulator (see tables.md)")
        for line in problems:
            print(f"  inconsistent: {line}")
    return 70 if problems and args.strict else 0


COMMANDS["bench"] = cmd_bench

if __name__ == "__main__":
    sys.exit(main())
