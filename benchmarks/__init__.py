"""Research harnesses run from the repository root (not installed with poetc): `python -m benchmarks.NAME`."""
