"""Benchmarks of this project, each runnable as `seer bench NAME`, `python -m benchmarks.MODULE` or
`python benchmarks/MODULE.py` (with the project importable): `train` (benchmarks.train), `data` (benchmarks.data),
`kernels` (benchmarks.swav_head). They share one record schema (benchmarks.harness)."""
