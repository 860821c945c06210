"""Benchmarks for wan-trt: GPU speed and memory of every component, and the CPU runtime-overhead gate.

``python -m benchmarks.run gpu ...`` (on a CUDA machine), ``python -m benchmarks.run cpu-overhead``,
``python -m benchmarks.run gate --run RUN.json --baseline BASE.json``. Results are JSON files under
``benchmarks/results/``.
"""

from benchmarks._bootstrap import ensure_wan_trt

ensure_wan_trt()
