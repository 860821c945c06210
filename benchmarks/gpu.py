"""The GPU suite: every component of ``animate-14b --random-weights`` at full size, baseline vs fast path.

Stages run one after another and each releases what it built (the memory plan of a deployment):
umT5 → CLIP → VAE (streamed encode of 77 frames, streamed decode) → DiT (motion encoder, baseline
and fast forwards, accuracy) → kernel micro-benchmarks. Times are medians of CUDA-event-timed
repeats after a warm-up; memory is the allocator's peak in each stage.

Baseline: diffusers' modules as shipped (their own attention processors, default SDPA), bf16 with
diffusers' fp32 modules (``_keep_in_fp32_modules``), eager. Fast: ``runtime/fast/``.
"""

# ruff: noqa: B023  (every timed lambda is called at once, inside the loop iteration that made it)
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from wan_trt.calibration.policy import load_policy

from benchmarks.models import (
    build_image_encoder,
    build_text_encoder,
    build_transformer,
    build_vae,
    stock_processors,
)
from benchmarks.timing import PeakMemory, time_cuda
from wan_trt.components import TEXT_TOKENS
from wan_trt.metrics import relative_l2
from wan_trt.presets import Preset

log = logging.getLogger("benchmarks.gpu")

CEILINGS_TFLOPS = {"bf16_gemm": 750.0, "fp8_scaled_mm": 1300.0, "cudnn_sdpa_bf16": 580.0}
VOCAB = 256384


@dataclass
class GpuConfig:
    preset: Preset
    sizes: list[tuple[int, int]]  # (width, height)
    frames: int = 77
    repeats: int = 3
    warmup: int = 1
    num_layers: int | None = None  # fewer DiT blocks (smoke runs)
    components: bool = True  # umT5, CLIP, VAE
    variants: tuple[str, ...] = ("fast_bf16", "fast_fp8", "fast_fp8_every_block")
    micro: bool = True
    policy: str | None = None  # precision policy JSON [the shipped default]
    fp8_attention_kernel: str = "auto"  # auto | cudnn | fa3, for variants without a _cudnn/_fa3 suffix
    reference_noise: bool = False  # also run the baseline with SDPA pinned to each bf16 backend (its own floor)


def _release(*objs) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def _tokens(width: int, height: int, frames: int) -> int:
    latent_frames = (frames - 1) // 4 + 1
    return (latent_frames + 1) * (height // 16) * (width // 16)


# ------------------------------------------------------------------------------------------------
# Encoders and VAE
# ------------------------------------------------------------------------------------------------

def bench_text_encoder(cfg: GpuConfig) -> dict[str, Any]:
    from wan_trt.models.graphs import TextEncoderGraph

    with PeakMemory() as load:
        graph = TextEncoderGraph(build_text_encoder(cfg.preset, VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (1, TEXT_TOKENS), device="cuda")
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="cuda")
    mask[:, :32] = 1  # a short prompt, padded to 512 as the runtime does
    with torch.inference_mode(), PeakMemory() as mem:
        timing = time_cuda(lambda: graph(ids, mask), cfg.warmup, cfg.repeats)
    result = {"timing": timing, "memory": mem.to_json(), "weights_gib": round(load.peak_gib, 3),
              "shape": {"tokens": TEXT_TOKENS, "batch": 1}, "precision": "bf16"}
    _release(graph)
    return result


def bench_image_encoder(cfg: GpuConfig) -> dict[str, Any]:
    from wan_trt.models.graphs import ImageEncoderGraph

    with PeakMemory() as load:
        graph = ImageEncoderGraph(build_image_encoder(cfg.preset)).eval()
    pixels = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), PeakMemory() as mem:
        timing = time_cuda(lambda: graph(pixels), cfg.warmup, cfg.repeats)
    result = {"timing": timing, "memory": mem.to_json(), "weights_gib": round(load.peak_gib, 3),
              "shape": {"pixels": [1, 3, 224, 224]}, "precision": "bf16"}
    _release(graph)
    return result


def _vae_encode(first, step, video: torch.Tensor) -> torch.Tensor:
    outs = first(video[:, :, :1])
    latents, caches = [outs[0]], outs[1:]
    for start in range(1, video.shape[2], 4):
        outs = step(video[:, :, start:start + 4], *caches)
        latents.append(outs[0])
        caches = outs[1:]
    return torch.cat(latents, dim=2)


