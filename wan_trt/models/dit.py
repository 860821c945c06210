"""The DiT's one forward (``dit_forward``) and the strategies that run its blocks (``BlockRunner``).

``dit_forward`` is ``WanAnimateTransformer3DModel.forward`` with motion vectors as input (the motion
encoder is its own graph): RoPE tables, patch + pose embedding, condition embedder, face encoder, the
block loop with a face adapter every ``inject_face_latents_blocks`` blocks, then norm_out, proj_out and
unpatchify. What differs between the exported graph and the fast GPU path is how a block computes and
a few casts at the edges; a :class:`BlockRunner` supplies both:

* ``TransformerGraph`` (``wan_trt.models.graphs``; exported to ONNX, run by the torch backend and by
  calibration) calls diffusers' blocks with the export attention processors; its edge hooks are the
  defaults below, which change nothing, so the exported graph is the reference's;
* ``FastTransformer`` (``runtime/fast``) runs its fused block math with FP8/INT8 Linears and attention
  kernels, and casts inputs to its dtype, keeps RoPE in fp32, may keep the residual stream in fp32 and
  returns fp32.

Sequence parallelism (``runtime/sequence_parallel.py``) hooks the modules this forward calls (``rope``,
the first block, ``proj_out``) and so applies to any runner that calls the diffusers blocks.
"""

from __future__ import annotations

from typing import Any

import torch


class BlockRunner:
    """How :func:`dit_forward` runs the transformer blocks, and the casts around them.

    Subclasses supply :meth:`block_context` and :meth:`run_block`. The other hooks default to the
    reference's behaviour (no cast, no copy), which is what the exported graph computes.
    """

    def cast_inputs(self, latent_input: torch.Tensor, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                    pose_latents: torch.Tensor, motion_vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The float inputs as the model takes them (all but the timestep, which stays as it is)."""
        return latent_input, text_embeds, image_embeds, pose_latents, motion_vectors

    def rotary_tables(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) tables that the blocks get, from the model's ``rope``."""
        return rope

    def residual_stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedded tokens ``[B, S, D]`` as the residual stream that runs through the blocks."""
        return tokens

    def model_dtype(self, tokens: torch.Tensor) -> torch.dtype:
        """The dtype the face adapters and the head's Linear compute in (``tokens``: the residual stream
        entering the blocks). The reference: the stream's own dtype."""
        return tokens.dtype

    def block_context(self, text_context: torch.Tensor, image_context: torch.Tensor) -> Any:
        """The cross-attention context as :meth:`run_block` takes it, made once per forward."""
        raise NotImplementedError

    def run_block(self, index: int, block: torch.nn.Module, tokens: torch.Tensor, context: Any,
                  timestep_proj: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Transformer block ``index`` (the module ``block``) on the residual stream; returns the new stream.
        ``timestep_proj`` is the condition embedder's ``[B, 6, D]`` modulation."""
        raise NotImplementedError

    def velocity_out(self, velocity: torch.Tensor) -> torch.Tensor:
        """The forward's output, from the unpatchified ``[B, C, F, H, W]`` velocity."""
        return velocity


class DiffusersBlocks(BlockRunner):
    """The reference runner: diffusers' blocks (with whatever attention processors they hold), as the
    model's own forward calls them, with the image and text context concatenated once."""

    def block_context(self, text_context: torch.Tensor, image_context: torch.Tensor) -> torch.Tensor:
        return torch.cat([image_context, text_context], dim=1)

    def run_block(self, index: int, block: torch.nn.Module, tokens: torch.Tensor, context: torch.Tensor,
                  timestep_proj: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return block(tokens, context, timestep_proj, rotary)


def dit_forward(model: torch.nn.Module, runner: BlockRunner, latent_input: torch.Tensor, timestep: torch.Tensor,
                text_embeds: torch.Tensor, image_embeds: torch.Tensor, pose_latents: torch.Tensor,
                motion_vectors: torch.Tensor) -> torch.Tensor:
    """The velocity ``[B, C, F, H, W]`` of diffusers' ``WanAnimateTransformer3DModel`` ``model`` (motion
    vectors in place of face pixels), its blocks run by ``runner``."""
    latent_input, text_embeds, image_embeds, pose_latents, motion_vectors = runner.cast_inputs(
        latent_input, text_embeds, image_embeds, pose_latents, motion_vectors)
    batch, _, frames, height, width = latent_input.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary = runner.rotary_tables(model.rope(latent_input))

    tokens = model.patch_embedding(latent_input)
    pose = model.pose_patch_embedding(pose_latents)
    tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + pose], dim=2)  # no pose on the reference slot
    dtype = runner.model_dtype(tokens)
    tokens = runner.residual_stream(tokens.flatten(2).transpose(1, 2))

    temb, timestep_proj, text_context, image_context = model.condition_embedder(
        timestep, text_embeds, image_embeds, timestep_seq_len=None
    )
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    context = runner.block_context(text_context, image_context)

    face_tokens = model.face_encoder(motion_vectors)
    face_tokens = torch.cat([torch.zeros_like(face_tokens[:, :1]), face_tokens], dim=1)  # reference slot

    every = model.config.inject_face_latents_blocks
    for index, block in enumerate(model.blocks):
        tokens = runner.run_block(index, block, tokens, context, timestep_proj, rotary)
        if index % every == 0:
            face_input = tokens if tokens.dtype == dtype else tokens.to(dtype)  # an fp32 residual stream
            tokens = model.face_adapter[index // every](face_input, face_tokens) + tokens

    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    tokens = (model.norm_out(tokens.float()) * (1 + scale) + shift).to(dtype)
    tokens = model.proj_out(tokens)
    tokens = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    velocity = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return runner.velocity_out(velocity)
