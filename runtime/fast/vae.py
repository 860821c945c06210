"""The VAE decode of ``--fast``: streamed chunks with an in-place feature cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch




@torch.no_grad()
def decode_streamed(vae: torch.nn.Module, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """Normalised latents ``[B, 16, F, h, w]`` → pixel chunks in [-1, 1] (1 frame, then 4 per latent frame).

    The same function as the ``vae_decoder_first/step`` graphs, but with diffusers' own feature-cache
    list updated in place: an old cache entry is freed as soon as its replacement exists, where the
    graphs' explicit cache inputs and outputs keep both generations alive during a chunk.
    """
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    cache: list = [None] * vae._cached_conv_counts["decoder"]
    mean, std = mean.to(latents.dtype), std.to(latents.dtype)  # as the graphs' buffers, in the VAE's dtype
    for index in range(latents.shape[2]):
        z = vae.post_quant_conv(latents[:, :, index:index + 1] * std + mean)
        yield vae.decoder(z, feat_cache=cache, feat_idx=[0], first_chunk=index == 0).clamp(-1.0, 1.0)
