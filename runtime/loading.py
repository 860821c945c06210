"""Open an engines directory as a ready pipeline on one backend."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from wan_trt.errors import EngineError
from wan_trt.registry import GRAPHS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER_STEP
from wan_trt.runtime.engines import BACKENDS, Engine, OrtEngine, TorchEngine, ort_providers
from wan_trt.runtime.manifest import Manifest, build_command, built_with, read_manifest, require_backend
from wan_trt.runtime.options import RuntimeOptions
from wan_trt.runtime.pipeline import AnimatePipeline
from wan_trt.tokenizer import load_tokenizer, tokenize

log = logging.getLogger(__name__)


def load_engines(directory: Path, manifest: Manifest, backend: str, device: str = "cpu") -> dict[str, Engine]:
    """Engines for every graph in the manifest on ``backend`` (``onnxruntime``, ``torch`` or ``tensorrt``);
    ``infer --fast``'s engines: :func:`runtime_engines`."""
    if backend in BACKENDS:
        require_backend(directory, manifest, backend)
    if backend == "onnxruntime":
        bf16 = sorted(name for name, entry in manifest.graphs.items() if entry.dtype == "bf16")
        if bf16 and device == "cpu":
            raise EngineError(
                f"'{directory}' has bf16 graphs ({', '.join(bf16)}) and ONNX Runtime's CPU provider has no bf16 kernels: "
                "run them with --backend tensorrt, --device cuda (onnxruntime-gpu) or --backend torch, "
                "or build with --precision fp32|fp16 for the CPU"
            )
        optimization = "all" if manifest.precision == "fp32" else "basic"
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
    modules = reference_graph_modules(manifest, directory)
    if any(entry.dtype != "fp32" for entry in manifest.graphs.values()):
        from wan_trt.models.precision import HalfPrecisionGraph

        modules = {name: HalfPrecisionGraph(modules[name], entry.dtype, entry.spec.input_names)
                   if entry.dtype != "fp32" else modules[name] for name, entry in manifest.graphs.items()}
    if manifest.quantization:
        from wan_trt.calibration.quantized import quantize_vae_for_manifest, reference_for_manifest

        if directory is None:
            raise EngineError("quantized engines need their directory to rebuild the fake-quant PyTorch reference")
        modules[TRANSFORMER] = reference_for_manifest(modules[TRANSFORMER], directory, manifest)
        quantize_vae_for_manifest(modules[VAE_DECODER_STEP], directory, manifest)
    return {name: TorchEngine(modules[name], entry.spec, "cuda" if device != "cpu" else "cpu")
            for name, entry in manifest.graphs.items()}


def bf16_reference_engines(manifest: Manifest, directory: Path | None, device: str) -> dict[str, Engine]:
    """The PyTorch reference of ``--precision bf16`` engines of the manifest's weights, rebuilt straight on
    ``device`` in bf16 (no fp32 copy of the model on the host): the graphs ``graph_dtypes`` puts in bf16 (the
    DiT, umT5) compute as ``HalfPrecisionGraph`` — what bf16 engines compute — the others in fp32.

    Weights that bf16 engines hold in fp32 (the fp32 graphs — CLIP, the VAE —, the convolutions, umT5's
    ``wo``) are their bf16-rounded values widened here; diffusers' keep-in-fp32 modules and the motion
    encoder are built in fp32. On a GPU the once-per-video encoders (umT5, CLIP) wait on the host between
    their calls (calibration checks first that there is a GPU: ``calibration.collect.check_calibration_device``).
    """
    from wan_trt.models.precision import HalfPrecisionGraph, cast_module, graph_dtypes
    from wan_trt.runtime.fast.engines import FastEngine

    gpu = torch.device(device).type == "cuda"
    modules = reference_graph_modules(manifest, directory, device, torch.bfloat16)
    dtypes = graph_dtypes("bf16", list(manifest.graphs))
    engines: dict[str, Engine] = {}
    for name, entry in manifest.graphs.items():
        module = (HalfPrecisionGraph(modules[name], "bf16", entry.spec.input_names) if dtypes[name] == "bf16"
                  else cast_module(modules[name], "fp32"))
        if GRAPHS[name].once_per_video:  # no input cast (dtype None): the graph casts its own
            engines[name] = FastEngine(module, entry.spec, device, dtype=None, offload=gpu)
        else:
            engines[name] = TorchEngine(module, entry.spec, device)
    return engines


