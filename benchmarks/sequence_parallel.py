"""Scaling of the sequence-parallel (Ulysses) DiT: one DiT forward on 1 GPU vs N GPUs.

Launch with torchrun, one process per GPU (each holds a full replica of the DiT)::

    torchrun --standalone --nproc-per-node N -m benchmarks.sequence_parallel \
        --out benchmarks/results/sequence_parallel_<machine>.json

Every rank builds ``animate-14b`` with random weights (meta device → materialised on its GPU, bf16
with diffusers' fp32 modules) from the same seed, so the replicas are identical (checked). Then:

1. ``fp32_exactness``: a small DiT (tiny widths, 8 heads) in fp32 on the same backend (NCCL on GPUs),
   sequence-parallel vs the plain forward on the same device (rel-L2; TF32 off).
2. ``single``: every rank times the plain ``TransformerGraph`` forward on its own GPU (the 1-GPU
   baseline; all ranks at once, independent of each other).
3. ``parallel``: the same graph wrapped in ``SequenceParallelDiT`` over all N ranks. Each repeat starts
   after a barrier; its time is the slowest rank's (CUDA events), the median is reported.
   ``rel_l2_vs_single`` compares the bf16 outputs of both (different kernels and shapes: bf16 rounding).

Speed-up = single median / parallel median. ``--smoke`` runs the same code on CPUs over gloo with a
tiny DiT (for checking the script, not for numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.models import build_transformer
from benchmarks.timing import environment, summarize, write_json
from wan_trt.components import TEXT_TOKENS
from wan_trt.metrics import relative_l2
from wan_trt.presets import Preset, get_preset

log = logging.getLogger("benchmarks.sequence_parallel")


def _size(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(v) for v in text.lower().split("x"))
    return width, height, frames


def _check_variant() -> Preset:
    """The tiny preset's DiT with 8 heads (2, 4 and 8 ranks divide them) for the fp32 check."""
    tiny = get_preset("tiny")
    heads, head_dim = 8, int(tiny.transformer["attention_head_dim"])
    return dataclasses.replace(tiny, transformer={**tiny.transformer, "num_attention_heads": heads,
                                                  "added_kv_proj_dim": heads * head_dim})


