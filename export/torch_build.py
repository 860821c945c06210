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

Every step but the export is the ONNX build's own code (``sources``, ``directory``, ``staging``,
``calibration.quantized``): same atomic write, same refusals.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from wan_trt.calibration.quantized import QuantizationRequest, QuantizedTransformer, prepare_quantization
from wan_trt.export.directory import directory_manifest, write_text_files
from wan_trt.export.sources import float_dtypes, in_dtypes, load_sources
from wan_trt.export.staging import check_out_dir, staged_directory
from wan_trt.lora import LoraSpec
from wan_trt.presets import Preset
from wan_trt.runtime.manifest import TORCH_BACKENDS, GraphEntry, write_manifest

log = logging.getLogger(__name__)


def _bounded_weights(preset: Preset, checkpoint: str | None, device: str,
                     quantization: QuantizationRequest | None) -> dict[str, Any]:
    """Where and which weights a torch build makes. ``counter`` random weights: only what the build reads
    (umT5 for the prompts, the VAE's structure for the cache layout, the DiT for an FP8/INT8 plan), on the
    GPU in bf16 where there is one (the dtype ``--fast`` embeds prompts in). Otherwise every weight in fp32
    on the host, as the ONNX build (their hash covers all of them)."""
    if checkpoint is not None or preset.random_init != "counter":
        return {}
    components = {"text_encoder", "vae"} | ({"transformer"} if quantization is not None else set())
    return {"device": device, "dtype": torch.bfloat16 if device == "cuda" else torch.float32,
            "components": components}


def build_torch_engines(preset: Preset, out_dir: str | Path, *, seed: int = 0, checkpoint: str | None = None,
                        random_weights: bool = False, loras: Sequence[LoraSpec] = (),
                        precision: str = "fp32", quantization: QuantizationRequest | None = None) -> Path:
    """Write the torch-backend engines directory of ``preset``'s weights into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sources = load_sources(preset, seed=seed, checkpoint=checkpoint, random_weights=random_weights, loras=loras,
                           **_bounded_weights(preset, checkpoint, device, quantization))
    dtypes = float_dtypes(precision, quantization, list(sources.specs))
    if quantization is not None:
        QuantizedTransformer.check_request(quantization, sources.weights_hash)
    modules = in_dtypes(sources.modules, dtypes, sources.specs)
    quant = vae_quant = None
    if quantization is not None:  # the plan only: it proves the cache and policy fit these weights
        quant, vae_quant = prepare_quantization(quantization, sources.weights_hash, modules, preset, reference=False)
    with staged_directory(out_dir) as staging:
        log.info("embedding the default prompts (umT5 on %s)", device)
        write_text_files(staging, sources, modules["text_encoder"], device)
        quant_entry = None
        if quant is not None:
            quant.save_cache(staging)
            quant_entry = quant.manifest_entry(len(vae_quant.plan.layers) if vae_quant else 0)
        graphs = {name: GraphEntry(spec, dtype=dtypes[name]) for name, spec in sources.specs.items()}
        manifest = directory_manifest(sources, precision=quant.precision if quant else precision, graphs=graphs,
                                      backends=TORCH_BACKENDS, quantization=quant_entry)
        write_manifest(staging, manifest)
    log.info("torch-backend engines written to %s", out_dir)
    return out_dir
