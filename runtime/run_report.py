"""Where an ``infer`` run spent its time and memory: one summary line on stderr at the end of the run.

Each engine is wrapped in a ``TimedEngine`` (wall time of its calls; every engine returns host tensors or
waits for the GPU before returning, so a call's time includes its GPU work), the time the run waited for
the mp4 writer (which encodes on a thread, overlapping the decode) is set by the caller, and the peaks
are read at the end: the GPU's (``torch.cuda.max_memory_allocated``, what PyTorch's allocator held at
most) and the host's (``ru_maxrss``: the process's peak resident set).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from wan_trt import registry as g

# The stages of a run, by the graphs that make them (the rest of the time is the pipeline's own glue).
STAGES = {
    "text/image encoding": (g.TEXT_ENCODER, g.IMAGE_ENCODER),
    "VAE encode": (g.VAE_ENCODER_FIRST, g.VAE_ENCODER_STEP),
    "motion encoder": (g.MOTION_ENCODER,),
    "DiT": (g.TRANSFORMER,),
    "VAE decode": (g.VAE_DECODER_FIRST, g.VAE_DECODER_STEP),
}


class Phases:
    """Wall seconds of named phases in order (``with phases("plan"): ...``), the GPU's queued work included;
    ``str()`` gives ``"plan 1.2 s, pin 3.4 s"`` for one log line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


class TimedEngine:
    """An engine whose calls are timed (``seconds``, ``calls``)."""

    def __init__(self, engine) -> None:
        self.engine, self.spec = engine, engine.spec
        self.seconds, self.calls = 0.0, 0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        try:
            return self.engine.run(feed)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


@dataclass
class RunReport:
    started: float = field(default_factory=time.perf_counter)
    loaded: float | None = None  # engines open
    first_step: float | None = None  # the first denoising step finished
    writing: float = 0.0  # seconds the run waited for the mp4 writer's thread
    engines: dict[str, TimedEngine] = field(default_factory=dict)

    def time(self, engines: Mapping[str, object]) -> dict[str, TimedEngine]:
        """Wrap ``engines`` (after they are open) and remember them."""
        self.loaded = time.perf_counter()
        self.engines = {name: TimedEngine(engine) for name, engine in engines.items()}
        return self.engines

    def step_done(self) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def summary(self, cuda: bool) -> dict[str, float]:
        """Seconds per stage and the peaks (GiB)."""
        total = time.perf_counter() - self.started
        out = {"total_s": total, "load_s": (self.loaded or self.started) - self.started}
        if self.first_step is not None:
            out["to_first_step_s"] = self.first_step - self.started
        for stage, names in STAGES.items():
            out[f"{stage}_s"] = sum(self.engines[n].seconds for n in names if n in self.engines)
        out["mp4 writing_s"] = self.writing
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host_peak_rss_gib"] = ru / (1 << 30) if sys.platform == "darwin" else ru / (1 << 20)  # bytes vs KiB
        if cuda and torch.cuda.is_available():
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / (1 << 30)
        return out


def format_summary(summary: Mapping[str, float]) -> str:
    parts = [f"{key.removesuffix('_s')} {value:.1f} s" for key, value in summary.items() if key.endswith("_s")]
    parts += [f"{key.removesuffix('_gib').replace('_', ' ')} {value:.1f} GiB"
              for key, value in summary.items() if key.endswith("_gib")]
    parts += [f"{key} {value}" for key, value in summary.items()  # counts
              if isinstance(value, int) and not isinstance(value, bool) and not key.endswith(("_s", "_gib"))]
    return "run: " + ", ".join(parts)
