"""``wan-trt calibrate``: run the PyTorch pipeline over calibration samples and record activation ranges.

Every denoising step of every segment of every sample is observed (the DiT sees very different
activations at t≈999 and t≈1). For each Linear layer of the DiT the input's per-tensor range and
per-input-channel maxima (for SmoothQuant) are recorded; for each block's self-attention the ranges
of q, k, v (by the same method) and the largest softmax probability (``attention.py``), under keys
such as ``transformer.blocks.4.attn1.sdpa.q``; for every convolution of the VAE (encoder and decoder,
keyed ``vae.decoder.…``) the largest |input| (``conv_quant.py``; max only). Methods for the DiT's ranges:

* ``max``: the largest |x| seen;
* ``percentile``: per call, the given percentile of |x|; the largest over calls (robust to outliers);
* ``mse`` / ``entropy``: searched over a histogram of |x| gathered over all calls (``histogram.py``):
  the least quantization error for ``target`` (fp8 or int8), or TensorRT's INT8 KL-divergence search.

With ``guidance_scale > 1`` the DiT runs both CFG branches (one batch-2 call), so both are observed.

Where (``run_calibration``): by default the engines' own PyTorch reference on the CPU (fp32 for fp32
engines; days per video at full size). ``device="cuda"`` (or ``dtype="bf16"`` on the CPU, the same code
path) runs the bf16 reference rebuilt on the device (``runtime.loading.bf16_reference_engines``), so the
scales are measured on bf16 activations: the ones the fast path's FP8 Linears quantize, and the ones
Q/DQ graphs over ``--high-precision bf16`` see. The cache records the device and the DiT's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from wan_trt.calibration.attention import (SMOOTHED_TENSORS, AttentionObserver, exact_max_probability,
                                           fused_max_probability, self_attention_processors, stats_key)
from wan_trt.calibration.cache import CalibrationCache, LayerStats
from wan_trt.calibration.conv_quant import ConvRangeObserver, observe_convs
from wan_trt.calibration.histogram import AbsHistogram, entropy_amax, mse_amax
from wan_trt.calibration.quantize import QUANTIZED_PRECISIONS, linear_layers
from wan_trt.driving_inputs import DrivingInputs
from wan_trt.errors import BadInputError, EngineError
from wan_trt.presets import DEFAULT_PROMPT
from wan_trt.registry import TRANSFORMER, VAE_DECODER_STEP
from wan_trt.runtime.manifest import Manifest
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest
from wan_trt.runtime.samplers import Sampling

log = logging.getLogger(__name__)

METHODS = ("max", "percentile", "mse", "entropy")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "bf16")  # auto: bf16 on cuda, the engines' own dtypes on the CPU
_PERCENTILE_SAMPLE = 1 << 20  # |x| values kept per call for the percentile (a strided subsample)


class RangeObserver:
    """One tensor's range over every call, by ``method``. The per-input-channel maxima (and so ``max``'s
    per-tensor range, their largest) are running maxima on the tensor's device, read once at the end:
    no host sync and no full-size temporary per call (|x| per channel from min and max). ``percentile``
    and the histogram methods read per call.
    """

    def __init__(self, method: str, percentile: float) -> None:
        self.method, self.percentile = method, percentile
        self.channel_max: torch.Tensor | None = None  # fp32, on the observed tensors' device
        self.percentile_amax = 0.0
        self.calls = 0
        self.rows = 0  # token rows observed (a CFG call of batch 2 counts both branches)
        self.histogram = AbsHistogram() if method in ("mse", "entropy") else None

    def __call__(self, module, args) -> None:  # a forward pre-hook
        self.observe(args[0])

    def observe(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1, tensor.shape[-1])
        low, high = torch.aminmax(flat, dim=0)
        channel = torch.maximum(high, -low).to(torch.float32)  # = |x|.amax(0), exactly
        self.channel_max = channel if self.channel_max is None else torch.maximum(self.channel_max, channel)
        if self.histogram is not None:
            self.histogram.add(flat)
        elif self.method == "percentile":
            values = flat.reshape(-1)
            values = values[:: max(1, values.numel() // _PERCENTILE_SAMPLE)].to(torch.float32).abs()
            self.percentile_amax = max(self.percentile_amax, float(torch.quantile(values, self.percentile / 100.0)))
        self.calls += 1
        self.rows += flat.shape[0]

    @property
    def channel_amax(self) -> list[float]:
        return self.channel_max.tolist()

    def final_amax(self, target: str) -> float:
        if self.method == "mse":
            return mse_amax(self.histogram, target)
        if self.method == "entropy":
            return entropy_amax(self.histogram)
        if self.method == "percentile":
            return self.percentile_amax
        return float(self.channel_max.max())


def calibrate(pipeline: AnimatePipeline, transformer_module: torch.nn.Module, manifest: Manifest,
              samples: list[tuple[str, DrivingInputs]], *, sampling: Sampling, method: str = "max",
              percentile: float = 99.99, segment_frames: int | None = None, target: str = "fp8",
              guidance_scale: float = 1.0, vae_module: torch.nn.Module | None = None, device: str = "cpu",
              dtype: str = "fp32") -> CalibrationCache:
    """Observe the DiT's Linear and attention inputs (and the convs of ``vae_module``, a VAE graph module)
    while ``pipeline`` (torch engines on ``device``, the DiT computing in ``dtype``) generates every sample.
    The softmax maximum is exact in fp32, from fused attention in bf16/fp16 (``attention.py``)."""
    if method not in METHODS:
        raise BadInputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if target not in QUANTIZED_PRECISIONS:
        raise BadInputError(f"--target {target}: choose one of {', '.join(QUANTIZED_PRECISIONS)}")
    max_prob = exact_max_probability if dtype == "fp32" else fused_max_probability
    core = getattr(transformer_module, "inner", transformer_module)  # a half-precision wrapper's module
    observers: dict[str, RangeObserver] = {}
    handles = []
    for path, linear in linear_layers(core).items():
        observers[path] = RangeObserver(method, percentile)
        handles.append(linear.register_forward_pre_hook(observers[path]))
    attention_observers = {}
    processors = self_attention_processors(transformer_module)
    for block, processor in processors.items():
        for tensor in ("q", "k", "v", *SMOOTHED_TENSORS):
            observers[stats_key(block, tensor)] = RangeObserver(method, percentile)
        attention_observers[block] = AttentionObserver(
            lambda name, x, block=block: observers[stats_key(block, name)].observe(x), processor.self_attention,
            max_prob)
        processor.self_attention = attention_observers[block]
    conv_ranges: ConvRangeObserver | None = None
    try:
        with observe_convs(vae_module) if vae_module is not None else contextlib.nullcontext() as conv_ranges:
            _generate_all(pipeline, manifest, samples, sampling, segment_frames, guidance_scale)
    finally:
        for handle in handles:
            handle.remove()
        for block, processor in processors.items():
            processor.self_attention = attention_observers[block].attention
    layers = {path: LayerStats(amax=o.final_amax(target), channel_amax=o.channel_amax, calls=o.calls, rows=o.rows)
              for path, o in observers.items() if o.calls}
    for block, observer in attention_observers.items():
        q_stats = layers.get(stats_key(block, "q"))
        if q_stats is not None:  # P is at most 1: a fixed range, recorded by its maximum
            layers[stats_key(block, "softmax")] = LayerStats(amax=observer.softmax_amax, channel_amax=[],
                                                             calls=q_stats.calls, rows=q_stats.rows)
    for path, amax in (conv_ranges.amax if conv_ranges is not None else {}).items():
        layers[path] = LayerStats(amax=amax, channel_amax=[], calls=conv_ranges.calls[path])
    return CalibrationCache(weights_hash=manifest.weights_hash, preset=manifest.preset.name, method=method,
                            percentile=percentile if method == "percentile" else None,
                            samples=[name for name, _ in samples], steps=sampling.steps, layers=layers,
                            target=target if method == "mse" else None, guidance_scale=guidance_scale,
                            sampling=sampling.to_json(), device=torch.device(device).type, dtype=dtype)


def _generate_all(pipeline: AnimatePipeline, manifest: Manifest, samples: list[tuple[str, DrivingInputs]],
                  sampling: Sampling, segment_frames: int | None, guidance_scale: float) -> None:
    for number, (name, inputs) in enumerate(samples, 1):
        log.info("calibrating on %s (%d/%d: %d frames, %s)", name, number, len(samples), inputs.num_frames,
                 sampling.describe())
        last = time.perf_counter()

        def on_step(segment: int, segments: int, step: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            log.info("sample %d/%d, segment %d/%d, step %d/%d (%.1f s)", number, len(samples), segment + 1, segments,
                     step, total, now - last)
            last = now

        request = GenerationRequest(ref_image=inputs.ref_image, pose_frames=inputs.pose.frames,
                                    face_frames=inputs.face.frames, prompt=DEFAULT_PROMPT, sampling=sampling,
                                    guidance_scale=guidance_scale,
                                    segment_frames=segment_frames or manifest.preset.segment_frames, on_step=on_step)
        for _ in pipeline.generate(request):
            pass


def check_calibration_device(device: str, dtype: str) -> None:
    """``--device``/``--dtype``: one line naming the fix; EngineError (exit 3) for cuda without a CUDA GPU."""
    if device not in DEVICES:
        raise BadInputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False): "
                          "calibrate with --device cpu")


def compute_dtype(manifest: Manifest, device: str, dtype: str) -> str:
    """The DiT's arithmetic: bf16 on cuda or with ``--dtype bf16``, else the engines' own (fp32 for fp32 engines)."""
    return "bf16" if device == "cuda" or dtype == "bf16" else manifest.graphs[TRANSFORMER].dtype


def run_calibration(engines_dir: Path, data: list[Path], out: Path, *, steps: int | None, method: str,
                    percentile: float, segment_frames: int | None, target: str = "fp8",
                    guidance_scale: float | None = None, recipe: str | None = None, sampler: str | None = None,
                    shift: float | None = None, sigmas: str | None = None, device: str = "cpu",
                    dtype: str = "auto", manifest: Manifest | None = None) -> CalibrationCache:
    """The CLI's entry: unquantized engines dir (for the weights) + preprocessed folders → cache file.

    The sampling is resolved as for ``infer`` (``wan_trt.runtime.recipes.resolve``: the options over the
    recipe over the preset's defaults) and recorded in the cache. ``device`` cpu with ``dtype`` auto: the
    engines' PyTorch reference on the CPU (``torch_engines``; fp32 for fp32 engines). cuda, or ``dtype`` bf16 on either device:
    the bf16 reference rebuilt straight on the device (``bf16_reference_engines``), so the ranges are those of
    bf16 activations — what the fast path's FP8 Linears quantize and what Q/DQ graphs over
    ``--high-precision bf16`` see. ``manifest``: the engines' manifest where the caller has read it (the CLI).
    """
    from wan_trt.driving_inputs import load_driving_inputs
    from wan_trt.runtime.recipes import check_recipe_engines, resolve
    from wan_trt.runtime.loading import bf16_reference_engines, torch_engines
    from wan_trt.runtime.manifest import built_with, read_manifest
    from wan_trt.tokenizer import load_tokenizer, tokenize

    check_calibration_device(device, dtype)
    manifest = manifest or read_manifest(engines_dir)
    settings = resolve(recipe, sampler=sampler, steps=steps, shift=shift, sigmas=sigmas,
                       guidance_scale=guidance_scale, preset=manifest.preset)
    check_recipe_engines(settings, manifest, engines_dir, built_with(manifest))
    samples = [(str(folder), load_driving_inputs(str(folder))) for folder in data]
    arithmetic = compute_dtype(manifest, device, dtype)
    start = time.perf_counter()
    if device == "cpu" and dtype == "auto":
        engines = torch_engines(manifest, "cpu", engines_dir)
    else:
        engines = bf16_reference_engines(manifest, engines_dir, device)
    log.info("calibrating on %s in %s (model ready in %.1f s)", device, arithmetic, time.perf_counter() - start)
    tokenizer = load_tokenizer(engines_dir / manifest.tokenizer_file)
    pipeline = AnimatePipeline(engines, manifest.preset, lambda prompt: tokenize(tokenizer, prompt))
    cache = calibrate(pipeline, engines[TRANSFORMER].module, manifest, samples,
                      sampling=settings.sampling, method=method, percentile=percentile,
                      segment_frames=segment_frames, target=target, guidance_scale=settings.guidance_scale,
                      vae_module=engines[VAE_DECODER_STEP].module, device=device, dtype=arithmetic)
    cache.save(out)
    peak = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    log.info("calibration cache for %d layers written to %s (%.1f s%s)", len(cache.layers), out,
             time.perf_counter() - start, peak)
    return cache
