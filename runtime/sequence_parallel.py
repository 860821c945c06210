"""Ulysses sequence parallelism for the torch backend's DiT, over ``torch.distributed``.

Every process (rank) holds a full replica of the DiT and runs the same forward on the same inputs,
but the transformer blocks see only the rank's contiguous slice of the token sequence:

* after the patch embedding (a forward pre-hook on the first block) the ``S = (F+1)·h'·w'`` tokens
  are padded at the end to a multiple of the world size ``N`` and each rank keeps its ``S_pad / N``;
  the RoPE tables (a hook on ``rope``) are sliced the same way, so each token keeps its position;
* self-attention (``attn1`` of every block) projects, normalises and rotates its local tokens, then
  an all-to-all turns "all heads of my tokens" into "my heads of all tokens" (N must divide the
  heads), attends over the real tokens (the padding is cut off before attention, so no mask is
  needed) and an all-to-all turns the result back;
* cross-attention to text/CLIP context and the feed-forward are per-token: no communication;
* the face blocks attend each latent frame's tokens to that frame's motion tokens. The motion tokens
  (face encoder output) are small and computed on every rank, so each rank attends its own tokens to
  the frames they belong to (its slice padded to whole frames); this needs no communication, unlike
  the official code's all-gather of q, and gives the same result;
* the head's output (``proj_out``, 64 channels per token) is all-gathered, so every rank returns the
  whole velocity and the denoising loop stays identical on every rank.

The wrapper installs attention processors and hooks on the diffusers modules instead of rewriting
the forward: the DiT's one forward (``wan_trt.models.dit.dit_forward``, the function that is exported)
runs unchanged with ``TransformerGraph``'s runner (diffusers' blocks).
Collectives: ``all_to_all_single`` and ``all_gather`` (NCCL on GPUs, gloo on CPUs; gloo has both in
torch ≥ 2.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from wan_trt.models.graphs import TransformerGraph, _rope, _sdpa

from wan_trt.errors import BadInputError, EngineError


def check_world_size(heads: int, world: int) -> None:
    """Ulysses splits the attention heads over the ranks: ``world`` must divide ``heads``."""
    if world < 1 or heads % world:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise BadInputError(f"--gpus {world}: sequence parallelism splits the DiT's {heads} attention heads over the "
                            f"GPUs, so their number must divide {heads} (one of {divisors})")


@dataclass(frozen=True)
class TokenLayout:
    """Which tokens of the sequence a rank holds: a contiguous slice of the sequence padded to N·local."""

    tokens: int  # real tokens, (F+1)·h'·w'
    tokens_per_frame: int  # h'·w'
    rank: int
    world: int

    @property
    def local(self) -> int:
        return math.ceil(self.tokens / self.world)

    @property
    def padded(self) -> int:
        return self.local * self.world

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def real(self) -> int:
        """Real (not padding) tokens in this rank's slice."""
        return max(0, min(self.start + self.local, self.tokens) - self.start)

    def frame_window(self) -> tuple[int, int]:
        """[first, last) latent frames that this rank's real tokens belong to."""
        first = self.start // self.tokens_per_frame
        last = (self.start + self.real - 1) // self.tokens_per_frame + 1
        return first, last


def shard_tokens(x: torch.Tensor, layout: TokenLayout, dim: int = 1) -> torch.Tensor:
    """This rank's slice of ``x`` along the token axis ``dim``, zero-padded to ``layout.local``."""
    if x.shape[dim] != layout.tokens:
        raise EngineError(f"sequence parallel: expected {layout.tokens} tokens on dim {dim}, got {tuple(x.shape)}")
    part = x.narrow(dim, min(layout.start, layout.tokens), layout.real)
    missing = layout.local - layout.real
    if missing:
        shape = list(part.shape)
        shape[dim] = missing
        part = torch.cat([part, part.new_zeros(shape)], dim)
    return part.contiguous()


