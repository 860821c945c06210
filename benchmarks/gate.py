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
KERNEL_SUFFIXES = ("_fa3", "_cudnn")  # variants pinned to an FP8 attention kernel (benchmarks/gpu.py)
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
    rows = []
    for metric in metrics:
        variant = metric.rpartition(".")[0]
        want = _recorded(baseline, f"{variant}.fp8_attention_kernel")
        found = _run_metric(run, metric, want)
        got = _recorded(run, f"{found.rpartition('.')[0]}.fp8_attention_kernel")
        if None not in (got, want) and got != want:
            raise ValueError(f"{variant}: baseline ran the FP8 attention kernel {want}, this run {got}: "
                             "compare like with like (benchmarks.run gpu --fp8-attention-kernel)")
        rows.append(GateRow(metric, lookup(baseline, metric), lookup(run, found), 1.0 + tolerance))
    return rows


def _run_metric(run: dict[str, Any], metric: str, kernel: str | None) -> str:
    """``metric``'s path in the run: as named, else its variant pinned to a kernel (``fast_fp8_fa3`` for
    ``fast_fp8``: ``benchmarks.run gpu --variants fast_fp8_fa3``), the one that ran ``kernel`` where given."""
    if _recorded(run, metric) is not None:
        return metric
    variant, _, leaf = metric.rpartition(".")
    pinned = [f"{variant}{suffix}.{leaf}" for suffix in KERNEL_SUFFIXES if _recorded(run, f"{variant}{suffix}.{leaf}") is not None]
    same = [p for p in pinned if _recorded(run, f"{p.rpartition('.')[0]}.fp8_attention_kernel") == kernel]
    return (same or pinned or [metric])[0]


def merge_runs(runs: list[dict[str, Any]], device_key: str = "gpu") -> dict[str, Any]:
    """Several GPU runs of one device kind (e.g. one per size) as one: their ``dit.sizes`` together."""
    devices = {r.get("env", {}).get(device_key) for r in runs}
    if len(devices) != 1:
        raise ValueError(f"the runs come from different devices ({', '.join(map(str, devices))}): gate them separately")
    merged = {**runs[0], "dit": {**runs[0].get("dit", {}), "sizes": {}}}
    for r in runs:
        for size, row in r.get("dit", {}).get("sizes", {}).items():
            if size in merged["dit"]["sizes"]:
                raise ValueError(f"two runs measure {size}: pass one run per size")
            merged["dit"]["sizes"][size] = row
    return merged


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
