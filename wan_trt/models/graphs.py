"""Export-friendly torch modules, one per declared graph (``wan_trt.registry``; ``GRAPH_FACTORIES``).

Each module's ``forward`` takes the graph's inputs positionally in declared order and returns its
outputs as a tuple in declared order. They wrap the diffusers/transformers reference modules and
only change what export needs, with identical math:

* transformer: the motion encoder runs as its own graph (once per segment, not once per denoising
  step), so the DiT graph takes motion vectors; the pose embedding is added with ``cat`` instead of
  an in-place slice write; attention processors use plain SDPA and RoPE without strided writes.
* motion encoder: ``Q = qr(W)`` of the motion basis depends only on weights, so it is precomputed.
* VAE: the causal feature caches become explicit 2-frame tensors (zeros where the reference code
  has no history yet, which is what its causal zero padding computes anyway).

The runtime's ``torch`` backend runs these same modules, so the ORT-vs-torch tests compare the
exact function that was exported; separate tests tie these modules to the untouched references.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from wan_trt import registry
from wan_trt.components import CacheSlot
from wan_trt.models.dit import BlockRunner, DiffusersBlocks, dit_forward
from wan_trt.reference_models import ReferenceModels

CACHE_FRAMES = 2  # the causal 3-D convs look back 2 frames


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------

class TextEncoderGraph(torch.nn.Module):
    """umT5 → hidden states with padded positions zeroed (== trimming to the prompt and zero-padding)."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return (hidden * attention_mask.unsqueeze(-1).to(hidden.dtype),)


class ImageEncoderGraph(torch.nn.Module):
    """CLIP vision tower → the penultimate layer's hidden states."""

    def __init__(self, image_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, clip_pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.image_encoder(pixel_values=clip_pixels, output_hidden_states=True).hidden_states[-2],)


