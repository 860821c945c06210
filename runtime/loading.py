"""Open an engines directory as a ready pipeline on one backend."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from wan_trt.errors import EngineError
from wan_trt.runtime.engines import BACKENDS, Engine, OrtEngine, TorchEngine, ort_providers
from wan_trt.runtime.manifest import Manifest, read_manifest
from wan_trt.runtime.pipeline import AnimatePipeline
from wan_trt.tokenizer import load_tokenizer, tokenize

log = logging.getLogger(__name__)


def load_engines(directory: Path, manifest: Manifest, backend: str, device: str = "cpu") -> dict[str, Engine]:
    """Engines for every graph in the manifest on ``backend`` (``onnxruntime`` or ``torch``)."""
    if backend == "onnxruntime":
        optimization = "all" if manifest.precision in ("fp32", "fp16", "bf16") else "basic"
        return {name: OrtEngine(directory / entry.file, entry.spec, ort_providers(device), optimization)
                for name, entry in manifest.graphs.items()}
    if backend == "torch":
        return torch_engines(manifest, device, directory)
    if backend == "tensorrt":
        from wan_trt.runtime.tensorrt_engine import tensorrt_engines

        return tensorrt_engines(directory, manifest)
    raise EngineError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")


def torch_engines(manifest: Manifest, device: str = "cpu", directory: Path | None = None) -> dict[str, Engine]:
    """The PyTorch reference for the manifest's weights; refuses if they are not the weights it records.

    For quantized engines the DiT is the fake-quant model built from the directory's calibration cache
    and policy: it computes what the Q/DQ graph computes.
    """
    from wan_trt.export.graphs import graph_modules  # imports diffusers/transformers: torch backend only
    from wan_trt.reference_models import build_reference_models

    vocab = manifest.graphs["text_encoder"].spec.vocab_size
    lora = manifest.lora or {}
    models = build_reference_models(manifest.preset, seed=manifest.seed, vocab_size=vocab,
                                    checkpoint=manifest.checkpoint, random_weights=manifest.preset.needs_checkpoint,
                                    lora=lora.get("file"), lora_scale=lora.get("scale", 1.0))
    if models.weights_hash() != manifest.weights_hash:
        raise EngineError(
            f"the PyTorch weights rebuilt for preset '{manifest.preset.name}' (seed {manifest.seed}) do not match the "
            f"engines' weights hash {manifest.weights_hash}: rebuild the engines with this wan-trt version"
        )
    modules = graph_modules(models)
    if manifest.quantization:
        from wan_trt.calibration.quantized import reference_for_manifest

        if directory is None:
            raise EngineError("quantized engines need their directory to rebuild the fake-quant PyTorch reference")
        modules["transformer"] = reference_for_manifest(modules["transformer"], directory, manifest)
    return {name: TorchEngine(modules[name], entry.spec, "cuda" if device != "cpu" else "cpu")
            for name, entry in manifest.graphs.items()}


def open_pipeline(directory: str | Path, backend: str = "onnxruntime", device: str = "cpu") -> tuple[AnimatePipeline, Manifest]:
    directory = Path(directory)
    manifest = read_manifest(directory)
    tokenizer = load_tokenizer(directory / manifest.tokenizer_file)
    engines = load_engines(directory, manifest, backend, device)
    log.info("opened %s engines for preset '%s' on %s (%s)", manifest.precision, manifest.preset.name, backend, device)
    pipeline = AnimatePipeline(engines, manifest.preset, lambda prompt: tokenize(tokenizer, prompt),
                               load_prompt_cache(directory, manifest))
    return pipeline, manifest


def load_prompt_cache(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The build's text embeddings of the default prompts (empty for engines built without them)."""
    if not manifest.prompt_cache_file:
        return {}
    with np.load(directory / manifest.prompt_cache_file) as data:
        prompts = [str(p) for p in data["prompts"]]
        return {p: torch.from_numpy(data[f"prompt_{i}"]) for i, p in enumerate(prompts)}
