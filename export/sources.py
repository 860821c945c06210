"""What every build starts from: the tokenizer, the reference weights (their hash, and the checkpoint
folder's fingerprint), each graph's declaration and module, and the float type each graph computes in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from wan_trt.calibration.quantized import QuantizationRequest
from wan_trt.checkpoint_fingerprint import checkpoint_fingerprint
from wan_trt.components import GraphSpec
from wan_trt.errors import BadInputError
from wan_trt.models.graphs import cache_layouts, graph_modules
from wan_trt.models.precision import FLOAT_PRECISIONS, HalfPrecisionGraph, graph_dtypes
from wan_trt.lora import LoraReport, LoraSpec
from wan_trt.presets import Preset
from wan_trt.reference_models import COMPONENTS, build_reference_models
from wan_trt.registry import graph_specs
from wan_trt.tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)


@dataclass
class BuildSources:
    preset: Preset
    seed: int
    checkpoint: str | None
    checkpoint_fingerprint: dict[str, Any] | None
    loras: list[LoraReport]  # the LoRAs merged into the DiT, in order, and what each changed
    tokenizer: Any  # tokenizers.Tokenizer
    specs: dict[str, GraphSpec]
    modules: dict[str, torch.nn.Module]  # fp32 graph modules of the reference weights
    weights_hash: str

    @property
    def lora_entries(self) -> list[dict[str, Any]]:
        """The manifest's ``loras``: each file, scale, unmatched-keys policy and counts of what it changed."""
        return [report.to_json() for report in self.loras]


def load_sources(preset: Preset, *, seed: int = 0, checkpoint: str | None = None, random_weights: bool = False,
                 loras: Sequence[LoraSpec] = (), device: str = "cpu", dtype: torch.dtype = torch.float32,
                 components: Iterable[str] = COMPONENTS) -> BuildSources:
    """The reference weights of ``preset`` (seeded, or ``checkpoint``; ``loras`` merged in order) as graph modules
    on ``device`` in ``dtype``; with ``counter`` random weights only ``components`` get values (the others'
    modules are structure on the meta device)."""
    tokenizer = checkpoint_tokenizer(checkpoint) if checkpoint else build_tiny_tokenizer()
    fingerprint = checkpoint_fingerprint(checkpoint) if checkpoint else None  # before reading: a later change shows
    vocab_size = int(preset.text_encoder.get("vocab_size", tokenizer.get_vocab_size()))
    log.info("building reference modules for preset '%s' (%s)", preset.name,
             f"checkpoint {checkpoint}" if checkpoint else f"seed {seed}")
    models = build_reference_models(preset, seed=seed, vocab_size=vocab_size, checkpoint=checkpoint,
                                    random_weights=random_weights, lora=list(loras) or None, device=device,
                                    dtype=dtype, components=components)
    encoder_caches, decoder_caches = cache_layouts(models)
    return BuildSources(preset, seed, str(Path(checkpoint).resolve()) if checkpoint else None, fingerprint,
                        models.lora_reports, tokenizer, graph_specs(preset, encoder_caches, decoder_caches, vocab_size),
                        graph_modules(models), models.weights_hash())


def float_dtypes(precision: str, quantization: QuantizationRequest | None, names: list[str]) -> dict[str, str]:
    """The float type each graph computes in: ``precision``'s, or with ``quantization`` its high precision's."""
    if precision not in FLOAT_PRECISIONS:
        raise BadInputError(f"--precision {precision}: float precisions are {', '.join(FLOAT_PRECISIONS)} "
                            "(fp8/int8 come with a calibration cache)")
    float_precision = quantization.high_precision if quantization is not None else precision
    if float_precision not in FLOAT_PRECISIONS:
        raise BadInputError(f"--high-precision {float_precision}: choose one of {', '.join(FLOAT_PRECISIONS)}")
    return graph_dtypes(float_precision, names)


def in_dtypes(modules: dict[str, torch.nn.Module], dtypes: dict[str, str],
              specs: dict[str, GraphSpec]) -> dict[str, torch.nn.Module]:
    """Each graph module computing in its dtype (cast in place: ``HalfPrecisionGraph``), as the runtime's
    torch backend rebuilds it from the manifest's dtypes."""
    return {name: HalfPrecisionGraph(module, dtypes[name], specs[name].input_names) if dtypes[name] != "fp32" else module
            for name, module in modules.items()}


def checkpoint_tokenizer(checkpoint: str):
    """The umT5 tokenizer shipped with a checkpoint (its ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    from wan_trt.checkpoints import detect_layout

    layout = detect_layout(checkpoint)
    if layout.tokenizer_file is None:
        raise BadInputError(f"checkpoint '{checkpoint}' has no {layout.tokenizer_dir / 'tokenizer.json'}: "
                            "use a download that includes the umT5 tokenizer's tokenizer.json")
    return Tokenizer.from_file(str(layout.tokenizer_file))
