"""The PyTorch reference modules (diffusers / transformers) for a preset.

Imported only by export and by the runtime's ``torch`` backend: the ORT and TensorRT paths never
import diffusers or transformers. Every module is built in fp32 eval mode; random weights are drawn
from a seed per component, so the same preset and seed give the same weights in any order.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from wan_trt.errors import BadInputError
from wan_trt.presets import Preset

if TYPE_CHECKING:
    from wan_trt.lora import LoraReport, LoraSpec

log = logging.getLogger(__name__)

_COMPONENT_SEED_OFFSETS = {"text_encoder": 11, "image_encoder": 23, "vae": 37, "transformer": 53}


@dataclass
class ReferenceModels:
    text_encoder: torch.nn.Module  # transformers.UMT5EncoderModel
    image_encoder: torch.nn.Module  # transformers.CLIPVisionModel
    vae: torch.nn.Module  # diffusers.AutoencoderKLWan
    transformer: torch.nn.Module  # diffusers.WanAnimateTransformer3DModel
    lora_reports: list[LoraReport] = field(default_factory=list)  # what each merged LoRA changed, in order

    def weights_hash(self) -> str:
        """A short content hash of all weights (to stamp manifests and calibration caches)."""
        digest = hashlib.sha256()
        for name in ("text_encoder", "image_encoder", "vae", "transformer"):
            for key, value in sorted(getattr(self, name).state_dict().items()):
                digest.update(f"{name}.{key}{tuple(value.shape)}".encode())
                digest.update(value.detach().to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def build_reference_models(
    preset: Preset, *, seed: int = 0, vocab_size: int, checkpoint: str | Path | None = None,
    random_weights: bool = False, lora: str | Path | LoraSpec | Sequence[LoraSpec] | None = None,
    lora_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> ReferenceModels:
    """Instantiate the four reference modules of ``preset``.

    With ``checkpoint`` (a Diffusers-layout or original Wan-AI folder, detected automatically) the
    weights are loaded strictly from it (``wan_trt.checkpoints``), in ``dtype``. Without it, ``tiny``
    uses seeded random weights; a preset that needs a checkpoint takes ``random_weights=True`` for
    speed/memory work. ``lora`` (a LoRA file, e.g. ``relighting_lora.ckpt``, merged with ``lora_scale``,
    or ``wan_trt.lora.LoraSpec``s, merged in order) changes the transformer's weights after loading.
    """
    if checkpoint is not None:
        from wan_trt.checkpoints import load_checkpoint

        models = ReferenceModels(**load_checkpoint(preset, checkpoint, vocab_size=vocab_size, dtype=dtype))
    elif preset.needs_checkpoint and not random_weights:
        raise BadInputError(
            f"preset '{preset.name}' needs real weights: pass --checkpoint DIR, or --random-weights for speed/memory work"
        )
    else:
        models = _random_models(preset, seed=seed, vocab_size=vocab_size)
        if dtype != torch.float32:
            for name in ("text_encoder", "image_encoder", "vae", "transformer"):
                getattr(models, name).to(dtype)
    if lora is not None:
        from wan_trt.lora import lora_specs, merge_loras

        models.lora_reports = merge_loras(models.transformer, lora_specs(lora, lora_scale))
    return models


def _random_models(preset: Preset, *, seed: int, vocab_size: int) -> ReferenceModels:
    """The preset's modules with random weights drawn from ``seed`` (one stream per component)."""
    from diffusers import AutoencoderKLWan, WanAnimateTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    def seeded(component: str) -> None:
        torch.manual_seed(seed * 1000 + _COMPONENT_SEED_OFFSETS[component])

    seeded("text_encoder")
    text_encoder = UMT5EncoderModel(UMT5Config(**{"vocab_size": vocab_size, **preset.text_encoder}))
    seeded("image_encoder")
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**preset.image_encoder))
    seeded("vae")
    vae = AutoencoderKLWan(**preset.vae)
    seeded("transformer")
    tr_config = dict(preset.transformer)
    tr_config["patch_size"] = tuple(tr_config["patch_size"])
    transformer = WanAnimateTransformer3DModel(**tr_config)
    models = ReferenceModels(text_encoder, image_encoder, vae, transformer)
    for module in (text_encoder, image_encoder, vae, transformer):
        module.eval().requires_grad_(False)
    return models
