"""The VAE's encode and decode at full size, bf16: diffusers' whole-clip calls (as its pipeline makes them)
against the runtime's streamed chunks, first with explicit cache inputs and outputs (the ONNX graphs' form),
then as ``--fast`` runs them (the caches handed over from chunk to chunk), then with each speed-up of
``runtime.fast.vae.speed_up_vae`` added in turn (cumulative, in ``VAE_SPEEDUPS``'s order).

``python -m benchmarks.vae_speed --out results/JSON [--sizes 1280x720] [--frames 77] [--profile]``
``python -m benchmarks.vae_speed --device cpu --sizes 160x96 --frames 9 --out results/JSON``

On the GPU, per variant: encode (``--frames`` frames → latents) and decode (the latents back to frames, the
chunks coming to the host as ``infer`` takes them) medians, the GPU peak of each, and the max-abs / PSNR of
its output against diffusers' (the decoded video in [-1, 1]; the latents). ``--profile`` adds the ten CUDA
kernels that take most of the decode's time, for the first and the last variant. On the CPU (``--device
cpu``): the allocator's exact peaks only (``timing.cpu_allocation_peak``), and each scaled to 1280x720 by the
pixel count (activations and caches scale with it; 12.5 GiB projected this way from 160x96 for the explicit-
cache decode, 13.1 GiB measured on the H100). Random weights (``animate-14b``'s VAE config, seed 3) and
random inputs: neither speed nor memory depends on their values.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any, Callable

import torch

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)

log = logging.getLogger("vae_speed")
FULL_HD_PIXELS = 1280 * 720


def _difference(got: torch.Tensor, want: torch.Tensor, peak_to_peak: float) -> dict[str, float]:
    err = (got.float().cpu() - want.float().cpu())
    mse = float(err.pow(2).mean())
    return {"max_abs": float(err.abs().max()),
            "psnr_db": round(10 * math.log10(peak_to_peak**2 / mse), 2) if mse > 0 else float("inf")}


def _profile(fn) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:10]
    return [{"kernel": e.key[:120], "calls": e.count, "cuda_ms": round(e.device_time_total / 1e3, 1)} for e in rows]


def vae_pipelines(vae: torch.nn.Module, preset, device: str):
    """Two runtime pipelines over the four streamed VAE graphs of ``vae`` (in its dtype, on ``device``):
    ``explicit`` (``TorchEngine``: cache tensors in and out, as the ONNX graphs) and ``fast`` (``FastEngine``:
    as ``--fast``, the caches handed over)."""
    from wan_trt.models.graphs import cache_layouts, graph_modules
    from wan_trt.reference_models import ReferenceModels
    from wan_trt.registry import graph_specs
    from wan_trt.runtime.engines import TorchEngine
    from wan_trt.runtime.fast.engines import VAE_GRAPHS, FastEngine
    from wan_trt.runtime.pipeline import AnimatePipeline

    models = ReferenceModels(text_encoder=None, image_encoder=None, vae=vae, transformer=None)
    specs = graph_specs(preset, *cache_layouts(models), vocab_size=0)
    dtype = next(vae.parameters()).dtype
    modules = {name: module.to(device, dtype) for name, module in graph_modules(models, VAE_GRAPHS).items()}
    explicit = {name: TorchEngine(modules[name], specs[name], device) for name in VAE_GRAPHS}
    fast = {name: FastEngine(modules[name], specs[name], device, dtype=None) for name in VAE_GRAPHS}
    return (AnimatePipeline(explicit, preset, tokenize=None), AnimatePipeline(fast, preset, tokenize=None))


class Meter:
    """Time and peak memory of one call: CUDA medians and the allocator's peak on a GPU; on the CPU only
    the allocator's exact peak (``cpu_allocation_peak``), with its 1280x720 projection."""

    def __init__(self, device: str, repeats: int, pixels: int) -> None:
        self.device, self.repeats, self.scale = device, repeats, FULL_HD_PIXELS / pixels

    def __call__(self, fn: Callable[[], Any]) -> dict[str, Any]:
        from benchmarks.timing import PeakMemory, cpu_allocation_peak, time_cuda

        if self.device == "cpu":
            peak = cpu_allocation_peak(fn) / 2**30
            return {"memory": {"peak_allocated_gib": round(peak, 4),
                               "at_1280x720_gib": round(peak * self.scale, 2)}}
        with PeakMemory() as memory:
            timing = time_cuda(fn, 1, self.repeats)
        return {"timing": timing, "memory": memory.to_json()}