def reference_graph_modules(manifest: Manifest, directory: Path | None = None, device: str = "cpu",
                            dtype: torch.dtype = torch.float32, graphs: Iterable[str] | None = None,
                            trust_fingerprint: bool = False) -> dict[str, torch.nn.Module]:
    """The graph modules of the manifest's weights (every graph, or those named in ``graphs``: only the
    components they hold are then made), rebuilt on ``device`` in ``dtype`` (diffusers' fp32-kept modules
    stay fp32); refused if the checkpoint folder changed since the build (its fingerprint, checked first)
    or if the weights hash differs.

    Bounded loading: no fp32 copy of the model on the host when ``device`` is a GPU. There (and wherever
    ``trust_fingerprint``: ``--fast`` loading on the host for ``--max-gpu-memory``) the weights of a
    checkpoint are not hashed again (23.7 B parameters at full size: minutes; the hash is over fp32 values,
    which a bf16 load no longer holds): the folder's fingerprint stands for them. ``counter`` random
    weights are checked by their recipe's digest.
    """
    from wan_trt.models.graphs import graph_modules  # imports diffusers/transformers: torch backend only
    from wan_trt.lora import LoraSpec
    from wan_trt.reference_models import build_reference_models

    check_checkpoint_unchanged(manifest, directory)
    vocab = manifest.graphs[TEXT_ENCODER].spec.vocab_size
    loras = [LoraSpec.from_json(record) for record in manifest.loras]
    fingerprinted = bool(manifest.checkpoint and manifest.checkpoint_fingerprint)
    # else a checkpoint's weights are hashed: all of them
    trusted = fingerprinted and (trust_fingerprint or torch.device(device).type != "cpu")
    names = list(GRAPHS) if graphs is None or (manifest.checkpoint and not trusted) else list(graphs)
    components = {GRAPHS[name].parameters.component for name in names}
    models = build_reference_models(manifest.preset, seed=manifest.seed, vocab_size=vocab,
                                    checkpoint=manifest.checkpoint, random_weights=manifest.preset.needs_checkpoint,
                                    lora=loras or None, device=device, dtype=dtype, components=components)
    if trusted:
        log.info("checkpoint weights not re-hashed on %s: the folder's fingerprint matches the build's", device)
    elif models.weights_hash() != manifest.weights_hash:
        raise EngineError(
            f"the PyTorch weights rebuilt for preset '{manifest.preset.name}' (seed {manifest.seed}) do not match the "
            f"engines' weights hash {manifest.weights_hash}: rebuild the engines with this wan-trt version"
        )
    return graph_modules(models, names if graphs is not None else None)


def check_checkpoint_unchanged(manifest: Manifest, directory: Path | None) -> None:
    """EngineError naming the checkpoint folder and the rebuild command when it changed since the build
    (``wan_trt.checkpoint_fingerprint``; a manifest without a fingerprint is left to the weights hash)."""
    from wan_trt.checkpoint_fingerprint import fingerprint_change

    if not manifest.checkpoint or not manifest.checkpoint_fingerprint:
        return
    change = fingerprint_change(manifest.checkpoint_fingerprint, manifest.checkpoint)
    if change:
        engines = directory or Path("ENGINES")
        raise EngineError(f"checkpoint folder '{manifest.checkpoint}' changed since the engines in '{engines}' were "
                          f"built ({change}): rebuild them with: "
                          f"{build_command(manifest, engines, built_with(manifest), str(engines))}")


def runtime_engines(directory: Path, manifest: Manifest, options: RuntimeOptions) -> dict[str, Engine]:
    """The engines ``options`` ask for: ``--fast``'s (``runtime/fast/``) or those of its backend on its device."""
    if options.fast:
        from wan_trt.runtime.fast.engines import fast_torch_engines

        require_backend(directory, manifest, options.backend)
        return fast_torch_engines(manifest, directory, options)
    return load_engines(directory, manifest, options.backend, options.engine_device)


def open_pipeline(directory: str | Path, backend: str = "onnxruntime",
                  device: str = "cpu") -> tuple[AnimatePipeline, Manifest]:
    """Read the engines directory's manifest and open it on ``backend``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return pipeline_for(directory, manifest, RuntimeOptions(backend, device)), manifest


def pipeline_for(directory: Path, manifest: Manifest, options: RuntimeOptions) -> AnimatePipeline:
    """The pipeline of an engines directory whose manifest is already read, opened as ``options`` ask."""
    tokenizer = load_tokenizer(directory / manifest.tokenizer_file)
    engines = runtime_engines(directory, manifest, options)
    log.info("opened %s engines for preset '%s' on %s (%s)", manifest.precision, manifest.preset.name,
             options.backend, options.engine_device)
    return AnimatePipeline(engines, manifest.preset, lambda prompt: tokenize(tokenizer, prompt),
                           load_prompt_cache(directory, manifest))


def load_prompt_cache(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The build's text embeddings of the default prompts (empty for engines built without them)."""
    if not manifest.prompt_cache_file:
        return {}
    with np.load(directory / manifest.prompt_cache_file) as data:
        prompts = [str(p) for p in data["prompts"]]
        return {p: torch.from_numpy(data[f"prompt_{i}"]) for i, p in enumerate(prompts)}
