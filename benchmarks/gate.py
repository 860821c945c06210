"""Latency regression gate: a run against a committed baseline of the same device kind, by ratios.

A gate spec names metrics inside the results JSON (dotted paths) that are *ratios* (machine speed
cancels out: overhead per bare-engine time, fast/baseline forward time). A metric fails when
``run / baseline > 1 + tolerance``. Absolute seconds are never compared across machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CPU_OVERHEAD_METRICS = ("overhead_ratio",)
CPU_TOLERANCE = 0.75  # fail past 1.75× the baseline ratio: a 2× slowdown of the runtime overhead fails
GPU_TOLERANCE = 0.10
GPU_METRICS = tuple(f"dit.sizes.{size}.{variant}.ratio_to_baseline" for size in ("1280x720", "832x480")
                    for variant in ("fast_fp8", "fast_fp8_every_block"))


@dataclass
class GateRow:
    metric: str
    baseline: float
    run: float
    limit: float

    @property
    def ratio(self) -> float:
        return self.run / self.baseline

    @property
    def ok(self) -> bool:
        return self.ratio <= self.limit


def find(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path; KeyError naming the missing part."""
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"metric '{path}' is missing ('{part}' not found)")
        value = value[part]
    return value


def lookup(data: dict[str, Any], path: str) -> float:
    return float(find(data, path))


def check(run: dict[str, Any], baseline: dict[str, Any], metrics: tuple[str, ...], tolerance: float,
          device_key: str | None = None) -> list[GateRow]:
    """One row per metric; raises ValueError when the two results come from different device kinds, or when a
    metric's variant ran another FP8 attention kernel (where both files record it)."""
    if device_key is not None:
        got, want = run.get("env", {}).get(device_key), baseline.get("env", {}).get(device_key)
        if got != want:
            raise ValueError(f"baseline is for {device_key}={want!r}, this run is {got!r}: compare like with like")
    for metric in metrics:
        variant = metric.rpartition(".")[0]
        kernels = [_recorded(data, f"{variant}.fp8_attention_kernel") for data in (run, baseline)]
        if None not in kernels and kernels[0] != kernels[1]:
            raise ValueError(f"{variant}: baseline ran the FP8 attention kernel {kernels[1]}, this run {kernels[0]}: "
                             "compare like with like (benchmarks.run gpu --fp8-attention-kernel)")
    return [GateRow(m, lookup(baseline, m), lookup(run, m), 1.0 + tolerance) for m in metrics]


def _recorded(data: dict[str, Any], path: str) -> Any:
    """The value at ``path``, or None where the file does not record it (older results)."""
    try:
        return find(data, path)
    except KeyError:
        return None


def report(rows: list[GateRow]) -> str:
    lines = [f"{'metric':<58} {'baseline':>10} {'run':>10} {'ratio':>7} {'limit':>6}  result"]
    for r in rows:
        lines.append(f"{r.metric:<58} {r.baseline:>10.4g} {r.run:>10.4g} {r.ratio:>7.3f} {r.limit:>6.2f}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
