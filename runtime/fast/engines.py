"""The engines of ``infer --fast``: the fast DiT, VAE and encoders behind the runtime's engine interface,
and the FP8 plan read from the engines' calibration cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from wan_trt.calibration.attention import DEFAULT_SMOOTHING, range_names
from wan_trt.calibration.quantize import QuantPlan
from wan_trt.devices import host_work_on_gpu
from wan_trt.dtypes import cast_floats
from wan_trt.errors import EngineError
from wan_trt.registry import (
    GRAPHS,
    TEXT_ENCODER,
    TRANSFORMER,
    VAE_DECODER_FIRST,
    VAE_DECODER_STEP,
    VAE_ENCODER_FIRST,
    VAE_ENCODER_STEP,
)
from wan_trt.runtime.engines import pipeline_outputs
from wan_trt.runtime.fast.compiled import compile_times, use_persistent_compile_cache
from wan_trt.runtime.fast.streaming import STREAM_AHEAD
from wan_trt.runtime.fast.transformer import FastOptions, FastTransformer
from wan_trt.runtime.fast.vae import DEFAULT_VAE_SPEEDUPS, MEMORY_PLAN_VAE_SPEEDUPS, speed_up_vae
from wan_trt.runtime.options import RuntimeOptions
from wan_trt.runtime.run_report import Phases

log = logging.getLogger(__name__)

VAE_GRAPHS = (VAE_ENCODER_FIRST, VAE_ENCODER_STEP, VAE_DECODER_FIRST, VAE_DECODER_STEP)
FAST_PRECISIONS = ("fp32", "fp8", "int8")  # the engines --fast runs (fp16/bf16 ones: without --fast)


class FastEngine:
    """A graph module on the GPU in bf16: float inputs cast on the way in; caches stay on the device,
    other outputs come back as float32 on the host. ``offload``: the module lives on the host and
    visits the GPU only for its call (the memory plan of the one-shot encoders). A streamed VAE step
    graph takes its feature caches out of ``feed`` (the caller hands them over, see
    ``forward_taking_caches``): each is freed as soon as the chunk has replaced it."""

    def __init__(self, module: torch.nn.Module, spec, device: str = "cuda", dtype: torch.dtype | None = torch.bfloat16,
                 offload: bool = False, place: bool = True) -> None:
        self.module, self.spec, self.device, self.dtype, self.offload = module, spec, device, dtype, offload
        if place:  # (a DiT with streamed blocks has placed itself)
            self.module.to("cpu" if offload else device)
        self.seconds = 0.0

    def _on_device(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device, non_blocking=True)
        return value.to(self.dtype) if self.dtype is not None and value.is_floating_point() else value

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import time

        cache_names = [name for name, _ in self.spec.cache_pairs]
        caches = [self._on_device(feed.pop(name)) for name in cache_names]  # handed over: no other reference
        args = [self._on_device(feed[t.name]) for t in self.spec.inputs if t.name not in cache_names]
        start = time.perf_counter()
        if self.offload:
            self.module.to(self.device)
        with torch.inference_mode():
            outputs = self.module.forward_taking_caches(*args, caches) if cache_names else self.module(*args)
        if self.offload:
            self.module.to("cpu")
            torch.cuda.empty_cache()
        result = pipeline_outputs(self.spec.output_names, outputs, torch.float32)  # the host copy waits for the GPU
        self.seconds += time.perf_counter() - start
        return result


class LazyEngine:
    """An engine made on its first call (``make``), so that a graph the run never calls is never loaded."""

    def __init__(self, spec, make: Callable[[], FastEngine]) -> None:
        self.spec, self._make, self._engine = spec, make, None

    @property
    def seconds(self) -> float:
        return self._engine.seconds if self._engine is not None else 0.0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._engine is None:
            self._engine = self._make()
        return self._engine.run(feed)


def _text_encoder_engine(manifest, directory) -> FastEngine:
    """umT5 for a prompt the build did not embed: made now, on the GPU in bf16, kept on the host between calls."""
    from wan_trt.runtime.loading import reference_graph_modules

    log.info("a prompt is not in the build's cache: loading the text encoder")
    module = reference_graph_modules(manifest, directory, "cuda", torch.bfloat16, graphs=[TEXT_ENCODER])[TEXT_ENCODER]
    return FastEngine(cast_floats(module, torch.bfloat16), manifest.graphs[TEXT_ENCODER].spec, "cuda",
                      torch.bfloat16, offload=GRAPHS[TEXT_ENCODER].once_per_video)


def fast_plan(graph: torch.nn.Module, directory, manifest,
              smoothing: str = "auto") -> tuple[QuantPlan, dict[int, tuple[float, float, float]], str]:
    """The FP8 plan of a quantized engines directory (its calibration cache and policy, as the build made it),
    the calibrated |q|, |k|, |v| ranges of the blocks whose self-attention it quantizes (k's and v's less
    their token mean where the smoothing subtracts it), and that smoothing: ``smoothing``, or for auto
    ``DEFAULT_SMOOTHING`` where the cache has its ranges, else none (logged: a cache from before smoothing)."""
    from wan_trt.calibration.attention import stats_key
    from wan_trt.calibration.cache import load_cache
    from wan_trt.calibration.policy import PrecisionPolicy
    from wan_trt.calibration.quantize import linear_layers, make_plan

    q = manifest.quantization
    policy = PrecisionPolicy.from_json(q["policy"])
    path = directory / q["calibration_file"]
    cache = load_cache(path)
    plan = make_plan(linear_layers(graph), cache, policy, q["precision"], int(manifest.preset.transformer["num_layers"]),
                     head_dim=int(graph.transformer.config.attention_head_dim))
    def keys(mode: str) -> list[list[str]]:
        return [[stats_key(block, name) for name in range_names(mode)] for block in sorted(plan.attention)]

    def missing(mode: str) -> list[str]:
        return [key for row in keys(mode) for key in row if key not in cache.layers]

    if smoothing == "auto":
        smoothing = DEFAULT_SMOOTHING
        if missing(smoothing):
            log.warning("%s predates FP8 attention smoothing (no %s): --fast runs its FP8 attention unsmoothed; "
                        "re-run wan-trt calibrate and wan-trt build --calibration for about half the error "
                        "(docs/precision.md)", path, missing(smoothing)[0])
            smoothing = "none"
    if missing(smoothing):
        raise EngineError(f"{path} has no range for {missing(smoothing)[0]} (--fp8-attention-smoothing {smoothing}; "
                          "caches calibrated before smoothing existed lack them): re-run wan-trt calibrate and "
                          "wan-trt build --calibration with the new cache, or pass --fp8-attention-smoothing none")
    ranges = {block: tuple(cache.layers[key].amax for key in row)
              for block, row in zip(sorted(plan.attention), keys(smoothing))}
    return plan, ranges, smoothing


def warm_up_seconds() -> dict[str, float | int]:
    """What this process has spent so far making the fast path's kernels, for ``infer --timings``: most of
    the first denoising step's warm-up on a fresh machine (torch.compile, cuDNN's FP8 attention graphs;
    a figure this torch does not report is left out)."""
    from wan_trt.runtime.fast.attention import CudnnFp8Attention

    times = compile_times()
    seconds = {"compiling_s": None if times is None else float(sum(times)),
               "compiles": None if times is None else len(times),
               "attention graphs_s": CudnnFp8Attention.build_seconds}
    return {key: value for key, value in seconds.items() if value is not None}


def cap_allocator(size: int) -> None:
    """Cap torch's allocator so that the process uses at most ``size`` bytes of the GPU: ``size`` less what
    is already in use outside the allocator (the CUDA context, libraries' handles)."""
    free, total = torch.cuda.mem_get_info()
    outside = max(0, total - free - torch.cuda.memory_reserved())
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (size - outside) / total)))
    log.info("GPU memory capped at %.2f GiB (%.2f GiB of it outside torch's allocator)", size / 2**30, outside / 2**30)