def dit_inputs(preset: Preset, width: int, height: int, frames: int, device: str, dtype: torch.dtype,
               batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded DiT inputs for a segment of ``frames`` pixel frames (identical on every rank)."""
    tr = preset.transformer
    gen = torch.Generator().manual_seed(seed)
    latent_frames, h, w = (frames - 1) // 4 + 1, height // 8, width // 8

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    timestep = (torch.rand(batch, generator=gen) * 998 + 1).to(device)
    return (rnd(batch, tr["in_channels"], latent_frames + 1, h, w), timestep, rnd(batch, TEXT_TOKENS, tr["text_dim"]),
            rnd(batch, 257, tr["image_dim"]), rnd(batch, tr["latent_channels"], latent_frames, h, w),
            rnd(batch, 4 * latent_frames - 3, tr["motion_encoder_dim"]))


def _timed(fn: Callable[[], Any], device: str, synchronized: bool) -> float:
    """Milliseconds of one call (CUDA events on a GPU); with ``synchronized``, all ranks start together
    and the slowest rank's time is returned."""
    if synchronized:
        dist.barrier()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
    if synchronized:
        slowest = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        ms = float(slowest.item())
    return ms


def _time(fn: Callable[[], Any], device: str, warmup: int, repeats: int, synchronized: bool) -> dict[str, Any]:
    for _ in range(warmup):
        _timed(fn, device, synchronized)
    return summarize([_timed(fn, device, synchronized) for _ in range(repeats)])


def fp32_exactness(device: str) -> dict[str, Any]:
    """Sequence-parallel vs plain forward of a small fp32 DiT, two shapes (batch 2 with frames cut by the
    rank slices; a token count that needs padding)."""
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.runtime.sequence_parallel import SequenceParallelDiT

    preset = _check_variant()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        graph = TransformerGraph(build_transformer(preset, device, torch.float32, seed=5))
        cases = {"b2_64x48x13": (64, 48, 13, 2), "b1_80x48x13": (80, 48, 13, 1)}
        inputs = {name: dit_inputs(preset, w, h, f, device, torch.float32, batch=b, seed=9)
                  for name, (w, h, f, b) in cases.items()}
        with torch.inference_mode():
            single = {name: graph(*x)[0] for name, x in inputs.items()}
            parallel = SequenceParallelDiT(graph)
            errors = {name: relative_l2(parallel(*x)[0].cpu().numpy(), single[name].cpu().numpy())
                      for name, x in inputs.items()}
    finally:
        torch.backends.cudnn.allow_tf32 = True
    return {"heads": preset.transformer["num_attention_heads"], "rel_l2": errors, "max_rel_l2": max(errors.values()),
            "passed_1e-5": max(errors.values()) <= 1e-5}


def _replicas_identical(model: torch.nn.Module, device: str) -> bool:
    digest = torch.stack([p.detach().float().double().sum() for p in model.parameters()]).sum().reshape(1)
    digest = digest.to(device)
    digests = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, digest)
    return all(torch.equal(d, digests[0]) for d in digests)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.runtime.sequence_parallel import SequenceParallelDiT

    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    preset = _check_variant() if args.smoke else get_preset("animate-14b")
    result: dict[str, Any] = {"world_size": world, "mode": "smoke (CPU, gloo, tiny DiT)" if args.smoke else "full",
                              "backend": dist.get_backend(), "environment": environment()}
    if device == "cuda":
        names = [None] * world
        dist.all_gather_object(names, torch.cuda.get_device_name())
        result["gpus"] = names
        result["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        result["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    result["fp32_exactness"] = fp32_exactness(device)
    log.info("rank %d: fp32 exactness %s", rank, result["fp32_exactness"]["rel_l2"])

    started = time.perf_counter()
    model = build_transformer(preset, device, dtype, seed=0, num_layers=args.num_layers)
    graph = TransformerGraph(model).eval()
    result["model"] = {"preset": preset.name, "num_layers": len(model.blocks), "dtype": str(dtype),
                       "heads": model.config.num_attention_heads,
                       "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                       "build_s": round(time.perf_counter() - started, 1),
                       "replicas_identical": _replicas_identical(model, device)}
    sizes = [_size(s) for s in args.sizes]
    shapes = {f"{w}x{h}x{f}": dit_inputs(preset, w, h, f, device, dtype) for w, h, f in sizes}
    rows: dict[str, Any] = {}
    references = {}
    with torch.inference_mode():
        for key, inputs in shapes.items():
            latent = inputs[0].shape
            timing = _time(lambda x=inputs: graph(*x), device, args.warmup, args.repeats, synchronized=False)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, timing["median_ms"])
            references[key] = graph(*inputs)[0]
            rows[key] = {"latent_input": list(latent), "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2),
                         "single": timing, "single_median_ms_per_rank": per_rank}
            log.info("rank %d: %s single %.1f ms", rank, key, timing["median_ms"])
        if device == "cuda":
            result["single_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        parallel = SequenceParallelDiT(graph)
        for key, inputs in shapes.items():
            timing = _time(lambda x=inputs: parallel(*x), device, args.warmup, args.repeats, synchronized=True)
            out = parallel(*inputs)[0]
            row = rows[key]
            row["parallel"] = timing
            row["speedup"] = round(row["single"]["median_ms"] / timing["median_ms"], 3)
            row["rel_l2_vs_single"] = relative_l2(out.float().cpu().numpy(), references[key].float().cpu().numpy())
            row["finite"] = bool(torch.isfinite(out).all())
            log.info("rank %d: %s parallel %.1f ms (x%.2f)", rank, key, timing["median_ms"], row["speedup"])
        if device == "cuda":
            result["parallel_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["sizes"] = rows
    result["timing"] = {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
                        "parallel": "slowest rank per repeat, repeats start after a barrier"}
    return result


def table(result: dict[str, Any]) -> str:
    world = result["world_size"]
    lines = [(f"world {world} ({result.get('gpus', ['cpu'])[0]}), fp32 SP rel-L2 "
              f"{result['fp32_exactness']['max_rel_l2']:.1e}, replicas identical {result['model']['replicas_identical']}"),
             (f"{'size':<14} {'tokens':>7} {'1 GPU ms':>10} {str(world) + ' GPUs ms':>10} {'speed-up':>9} "
              f"{'bf16 rel-L2':>11}")]
    for key, row in result["sizes"].items():
        lines.append(f"{key:<14} {row['tokens']:>7} {row['single']['median_ms']:>10.1f} "
                     f"{row['parallel']['median_ms']:>10.1f} {row['speedup']:>9.2f} {row['rel_l2_vs_single']:>11.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1280x720x77", "832x480x77"], help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-layers", type=int, default=None, help="fewer DiT blocks (script checks)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny DiT: checks the script")
    parser.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    args = parser.parse_args()
    if args.smoke and args.sizes == parser.get_default("sizes"):
        args.sizes = ["64x48x13", "96x64x9"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        result = run(args)
        if dist.get_rank() == 0:
            write_json(args.out, result)
            print(table(result), flush=True)
        dist.barrier()  # every rank done before the group is torn down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
