"""Timing and memory helpers: CUDA events (GPU) or perf_counter (CPU), warm-up, medians of repeats."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wan_trt.json_files import write_json_atomic


def summarize(samples_ms: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "max_ms": max(samples_ms),
            "n": len(samples_ms), "samples_ms": [round(s, 4) for s in samples_ms]}


def time_cuda(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Median of ``repeats`` timed calls (CUDA events around each) after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return summarize(samples)


def time_cpu(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


class PeakMemory:
    """``with PeakMemory() as m: ...`` → ``m.peak_gib`` (max allocated inside), ``m.base_gib`` (allocated before)."""

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base_gib = torch.cuda.memory_allocated() / 2**30
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30

    def to_json(self) -> dict[str, float]:
        return {"peak_allocated_gib": round(self.peak_gib, 3), "resident_before_gib": round(self.base_gib, 3),
                "peak_above_resident_gib": round(self.peak_gib - self.base_gib, 3)}


def cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    """Bytes that ``fn()`` has allocated on the CPU at its peak above what was allocated when it started
    (memory it frees that was allocated before counts against it), from torch's profiler: every CPU
    allocation and free in order, summed. Exact at the allocator's level, independent of the OS and of time,
    so tests may assert on it. (It reads the profiler's kineto events, a private API of the pinned torch; the
    tests that use it fail if that changes.) At 1280x720 the VAE's decode with explicit caches peaked at 12.5
    GiB projected from a 160x96 run by the pixels, 13.1 GiB measured on the H100."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def environment() -> dict[str, Any]:
    """Device, driver and library versions for a results file."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), compute_capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_driver())
        try:
            import cudnn

            env["cudnn_frontend"] = cudnn.__version__
            env["cudnn_backend"] = cudnn.backend_version_string()
        except Exception as error:  # noqa: BLE001 - recorded, not fatal: only FP8 attention needs it
            env["cudnn_frontend"] = f"unavailable: {type(error).__name__}: {error}"[:200]
        try:
            import flash_attn_3

            env["flash_attn_3"] = flash_attn_3.__version__
        except Exception as error:  # noqa: BLE001 - recorded, not fatal: optional FP8 attention kernel
            env["flash_attn_3"] = f"unavailable: {type(error).__name__}: {error}"[:200]
    return env


def _driver() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except Exception as error:  # noqa: BLE001
        return f"unknown ({type(error).__name__})"


def write_json(path: str | Path, data: dict) -> Path:
    """Write atomically (temp file beside it, then rename)."""
    return write_json_atomic(path, data)


def benchmark_parser(description: str, work_help: str = "scratch folder") -> argparse.ArgumentParser:
    """An argument parser with the two options every end-to-end benchmark takes: ``--work`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", required=True, help=work_help)
    parser.add_argument("--out", required=True, help="results JSON")
    return parser