def _summary(row: dict[str, Any]) -> str:
    def part(stage: str) -> str:
        entry = row[stage]
        ms = f"{entry['timing']['median_ms']:.0f} ms, " if "timing" in entry else ""
        memory = entry["memory"]
        return (f"{stage} {ms}peak {memory['peak_allocated_gib']:.3f} GiB"
                + (f" (~{memory['at_1280x720_gib']:.1f} GiB at 1280x720)" if "at_1280x720_gib" in memory else ""))
    return f"{part('encode')}, {part('decode')}"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.models import build_vae
    from benchmarks.timing import environment, write_json
    from wan_trt.presets import get_preset
    from wan_trt.runtime.fast.vae import VAE_SPEEDUPS, speed_up_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--preset", default="animate-14b", help="whose VAE config (tiny: a smoke test)")
    parser.add_argument("--sizes", default="1280x720")
    parser.add_argument("--frames", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--speedups", default=",".join(VAE_SPEEDUPS),
                        help="the speed-ups to add, in this order (cumulative)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    speedups = [name for name in args.speedups.split(",") if name]
    unknown = sorted(set(speedups) - set(VAE_SPEEDUPS))
    if unknown:
        parser.error(f"unknown speed-up {unknown[0]}: choose from {', '.join(VAE_SPEEDUPS)}")

    device = args.device
    preset = get_preset(args.preset)
    vae = build_vae(preset).to(device, torch.bfloat16)
    explicit, fast = vae_pipelines(vae, preset, device)
    resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    results: dict[str, Any] = {"kind": "vae_speed", "env": environment(), "device": device, "preset": args.preset,
                               "precision": "bf16",
                               "frames": args.frames, "weights_gib": resident, "sizes": {}}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        meter = Meter(device, args.repeats, width * height)
        gen = torch.Generator(device=device).manual_seed(0)
        video = (torch.rand(1, 3, args.frames, height, width, device=device, generator=gen) * 2 - 1).to(torch.bfloat16)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            graph = explicit.engines["vae_encoder_first"].module  # the streamed graphs' latent mean and std
            mean, std = graph.latents_mean, graph.latents_std
            raw = vae.encode(video).latent_dist.mode()
            want_latents = (raw - mean) / std
            row["diffusers_whole_clip"] = {"encode": meter(lambda: vae.encode(video).latent_dist.mode()),
                                           "decode": meter(lambda: vae.decode(raw).sample.cpu())}
            want_video = vae.decode(raw).sample.clamp(-1, 1).cpu()
            log.info("%s diffusers: %s", size, _summary(row["diffusers_whole_clip"]))
            variants = [("explicit caches", explicit, None), ("streamed", fast, None)]
            variants += [(f"+{name}", fast, name) for name in speedups]
            for index, (key, pipeline, speedup) in enumerate(variants):
                if speedup is not None:
                    speed_up_vae(vae, [speedup])
                latents = pipeline.vae_encode(video)
                got_video = torch.cat(list(pipeline.vae_decode(want_latents)), dim=2)
                row[key] = {"encode": {**meter(lambda p=pipeline: p.vae_encode(video)),
                                       "vs_diffusers": _difference(latents, want_latents, 1.0)},
                            "decode": {**meter(lambda p=pipeline: list(p.vae_decode(want_latents))),
                                       "vs_diffusers_psnr_range_2": _difference(got_video, want_video, 2.0)}}
                if device == "cuda":
                    total = sum(row[key][s]["timing"]["median_ms"] for s in ("encode", "decode"))
                    baseline = sum(row["diffusers_whole_clip"][s]["timing"]["median_ms"] for s in ("encode", "decode"))
                    row[key]["ratio_to_diffusers"] = total / baseline
                log.info("%s %s: %s%s, decode PSNR %.1f dB", size, key, _summary(row[key]),
                         f", ratio {row[key]['ratio_to_diffusers']:.3f}" if "ratio_to_diffusers" in row[key] else "",
                         row[key]["decode"]["vs_diffusers_psnr_range_2"]["psnr_db"])
                if args.profile and device == "cuda" and index in (1, len(variants) - 1):
                    row[key]["decode_top_kernels"] = _profile(lambda p=pipeline: list(p.vae_decode(want_latents)))
                del latents, got_video
                write_json(args.out, {**results, "sizes": {**results["sizes"], size: row}})
        results["sizes"][size] = row
    write_json(args.out, results)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