def fast_torch_engines(manifest, directory, options: RuntimeOptions) -> dict:
    """The ``--fast`` engines for an fp32 or fp8 engines directory (see the module docstring), with the FP8
    attention kernel and smoothing of ``options`` (which checked, when made, that they ask for ``--fast``
    on ``--backend torch --device cuda``)."""
    from wan_trt.runtime.loading import reference_graph_modules

    if not torch.cuda.is_available():
        raise EngineError("--fast needs a CUDA GPU (torch.cuda.is_available() is False): run without --fast on a CPU")
    precision = manifest.precision
    if precision not in FAST_PRECISIONS:
        raise EngineError(f"--fast runs fp32, fp8 and int8 engines; these are {precision}: run them without --fast")
    if options.max_gpu_memory is not None:  # the allocator refuses more than the plan's budget
        cap_allocator(options.max_gpu_memory)
    compile_cache = use_persistent_compile_cache()
    log.info("torch.compile's kernels are kept in %s", compile_cache or "Inductor's default folder")
    # straight to the GPU in bf16 (to the host when the DiT's blocks stream from there); umT5 (11 GB at full
    # size) only if a prompt is not in the build's cache
    load_device = "cpu" if options.stream_blocks is not None else "cuda"
    phases = Phases()  # where the loading goes (one log line; benchmarks/end_to_end.py records it)
    with host_work_on_gpu():  # a model loaded on the host: its weights drawn and quantized on the GPU
        with phases("modules"):
            modules = reference_graph_modules(manifest, directory, load_device, torch.bfloat16,
                                              graphs=[name for name in manifest.graphs if name != TEXT_ENCODER],
                                              trust_fingerprint=True)
        with phases("plan"):
            plan, attention_ranges, smoothing = (fast_plan(modules[TRANSFORMER], directory, manifest,
                                                           options.fp8_attention_smoothing)
                                                 if precision in ("fp8", "int8") else (None, {}, "none"))
        graph = modules[TRANSFORMER]
        keep = tuple(getattr(graph.transformer, "_keep_in_fp32_modules", None) or ())
        with phases("cast"):
            cast_floats(graph, torch.bfloat16, keep, device=load_device)
        fast_options = FastOptions(attention="fp8" if attention_ranges else "bf16", fp8_attention_blocks="plan",
                                   fp8_attention_kernel=options.fp8_attention_kernel, attention_smoothing=smoothing)
        with phases("quantize"):
            fast = FastTransformer(graph, plan, fast_options, release_bf16=True)
    if options.stream_blocks is not None:
        with phases("pin"):
            streamer = fast.stream_blocks("cuda", STREAM_AHEAD, options.stream_blocks)
        log.info("fast DiT: %d of %d blocks wait in pinned host memory (%.1f GiB), copied to the GPU %d ahead of "
                 "use", len(streamer.groups), len(fast.block_ops),
                 sum(map(streamer.group_bytes, range(len(streamer.groups)))) / 2**30, STREAM_AHEAD)
    else:
        with phases("to GPU"):
            fast.to("cuda")
    with phases("attention kernels"):
        if attention_ranges:  # the calibrated ranges the Q/DQ graph uses, with the fast path's headroom
            fast.use_static_attention(attention_ranges)
            fast._attention_fp8()  # choose (and check) the kernel now, before any video is decoded
        if len(fast.fp8_attention) < len(fast.block_ops):
            fast._attention_bf16_kernel()  # the same for the bf16 self-attention's kernel
    torch.cuda.empty_cache()
    log.info("fast DiT: %s Linears; %s self-attention (FP8 in %d of %d blocks%s%s; bf16 on %s)",
             plan.precision.upper() if plan else "bf16", fast_options.attention, len(fast.fp8_attention), len(fast.block_ops),
             f", {fast.fp8_kernel_name}" if fast.fp8_kernel_name else "",
             f", smoothing {fast_options.attention_smoothing}" if fast.fp8_attention else "", fast.bf16_kernel_name)
    engines = {}
    with phases("other graphs"):  # placed on the GPU, or the host for the once-per-video encoders
        for name, entry in manifest.graphs.items():
            if name == TEXT_ENCODER:
                engines[name] = LazyEngine(entry.spec, lambda: _text_encoder_engine(manifest, directory))
                continue
            if name == TRANSFORMER:
                engines[name] = FastEngine(fast, entry.spec, "cuda", dtype=None,  # casts itself; timestep stays fp32
                                           place=options.stream_blocks is None)
                continue
            offload = GRAPHS[name].once_per_video  # run once per video, before the DiT
            module = cast_floats(modules[name], torch.bfloat16, ("basis_q_t",))  # the motion basis stays fp32
            engines[name] = FastEngine(module, entry.spec, "cuda", torch.bfloat16, offload=offload)
        vae = next((modules[name].vae for name in VAE_GRAPHS if name in modules), None)
        if vae is not None:  # the four streamed VAE graphs share one AutoencoderKLWan
            speedups = DEFAULT_VAE_SPEEDUPS if options.max_gpu_memory is None else MEMORY_PLAN_VAE_SPEEDUPS
            speed_up_vae(vae, speedups)
            log.info("fast VAE: caches handed over from chunk to chunk, %s", ", ".join(speedups))
    log.info("fast path loaded: %s", phases)
    return engines