def gather_tokens(x: torch.Tensor, layout: TokenLayout, group=None) -> torch.Tensor:
    """All ranks' slices [B, local, C] → the whole sequence [B, tokens, C] on every rank."""
    parts = [torch.empty_like(x) for _ in range(layout.world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)[:, : layout.tokens]


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """[..., S_local, H, D] of my tokens → [..., N·S_local, H/N, D]: my head group of every rank's tokens."""
    world = dist.get_world_size(group)
    x = x.unflatten(-2, (world, x.shape[-2] // world)).movedim(-3, 0).contiguous()  # [N, ..., S, H/N, D]
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # out[i]: rank i's tokens, my heads
    return out.movedim(0, -4).flatten(-4, -3)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [..., N·S_local, H/N, D] → [..., S_local, H, D]."""
    world = dist.get_world_size(group)
    x = x.unflatten(-3, (world, x.shape[-3] // world)).movedim(-4, 0).contiguous()  # [N, ..., S, H/N, D]
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # out[i]: head group i of my tokens
    return out.movedim(0, -3).flatten(-3, -2)


class _State:
    """The layout of the forward in progress, shared by the wrapper, its hooks and its processors."""

    def __init__(self, group) -> None:
        self.group = group
        self.layout: TokenLayout | None = None

    def current(self) -> TokenLayout:
        if self.layout is None:
            raise EngineError("this DiT is sequence-parallel: call it through its SequenceParallelDiT wrapper")
        return self.layout


class UlyssesSelfAttnProcessor:
    """The export processor's self-attention math with an all-to-all (tokens ↔ heads) around the attention.

    ``attention`` is the replaced processor's self-attention function (plain SDPA, or the fake-quant
    FP8 attention of a quantized reference: its scales are per tensor, so a head shard is quantized
    exactly as the whole).
    """

    def __init__(self, state: _State, attention=_sdpa) -> None:
        self.state, self.attention = state, attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        layout = self.state.current()
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise EngineError("the Ulysses processor handles the blocks' self-attention only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)  # the rope tables are this rank's slice
        q, k, v = seq_to_heads(torch.stack((q, k, v)), self.state.group)[:, :, : layout.tokens].unbind(0)
        out = self.attention(q, k, v).type_as(q).unflatten(2, (q.shape[2], -1))  # [B, S, H/N, D], real tokens only
        if layout.padded > layout.tokens:
            out = torch.cat([out, out.new_zeros(out.shape[0], layout.padded - layout.tokens, *out.shape[2:])], dim=1)
        out = heads_to_seq(out, self.state.group).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


class FrameLocalFaceProcessor:
    """The face block's per-frame cross-attention on this rank's tokens (no communication needed)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        layout = self.state.current()
        if attention_mask is not None:
            raise EngineError("the sequence-parallel face processor takes no attention mask")
        hidden_states = attn.pre_norm_q(hidden_states)
        motion = attn.pre_norm_kv(encoder_hidden_states)
        batch, frames, tokens, _ = motion.shape
        if frames * layout.tokens_per_frame != layout.tokens:
            raise EngineError(f"face block: {frames} motion frames do not match {layout.tokens} tokens of "
                              f"{layout.tokens_per_frame} per frame")
        motion = motion.flatten(1, 2)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))  # [B, local, H, D]
        k = attn.norm_k(attn.to_k(motion).view(batch, frames, tokens, attn.heads, -1))
        v = attn.to_v(motion).view(batch, frames, tokens, attn.heads, -1)
        out = q.new_zeros(batch, layout.local, q.shape[2] * q.shape[3])
        if layout.real:
            first, last = layout.frame_window()
            per = layout.tokens_per_frame
            lead = layout.start - first * per  # offset of my first token inside the window of whole frames
            window = q.new_zeros(batch, (last - first) * per, *q.shape[2:])
            window[:, lead: lead + layout.real] = q[:, : layout.real]
            attended = _sdpa(window.unflatten(1, (last - first, per)).flatten(0, 1),
                             k[:, first:last].flatten(0, 1), v[:, first:last].flatten(0, 1)).type_as(q)
            out[:, : layout.real] = attended.unflatten(0, (batch, last - first)).flatten(1, 2)[:, lead: lead + layout.real]
        return attn.to_out(out)


class SequenceParallelDiT(torch.nn.Module):
    """A :class:`TransformerGraph` whose blocks run sequence-parallel over ``group`` (default: the world).

    Same inputs and outputs as the graph; every rank must call it with the same inputs and gets the
    whole velocity back. The wrapped graph's modules are changed in place (processors, hooks), so the
    graph must not be called directly any more.
    """

    def __init__(self, graph: TransformerGraph, group=None) -> None:
        super().__init__()
        if not isinstance(graph, TransformerGraph):
            raise EngineError(f"sequence parallelism needs the torch DiT (TransformerGraph), not {type(graph).__name__}")
        if not dist.is_initialized():
            raise EngineError("sequence parallelism needs torch.distributed initialised (launch with wan-trt infer --gpus N)")
        self.graph = graph
        self.state = _State(group)
        model = graph.transformer
        check_world_size(int(model.config.num_attention_heads), dist.get_world_size(group))
        for block in model.blocks:
            previous = getattr(block.attn1.processor, "self_attention", _sdpa)
            block.attn1.set_processor(UlyssesSelfAttnProcessor(self.state, previous))
        for face_block in model.face_adapter:
            face_block.set_processor(FrameLocalFaceProcessor(self.state))
        model.rope.register_forward_hook(self._shard_rope)
        model.blocks[0].register_forward_pre_hook(self._shard_hidden_states)
        model.proj_out.register_forward_hook(self._gather_output)

    def forward(self, latent_input: torch.Tensor, *inputs: torch.Tensor):
        p_t, p_h, p_w = self.graph.transformer.config.patch_size
        frames, height, width = latent_input.shape[2] // p_t, latent_input.shape[3] // p_h, latent_input.shape[4] // p_w
        group = self.state.group
        self.state.layout = TokenLayout(frames * height * width, height * width, dist.get_rank(group),
                                        dist.get_world_size(group))
        try:
            return self.graph(latent_input, *inputs)
        finally:
            self.state.layout = None

    def _shard_rope(self, module, args, output):
        layout = self.state.current()
        return tuple(shard_tokens(table, layout) for table in output)

    def _shard_hidden_states(self, module, args):
        return (shard_tokens(args[0], self.state.current()), *args[1:])

    def _gather_output(self, module, args, output):
        return gather_tokens(output, self.state.current(), self.state.group)


def shard_dit_engine(engine) -> None:
    """Make a torch backend's DiT engine (a TorchEngine) sequence-parallel over the default process group.

    The engine's module is the fp32 ``TransformerGraph`` or a half-precision graph wrapping one
    (``wan_trt.models.precision.HalfPrecisionGraph``, its ``inner`` module); quantized DiTs are refused.
    """
    module = getattr(engine, "module", None)
    if isinstance(module, TransformerGraph):
        engine.module = SequenceParallelDiT(module)
    elif isinstance(getattr(module, "inner", None), TransformerGraph):
        module.inner = SequenceParallelDiT(module.inner)
    else:
        raise EngineError(f"--gpus > 1 needs the torch backend's fp32/bf16/fp16 DiT, not {type(module).__name__} "
                          "(quantized DiTs are not supported yet)")
