"""FP8 self-attention of the DiT: calibration of its matmul inputs, its plan and its fake-quant math.

The exported graph computes attention as torch's ONNX exporter decomposes SDPA (opset 19)::

    S = (qᵀ·c) @ (kᵀ·c)ᵀ,  c = (1/√d)^½;   P = softmax(S);   O = P @ v

With ``fp8_self_attention`` in the policy, the inputs of both matmuls get per-tensor Q/DQ: the
scaled q and k, the softmax output P and v — the pattern TensorRT fuses into its FP8 attention
kernel. Calibration records, per block, the largest |q|, |k|, |v| (after the q/k RMSNorm and RoPE,
as they enter attention) and the largest softmax probability; P is computed in chunks of query
rows so that no full ``S × S`` matrix is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from wan_trt.calibration.policy import BLOCK_PREFIX

TENSORS = ("q", "k", "v", "softmax")
# the fast path's smoothing of FP8 attention inputs (smooth_kv), and the ranges calibrated for it
SMOOTHING_MODES = ("none", "k", "v", "kv")
# FastOptions' default, and what `infer --fast` (auto) uses where the cache has its ranges (docs/precision.md)
DEFAULT_SMOOTHING = "v"
SMOOTHED_TENSORS = ("k_smooth", "v_smooth")
_CHUNK_ELEMENTS = 1 << 26  # scores held at once when computing attention chunk by chunk


def stats_key(block: int, tensor: str) -> str:
    """The calibration cache's key for one attention input, e.g. ``transformer.blocks.4.attn1.sdpa.q``."""
    return f"{BLOCK_PREFIX}.{block}.attn1.sdpa.{tensor}"


def smooth_kv(k: torch.Tensor, v: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Subtract the token mean (per head and channel) of ``[B, L, H, D]`` k and/or v (``mode`` k, v or kv), in fp32.

    Exact for attention: softmax(q·(k − k̄)) = softmax(q·k) (the same shift of every logit in a row),
    and P·(v − v̄) + v̄ = P·v (rows of P sum to 1). What is left to quantize is the part that varies
    between tokens, so E4M3's relative rounding of v, and the rounding of FP8 P times v, act on it
    rather than on the common offset (SageAttention's smoothing). Returns (k, v, v̄ ``[B, 1, H, D]``
    or None); v̄ goes back on the attention output.
    """
    if mode in ("k", "kv"):
        k = k.float() - k.float().mean(1, keepdim=True)
    if mode not in ("v", "kv"):
        return k, v, None
    v_mean = v.float().mean(1, keepdim=True)
    return k, v.float() - v_mean, v_mean


def range_names(smoothing: str) -> tuple[str, str, str]:
    """The calibration-cache names (``stats_key``) of the q, k and v ranges that FP8 attention with ``smoothing``
    quantizes: k's and v's less their token mean where ``smooth_kv`` subtracts it."""
    return "q", "k_smooth" if smoothing in ("k", "kv") else "k", "v_smooth" if smoothing in ("v", "kv") else "v"


def split_scale(head_dim: int) -> float:
    """``c``: the exporter multiplies q and kᵀ each by √(1/√d) before their matmul (fp32 value)."""
    return float(torch.tensor(math.sqrt(1.0 / math.sqrt(head_dim)), dtype=torch.float32))


def _row_chunks(batch: int, heads: int, queries: int, keys: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, batch * heads * keys))


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).to(torch.float32)  # [B, S, H, D] -> [B, H, S, D]


def max_probability(q: torch.Tensor, k: torch.Tensor) -> float:
    """The largest softmax probability of attention ``q``·``k`` (``[B, S, H, D]``), without an S×S matrix.

    A row's largest probability is ``exp(max_j s_ij - logsumexp_j s_ij)``.
    """
    c = split_scale(q.shape[-1])
    qh, kh = _heads_first(q) * c, _heads_first(k) * c
    rows = _row_chunks(qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2])
    best = 0.0
    for start in range(0, qh.shape[2], rows):
        scores = qh[:, :, start:start + rows] @ kh.transpose(-1, -2)
        best = max(best, float((scores.amax(-1) - torch.logsumexp(scores, -1)).exp().max()))
    return best


class AttentionObserver:
    """Stands in for the self-attention function while calibrating; records the ranges of its inputs
    (and of k and v smoothed as the fast path's FP8 attention can: ``k_smooth``, ``v_smooth``).

    ``observe(name, tensor)`` is a range observer per input (the calibration method's); the softmax
    maximum is recorded exactly (``max_probability``).
    """

    def __init__(self, observe: Callable[[str, torch.Tensor], None], attention: Callable) -> None:
        self.observe, self.attention = observe, attention
        self.softmax_amax = 0.0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_smooth, v_smooth, _ = smooth_kv(k.detach(), v.detach(), "kv")
        for name, tensor in zip(("q", "k", "v", *SMOOTHED_TENSORS), (q, k, v, k_smooth, v_smooth)):
            self.observe(name, tensor.detach())
        self.softmax_amax = max(self.softmax_amax, max_probability(q.detach(), k.detach()))
        return self.attention(q, k, v)


@dataclass
class AttentionPlan:
    """Per-tensor scales of one block's attention matmul inputs, as the graph holds them.

    ``q_scale`` and ``k_scale`` are for the scaled tensors ``q·c`` and ``k·c`` the matmul sees.
    """

    block: int
    q_scale: float
    k_scale: float
    v_scale: float
    softmax_scale: float

    def scales(self) -> dict[str, float]:
        return {"q": self.q_scale, "k": self.k_scale, "v": self.v_scale, "softmax": self.softmax_scale}


class FakeQuantAttention:
    """What the Q/DQ attention graph computes, in fp32 and in chunks of query rows."""

    def __init__(self, plan: AttentionPlan, precision: str,
                 fake_quant: Callable[[torch.Tensor, float, str], torch.Tensor]) -> None:
        self.plan, self.precision, self.fake_quant = plan, precision, fake_quant

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype, plan, fq = q.dtype, self.plan, self.fake_quant
        c = split_scale(q.shape[-1])
        qh = fq(_heads_first(q) * c, plan.q_scale, self.precision)
        kh = fq(_heads_first(k) * c, plan.k_scale, self.precision)
        vh = fq(_heads_first(v), plan.v_scale, self.precision)
        rows = _row_chunks(qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2])
        out = torch.cat([fq(torch.softmax(qh[:, :, s:s + rows] @ kh.transpose(-1, -2), dim=-1), plan.softmax_scale,
                            self.precision) @ vh for s in range(0, qh.shape[2], rows)], dim=2)
        return out.transpose(1, 2).flatten(2, 3).to(dtype)


def self_attention_processors(transformer_graph: torch.nn.Module) -> dict[int, object]:
    """Block index → the export processor of its self-attention (``attn1``), in the DiT graph module."""
    core = getattr(transformer_graph, "inner", transformer_graph)  # a half-precision wrapper's module
    return {index: block.attn1.processor for index, block in enumerate(core.transformer.blocks)}
