"""FP8 self-attention of the DiT: calibration of its matmul inputs, its plan and its fake-quant math.

The exported graph computes attention as torch's ONNX exporter decomposes SDPA (opset 19)::

    S = (qᵀ·c) @ (kᵀ·c)ᵀ,  c = (1/√d)^½;   P = softmax(S);   O = P @ v

With ``fp8_self_attention`` in the policy, the inputs of both matmuls get per-tensor Q/DQ: the
scaled q and k, the softmax output P and v — the pattern TensorRT fuses into its FP8 attention
kernel. Calibration records, per block, the largest |q|, |k|, |v| (after the q/k RMSNorm and RoPE,
as they enter attention) and the largest softmax probability, never holding an ``S × S`` matrix:
for fp32 q and k exactly, in fp32 chunks of query rows (``exact_max_probability``, the CPU reference);
for bf16/fp16 q and k (the GPU calibration) from two fused-attention log-sum-exps
(``fused_max_probability``: within ``FUSED_TOLERANCE`` of the exact value, for two flash-attention
forwards instead of an fp32 score matrix, chunk by chunk, per block and step).
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


def exact_max_probability(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability of attention ``q``·``k`` (``[B, S, H, D]``) as a 0-d fp32 tensor on their
    device, computed in fp32 chunks of query rows (no S×S matrix, no host sync).

    A row's largest probability is ``exp(max_j s_ij - logsumexp_j s_ij)``.
    """
    c = split_scale(q.shape[-1])
    qh, kh = _heads_first(q) * c, _heads_first(k) * c
    rows = _row_chunks(qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2])
    best = torch.zeros((), dtype=torch.float32, device=q.device)
    for start in range(0, qh.shape[2], rows):
        scores = qh[:, :, start:start + rows] @ kh.transpose(-1, -2)
        best = torch.maximum(best, (scores.amax(-1) - torch.logsumexp(scores, -1)).exp().max())
    return best


def max_probability(q: torch.Tensor, k: torch.Tensor) -> float:
    """``exact_max_probability`` as a Python float."""
    return float(exact_max_probability(q, k))


# fused_max_probability: the row maximum is T·logsumexp(s/T), over-estimated by at most T·ln(keys); with
# T = 2^-16 that is 1.7e-4 at 75,600 keys. What is left is the fp32 rounding of the kernels' scores.
FUSED_TEMPERATURE = 2.0 ** -16
FUSED_TOLERANCE = 1e-3  # relative, against exact_max_probability of the same bf16 q and k (tests/test_calibrate_device.py)


def _log_sum_exp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per query row, logsumexp_j(scale · q_i·k_j) of ``[B, H, S, D]`` q and k, from the flash-attention forward
    of their device (``[B, H, S]`` fp32; scores accumulated in fp32, never held)."""
    if q.device.type == "cuda":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, False, False, scale=scale)[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=scale)[1]


def fused_max_probability(q: torch.Tensor, k: torch.Tensor, temperature: float = FUSED_TEMPERATURE) -> torch.Tensor:
    """``exact_max_probability`` for bf16/fp16 ``q`` and ``k`` (``[B, S, H, D]``) without a score matrix: per row,
    ``exp(m_i − L_i)`` with ``L_i`` = logsumexp of the scores and the row maximum ``m_i`` ≈ ``T·logsumexp(s/T)``
    (``m ≤ T·LSE(s/T) ≤ m + T·ln(keys)``), both from the flash-attention forward (the value argument is k:
    that output is discarded). Two attention forwards per call; within ``FUSED_TOLERANCE`` of the exact value.
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused_max_probability takes bf16/fp16 q and k (got {q.dtype}): use exact_max_probability")
    scale = split_scale(q.shape[-1]) ** 2
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    lse = _log_sum_exp(qh, kh, scale)
    row_max = _log_sum_exp(qh, kh, scale / temperature) * temperature
    return (row_max - lse).exp().amax().clamp(max=1.0)


class AttentionObserver:
    """Stands in for the self-attention function while calibrating; records the ranges of its inputs
    (and of k and v smoothed as the fast path's FP8 attention can: ``k_smooth``, ``v_smooth``).

    ``observe(name, tensor)`` is a range observer per input (the calibration method's); the softmax
    maximum is ``max_prob(q, k)`` (``exact_max_probability`` or ``fused_max_probability``), kept as a
    running maximum on the device and read once (``softmax_amax``).
    """

    def __init__(self, observe: Callable[[str, torch.Tensor], None], attention: Callable,
                 max_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = exact_max_probability) -> None:
        self.observe, self.attention, self.max_prob = observe, attention, max_prob
        self._softmax_amax: torch.Tensor | None = None

    @property
    def softmax_amax(self) -> float:
        return 0.0 if self._softmax_amax is None else float(self._softmax_amax)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_, k_, v_ = q.detach(), k.detach(), v.detach()
        for name, tensor in zip(("q", "k", "v"), (q_, k_, v_)):
            self.observe(name, tensor)
        self.observe("k_smooth", smooth_kv(k_, v_, "k")[0])  # one fp32 smoothed copy alive at a time
        self.observe("v_smooth", smooth_kv(k_, v_, "v")[1])
        best = self.max_prob(q_, k_)
        self._softmax_amax = best if self._softmax_amax is None else torch.maximum(self._softmax_amax, best)
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
