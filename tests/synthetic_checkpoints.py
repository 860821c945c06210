"""Tiny synthetic checkpoints on disk (Diffusers layout), for the tests that load or fingerprint one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wan_trt.presets import get_preset
from wan_trt.reference_models import ReferenceModels, build_reference_models
from wan_trt.tokenizer import build_tiny_tokenizer


def noisy_tiny_models() -> ReferenceModels:
    """The tiny preset's modules (seed 0) with every tensor made distinct."""
    models = build_reference_models(get_preset("tiny"), seed=0, vocab_size=build_tiny_tokenizer().get_vocab_size())
    # Fresh modules initialise many tensors to the same constant (norm weights 1, biases 0): add noise so
    # that every tensor is distinct and a swapped pair (norm_q/norm_k, K/V, …) cannot go unnoticed.
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name in ("text_encoder", "image_encoder", "vae", "transformer"):
            for param in getattr(models, name).parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return models


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"))


def write_diffusers_checkpoint(models: ReferenceModels, root: Path) -> Path:
    """``models`` saved as a Diffusers-layout checkpoint folder ``root`` (the transformer sharded)."""
    models.transformer.save_pretrained(root / "transformer", max_shard_size="150KB")  # sharded: index.json
    models.vae.save_pretrained(root / "vae")
    models.text_encoder.save_pretrained(root / "text_encoder")
    models.image_encoder.save_pretrained(root / "image_encoder")
    write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanAnimatePipeline"}))
    return root


def tiny_transformer_output(model: torch.nn.Module) -> torch.Tensor:
    """The tiny DiT's output on fixed random inputs (2 latent frames of 4×4, 5 face frames)."""
    preset = get_preset("tiny")
    g = torch.Generator().manual_seed(11)
    frames, latent_frames, h, w = 5, 2, 4, 4
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 36, latent_frames + 1, h, w, generator=g),
            timestep=torch.tensor([637.0]),
            encoder_hidden_states=torch.randn(1, 512, preset.transformer["text_dim"], generator=g),
            encoder_hidden_states_image=torch.randn(1, 257, preset.transformer["image_dim"], generator=g),
            pose_hidden_states=torch.randn(1, 16, latent_frames, h, w, generator=g),
            face_pixel_values=torch.rand(1, 3, frames, 32, 32, generator=g) * 2 - 1,
            return_dict=False)[0]
