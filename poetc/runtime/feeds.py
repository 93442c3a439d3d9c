"""poetc's one seeded generator of training batches, shared by `poetc train` / `verify` (poetc.run) and the
measurement worker (which generates each step's batch itself on a state directory). numpy only."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def generated_feeds(specs: Mapping[str, tuple[tuple[int, ...], str]], classes: int | None,
                    seed) -> dict[str, np.ndarray]:
    """poetc's one seeded input generator: floats ~ N(0, 1), integers (labels) in [0, classes), bools 0/1,
    in name order. ``specs``: name -> (shape, dtype name). ``seed``: an int, or ``[seed, step]`` for the
    batch of one step (so a resumed run sees the batches an uninterrupted one does)."""
    rng = np.random.default_rng(seed)
    classes = classes or 2
    np_types = {"float": np.float32, "double": np.float64, "float16": np.float16, "int64": np.int64,
                "int32": np.int32, "int8": np.int8, "uint8": np.uint8}
    feeds = {}
    for name, (shape, dtype) in sorted(specs.items()):
        shape = tuple(shape)
        if dtype in ("float", "double", "float16"):
            feeds[name] = rng.standard_normal(shape).astype(np_types[dtype])
        elif dtype == "bool":
            feeds[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, classes, shape).astype(np_types.get(dtype, np.int64))
    return feeds
