"""The streamed VAE graphs (first chunk + steady-state chunk with explicit caches) over a whole
77-frame segment equal diffusers' whole-clip AutoencoderKLWan encode and decode."""

from __future__ import annotations

import pytest
import torch

from conftest import fresh_reference_models
from wan_trt.metrics import relative_l2
from wan_trt.runtime.pipeline import AnimatePipeline

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae():
    return fresh_reference_models().vae


@pytest.mark.parametrize("height,width", [(48, 64), (32, 32)])
def test_streamed_encode_equals_whole_clip(ort_engines, preset, vae, height, width):
    video = torch.rand(1, 3, 77, height, width, generator=torch.Generator().manual_seed(height)) * 2 - 1
    got = AnimatePipeline(ort_engines, preset, tokenize=None).vae_encode(video)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = (vae.encode(video).latent_dist.mode() - mean) / std
    assert got.shape == want.shape == (1, 16, 20, height // 8, width // 8)
    assert relative_l2(got, want) <= TOLERANCE


@pytest.mark.parametrize("height,width", [(48, 64), (32, 32)])
def test_streamed_decode_equals_whole_clip(ort_engines, preset, vae, height, width):
    latents = torch.randn(1, 16, 20, height // 8, width // 8, generator=torch.Generator().manual_seed(width))
    got = torch.cat(list(AnimatePipeline(ort_engines, preset, tokenize=None).vae_decode(latents)), dim=2)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = vae.decode(latents * std + mean).sample
    assert got.shape == want.shape == (1, 3, 77, height, width)
    assert relative_l2(got, want) <= TOLERANCE
