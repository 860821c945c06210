"""The VAE's encode and decode at full size on the GPU, bf16: diffusers' whole-clip calls (as its
pipeline makes them) against the runtime's streamed graph modules, then with each speed-up of
``runtime.fast.vae.speed_up_vae`` added in turn (cumulative, in ``VAE_SPEEDUPS``'s order).

``python -m benchmarks.vae_speed --out results/JSON [--sizes 1280x720] [--frames 77] [--profile]``

Per variant: encode (``--frames`` frames → latents) and decode (the latents back to frames, each chunk
copied to the host as ``infer`` does) medians, the GPU peak of each, and the max-abs / PSNR of its
output against diffusers' (the decoded video in [-1, 1]; the latents). ``--profile`` adds the ten CUDA
kernels that take most of the decode's time, for the first and the last variant. Random weights
(``animate-14b``'s VAE config, seed 3) and random inputs: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

import torch

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)

log = logging.getLogger("vae_speed")


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


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu import _vae_decode, _vae_encode
    from benchmarks.models import build_vae
    from benchmarks.timing import PeakMemory, environment, time_cuda, write_json
    from wan_trt.models.graphs import VaeDecoderFirst, VaeDecoderStep, VaeEncoderFirst, VaeEncoderStep
    from wan_trt.presets import get_preset
    from wan_trt.runtime.fast.vae import VAE_SPEEDUPS, speed_up_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1280x720")
    parser.add_argument("--frames", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    vae = build_vae(get_preset("animate-14b")).to("cuda", torch.bfloat16)
    modules = [m.to("cuda", torch.bfloat16).eval() for m in
               (VaeEncoderFirst(vae), VaeEncoderStep(vae), VaeDecoderFirst(vae), VaeDecoderStep(vae))]
    enc_first, enc_step, dec_first, dec_step = modules
    mean, std = modules[0].latents_mean, modules[0].latents_std
    results: dict[str, Any] = {"kind": "vae_speed", "env": environment(), "precision": "bf16", "frames": args.frames,
                               "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 3), "sizes": {}}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        video = (torch.rand(1, 3, args.frames, height, width, device="cuda", generator=gen) * 2 - 1).to(torch.bfloat16)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            with PeakMemory() as mem_e:
                t_e = time_cuda(lambda: vae.encode(video).latent_dist.mode(), 1, args.repeats)
            want_latents = (vae.encode(video).latent_dist.mode() - mean) / std
            raw = want_latents * std + mean
            with PeakMemory() as mem_d:
                t_d = time_cuda(lambda: vae.decode(raw).sample.cpu(), 1, args.repeats)
            want_video = vae.decode(raw).sample.clamp(-1, 1).cpu()
            row["diffusers_whole_clip"] = {"encode": {"timing": t_e, "memory": mem_e.to_json()},
                                           "decode": {"timing": t_d, "memory": mem_d.to_json()},
                                           "total_ms": t_e["median_ms"] + t_d["median_ms"]}
            log.info("%s diffusers: encode %.0f ms, decode %.0f ms", size, t_e["median_ms"], t_d["median_ms"])
            for index, name in enumerate(("streamed", *VAE_SPEEDUPS)):
                if name != "streamed":
                    speed_up_vae(vae, [name])
                with PeakMemory() as mem_e:
                    t_e = time_cuda(lambda: _vae_encode(enc_first, enc_step, video), 1, args.repeats)
                latents = _vae_encode(enc_first, enc_step, video)
                with PeakMemory() as mem_d:
                    t_d = time_cuda(lambda: _vae_decode(dec_first, dec_step, want_latents), 1, args.repeats)
                got_video = _vae_decode(dec_first, dec_step, want_latents)
                key = name if name == "streamed" else f"+{name}"
                row[key] = {"encode": {"timing": t_e, "memory": mem_e.to_json(),
                                       "vs_diffusers": _difference(latents, want_latents, 1.0)},
                            "decode": {"timing": t_d, "memory": mem_d.to_json(),
                                       "vs_diffusers_psnr_range_2": _difference(got_video, want_video, 2.0)},
                            "total_ms": t_e["median_ms"] + t_d["median_ms"]}
                row[key]["ratio_to_diffusers"] = row[key]["total_ms"] / row["diffusers_whole_clip"]["total_ms"]
                log.info("%s %s: encode %.0f ms (peak %.2f GiB), decode %.0f ms (peak %.2f GiB), ratio %.3f, "
                         "decode PSNR %.1f dB", size, key, t_e["median_ms"], mem_e.peak_gib, t_d["median_ms"],
                         mem_d.peak_gib, row[key]["ratio_to_diffusers"],
                         row[key]["decode"]["vs_diffusers_psnr_range_2"]["psnr_db"])
                if args.profile and index in (0, len(VAE_SPEEDUPS)):
                    row[key]["decode_top_kernels"] = _profile(lambda: _vae_decode(dec_first, dec_step, want_latents))
                del latents, got_video
                write_json(args.out, {**results, "sizes": {**results["sizes"], size: row}})
        results["sizes"][size] = row
    write_json(args.out, results)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
