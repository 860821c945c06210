"""The PyTorch reference modules (diffusers / transformers) for a preset.

Imported only by export and by the runtime's ``torch`` backend: the ORT and TensorRT paths never
import diffusers or transformers. Modules are in eval mode without gradients. Random weights follow
the preset's ``random_init``: ``torch`` draws them from a seed per component with the modules' own
initialisers, in fp32 on the CPU (the same preset and seed give the same weights in any order);
``counter`` makes them where they will live, in the inference dtype (``wan_trt.random_weights``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from wan_trt.dtypes import cast_floats
from wan_trt.errors import BadInputError
from wan_trt.presets import Preset

if TYPE_CHECKING:
    from wan_trt.lora import LoraReport, LoraSpec

log = logging.getLogger(__name__)

_COMPONENT_SEED_OFFSETS = {"text_encoder": 11, "image_encoder": 23, "vae": 37, "transformer": 53}
COMPONENTS = tuple(_COMPONENT_SEED_OFFSETS)
# Kept in fp32 whatever the dtype (besides diffusers' own ``_keep_in_fp32_modules``): the motion encoder is
# small and its motion basis' QR (wan_trt.models.graphs.MotionEncoderGraph) is taken from its fp32 weights.
_KEEP_FP32 = ("motion_encoder",)


@dataclass
class ReferenceModels:
    text_encoder: torch.nn.Module  # transformers.UMT5EncoderModel
    image_encoder: torch.nn.Module  # transformers.CLIPVisionModel
    vae: torch.nn.Module  # diffusers.AutoencoderKLWan
    transformer: torch.nn.Module  # diffusers.WanAnimateTransformer3DModel
    # set where the weights are determined by their recipe (``counter`` scheme), or hashed before a cast
    # (``torch`` random weights asked for in another dtype: the hash of the fp32 values a build stamps)
    known_hash: str | None = None
    lora_reports: list[LoraReport] = field(default_factory=list)  # what each LoRA changes, in merge order

    def weights_hash(self) -> str:
        """A short content hash of all weights (to stamp manifests and calibration caches); for ``counter``
        weights, the digest of the scheme's inputs (every value is a function of them)."""
        if self.known_hash is not None:
            return self.known_hash
        digest = hashlib.sha256()
        for name in COMPONENTS:
            for key, value in sorted(getattr(self, name).state_dict().items()):
                digest.update(f"{name}.{key}{tuple(value.shape)}".encode())
                digest.update(value.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def build_reference_models(
    preset: Preset, *, seed: int = 0, vocab_size: int, checkpoint: str | Path | None = None,
    random_weights: bool = False, lora: str | Path | LoraSpec | Sequence[LoraSpec] | None = None,
    lora_scale: float = 1.0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    components: Iterable[str] = COMPONENTS,
) -> ReferenceModels:
    """Instantiate the four reference modules of ``preset`` on ``device`` in ``dtype`` (diffusers' fp32-kept
    modules and the motion encoder stay fp32).

    With ``checkpoint`` (a Diffusers-layout or original Wan-AI folder, detected automatically) the
    weights are loaded strictly from it (``wan_trt.checkpoints``). Without it, ``tiny`` uses seeded
    random weights; a preset that needs a checkpoint takes ``random_weights=True`` for speed/memory
    work. ``lora`` (a LoRA file, e.g. ``relighting_lora.ckpt``, merged with ``lora_scale``, or
    ``wan_trt.lora.LoraSpec``s, merged in order) changes the transformer's weights after loading. With
    ``counter`` random weights or a checkpoint, the modules not named in ``components`` keep their
    parameters on the meta device (structure only: a build that needs only the text encoder's values
    makes only those); a LoRA is then checked against the structure and recorded, not merged. (Seeded
    fp32 random weights, the tiny preset's, are always made whole.)
    """
    if checkpoint is None and preset.needs_checkpoint and not random_weights:
        raise BadInputError(
            f"preset '{preset.name}' needs real weights: pass --checkpoint DIR, or --random-weights for speed/memory work"
        )
    if checkpoint is not None:
        from wan_trt.checkpoints import load_checkpoint

        models = ReferenceModels(**load_checkpoint(preset, checkpoint, vocab_size=vocab_size, dtype=dtype,
                                                   device=device, components=components))
    elif preset.random_init == "counter":
        models = _counter_models(preset, seed=seed, vocab_size=vocab_size, device=device, dtype=dtype,
                                 components=set(components), lora=lora, lora_scale=lora_scale)
    else:  # drawn in fp32 on the CPU: a LoRA is merged and the hash taken there, as a build stamps them
        models = _random_models(preset, seed=seed, vocab_size=vocab_size)
        if lora is not None:
            from wan_trt.lora import lora_specs, merge_loras

            models.lora_reports = merge_loras(models.transformer, lora_specs(lora, lora_scale))
            lora = None
        if dtype != torch.float32:
            models.known_hash = models.weights_hash()
        for name in COMPONENTS:
            module = getattr(models, name)
            cast_floats(module, dtype, _keep_fp32(module), device=device)
    if lora is not None:
        from wan_trt.lora import check_loras, lora_specs, merge_loras

        specs = lora_specs(lora, lora_scale)
        if models.transformer.patch_embedding.weight.device.type == "meta":
            log.info("LoRA checked and recorded, not merged: the transformer is not materialised in this run")
            models.lora_reports = check_loras(models.transformer, specs)
        else:
            models.lora_reports = merge_loras(models.transformer, specs)
    return models


def _keep_fp32(module: torch.nn.Module) -> tuple[str, ...]:
    """The names kept in fp32 in a lower dtype: diffusers' ``_keep_in_fp32_modules`` (transformers applies its
    own list, umT5's ``wo``, only for fp16: so do we, by not keeping it) and ours."""
    own = getattr(module, "_keep_in_fp32_modules", None) if type(module).__module__.startswith("diffusers") else None
    return tuple(own or ()) + _KEEP_FP32


def _counter_models(preset: Preset, *, seed: int, vocab_size: int, device: torch.device | str, dtype: torch.dtype,
                    components: set[str], lora: str | Path | LoraSpec | Sequence[LoraSpec] | None,
                    lora_scale: float) -> ReferenceModels:
    """The ``counter`` scheme: structure on meta, then the values of ``components`` made on ``device``."""
    from wan_trt.checkpoints import empty_component
    from wan_trt.devices import compute_device
    from wan_trt.random_weights import counter_weights_hash, materialize_random_

    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}")
    shells = {name: empty_component(name, preset, vocab_size) for name in COMPONENTS}
    for name in COMPONENTS:
        if name in components:
            drawn = compute_device(device)
            log.info("generating %s's random weights on %s (%s)%s", name, device, str(dtype).removeprefix("torch."),
                     f", drawn on {drawn.type}" if drawn != torch.device(device) else "")
            materialize_random_(shells[name], name, seed=seed, device=device, dtype=dtype,
                                keep_fp32=_keep_fp32(shells[name]))
        else:
            shells[name].eval().requires_grad_(False)
    from wan_trt.lora import lora_digest, lora_specs

    records = [{"sha256": lora_digest(spec), "scale": spec.scale}
               for spec in lora_specs(lora, lora_scale)]
    lora_record = records[0] if len(records) == 1 else (records or None)  # one LoRA: the hash of earlier builds
    architecture = {key: value for key, value in preset.to_json().items()
                    if key == "name" or key in COMPONENTS}
    return ReferenceModels(**shells, known_hash=counter_weights_hash(architecture, seed, vocab_size, lora_record))


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
