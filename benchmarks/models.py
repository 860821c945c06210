"""Full-size modules with random weights, built on the meta device and materialised on the GPU.

Never 17 B parameters on the host: parameters are created on ``meta`` (buffers stay real: RoPE
tables, position ids), then each module gets its own storage on the device, is initialised there
(``reset_parameters`` where torch has one, simple rules otherwise) and cast to the inference dtype
module by module, so the fp32 copy of the whole model never exists.
"""

from __future__ import annotations

import math

import torch

from wan_trt.checkpoints import parameters_on_meta
from wan_trt.dtypes import keeps_fp32
from wan_trt.presets import Preset

_STANDARD = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding,
             torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


def _init_custom(module: torch.nn.Module, name: str, p: torch.Tensor) -> None:
    cls = type(module).__name__
    if name == "scale_shift_table":
        p.normal_().div_(math.sqrt(p.shape[-1]))
    elif "bias" in name or "padding" in name or "pos_embed" in name:
        p.zero_()
    elif "Norm" in cls and name == "weight":
        p.fill_(1.0)
    else:
        p.normal_()


@torch.no_grad()
def materialize_(model: torch.nn.Module, device: str, dtype: torch.dtype, keep_fp32: tuple[str, ...] = (),
                 seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter device storage, initialise it, cast it (fp32 where ``keep_fp32`` names it)."""
    torch.manual_seed(seed)
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        for n, p in own:
            module._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=torch.float32),
                                                       requires_grad=False)
        if isinstance(module, _STANDARD):
            module.reset_parameters()
        else:
            for n, _ in own:
                _init_custom(module, n, module._parameters[n])
        for n, _ in own:
            full = f"{mod_name}.{n}"
            target = torch.float32 if keeps_fp32(full, keep_fp32) else dtype
            module._parameters[n].data = module._parameters[n].data.to(target)
    for mod_name, module in model.named_modules():
        for n, b in list(module._buffers.items()):
            if b is None:
                continue
            full = f"{mod_name}.{n}"
            if b.is_floating_point():
                target = torch.float32 if keeps_fp32(full, keep_fp32) else dtype
                module._buffers[n] = b.to(device=device, dtype=target)
            else:
                module._buffers[n] = b.to(device)
    return model.eval().requires_grad_(False)


def build_transformer(preset: Preset, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      num_layers: int | None = None) -> torch.nn.Module:
    """diffusers' WanAnimateTransformer3DModel of ``preset`` (optionally fewer blocks) on ``device``.

    Kept in fp32 exactly as diffusers loads a bf16 checkpoint: ``_keep_in_fp32_modules``.
    """
    from diffusers import WanAnimateTransformer3DModel

    config = dict(preset.transformer)
    config["patch_size"] = tuple(config["patch_size"])
    if num_layers is not None:
        config["num_layers"] = num_layers
    with parameters_on_meta():
        model = WanAnimateTransformer3DModel(**config)
    keep = tuple(model._keep_in_fp32_modules or ())
    return materialize_(model, device, dtype, keep, seed)


def build_text_encoder(preset: Preset, vocab_size: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 1) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    with parameters_on_meta():
        model = UMT5EncoderModel(UMT5Config(**{"vocab_size": vocab_size, **preset.text_encoder}))
    return materialize_(model, device, dtype, (), seed)


def build_image_encoder(preset: Preset, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                        seed: int = 2) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with parameters_on_meta():
        model = CLIPVisionModel(CLIPVisionConfig(**preset.image_encoder))
    return materialize_(model, device, dtype, (), seed)


def build_vae(preset: Preset, seed: int = 3) -> torch.nn.Module:
    """The causal VAE on the host in fp32 (127 M parameters): the streamed graphs read its cache layout there."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**preset.vae).eval().requires_grad_(False)


def stock_processors(graph: torch.nn.Module) -> torch.nn.Module:
    """Put diffusers' own attention processors back on a TransformerGraph's model (the 'as shipped' baseline)."""
    from diffusers.models.transformers.transformer_wan_animate import (
        WanAnimateFaceBlockAttnProcessor,
        WanAttnProcessor,
    )

    model = graph.transformer
    for block in model.blocks:
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    for face in model.face_adapter:
        face.set_processor(WanAnimateFaceBlockAttnProcessor())
    return graph
