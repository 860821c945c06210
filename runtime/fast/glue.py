"""The fast DiT's element-wise glue (LayerNorm + modulation, qk-RMSNorm + RoPE + FP8 cast, GELU + FP8
cast, residual + norm), in functions ``torch.compile``-d on the GPU (``Glue``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wan_trt.calibration.attention import smooth_kv
from wan_trt.runtime.fast.compiled import REFERENCE_ROUNDING, compile_once
from wan_trt.runtime.fast.linear import FP8, FP8_MAX


def _maybe_quant(x: torch.Tensor, act_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if act_scale is None else (x / act_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  act_scale: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm (no affine, fp32) · (1 + scale) + shift → ``dtype`` (default x's), or FP8 with ``act_scale``."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift
    return _maybe_quant(y, act_scale, dtype or x.dtype)


def norm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                act_scale: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The cross-attention pre-norm (LayerNorm with affine, fp32) → ``dtype`` (default x's), or FP8 with ``act_scale``."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    y = y.to(dtype or x.dtype)  # the reference rounds to the model dtype before its Linear
    return y if act_scale is None else _maybe_quant(y.float(), act_scale, y.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding on fp32 ``[B, L, H, D]`` (diffusers' math)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2].float(), sin[..., 1::2].float()
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, heads: int,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm across heads, then RoPE: ``[B, L, H*D]`` → bf16 ``[B, L, H, D]`` (rounded as the reference)."""
    dtype = q.dtype
    q = _rms(q, wq, eps).to(dtype).unflatten(-1, (heads, -1))
    k = _rms(k, wk, eps).to(dtype).unflatten(-1, (heads, -1))
    return _rope(q.float(), cos, sin).to(dtype), _rope(k.float(), cos, sin).to(dtype)


def qk_norm_rope_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                     eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor, inv_scales: torch.Tensor,
                     smoothing: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``qk_norm_rope`` (and ``smooth_kv``) with static per-tensor scales, straight to E4M3 ``[B, L, H, D]`` q,
    k, v; the fourth result is v's subtracted token mean (None unless ``smoothing`` smooths v)."""
    q, k = qk_norm_rope(q, k, wq, wk, eps, heads, cos, sin)
    k, v, v_mean = smooth_kv(k, v.unflatten(-1, (heads, -1)), smoothing)
    q8 = (q.float() * inv_scales[0]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    k8 = (k.float() * inv_scales[1]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    v8 = (v.float() * inv_scales[2]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q8, k8, v8, v_mean


def to_out_input(o: torch.Tensor, descale: torch.Tensor | None, v_mean: torch.Tensor | None,
                 act_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The self-attention's output ``[B, L, H, D]`` (FP8 with ``descale``, or high precision with None), plus
    v's mean where v was smoothed → ``to_out``'s input ``[B, L, H*D]``: FP8 with ``act_scale``, else ``dtype``."""
    y = o.float() if descale is None else o.float() * descale.reshape(())
    return _maybe_quant((y if v_mean is None else y + v_mean).flatten(2, 3), act_scale, dtype)


def quant_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling to E4M3: (x_fp8, descale) with ``x ≈ x_fp8 * descale``; descale [1,1,1,1]."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    descale = amax / FP8_MAX
    return (x.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), descale.reshape(1, 1, 1, 1)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y · gate`` in fp32, rounded to x's dtype (the reference's residual update; x is the residual
    stream: the model dtype, or fp32 with ``FastOptions.residual="fp32"``)."""
    return (x.float() + y.float() * gate).to(x.dtype)


def gelu_quant(x: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor:
    """tanh-GELU (in the model dtype, as the reference) → FP8 with ``act_scale``, or unchanged dtype."""
    y = F.gelu(x, approximate="tanh")
    return y if act_scale is None else _maybe_quant(y.float(), act_scale, x.dtype)


def residual_norm_affine(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, act_scale: torch.Tensor | None,
                         dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-attention's gated residual, then the cross-attention's pre-norm: ``(x', norm2(x'))`` in one pass."""
    x = gated_residual(x, y, gate)
    return x, norm_affine(x, weight, bias, eps, act_scale, dtype)


def residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                           act_scale: torch.Tensor | None,
                           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention's residual (``x + y`` in x's dtype, as the reference), then the FFN's
    LayerNorm + modulation: ``(x', h)`` in one pass."""
    x = x + y.to(x.dtype)
    return x, norm_modulate(x, shift, scale, eps, act_scale, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis (fp32 statistics) → the input's dtype (the cross-attention's q norm)."""
    return _rms(x, weight, eps).to(x.dtype)


def merge_heads(a: torch.Tensor, b: torch.Tensor | None, act_scale: torch.Tensor | None) -> torch.Tensor:
    """Attention outputs ``[B, H, L, D]`` (text, and image when ``b`` is given) summed in the model dtype as
    the reference does → contiguous ``[B, L, H*D]``, or FP8 with ``act_scale``."""
    y = a if b is None else a + b
    y = y.transpose(1, 2).flatten(2, 3)
    return y.contiguous() if act_scale is None else _maybe_quant(y.float(), act_scale, a.dtype)


@dataclass
class Glue:
    """The element-wise functions, compiled (GPU) or plain (CPU, tests)."""

    norm_modulate: Callable = norm_modulate
    norm_affine: Callable = norm_affine
    qk_norm_rope: Callable = qk_norm_rope
    quant_dynamic: Callable = quant_dynamic
    gated_residual: Callable = gated_residual
    gelu_quant: Callable = gelu_quant
    qk_norm_rope_fp8: Callable = qk_norm_rope_fp8
    residual_norm_affine: Callable = residual_norm_affine
    residual_norm_modulate: Callable = residual_norm_modulate
    rms_norm: Callable = rms_norm
    merge_heads: Callable = merge_heads
    smooth_kv: Callable = smooth_kv
    to_out_input: Callable = to_out_input

    @staticmethod
    def compiled() -> Glue:
        """Every function compiled once per process (``compiled.compile_once``), static shapes, whole graphs."""
        return Glue(*(compile_once(f.default, dynamic=False, fullgraph=True, options=REFERENCE_ROUNDING)
                      for f in dataclasses.fields(Glue)))