def _vae_decode(first, step, latents: torch.Tensor) -> torch.Tensor:
    """Streamed decode; the decoded frames go to the host chunk by chunk (as the runtime's writer takes them)."""
    outs = first(latents[:, :, :1])
    frames, caches = [outs[0].cpu()], outs[1:]
    for index in range(1, latents.shape[2]):
        outs = step(latents[:, :, index:index + 1], *caches)
        frames.append(outs[0].cpu())
        caches = outs[1:]
    return torch.cat(frames, dim=2)


def bench_vae(cfg: GpuConfig) -> dict[str, Any]:
    from wan_trt.models.graphs import (
        VaeDecoderFirst,
        VaeDecoderStep,
        VaeEncoderFirst,
        VaeEncoderStep,
    )
    from wan_trt.runtime.fast.vae import decode_streamed

    vae = build_vae(cfg.preset)
    modules = [VaeEncoderFirst(vae), VaeEncoderStep(vae), VaeDecoderFirst(vae), VaeDecoderStep(vae)]
    vae.to("cuda", torch.bfloat16)
    for m in modules:
        m.to("cuda", torch.bfloat16).eval()
    enc_first, enc_step, dec_first, dec_step = modules
    results: dict[str, Any] = {"precision": "bf16", "streamed": "1 frame, then 4-frame chunks with 2-frame caches",
                               "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 3)}
    for width, height in cfg.sizes:
        key = f"{width}x{height}"
        video = (torch.rand(1, 3, cfg.frames, height, width, device="cuda") * 2 - 1).to(torch.bfloat16)
        latent_frames = (cfg.frames - 1) // 4 + 1
        latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            with PeakMemory() as enc_mem:
                enc = time_cuda(lambda: _vae_encode(enc_first, enc_step, video), cfg.warmup, cfg.repeats)
            with PeakMemory() as dec_mem:
                dec = time_cuda(lambda: _vae_decode(dec_first, dec_step, latents), cfg.warmup, cfg.repeats)
            with PeakMemory() as fast_mem:
                fast = time_cuda(lambda: torch.cat([c.cpu() for c in decode_streamed(vae, latents)], dim=2),
                                 cfg.warmup, cfg.repeats)
            graph_video = _vae_decode(dec_first, dec_step, latents)
            fast_video = torch.cat([c.cpu() for c in decode_streamed(vae, latents)], dim=2)
        results[key] = {"encode": {"timing": enc, "memory": enc_mem.to_json(), "frames": cfg.frames},
                        "decode": {"timing": dec, "memory": dec_mem.to_json(), "latent_frames": latent_frames,
                                   "frames_out": cfg.frames, "how": "graph modules, explicit cache I/O"},
                        "decode_inplace_cache": {"timing": fast, "memory": fast_mem.to_json(),
                                                 "how": "runtime.fast.vae.decode_streamed (caches handed over)",
                                                 "max_abs_vs_graph_decode": float((fast_video.float() - graph_video.float()).abs().max())}}
        del graph_video, fast_video
        _release(video, latents)
    _release(*modules, vae)
    return results


# ------------------------------------------------------------------------------------------------
# DiT
# ------------------------------------------------------------------------------------------------

def dit_inputs(width: int, height: int, frames: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    latent_frames = (frames - 1) // 4 + 1
    h, w = height // 8, width // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    return (rnd(1, 36, latent_frames + 1, h, w), torch.tensor([500.0], device="cuda"), rnd(1, TEXT_TOKENS, 4096),
            rnd(1, 257, 1280), rnd(1, 16, latent_frames, h, w), rnd(1, frames, 512))


def dit_flops(cfg: GpuConfig, width: int, height: int) -> dict[str, float]:
    """Matmul FLOPs of one DiT forward (TFLOP): block Linears, self-attention, cross-attention."""
    tr = cfg.preset.transformer
    dim = tr["num_attention_heads"] * tr["attention_head_dim"]
    layers = cfg.num_layers or tr["num_layers"]
    tokens = _tokens(width, height, cfg.frames)
    per_token = 2 * (6 * dim * dim + 2 * dim * tr["ffn_dim"])  # q,k,v,o, cross q,o; FFN up/down
    linear = per_token * tokens * layers
    self_attn = 4 * tokens * tokens * dim * layers
    cross_attn = 4 * tokens * (TEXT_TOKENS + 257) * dim * layers
    return {"tokens": tokens, "linear_tflop": linear / 1e12, "self_attention_tflop": self_attn / 1e12,
            "cross_attention_tflop": cross_attn / 1e12,
            "total_tflop": (linear + self_attn + cross_attn) / 1e12}


def bench_dit(cfg: GpuConfig) -> dict[str, Any]:
    from wan_trt.calibration.cache import CalibrationCache
    from wan_trt.calibration.quantize import make_plan
    from wan_trt.models.graphs import MotionEncoderGraph, TransformerGraph
    from wan_trt.runtime.fast.linear import AmaxObserver, fp8_plan
    from wan_trt.dtypes import cast_floats
    from wan_trt.runtime.fast.transformer import ATTENTION_MARGIN, BLOCK_LINEARS

    import torch._dynamo

    # the compiled glue specializes per shape, dtype and FP8-or-not: two sizes and the diagnostic variants can
    # exceed dynamo's default 8 per function (it would then run that function eagerly, slower)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    with PeakMemory() as load:
        model = build_transformer(cfg.preset, num_layers=cfg.num_layers)
    graph = stock_processors(TransformerGraph(model))
    out: dict[str, Any] = {"weights_gib_bf16": round(load.peak_gib, 3),
                           "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                           "num_layers": len(model.blocks)}

    # motion encoder: 77 face crops at 512², batches of 8 (the runtime's MOTION_BATCH), bf16, basis fp32
    motion = cast_floats(MotionEncoderGraph(model.motion_encoder), torch.bfloat16, ("basis_q_t",)).eval()
    faces = torch.rand(cfg.frames, 3, 512, 512, device="cuda").mul(2).sub(1).to(torch.bfloat16)
    with torch.inference_mode(), PeakMemory() as mem:
        timing = time_cuda(lambda: [motion(faces[i:i + 8]) for i in range(0, cfg.frames, 8)], cfg.warmup, cfg.repeats)
    out["motion_encoder"] = {"timing": timing, "memory": mem.to_json(), "faces": cfg.frames, "batch": 8,
                             "precision": "bf16 (motion basis fp32)"}
    _release(faces)

    policies = {"fast_fp8": load_policy(cfg.policy), "fast_fp8_every_block": load_policy("every-block"),
                "fast_int8": load_policy(cfg.policy)}
    num_blocks = len(model.blocks)
    linears = {f"transformer.{n}": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    observed = {f"transformer.blocks.{b}.{n}" for b in range(num_blocks) for n in BLOCK_LINEARS}
    variants: dict[str, Any] | None = None
    out["sizes"] = {}
    for width, height in cfg.sizes:
        key = f"{width}x{height}"
        inputs = dit_inputs(width, height, cfg.frames)
        row: dict[str, Any] = {"shape": {"latent_input": list(inputs[0].shape), "tokens": _tokens(width, height, cfg.frames),
                                         "frames": cfg.frames}, "flops": dit_flops(cfg, width, height)}
        with torch.inference_mode():
            if variants is None:  # calibrate on the first size's baseline warm-up (random weights: no cache exists)
                observer = AmaxObserver({p: m for p, m in linears.items() if p in observed}, channels=True)
                graph(*inputs)
                channel_amax = observer.remove_channels()
                amax = {name: max(values) for name, values in channel_amax.items()}
                int8_cache = CalibrationCache.from_channel_maxima(channel_amax, "animate-14b", f"one forward at {key}")
                plans = {name: (make_plan(linears, int8_cache, policy, "int8", num_blocks) if name == "fast_int8"
                                else fp8_plan(linears, amax, policy, num_blocks))
                         for name, policy in policies.items()
                         if name != "fast_int8" or any(v.startswith("fast_int8") for v in cfg.variants)}
                out["calibration"] = {"method": "max", "samples": f"one bf16 forward at {key}, t=500, random inputs",
                                      "layers": len(amax),
                                      "policies": {name: {**policies[name].to_json(), "quantized_layers": len(plan.layers)}
                                                   for name, plan in plans.items()},
                                      "attention": {"margin": ATTENTION_MARGIN,
                                                    "samples": f"one fast forward at {key}, t=500 (static q/k/v scales)"}}
                variants = _variants(graph, plans, cfg.variants, cfg.fp8_attention_kernel)
                for fast in variants.values():
                    if fast.fp8_attention:  # static q/k/v scales, as `infer --fast` uses (there: from the cache)
                        fast.record_attention_amax()
                        fast(*inputs)
                        fast.use_static_attention()
            with PeakMemory() as mem:
                base_t = time_cuda(lambda: graph(*inputs), cfg.warmup, cfg.repeats)
            reference = graph(*inputs)[0].float()
            row["diffusers_eager_bf16"] = {"timing": base_t, "memory": mem.to_json()}
            if cfg.reference_noise:
                row["diffusers_eager_bf16"]["rel_l2_with_sdpa_pinned"] = _reference_noise(graph, inputs, reference)
            for name, fast in variants.items():
                try:
                    row[name] = _measure_variant(fast, inputs, reference, base_t, row["flops"], cfg)
                except Exception as error:
                    log.exception("%s %s failed", key, name)
                    row[name] = {"error": f"{type(error).__name__}: {error}"[:1000]}
                    continue
                log.info("%s %s: %.1f ms (baseline %.1f ms, ratio %.3f), rel-L2 %.3e", key, name,
                         row[name]["timing"]["median_ms"], base_t["median_ms"], row[name]["ratio_to_baseline"],
                         row[name]["rel_l2_vs_diffusers_bf16"])
            row["diffusers_eager_bf16"]["achieved_tflops"] = row["flops"]["total_tflop"] / (base_t["median_ms"] / 1e3)
            log.info("%s baseline: %.1f ms", key, base_t["median_ms"])
        out["sizes"][key] = row
        _release(inputs, reference)
    for name, fast in (variants or {}).items():
        if fast.plan is not None:
            fp8_weights = sum(b.numel() * b.element_size() for b in fast.buffers() if b.dtype == torch.float8_e4m3fn)
            out.setdefault("fp8_weight_gib", {})[name] = round(fp8_weights / 2**30, 3)
    _release(variants, graph, model, motion)
    return out


def _reference_noise(graph, inputs, reference) -> dict[str, float]:
    """The baseline again with SDPA pinned to one bf16 backend, rel-L2 to the default run: how far two
    valid bf16 runs of the same model are (0 for the backend the default picks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                got = graph(*inputs)[0].float()
        except RuntimeError as error:  # the backend refused a shape
            log.warning("reference with SDPA %s: %s", name, error)
            continue
        out[name] = relative_l2(got.cpu().numpy(), reference.cpu().numpy())
        log.info("baseline with SDPA pinned to %s: rel-L2 %.3e to the default", name, out[name])
        del got
    return out


def _measure_variant(fast, inputs, reference, base_t, flops, cfg: GpuConfig) -> dict[str, Any]:
    with PeakMemory() as mem:
        t = time_cuda(lambda: fast(*inputs), cfg.warmup + 1, cfg.repeats)  # +1: compile happens first
    got = fast(*inputs)[0].float()
    return {"timing": t, "memory": mem.to_json(), "options": fast.options.to_json(),
            "fp8_attention_kernel": fast.fp8_kernel_name, "bf16_attention_kernel": fast.bf16_kernel_name,
            "fp8_attention_blocks": sorted(fast.fp8_attention),
            "static_attention_scales": bool(fast.attention_scales),
            "rel_l2_vs_diffusers_bf16": relative_l2(got.cpu().numpy(), reference.cpu().numpy()),
            "speedup_vs_baseline": base_t["median_ms"] / t["median_ms"],
            "ratio_to_baseline": t["median_ms"] / base_t["median_ms"],
            "achieved_tflops": flops["total_tflop"] / (t["median_ms"] / 1e3)}


# diagnostic modifiers: NAME+MODIFIER runs variant NAME with one option changed (the same weights)
VARIANT_MODIFIERS = {"eager_glue": {"compile": False}, "fp32_residual": {"residual": "fp32"},
                     "fa3_bf16": {"bf16_attention_kernel": "fa3"}, "sdpa_bf16": {"bf16_attention_kernel": "sdpa"},
                     "no_smoothing": {"attention_smoothing": "none"}, "smooth_k": {"attention_smoothing": "k"},
                     "smooth_kv": {"attention_smoothing": "kv"}}


def _variants(graph, plans: dict[str, Any], names: tuple[str, ...], kernel: str = "auto") -> dict[str, Any]:
    """The fast variants: ``fast_bf16``; ``fast_fp8`` (the policy's FP8 Linears and self-attention),
    ``fast_fp8_every_block`` (the every-block policy), either with the suffix ``_cudnn`` or ``_fa3`` to pin
    the FP8 attention kernel (else ``kernel``); ``fast_fp8_linears_bf16_attention`` (the policy's FP8
    Linears, bf16 attention: shares ``fast_fp8``'s FP8 weights). Each calibrates its own static attention
    scales (bench_dit). Any of them ``+eager_glue`` (element-wise glue not compiled), ``+fp32_residual``
    (fp32 residual stream): diagnostics of the numerical floor; ``+fa3_bf16`` / ``+sdpa_bf16``: the bf16
    self-attention's kernel pinned (else it follows the FP8 one); ``+no_smoothing`` / ``+smooth_k`` /
    ``+smooth_kv``: the FP8 attention's inputs not smoothed, k only, or k and v (``smooth_kv``; default v)."""
    out: dict[str, Any] = {}
    by_plan: dict[str, Any] = {}  # plan name -> its first FastTransformer (variants of one plan share FP8 weights)
    for name in names:
        base, *mods = name.split("+")
        unknown = [m for m in mods if m not in VARIANT_MODIFIERS]
        if unknown:
            raise ValueError(f"variant {name}: unknown modifier {unknown[0]}; choose from {', '.join(VARIANT_MODIFIERS)}")
        if base not in out:
            out[base] = _base_variant(graph, plans, base, kernel, by_plan)
        if mods:
            out[name] = out[base].with_options(**{k: v for m in mods for k, v in VARIANT_MODIFIERS[m].items()})
    return {name: out[name] for name in names}


def _base_variant(graph, plans: dict[str, Any], name: str, kernel: str, by_plan: dict[str, Any]):
    """One variant without modifiers; FP8 variants of one plan share its weights through ``by_plan``."""
    from wan_trt.runtime.fast.transformer import FastOptions, FastTransformer

    base, _, pinned = name.rpartition("_") if name.endswith(("_cudnn", "_fa3")) else (name, "", "")
    fp8 = FastOptions(attention="fp8", fp8_attention_blocks="policy", fp8_attention_kernel=pinned or kernel)
    if name == "fast_bf16":  # its self-attention kernel follows ``kernel`` too (bf16_attention_kernel auto)
        return FastTransformer(graph, None, FastOptions(attention="bf16", fp8_attention_kernel=kernel)).to("cuda")
    if name == "fast_int8":  # INT8 W8A8 Linears (torch._int_mm), bf16 attention: GPUs without FP8
        return FastTransformer(graph, plans[name], FastOptions(attention="bf16", fp8_attention_kernel=kernel)).to("cuda")
    if name == "fast_fp8_linears_bf16_attention":
        base = "fast_fp8"
    elif base not in ("fast_fp8", "fast_fp8_every_block"):
        raise ValueError(f"unknown variant {name}: choose from fast_bf16, fast_fp8, fast_fp8_every_block, "
                         "fast_fp8_linears_bf16_attention, fast_int8")
    first = base not in by_plan
    if first:
        by_plan[base] = FastTransformer(graph, plans[base], fp8).to("cuda")
    if name == "fast_fp8_linears_bf16_attention":
        return by_plan[base].with_options(attention="bf16", fp8_attention_kernel=fp8.fp8_attention_kernel)
    # the plan's first variant, or the same plan with another attention kernel
    return by_plan[base] if first else by_plan[base].with_options(fp8_attention_kernel=fp8.fp8_attention_kernel)


# ------------------------------------------------------------------------------------------------
# Kernel micro-benchmarks (the ceilings)
# ------------------------------------------------------------------------------------------------

def bench_micro(cfg: GpuConfig) -> dict[str, Any]:
    from wan_trt.runtime.fast.attention import CudnnFp8Attention, sdpa
    from wan_trt.runtime.fast.glue import quant_dynamic

    tr = cfg.preset.transformer
    heads, head_dim = tr["num_attention_heads"], tr["attention_head_dim"]
    dim, ffn = heads * head_dim, tr["ffn_dim"]
    out: dict[str, Any] = {"ceilings_tflops": CEILINGS_TFLOPS, "gemm": {}, "attention": {}}
    for width, height in cfg.sizes:
        m = _tokens(width, height, cfg.frames)
        for k, n in ((dim, 3 * dim), (dim, dim), (dim, ffn), (ffn, dim)):
            key = f"M{m}_K{k}_N{n}"
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
            flop = 2 * m * k * n
            row = {}
            t = time_cuda(lambda: torch.nn.functional.linear(a, w), 2, 5)
            row["bf16"] = {"median_ms": t["median_ms"], "tflops": flop / t["median_ms"] / 1e9}
            a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            rows_a, cols_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
            for label, sa, sb, fast in (("fp8_tensorwise", one, one, True), ("fp8_rowwise", rows_a, cols_b, True),
                                        ("fp8_rowwise_exact_accum", rows_a, cols_b, False)):
                try:
                    t = time_cuda(lambda: torch._scaled_mm(a8, w8.t(), sa, sb, out_dtype=torch.bfloat16,
                                                           use_fast_accum=fast), 2, 5)
                    row[label] = {"median_ms": t["median_ms"], "tflops": flop / t["median_ms"] / 1e9}
                except RuntimeError as error:
                    row[label] = {"error": str(error)[:300]}
            out["gemm"][key] = row
            _release(a, w, a8, w8)
        # self-attention at the DiT's token count
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, m, heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
        flop = 4 * m * m * dim
        row = {"tokens": m, "tflop": flop / 1e12}
        t = time_cuda(lambda: sdpa(q, k, v), 1, 5)
        row["cudnn_bf16_sdpa"] = {"median_ms": t["median_ms"], "tflops": flop / t["median_ms"] / 1e9}
        ref = sdpa(q, k, v).float()
        try:
            attn = CudnnFp8Attention()
            (q8, dq), (k8, dk), (v8, dv) = quant_dynamic(q), quant_dynamic(k), quant_dynamic(v)
            t = time_cuda(lambda: attn(q8, k8, v8, dq, dk, dv), 1, 5)
            row["cudnn_fp8_sdpa_kernel"] = {"median_ms": t["median_ms"], "tflops": flop / t["median_ms"] / 1e9}

            def fp8_full():
                (q8_, dq_), (k8_, dk_), (v8_, dv_) = quant_dynamic(q), quant_dynamic(k), quant_dynamic(v)
                return attn(q8_, k8_, v8_, dq_, dk_, dv_)

            t = time_cuda(fp8_full, 1, 5)
            row["cudnn_fp8_sdpa_with_quant"] = {"median_ms": t["median_ms"], "tflops": flop / t["median_ms"] / 1e9}
            o8, do = fp8_full()
            row["cudnn_fp8_rel_l2_vs_bf16_random_qkv"] = relative_l2(
                (o8.float() * do.reshape(())).flatten(2).cpu().numpy(), ref.cpu().numpy())
        except Exception as error:  # noqa: BLE001 - recorded: the JSON says why FP8 attention is missing
            row["cudnn_fp8_sdpa_kernel"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        try:  # does torch itself take FP8 q/k/v in SDPA? (measured, not assumed)
            q8t = q.to(torch.float8_e4m3fn).transpose(1, 2)
            torch.nn.functional.scaled_dot_product_attention(q8t, q8t, q8t)
            row["torch_sdpa_fp8_inputs"] = "accepted"
        except Exception as error:  # noqa: BLE001
            row["torch_sdpa_fp8_inputs"] = f"refused: {type(error).__name__}: {str(error)[:200]}"
        out["attention"][f"{width}x{height}"] = row
        _release(q, k, v, ref)
    return out


def run_gpu(cfg: GpuConfig) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if cfg.components:
        log.info("umT5 ...")
        results["text_encoder"] = bench_text_encoder(cfg)
        log.info("CLIP ...")
        results["image_encoder"] = bench_image_encoder(cfg)
        log.info("VAE ...")
        results["vae"] = bench_vae(cfg)
    log.info("DiT ...")
    results["dit"] = bench_dit(cfg)
    if cfg.micro:
        log.info("micro-benchmarks ...")
        results["micro"] = bench_micro(cfg)
    results["segment_estimate"] = segment_estimate(results, cfg)
    return results


def segment_estimate(results: dict[str, Any], cfg: GpuConfig, steps: int = 20) -> dict[str, Any]:
    """One 77-frame segment, 20 steps, no CFG: pose + guide VAE encodes, motion encoder, 20 DiT calls, decode.

    Per video once (not included): umT5 (only for a custom prompt), CLIP, the reference frame's encode.
    """
    dit, vae = results.get("dit", {}), results.get("vae", {})
    out: dict[str, Any] = {"steps": steps, "cfg": False,
                           "formula": "2*vae_encode(77 frames) + motion_encoder(77) + steps*dit + vae_decode(20 latent frames)"}
    for key, row in dit.get("sizes", {}).items():
        fixed = dit["motion_encoder"]["timing"]["median_ms"]
        if key in vae:
            fixed += 2 * vae[key]["encode"]["timing"]["median_ms"] + vae[key]["decode"]["timing"]["median_ms"]
        per = {}
        for name in ("diffusers_eager_bf16", *cfg.variants):
            if name in row and "timing" in row[name]:
                per[name] = round((fixed + steps * row[name]["timing"]["median_ms"]) / 1e3, 2)
        out[key] = {"seconds": per, "includes_vae": key in vae}
    return out
