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
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from wan_trt.calibration.attention import SMOOTHED_TENSORS, AttentionObserver, self_attention_processors, stats_key
from wan_trt.calibration.cache import CalibrationCache, LayerStats
from wan_trt.calibration.conv_quant import ConvRangeObserver, observe_convs
from wan_trt.calibration.histogram import AbsHistogram, entropy_amax, mse_amax
from wan_trt.calibration.quantize import QUANTIZED_PRECISIONS, linear_layers
from wan_trt.driving_inputs import DrivingInputs
from wan_trt.errors import BadInputError
from wan_trt.presets import DEFAULT_PROMPT
from wan_trt.runtime.manifest import Manifest
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest
from wan_trt.runtime.samplers import Sampling

log = logging.getLogger(__name__)

METHODS = ("max", "percentile", "mse", "entropy")
_PERCENTILE_SAMPLE = 1 << 20  # |x| values kept per call for the percentile (a strided subsample)


class _RangeObserver:
    def __init__(self, method: str, percentile: float) -> None:
        self.method, self.percentile = method, percentile
        self.amax = 0.0
        self.channel_amax: torch.Tensor | None = None
        self.calls = 0
        self.rows = 0  # token rows observed (a CFG call of batch 2 counts both branches)
        self.histogram = AbsHistogram() if method in ("mse", "entropy") else None

    def __call__(self, module, args) -> None:  # a forward pre-hook
        self.observe(args[0])

    def observe(self, tensor: torch.Tensor) -> None:
        x = tensor.detach().to(torch.float32).abs()
        flat = x.reshape(-1, x.shape[-1])
        channel = flat.amax(dim=0)
        self.channel_amax = channel if self.channel_amax is None else torch.maximum(self.channel_amax, channel)
        if self.histogram is not None:
            self.histogram.add(flat)
            value = float(channel.max())
        elif self.method == "max":
            value = float(channel.max())
        else:
            values = flat.reshape(-1)
            values = values[:: max(1, values.numel() // _PERCENTILE_SAMPLE)]
            value = float(torch.quantile(values, self.percentile / 100.0))
        self.amax = max(self.amax, value)
        self.calls += 1
        self.rows += flat.shape[0]

    def final_amax(self, target: str) -> float:
        if self.method == "mse":
            return mse_amax(self.histogram, target)
        if self.method == "entropy":
            return entropy_amax(self.histogram)
        return self.amax


def calibrate(pipeline: AnimatePipeline, transformer_module: torch.nn.Module, manifest: Manifest,
              samples: list[tuple[str, DrivingInputs]], *, sampling: Sampling, method: str = "max",
              percentile: float = 99.99, segment_frames: int | None = None, target: str = "fp8",
              guidance_scale: float = 1.0, vae_module: torch.nn.Module | None = None) -> CalibrationCache:
    """Observe the DiT's Linear and attention inputs (and the convs of ``vae_module``, a VAE graph module)
    while ``pipeline`` (torch engines) generates every sample."""
    if method not in METHODS:
        raise BadInputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if target not in QUANTIZED_PRECISIONS:
        raise BadInputError(f"--target {target}: choose one of {', '.join(QUANTIZED_PRECISIONS)}")
    observers = {}
    handles = []
    for path, linear in linear_layers(transformer_module).items():
        observers[path] = _RangeObserver(method, percentile)
        handles.append(linear.register_forward_pre_hook(observers[path]))
    attention_observers = {}
    processors = self_attention_processors(transformer_module)
    for block, processor in processors.items():
        for tensor in ("q", "k", "v", *SMOOTHED_TENSORS):
            observers[stats_key(block, tensor)] = _RangeObserver(method, percentile)
        attention_observers[block] = AttentionObserver(
            lambda name, x, block=block: observers[stats_key(block, name)].observe(x), processor.self_attention)
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
    layers = {path: LayerStats(amax=o.final_amax(target), channel_amax=o.channel_amax.tolist(), calls=o.calls,
                               rows=o.rows)
              for path, o in observers.items() if o.calls}
    for block, observer in attention_observers.items():
        q_stats = layers.get(stats_key(block, "q"))
        if q_stats is not None:  # P is at most 1: a fixed range, recorded by its exact maximum
            layers[stats_key(block, "softmax")] = LayerStats(amax=observer.softmax_amax, channel_amax=[],
                                                             calls=q_stats.calls, rows=q_stats.rows)
    for path, amax in (conv_ranges.amax if conv_ranges is not None else {}).items():
        layers[path] = LayerStats(amax=amax, channel_amax=[], calls=conv_ranges.calls[path])
    return CalibrationCache(weights_hash=manifest.weights_hash, preset=manifest.preset.name, method=method,
                            percentile=percentile if method == "percentile" else None,
                            samples=[name for name, _ in samples], steps=sampling.steps, layers=layers,
                            target=target if method == "mse" else None, guidance_scale=guidance_scale,
                            sampling=sampling.to_json())


def _generate_all(pipeline: AnimatePipeline, manifest: Manifest, samples: list[tuple[str, DrivingInputs]],
                  sampling: Sampling, segment_frames: int | None, guidance_scale: float) -> None:
    for name, inputs in samples:
        log.info("calibrating on %s (%d frames, %s)", name, inputs.num_frames, sampling.describe())
        request = GenerationRequest(ref_image=inputs.ref_image, pose_frames=inputs.pose.frames,
                                    face_frames=inputs.face.frames, prompt=DEFAULT_PROMPT, sampling=sampling,
                                    guidance_scale=guidance_scale,
                                    segment_frames=segment_frames or manifest.preset.segment_frames)
        for _ in pipeline.generate(request):
            pass


def run_calibration(engines_dir: Path, data: list[Path], out: Path, *, steps: int | None, method: str,
                    percentile: float, segment_frames: int | None, target: str = "fp8",
                    guidance_scale: float | None = None, recipe: str | None = None, sampler: str | None = None,
                    shift: float | None = None, sigmas: str | None = None) -> CalibrationCache:
    """The CLI's entry: fp32 engines dir (for the weights) + preprocessed folders → cache file.

    The sampling is resolved as for ``infer`` (``wan_trt.recipes.resolve``: the options over the recipe over
    the preset's defaults) and recorded in the cache."""
    from wan_trt.driving_inputs import load_driving_inputs
    from wan_trt.recipes import check_recipe_engines, resolve
    from wan_trt.runtime.loading import torch_engines
    from wan_trt.runtime.manifest import built_with, read_manifest
    from wan_trt.tokenizer import load_tokenizer, tokenize

    manifest = read_manifest(engines_dir)
    settings = resolve(recipe, sampler=sampler, steps=steps, shift=shift, sigmas=sigmas,
                       guidance_scale=guidance_scale, preset=manifest.preset)
    check_recipe_engines(settings, manifest, engines_dir, built_with(manifest))
    samples = [(str(folder), load_driving_inputs(str(folder))) for folder in data]
    engines = torch_engines(manifest, "cpu", engines_dir)
    tokenizer = load_tokenizer(engines_dir / manifest.tokenizer_file)
    pipeline = AnimatePipeline(engines, manifest.preset, lambda prompt: tokenize(tokenizer, prompt))
    cache = calibrate(pipeline, engines["transformer"].module, manifest, samples,
                      sampling=settings.sampling, method=method, percentile=percentile,
                      segment_frames=segment_frames, target=target, guidance_scale=settings.guidance_scale,
                      vae_module=engines["vae_decoder_step"].module)
    cache.save(out)
    log.info("calibration cache for %d layers written to %s", len(cache.layers), out)
    return cache