class MotionEncoderGraph(torch.nn.Module):
    """Face crops → motion vectors, with the motion basis' QR precomputed (it depends only on weights)."""

    _keep_in_fp32_modules = ("basis_q_t",)  # the reference takes the QR in fp32 whatever the model's dtype

    def __init__(self, motion_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.motion_encoder = motion_encoder
        with torch.no_grad():
            basis = (motion_encoder.motion_synthesis_weight + 1e-8).to(torch.float32)
            q = torch.linalg.qr(basis)[0]
        self.register_buffer("basis_q_t", q.T.contiguous(), persistent=False)

    def forward(self, face_pixels: torch.Tensor) -> tuple[torch.Tensor]:
        enc = self.motion_encoder
        x = enc.conv_in(face_pixels)
        for block in enc.res_blocks:
            x = block(x)
        x = enc.conv_out(x).flatten(1)
        for linear in enc.motion_network:
            x = linear(x)
        # reference: sum(diag_embed(alpha) @ Q^T, dim=1), which is alpha @ Q^T
        return (torch.matmul(x.to(torch.float32), self.basis_q_t).to(x.dtype),)


# ------------------------------------------------------------------------------------------------
# Transformer
# ------------------------------------------------------------------------------------------------

def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding (diffusers' math) built with stack instead of strided writes."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, S, H, D] tensors, returning [B, S, H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3)


class ExportAttnProcessor:
    """diffusers' WanAttnProcessor math (self- and cross-attention with the CLIP K/V branch) for export.

    ``self_attention`` computes softmax(q·kᵀ/√d)·v of the self-attention over ``[B, S, H, D]``
    tensors; calibration swaps in an observer and the FP8 reference a fake-quant attention
    (``wan_trt.calibration.attention``); the default is plain SDPA.
    """

    def __init__(self) -> None:
        self.self_attention = _sdpa

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - 512  # the reference splits image tokens from 512 text tokens
            image_context = encoder_hidden_states[:, :split]
            encoder_hidden_states = encoder_hidden_states[:, split:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        out = (self.self_attention if encoder_hidden_states is None else _sdpa)(q, k, v).type_as(q)
        if image_context is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (attn.heads, -1))
            v_img = attn.add_v_proj(image_context).unflatten(2, (attn.heads, -1))
            out = out + _sdpa(q, k_img, v_img).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class ExportFaceAttnProcessor:
    """diffusers' face-block attention: each latent frame's tokens attend to that frame's motion tokens."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        hidden_states = attn.pre_norm_q(hidden_states)
        motion = attn.pre_norm_kv(encoder_hidden_states)
        batch, frames, tokens, _ = motion.shape
        motion = motion.flatten(1, 2)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(motion).view(batch, frames, tokens, attn.heads, -1))
        v = attn.to_v(motion).view(batch, frames, tokens, attn.heads, -1)
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)
        out = _sdpa(q, k.flatten(0, 1), v.flatten(0, 1)).type_as(q)
        return attn.to_out(out.unflatten(0, (batch, frames)).flatten(1, 2))


class TransformerGraph(torch.nn.Module):
    """WanAnimateTransformer3DModel.forward with motion vectors as input (see the module docstring): the
    DiT's one forward (``wan_trt.models.dit.dit_forward``) on diffusers' blocks with the export processors."""

    _not_in_graph = ("transformer.motion_encoder",)  # runs as its own graph (and may have another dtype)
    runner: BlockRunner = DiffusersBlocks()  # stateless

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        for block in transformer.blocks:
            block.attn1.set_processor(ExportAttnProcessor())
            block.attn2.set_processor(ExportAttnProcessor())
        for face_block in transformer.face_adapter:
            face_block.set_processor(ExportFaceAttnProcessor())

    def forward(self, latent_input, timestep, text_embeds, image_embeds, pose_latents, motion_vectors):
        return (dit_forward(self.transformer, self.runner, latent_input, timestep, text_embeds, image_embeds,
                            pose_latents, motion_vectors),)


# ------------------------------------------------------------------------------------------------
# Streamed VAE
# ------------------------------------------------------------------------------------------------

def _latent_stats(vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return mean, std


def _padded_cache(cache: torch.Tensor) -> torch.Tensor:
    """A cache of exactly CACHE_FRAMES frames, zero frames in front where history is shorter."""
    missing = CACHE_FRAMES - cache.shape[2]
    if missing <= 0:
        return cache
    return torch.cat([cache.new_zeros(*cache.shape[:2], missing, *cache.shape[3:]), cache], dim=2)


def discover_cache_slots(vae: torch.nn.Module, side: str) -> tuple[list[int], list[CacheSlot]]:
    """Run two chunks eagerly and read which feature-cache slots hold tensors, with their sizes.

    Returns the used slot indices of diffusers' cache list and their layout relative to ``h2``.
    """
    h2 = 2
    weight = next(vae.parameters())
    like = {"device": weight.device, "dtype": weight.dtype}
    with torch.no_grad():
        if side == "encoder":
            cache: list = [None] * vae._cached_conv_counts["encoder"]
            video = torch.zeros(1, 3, 5, 16 * h2, 16 * h2, **like)
            vae.encoder(video[:, :, :1], feat_cache=cache, feat_idx=[0])
            vae.encoder(video[:, :, 1:5], feat_cache=cache, feat_idx=[0])
        else:
            cache = [None] * vae._cached_conv_counts["decoder"]
            latents = vae.post_quant_conv(torch.zeros(1, vae.config.z_dim, 2, 2 * h2, 2 * h2, **like))
            vae.decoder(latents[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
            vae.decoder(latents[:, :, 1:2], feat_cache=cache, feat_idx=[0])
    used = [i for i, c in enumerate(cache) if isinstance(c, torch.Tensor)]
    return used, [CacheSlot(int(cache[i].shape[1]), int(cache[i].shape[3]) // h2) for i in used]


class _StreamedVae(torch.nn.Module):
    side = ""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.used_slots, self.slots = discover_cache_slots(vae, self.side)
        mean, std = _latent_stats(vae)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    def _cache_list(self, caches: Sequence[torch.Tensor]) -> list:
        cache: list = [None] * self.vae._cached_conv_counts[self.side]
        for index, tensor in zip(self.used_slots, caches):
            cache[index] = tensor
        return cache

    def _chunk(self, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward_taking_caches(self, x: torch.Tensor, caches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``forward(x, *caches)``, the caller handing ``caches`` over (the list is emptied): each old cache is
        then freed as soon as its convolution has replaced it, as in diffusers' own loop, instead of two
        generations of the feature cache being alive at the end of a chunk (the decoder's: ≈ 4 GiB at 1280x720)."""
        cache = self._cache_list(caches)
        caches.clear()
        return self._chunk(x, cache)

    def _caches_out(self, cache: list, like: torch.Tensor, h2, w2) -> list[torch.Tensor]:
        out = []
        for index, slot in zip(self.used_slots, self.slots):
            value = cache[index]
            if isinstance(value, torch.Tensor):
                out.append(_padded_cache(value))
            else:  # "Rep": the upsampler skipped its time conv on the first chunk -> no history yet
                out.append(like.new_zeros(like.shape[0], slot.channels, CACHE_FRAMES, slot.scale * h2, slot.scale * w2))
        return out


class _VaeEncoderChunk(_StreamedVae):
    side = "encoder"

    def _chunk(self, video: torch.Tensor, cache: list):
        moments = self.vae.quant_conv(self.vae.encoder(video, feat_cache=cache, feat_idx=[0]))
        latents = (moments[:, : self.vae.config.z_dim] - self.latents_mean) / self.latents_std  # the mean; no sampling
        return (latents, *self._caches_out(cache, video, video.shape[3] // 16, video.shape[4] // 16))


class VaeEncoderFirst(_VaeEncoderChunk):
    def forward(self, video: torch.Tensor):
        return self._chunk(video, self._cache_list(()))


class VaeEncoderStep(_VaeEncoderChunk):
    def forward(self, video: torch.Tensor, *caches: torch.Tensor):
        return self._chunk(video, self._cache_list(caches))


class _VaeDecoderChunk(_StreamedVae):
    side = "decoder"
    first = False

    def _chunk(self, latents: torch.Tensor, cache: list):
        z = self.vae.post_quant_conv(latents * self.latents_std + self.latents_mean)
        video = self.vae.decoder(z, feat_cache=cache, feat_idx=[0], first_chunk=self.first).clamp(-1.0, 1.0)
        return (video, *self._caches_out(cache, latents, latents.shape[3] // 2, latents.shape[4] // 2))


class VaeDecoderFirst(_VaeDecoderChunk):
    first = True

    def forward(self, latents: torch.Tensor):
        return self._chunk(latents, self._cache_list(()))


class VaeDecoderStep(_VaeDecoderChunk):
    def forward(self, latents: torch.Tensor, *caches: torch.Tensor):
        return self._chunk(latents, self._cache_list(caches))


#: One factory per graph of ``wan_trt.registry.GRAPHS`` (a test checks they match): the export-friendly
#: module computing it from the reference models.
GRAPH_FACTORIES: dict[str, Callable[[ReferenceModels], torch.nn.Module]] = {
    registry.TEXT_ENCODER: lambda models: TextEncoderGraph(models.text_encoder),
    registry.IMAGE_ENCODER: lambda models: ImageEncoderGraph(models.image_encoder),
    registry.VAE_ENCODER_FIRST: lambda models: VaeEncoderFirst(models.vae),
    registry.VAE_ENCODER_STEP: lambda models: VaeEncoderStep(models.vae),
    registry.VAE_DECODER_FIRST: lambda models: VaeDecoderFirst(models.vae),
    registry.VAE_DECODER_STEP: lambda models: VaeDecoderStep(models.vae),
    registry.MOTION_ENCODER: lambda models: MotionEncoderGraph(models.transformer.motion_encoder),
    registry.TRANSFORMER: lambda models: TransformerGraph(models.transformer),
}


def graph_modules(models: ReferenceModels, names: Iterable[str] | None = None) -> dict[str, torch.nn.Module]:
    """One export-friendly module per declared graph name (or per name in ``names``), in eval mode, in the
    registry's order."""
    wanted = registry.GRAPH_NAMES if names is None else [n for n in registry.GRAPH_NAMES if n in set(names)]
    return {name: GRAPH_FACTORIES[name](models).eval() for name in wanted}


def cache_layouts(models: ReferenceModels) -> tuple[list[CacheSlot], list[CacheSlot]]:
    """(encoder slots, decoder slots) of the streamed VAE."""
    return discover_cache_slots(models.vae, "encoder")[1], discover_cache_slots(models.vae, "decoder")[1]
