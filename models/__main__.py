"""Command line: ``python -m models list`` and ``python -m models build NAME``."""

from __future__ import annotations

import argparse
import sys

from .zoo import MODELS, build, export_onnx, get_spec


def _list() -> int:
    width = max(map(len, MODELS))
    for spec in MODELS.values():
        shapes = ", ".join(f"{i.name}[B,{','.join(map(str, i.shape))}]:{i.dtype}"
                           for i in spec.inputs)
        print(f"{spec.name:<{width}}  batch={spec.default_batch:<3} {shapes}  "
              f"classes={spec.num_classes}  {spec.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models",
                                     description="Build ONNX models for poetc.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the available models")
    b = sub.add_parser("build", help="export a model and print its path")
    b.add_argument("name", help="model name (see 'list')")
    b.add_argument("--batch", type=int, default=None, help="batch size (default: per model)")
    b.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    b.add_argument("--out", default=None,
                   help="write to this file instead of the cache")
    b.add_argument("--cache-dir", default=None,
                   help="cache root (default: $POETC_CACHE or ~/.cache/poetc/models)")
    b.add_argument("--dynamic-batch", action="store_true",
                   help="make the batch dimension symbolic ('batch')")
    args = parser.parse_args(argv)

    if args.command == "list":
        return _list()
    try:
        get_spec(args.name)
    except KeyError as e:
        parser.exit(2, f"{parser.prog}: error: {e.args[0]}\n")
    if args.batch is not None and args.batch < 1:
        parser.exit(2, f"{parser.prog}: error: --batch must be >= 1\n")
    if args.out is not None:
        path = export_onnx(args.name, args.out, batch=args.batch, seed=args.seed,
                           dynamic_batch=args.dynamic_batch)
    else:
        path = build(args.name, args.cache_dir, batch=args.batch, seed=args.seed,
                     dynamic_batch=args.dynamic_batch)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
