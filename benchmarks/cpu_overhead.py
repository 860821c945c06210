"""Runtime overhead per denoising step on the CPU (tiny preset): pipeline step time minus bare engine time.

The pipeline's own work in a step (building the DiT's inputs, CFG arithmetic, the UniPC update,
bookkeeping) is measured as the wall time between two step callbacks minus the time spent inside
the DiT engine's ``run`` in that step. It is reported as a ratio to the bare engine time, so the
number carries over between machines of different speed; the gate (``benchmarks.gate``) compares
that ratio with a committed baseline.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wan_trt.presets import Preset, get_preset


@dataclass
class _TimedEngine:
    """Wraps an engine and records the wall time of each ``run``."""

    engine: Any
    times: list[float]

    @property
    def spec(self):
        return self.engine.spec

    def run(self, feed):
        start = time.perf_counter()
        out = self.engine.run(feed)
        self.times.append(time.perf_counter() - start)
        return out


def tiny_pipeline(seed: int = 0):
    """The tiny preset's PyTorch engines (no export needed) in an ``AnimatePipeline``."""
    from wan_trt.models.graphs import cache_layouts, graph_modules
    from wan_trt.runtime.engines import TorchEngine
    from wan_trt.runtime.pipeline import AnimatePipeline

    from wan_trt.registry import graph_specs
    from wan_trt.reference_models import build_reference_models
    from wan_trt.tokenizer import build_tiny_tokenizer, tokenize

    preset = get_preset("tiny")
    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab_size()
    models = build_reference_models(preset, seed=seed, vocab_size=vocab)
    enc, dec = cache_layouts(models)
    specs = graph_specs(preset, enc, dec, vocab)
    modules = graph_modules(models)
    engines = {name: TorchEngine(modules[name], spec) for name, spec in specs.items()}
    return AnimatePipeline(engines, preset, lambda prompt: tokenize(tokenizer, prompt)), preset


def _request(preset: Preset, steps: int, frames: int, width: int, height: int, guidance: float):
    from wan_trt.runtime.pipeline import GenerationRequest
    from wan_trt.runtime.samplers import Sampling

    rng = np.random.default_rng(0)
    face = preset.face_size
    return GenerationRequest(
        ref_image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        pose_frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        face_frames=rng.integers(0, 256, (frames, face, face, 3), dtype=np.uint8),
        guidance_scale=guidance, sampling=Sampling(steps=steps), segment_frames=frames, seed=0)


def measure_overhead(pipeline=None, preset: Preset | None = None, *, steps: int = 12, frames: int = 5,
                     width: int = 64, height: int = 48, guidance: float = 2.0, runs: int = 3) -> dict[str, Any]:
    """Per-step overhead samples (ms) and engine times (ms) over ``runs`` generations; medians and their ratio."""
    if pipeline is None:
        pipeline, preset = tiny_pipeline()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    engine = pipeline.engines["transformer"]
    timed = _TimedEngine(engine, [])
    pipeline.engines = {**pipeline.engines, "transformer": timed}
    overhead_ms: list[float] = []
    engine_ms: list[float] = []
    try:
        for run in range(runs + 1):  # the first run warms up
            marks: list[tuple[float, int]] = []

            def on_step(segment, segments, step, total, marks=marks):
                marks.append((time.perf_counter(), len(timed.times)))

            request = _request(preset, steps, frames, width, height, guidance)
            request.on_step = on_step
            for _ in pipeline.generate(request):
                pass
            if run == 0:
                continue
            # step n (n >= 1) spans callback n-1 → callback n and holds exactly one engine call
            for (t0, c0), (t1, c1) in itertools.pairwise(marks):
                calls = timed.times[c0:c1]
                if len(calls) != 1:
                    continue
                engine_ms.append(calls[0] * 1e3)
                overhead_ms.append((t1 - t0 - calls[0]) * 1e3)
    finally:
        pipeline.engines = {**pipeline.engines, "transformer": engine}
    return summarize_overhead(overhead_ms, engine_ms, {"steps": steps, "frames": frames, "width": width,
                                                           "height": height, "guidance_scale": guidance, "runs": runs})


def summarize_overhead(overhead_ms: list[float], engine_ms: list[float], config: dict[str, Any]) -> dict[str, Any]:
    if not overhead_ms:
        raise RuntimeError("no denoising step was measured")
    overhead, engine = statistics.median(overhead_ms), statistics.median(engine_ms)
    return {"overhead_ms_per_step": overhead, "engine_ms_per_step": engine, "overhead_ratio": overhead / engine,
            "samples": len(overhead_ms), "overhead_samples_ms": [round(x, 4) for x in overhead_ms],
            "engine_samples_ms": [round(x, 4) for x in engine_ms], "config": config}


def slowed(result: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same measurement with the runtime overhead ``factor`` times larger (to prove the gate fails)."""
    return summarize_overhead([x * factor for x in result["overhead_samples_ms"]], result["engine_samples_ms"],
                              result["config"])
