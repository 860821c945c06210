"""``wan-trt build --backend torch``: an engines directory for the torch backend (and ``--fast``) only.

No graph is exported: the directory holds what the torch backend reads besides the weights it
rebuilds from the manifest (preset and seed, or checkpoint folder and LoRA; checked by the weights
hash and the checkpoint folder's fingerprint) — the manifest with every graph's declaration and dtype
but no files, the tokenizer, the default prompts' embeddings (umT5 on the GPU where there is one)
and, for fp8/int8, the calibration cache and the policy, recorded exactly as the ONNX build records
them, so the fake-quant reference and ``--fast``'s FP8 plan are the same as from an ONNX directory.
``--precision fp16|bf16`` records the same per-graph dtypes as the ONNX build, which the torch
backend runs through the same ``HalfPrecisionGraph``. There is no ``accuracy.json``: it measures an
ONNX graph in ONNX Runtime.

Every step but the export is the ONNX build's own code (``request``: the same :class:`BuildRequest` and
its shared steps; ``sources``, ``directory``, ``staging``, ``calibration.quantized``): same atomic write,
same refusals.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from wan_trt.calibration.quantized import QuantizationRequest
from wan_trt.export.directory import write_text_files
from wan_trt.export.request import (BuildModules, BuildRequest, graph_float_types, load_request_sources,
                                    prepare_modules, request_manifest)
from wan_trt.export.staging import check_out_dir, staged_directory
from wan_trt.lora import LoraSpec
from wan_trt.presets import Component, Preset
from wan_trt.registry import TEXT_ENCODER
from wan_trt.runtime.manifest import TORCH_BACKENDS, GraphEntry, write_manifest

log = logging.getLogger(__name__)


def _bounded_weights(request: BuildRequest, device: str) -> dict[str, Any]:
    """Where and which weights a torch build makes. ``counter`` random weights: only what the build reads
    (umT5 for the prompts, the VAE's structure for the cache layout, the DiT for an FP8/INT8 plan), on the
    GPU in bf16 where there is one (the dtype ``--fast`` embeds prompts in). Otherwise every weight in fp32
    on the host, as the ONNX build (their hash covers all of them)."""
    if request.checkpoint is not None or request.preset.random_init != "counter":
        return {}
    components = {Component.TEXT_ENCODER, Component.VAE} | (
        {Component.TRANSFORMER} if request.quantization is not None else set())
    return {"device": device, "dtype": torch.bfloat16 if device == "cuda" else torch.float32,
            "components": components}


def build_torch_engines(preset: Preset, out_dir: str | Path, *, seed: int = 0, checkpoint: str | None = None,
                        random_weights: bool = False, loras: Sequence[LoraSpec] = (),
                        precision: str = "fp32", quantization: QuantizationRequest | None = None) -> Path:
    """:func:`build_torch` of the request these keywords make."""
    return build_torch(BuildRequest(preset, Path(out_dir), seed=seed, checkpoint=checkpoint,
                                    random_weights=random_weights, loras=tuple(loras), precision=precision,
                                    quantization=quantization))


def build_torch(request: BuildRequest) -> Path:
    """Write the torch-backend engines directory of ``request``'s weights into ``request.out_dir`` (atomically).
    ``verify``, ``accuracy_video`` and ``tensorrt`` concern ONNX graphs: a torch build has none."""
    check_out_dir(request.out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sources = load_request_sources(request, **_bounded_weights(request, device))
    dtypes = graph_float_types(request, sources)
    # the plan only: it proves the cache and policy fit these weights
    prepared = prepare_modules(request, sources, dtypes, reference=False)
    with staged_directory(request.out_dir) as staging:
        log.info("embedding the default prompts (umT5 on %s)", device)
        write_text_files(staging, sources, prepared.modules[TEXT_ENCODER], device)
        if prepared.quant is not None:
            prepared.quant.save_cache(staging)
        quant_entry = prepared.quantization_entry(_planned_vae_convs(prepared))
        graphs = {name: GraphEntry(spec, dtype=dtypes[name]) for name, spec in sources.specs.items()}
        write_manifest(staging, request_manifest(request, sources, graphs, TORCH_BACKENDS, quant_entry))
    log.info("torch-backend engines written to %s", request.out_dir)
    return request.out_dir


def _planned_vae_convs(prepared: BuildModules) -> int:
    """The VAE decoder convs the plan quantizes (the ONNX build counts those its Q/DQ graphs hold)."""
    return len(prepared.vae_quant.plan.layers) if prepared.vae_quant is not None else 0
