"""The fast PyTorch path of the ``torch`` backend (``wan-trt infer --backend torch --fast``).

The same math as the exported DiT graph (``TransformerGraph``), run the way a Hopper GPU likes it:

* bf16 everywhere the reference keeps fp32 only for its own bookkeeping (norm statistics and
  modulation are still computed in fp32 inside fused kernels, as diffusers does);
* FP8 E4M3 Linears through ``torch._scaled_mm`` for the layers the precision policy quantizes:
  weights per output channel, activations per tensor with the *static* scales of the calibration
  cache (the same ``make_plan`` scales as the Q/DQ graph and its fake-quant reference). The
  quantization of a Linear's input is fused into the element-wise kernel that produces it
  (LayerNorm + modulation, GELU); q/k/v of a block share one fused GEMM;
* self-attention: bf16 in the blocks without FP8 attention, on FlashAttention-3's bf16 forward where
  FA3 is the FP8 kernel (explicitly or by ``auto``; 17% faster than cuDNN at 75.6k tokens on the H200),
  else ``scaled_dot_product_attention`` with the cuDNN backend (``FastOptions.bf16_attention_kernel``);
  FP8 fused attention in the blocks the policy quantizes, by one of two kernels (``FastOptions.fp8_attention_kernel``):
  cuDNN's ``sdpa_fp8`` (``nvidia-cudnn-frontend``) or FlashAttention-3's FP8 forward (``flash_attn_3``,
  built from source for Hopper; ``auto`` takes it where it is installed). q, k and v are scaled per
  tensor: statically from the calibration cache, or from their current amax. By default v's token mean
  is subtracted before v is quantized and added back to the output (``FastOptions.attention_smoothing``,
  ``calibration.attention.smooth_kv``: exact in real arithmetic; 720p error 2.08e-2 → 1.18e-2).
  cuDNN's FP8 output uses ``scale_o = 224 / amax(v)``, safe because every output row is a convex
  combination of v's rows, and feeds the FP8 ``to_out`` GEMM without requantizing (with v smoothed:
  v's mean is added and the sum requantized, one fused kernel); FA3's bf16 output is quantized with
  ``to_out``'s calibrated input scale, as the Q/DQ graph does (plus v's mean, in the same kernel);
* the element-wise glue (LayerNorm + modulation, qk-RMSNorm + RoPE + FP8 cast, GELU + FP8 cast, the
  cross-attention's q RMSNorm and the sum of its text and image attention outputs) in
  ``torch.compile``-d functions, one fused kernel or two each; each residual update is fused with the
  norm that follows it (self-attention residual + cross-attention pre-norm, cross-attention residual
  + FFN LayerNorm and modulation).

Memory plan for ``infer --fast``: the text and image encoders are moved to the GPU for their call
and back to the host right after (they run once per video, before the DiT); the VAE, motion
encoder and DiT stay resident; the DiT's quantized Linears keep only their FP8 weights.

This module imports diffusers only through the reference models it is given (torch backend only).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from wan_trt.calibration.attention import DEFAULT_SMOOTHING, SMOOTHING_MODES, range_names, smooth_kv
from wan_trt.calibration.quantize import LayerPlan, QuantPlan

from wan_trt.errors import EngineError
from wan_trt.runtime.engines import pipeline_outputs

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12
O_MARGIN = 2.0  # cuDNN's FP8 attention output: |o| <= amax(v); scale to half the range (FP8 is relative precision)
ATTENTION_MARGIN = 1.25  # static q/k/v scales: headroom over the calibrated range
ATTENTION_MODES = ("bf16", "fp8")
BF16_ATTENTION_KERNELS = ("auto", "sdpa", "fa3")
FP8_ATTENTION_KERNELS = ("auto", "cudnn", "fa3")


# ------------------------------------------------------------------------------------------------
# FP8 Linear through torch._scaled_mm
# ------------------------------------------------------------------------------------------------

def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x / scale`` saturated to ±448 and rounded to E4M3 (what ONNX QuantizeLinear computes)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Linear(torch.nn.Module):
    """``y = x Wᵀ + b`` with x quantized per tensor (static scale) and W per output channel.

    Computes exactly what ``FakeQuantLinear`` (fp8) computes, up to the GEMM's accumulation order.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, act_scale: float,
                 bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True) -> None:
        super().__init__()
        self.out_dtype, self.fast_accum = out_dtype, fast_accum
        self.register_buffer("weight_q", weight_q.contiguous())  # [out, in] E4M3, row-major (b = Wᵀ is column-major)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).to(torch.float32).contiguous())  # [1, out]
        self.register_buffer("act_scale", torch.tensor(float(act_scale), dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).contiguous())

    @property
    def in_features(self) -> int:
        return self.weight_q.shape[1]

    @staticmethod
    def from_linears(linears: list[torch.nn.Linear], layers: list[LayerPlan], out_dtype: torch.dtype = torch.bfloat16,
                     fast_accum: bool = True) -> Fp8Linear:
        """One FP8 Linear for several Linears that read the same input (their outputs concatenated).

        The layers' activation scales come from the same tensor, so they agree; the largest is used.
        """
        weights, scales, biases = [], [], []
        for linear, layer in zip(linears, layers):
            if layer.smooth is not None:
                raise EngineError(f"{layer.path}: SmoothQuant (INT8) layers have no FP8 _scaled_mm path")
            w_scale = torch.from_numpy(layer.weight_scale).to(linear.weight.device)
            weights.append(quantize_fp8(linear.weight.detach(), w_scale[:, None]))
            scales.append(w_scale)
            biases.append(None if linear.bias is None else linear.bias.detach())
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        return Fp8Linear(torch.cat(weights), torch.cat(scales), max(layer.act_scale for layer in layers), bias,
                         out_dtype, fast_accum)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_fp8(x, self.act_scale)

    def forward_fp8(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The GEMM on an already quantized input (``x ≈ x_q * x_scale``, x_scale a scalar tensor)."""
        lead = x_q.shape[:-1]
        a = x_q.reshape(-1, x_q.shape[-1])
        scale_a = x_scale.reshape(1, 1).expand(a.shape[0], 1).contiguous()  # row-wise form of a per-tensor scale
        out = torch._scaled_mm(a, self.weight_q.t(), scale_a, self.weight_scale, bias=self.bias,
                               out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        return out.reshape(*lead, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fp8(self.quantize_input(x), self.act_scale)


def fp8_plan(linears: Mapping[str, torch.nn.Linear], act_amax: Mapping[str, float], policy,
             num_blocks: int) -> QuantPlan:
    """``make_plan(..., "fp8")`` computed where the weights are (a GPU: no host copy of 17 B weights).

    ``act_amax``: each layer's calibrated input range (``CalibrationCache.layers[path].amax``).
    """
    layers = {}
    for path in policy.quantized_layers(num_blocks):
        if path not in linears:
            raise EngineError(f"policy '{policy.source}' names layer {path}, which this model does not have")
        if path not in act_amax:
            raise EngineError(f"calibration has no statistics for {path}: re-run wan-trt calibrate")
        w_amax = linears[path].weight.detach().abs().amax(dim=1).to(torch.float32).clamp(min=_TINY)
        act_scale = float(np.float32(max(float(act_amax[path]), _TINY) / FP8_MAX))  # held as fp32, as make_plan
        layers[path] = LayerPlan(path, act_scale,
                                 (w_amax / FP8_MAX).cpu().numpy().astype(np.float32), None)
    return QuantPlan("fp8", layers)


class AmaxObserver:
    """Records the largest |input| of chosen Linears over calls, on their device (no host sync per call)."""

    def __init__(self, linears: Mapping[str, torch.nn.Module]) -> None:
        self.amax: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            value = args[0].detach().abs().amax().float()
            self.amax[name] = value if name not in self.amax else torch.maximum(self.amax[name], value)
        return hook

    def remove(self) -> dict[str, float]:
        for handle in self.handles:
            handle.remove()
        return {name: float(value) for name, value in self.amax.items()}


# ------------------------------------------------------------------------------------------------
# Element-wise glue (compiled on the GPU)
# ------------------------------------------------------------------------------------------------

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
        global _COMPILED
        if _COMPILED is None:  # one set for every FastTransformer: each function compiles once per shape
            # emulate_precision_casts: keep each explicit cast to bf16 (the reference's rounding points) inside
            # the fused kernels; inductor otherwise carries fp32 through them and the fast path drifts from the
            # eager reference (tests/test_fast_torch.py::test_compiled_glue_rounds_as_the_reference)
            opts = {"dynamic": False, "fullgraph": True, "options": {"emulate_precision_casts": True}}
            _COMPILED = Glue(*(torch.compile(f.default, **opts) for f in dataclasses.fields(Glue)))
        return _COMPILED


_COMPILED: Glue | None = None


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention over ``[B, S, H, D]`` → ``[B, H, S, D]`` (a view, as SDPA returns it); cuDNN first on a
    GPU, then flash, then efficient."""
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(*args)
    return F.scaled_dot_product_attention(*args)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention over ``[B, S, H, D]`` → ``[B, S, H*D]``."""
    return sdpa_heads(q, k, v).transpose(1, 2).flatten(2, 3)


class CudnnFp8Attention:
    """cuDNN's fused FP8 attention (``sdpa_fp8``) on ``[B, L, H, D]`` E4M3 tensors, one graph per shape."""

    def __init__(self) -> None:
        try:
            import cudnn
        except ImportError as error:
            raise EngineError("FP8 attention needs nvidia-cudnn-frontend (pip install nvidia-cudnn-frontend): "
                              f"{error}") from None
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs: dict[tuple, tuple] = {}
        self._one = None

    def _graph(self, batch: int, length: int, heads: int, dim: int):
        key = (batch, length, heads, dim)
        if key in self.graphs:
            return self.graphs[key]
        cudnn = self.cudnn
        dt = cudnn.data_type
        graph = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                              handle=self.handle)
        dims, strides = (batch, heads, length, dim), (length * heads * dim, dim, heads * dim, 1)  # BSHD in memory
        q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=dt.FP8_E4M3) for n in "qkv")
        scalars = {n: graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = graph.sdpa_fp8(name="sdpa_fp8", q=q, k=k, v=v, **scalars, generate_stats=False,
                                               attn_scale=1.0 / math.sqrt(dim), use_causal_mask=False)
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(dt.FP8_E4M3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        ports = {"q": q, "k": k, "v": v, "o": o, "amax_s": amax_s, "amax_o": amax_o, **scalars}
        workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
        self.graphs[key] = (graph, ports, workspace)
        log.info("built cuDNN FP8 attention graph for B=%d L=%d H=%d D=%d", *key)
        return self.graphs[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                 descale_k: torch.Tensor, descale_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E4M3 ``[B, L, H, D]`` q, k, v with their descales → (E4M3 output ``[B, L, H, D]``, its descale)."""
        graph, ports, workspace = self._graph(*q.shape)
        if self._one is None:
            self._one = {"descale_s": torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, device=q.device),
                         "scale_s": torch.full((1, 1, 1, 1), FP8_MAX, device=q.device),
                         "amax_s": torch.empty(1, 1, 1, 1, device=q.device),
                         "amax_o": torch.empty(1, 1, 1, 1, device=q.device)}
        out = torch.empty_like(q)
        descale_o = descale_v * O_MARGIN  # o <= amax(v) = 448 * descale_v
        pack = {ports["q"]: q, ports["k"]: k, ports["v"]: v, ports["o"]: out,
                ports["descale_q"]: descale_q, ports["descale_k"]: descale_k, ports["descale_v"]: descale_v,
                ports["scale_o"]: (1.0 / descale_o).contiguous(),
                **{ports[n]: t for n, t in self._one.items()}}
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        graph.execute(pack, workspace, handle=self.handle)
        return out, descale_o


class Fa3Fp8Attention:
    """FlashAttention-3's FP8 forward (``flash_attn_interface.flash_attn_func`` of the ``flash_attn_3`` package)
    on ``[B, L, H, D]`` E4M3 tensors. Its output is bf16 (FA3 has no FP8 output), returned with descale None."""

    def __init__(self, attention: Callable | None = None) -> None:
        """``attention``: a stand-in for ``flash_attn_func`` (tests); by default FA3's own, on a Hopper GPU."""
        if attention is not None:
            self.attention = attention
            return
        try:
            import flash_attn_interface
        except ImportError as error:
            raise EngineError("the fa3 attention kernel (--fp8-attention-kernel fa3) needs FlashAttention-3 "
                              "(flash_attn_3, built from the hopper/ folder of Dao-AILab/flash-attention; see "
                              f"docs/cli.md): {error}") from None
        if torch.cuda.get_device_capability() != (9, 0):
            raise EngineError(f"FlashAttention-3 runs on Hopper GPUs (compute capability 9.0); this GPU is "
                              f"{torch.cuda.get_device_name()}: use --fp8-attention-kernel cudnn")
        self.attention = flash_attn_interface.flash_attn_func

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                 descale_k: torch.Tensor, descale_v: torch.Tensor) -> tuple[torch.Tensor, None]:
        """E4M3 ``[B, L, H, D]`` q, k, v with per-tensor descales → (bf16 output ``[B, L, H, D]``, None)."""
        batch, heads = q.shape[0], k.shape[2]
        per_head = [d.reshape(1, 1).expand(batch, heads) for d in (descale_q, descale_k, descale_v)]  # FA3: (B, H_k)
        out = self.attention(q, k, v, causal=False, q_descale=per_head[0], k_descale=per_head[1],
                             v_descale=per_head[2])
        return (out[0] if isinstance(out, tuple) else out), None

    def bf16(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """FA3's bf16 forward: ``[B, L, H, D]`` q, k, v → ``[B, L, H, D]``."""
        out = self.attention(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out


def fa3_available() -> bool:
    """Whether FlashAttention-3 is importable and this GPU is a Hopper (its only target)."""
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def resolve_attention_kernel(name: str) -> str:
    """``FastOptions.fp8_attention_kernel`` → fa3 | cudnn (auto: FA3 where it is installed on a Hopper GPU)."""
    if name not in FP8_ATTENTION_KERNELS:
        raise EngineError(f"FP8 attention kernel '{name}': choose one of {', '.join(FP8_ATTENTION_KERNELS)}")
    if name != "auto":
        return name
    return "fa3" if fa3_available() else "cudnn"


def fp8_attention_kernel(name: str) -> CudnnFp8Attention | Fa3Fp8Attention:
    """The FP8 attention kernel ``name`` (see ``resolve_attention_kernel``)."""
    resolved = resolve_attention_kernel(name)
    if name == "auto":
        log.info("FP8 attention kernel: %s (auto%s)", resolved,
                 "" if resolved == "fa3" else ": flash_attn_3 not installed")
    return Fa3Fp8Attention() if resolved == "fa3" else CudnnFp8Attention()


# ------------------------------------------------------------------------------------------------
# The fast DiT
# ------------------------------------------------------------------------------------------------

def _check_options(options: FastOptions) -> None:
    for name, value, allowed in (("fast attention", options.attention, ATTENTION_MODES),
                                 ("bf16 attention kernel", options.bf16_attention_kernel, BF16_ATTENTION_KERNELS),
                                 ("fast residual stream", options.residual, ("model", "fp32")),
                                 ("FP8 attention blocks", options.fp8_attention_blocks, ("policy", "plan", "all")),
                                 ("FP8 attention smoothing", options.attention_smoothing, SMOOTHING_MODES)):
        if value not in allowed:
            raise EngineError(f"{name} '{value}': choose one of {', '.join(allowed)}")


@dataclass
class FastOptions:
    attention: str = "bf16"  # bf16 | fp8 (FP8 self-attention in the blocks listed below)
    fp8_attention_kernel: str = "auto"  # auto | cudnn | fa3 (see fp8_attention_kernel())
    # policy: the blocks whose Linears are quantized | plan: the plan's attention blocks | all
    fp8_attention_blocks: str = "policy"
    compile: bool = True
    fast_accum: bool = True
    dtype: torch.dtype = torch.bfloat16
    # the residual stream between blocks: "model" (dtype, rounded at each update as the reference) | "fp32"
    residual: str = "model"
    # self-attention of the blocks without FP8 attention: sdpa (cuDNN first) | fa3 (FlashAttention-3, bf16) |
    # auto: fa3 where fp8_attention_kernel is fa3, or auto with FA3 installed on a Hopper GPU; else sdpa
    bf16_attention_kernel: str = "auto"
    # FP8 self-attention: subtract the token mean of k, v or both before quantizing (calibration.attention.smooth_kv)
    attention_smoothing: str = DEFAULT_SMOOTHING

    def to_json(self) -> dict:
        return {"attention": self.attention, "fp8_attention_kernel": self.fp8_attention_kernel,
                "fp8_attention_blocks": self.fp8_attention_blocks, "compile": self.compile,
                "fast_accum": self.fast_accum, "dtype": str(self.dtype), "residual": self.residual,
                "bf16_attention_kernel": self.bf16_attention_kernel, "attention_smoothing": self.attention_smoothing}


BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class _Linears:
    """A block's Linear ops: FP8 where the plan has the layer, the model's own Linear otherwise."""

    qkv: Fp8Linear | None = None  # attn1 q|k|v fused (all three quantized); the three entries below are then None
    ops: dict[str, torch.nn.Module | None] = field(default_factory=dict)


def _block_ops(block: torch.nn.Module, prefix: str, plan: QuantPlan | None, out_dtype: torch.dtype,
               fast_accum: bool) -> _Linears:
    out = _Linears()
    layers = {} if plan is None else plan.layers
    qkv = [f"{prefix}.attn1.to_{c}" for c in "qkv"]
    if all(n in layers for n in qkv):
        out.qkv = Fp8Linear.from_linears([block.get_submodule(f"attn1.to_{c}") for c in "qkv"],
                                         [layers[n] for n in qkv], out_dtype, fast_accum)
    for name in BLOCK_LINEARS:
        path = f"{prefix}.{name}"
        if out.qkv is not None and path in qkv or name.startswith("attn2.add_") and block.attn2.add_k_proj is None:
            out.ops[name] = None
        elif path in layers:
            out.ops[name] = Fp8Linear.from_linears([block.get_submodule(name)], [layers[path]], out_dtype, fast_accum)
        else:
            out.ops[name] = block.get_submodule(name)
    return out


class FastTransformer(torch.nn.Module):
    """``TransformerGraph``'s function (same inputs and output) on the fast path.

    ``graph`` is a ``TransformerGraph`` (its diffusers model in ``graph.transformer``); ``plan`` the
    FP8 quantization plan (None: bf16 Linears). With ``release_bf16`` the quantized Linears' bf16
    weights are dropped from the model (it can then no longer run as the reference).
    """

    def __init__(self, graph: torch.nn.Module, plan: QuantPlan | None, options: FastOptions | None = None,
                 release_bf16: bool = False) -> None:
        super().__init__()
        self.options = options or FastOptions()
        _check_options(self.options)
        if plan is not None and plan.precision != "fp8":
            raise EngineError(f"the fast path runs FP8 plans only (this plan is {plan.precision})")
        self.model = graph.transformer
        self.plan = plan
        self.block_ops = [_block_ops(b, f"transformer.blocks.{i}", plan, self.options.dtype, self.options.fast_accum)
                          for i, b in enumerate(self.model.blocks)]
        for i, ops in enumerate(self.block_ops):  # registered so .to() moves them
            for name, op in ops.ops.items():
                if isinstance(op, Fp8Linear):
                    self.add_module(f"fp8_{i}_{name.replace('.', '_')}", op)
            if ops.qkv is not None:
                self.add_module(f"fp8_{i}_qkv", ops.qkv)
        self.fp8_attention = self._fp8_attention_blocks()
        if release_bf16 and plan is not None:
            for path in plan.layers:  # transformer.blocks.<i>.<name>: the FP8 copy replaces it
                parent, _, attr = path.removeprefix("transformer.").rpartition(".")
                setattr(self.model.get_submodule(parent), attr, torch.nn.Identity())
        self._glue: Glue | None = None
        self._fp8_attn: CudnnFp8Attention | Fa3Fp8Attention | None = None
        self._bf16_kernel: str | None = None  # bf16_attention_kernel resolved on the first bf16 attention
        self._fa3_bf16: Fa3Fp8Attention | None = None
        self.attention_scales: dict[int, tuple] = {}  # block -> (1/descale [3], (descale_q, descale_k, descale_v))
        self.recorded_amax: dict[int, torch.Tensor] | None = None

    def _glue_fns(self, device: torch.device) -> Glue:
        if self._glue is None:
            self._glue = Glue.compiled() if (self.options.compile and device.type == "cuda") else Glue()
        return self._glue

    def _attention_fp8(self) -> CudnnFp8Attention | Fa3Fp8Attention:
        if self._fp8_attn is None:
            self._fp8_attn = fp8_attention_kernel(self.options.fp8_attention_kernel)
        return self._fp8_attn

    def _fp8_attention_blocks(self) -> set[int]:
        """The blocks whose self-attention runs in FP8 (``attention`` and ``fp8_attention_blocks``)."""
        if self.options.attention != "fp8":
            return set()
        if self.options.fp8_attention_blocks == "all":
            return set(range(len(self.block_ops)))
        if self.options.fp8_attention_blocks == "plan":
            return set(self.plan.attention) if self.plan is not None else set()
        return {i for i, ops in enumerate(self.block_ops)  # policy: the blocks with FP8 Linears
                if ops.qkv is not None or any(isinstance(o, Fp8Linear) for o in ops.ops.values())}

    def with_options(self, **changes) -> FastTransformer:
        """A copy with some options changed that shares this one's modules and FP8 weights (and its static
        attention scales, unless the smoothing changes); kernel and glue choices are made again on its first call."""
        import copy

        other = copy.copy(self)
        other.options = dataclasses.replace(self.options, **changes)
        _check_options(other.options)
        other.fp8_attention = other._fp8_attention_blocks()
        # static scales are ranges of what is quantized: smoothing changes that, so they are calibrated again
        same = other.options.attention_smoothing == self.options.attention_smoothing
        other.attention_scales = dict(self.attention_scales) if same else {}
        if self.attention_scales and not same:
            log.info("with_options: attention smoothing %s -> %s drops the static q/k/v scales (dynamic until "
                     "record_attention_amax + use_static_attention)", self.options.attention_smoothing,
                     other.options.attention_smoothing)
        other.recorded_amax = None
        other._glue = other._fp8_attn = other._fa3_bf16 = other._bf16_kernel = None
        return other

    @property
    def bf16_kernel_name(self) -> str:
        """The bf16 self-attention kernel: fa3 or sdpa (``FastOptions.bf16_attention_kernel`` resolved)."""
        if self._bf16_kernel is None:
            kernel = self.options.bf16_attention_kernel
            if kernel == "auto":  # the FP8 attention's kernel family: FA3, or cuDNN's (SDPA for bf16)
                kernel = "fa3" if resolve_attention_kernel(self.options.fp8_attention_kernel) == "fa3" else "sdpa"
            self._bf16_kernel = kernel
        return self._bf16_kernel

    def _attention_bf16_kernel(self) -> Fa3Fp8Attention | None:
        """FA3 when it runs the bf16 self-attention (made, and checked, on the first call), else None (SDPA)."""
        if self.bf16_kernel_name != "fa3":
            return None
        if self._fa3_bf16 is None:
            self._fa3_bf16 = Fa3Fp8Attention()
        return self._fa3_bf16

    def _attention_bf16(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bf16 self-attention ``[B, L, H, D]`` → ``[B, L, H*D]``: FA3's bf16 forward (at 75.6k tokens on the
        H200, 169 ms per block against cuDNN's 204) or SDPA."""
        fa3 = self._attention_bf16_kernel()
        return fa3.bf16(q, k, v).flatten(2, 3) if fa3 is not None else sdpa(q, k, v)

    @property
    def fp8_kernel_name(self) -> str | None:
        """The FP8 attention kernel in use (class name), None before the first FP8 attention call."""
        return type(self._fp8_attn).__name__ if self._fp8_attn is not None else None

    # ---- one block ---------------------------------------------------------------------------
    def _self_attention(self, index: int, block, x, shift, scale, rotary, glue: Glue) -> torch.Tensor:
        ops, attn = self.block_ops[index], block.attn1
        eps = block.norm1.eps
        if ops.qkv is not None:
            h = glue.norm_modulate(x, shift, scale, eps, ops.qkv.act_scale, self.options.dtype)
            q, k, v = ops.qkv.forward_fp8(h, ops.qkv.act_scale).chunk(3, dim=-1)
        else:
            h = glue.norm_modulate(x, shift, scale, eps, None, self.options.dtype)
            q, k, v = (_run(ops.ops[f"attn1.to_{c}"], h) for c in "qkv")
        to_out = ops.ops["attn1.to_out.0"]
        static = self.attention_scales.get(index) if index in self.fp8_attention else None
        smoothing = self.options.attention_smoothing
        if static is not None:  # calibrated q/k/v scales: the FP8 cast is fused into the RMSNorm + RoPE kernel
            inv, descales = static
            q8, k8, v8, v_mean = glue.qk_norm_rope_fp8(q, k, v, attn.norm_q.weight, attn.norm_k.weight,
                                                       attn.norm_q.eps, attn.heads, *rotary, inv, smoothing)
            o, do = self._attention_fp8()(q8, k8, v8, *descales)
        else:
            q, k = glue.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, attn.heads,
                                     *rotary)
            v = v.unflatten(-1, (attn.heads, -1))
            if index not in self.fp8_attention:
                return _run(to_out, self._attention_bf16(q, k, v.contiguous()).to(self.options.dtype))
            k, v, v_mean = glue.smooth_kv(k, v, smoothing) if smoothing != "none" else (k, v, None)
            (q8, dq), (k8, dk), (v8, dv) = glue.quant_dynamic(q), glue.quant_dynamic(k), glue.quant_dynamic(v)
            if self.recorded_amax is not None:
                self._record(index, (dq, dk, dv))
            o, do = self._attention_fp8()(q8, k8, v8, dq, dk, dv)
        # o: E4M3 with its descale do (cuDNN), or bf16 with do None (FA3)
        if do is not None and v_mean is None and isinstance(to_out, Fp8Linear):  # cuDNN's FP8 output as it is
            return to_out.forward_fp8(o.flatten(2, 3), do)
        # else to_out's input is made as any FP8 Linear's (v's mean added where v was smoothed), in one kernel
        act = _act_scale(to_out)
        y = glue.to_out_input(o, do, v_mean, act, self.options.dtype)
        return to_out.forward_fp8(y, act) if act is not None else to_out(y)

    # ---- static FP8 attention scales -----------------------------------------------------------
    def record_attention_amax(self) -> None:
        """From now on, remember each FP8-attention block's largest |q|, |k|, |v| (dynamic scaling meanwhile)."""
        self.recorded_amax = {}

    def _record(self, index: int, descales) -> None:
        amax = torch.stack([d.reshape(()) for d in descales]) * FP8_MAX
        old = self.recorded_amax.get(index)
        self.recorded_amax[index] = amax if old is None else torch.maximum(old, amax)

    def use_static_attention(self, amax: Mapping[int, tuple[float, float, float]] | None = None,
                             margin: float = ATTENTION_MARGIN) -> dict[int, list[float]]:
        """Fix per-block q/k/v scales (``amax · margin / 448``) from ``amax`` or from what was recorded.

        Values beyond a calibrated range saturate at ±448: the margin covers inputs a bit larger than
        the calibration's. Returns the amax table used (JSON-friendly).
        """
        if amax is None:
            if not self.recorded_amax:
                raise EngineError("no attention ranges recorded: call record_attention_amax() and run a forward first")
            amax = {i: tuple(float(v) for v in t.tolist()) for i, t in self.recorded_amax.items()}
        self.recorded_amax = None
        self.attention_scales = {}
        device = next(self.model.parameters()).device
        for index, values in amax.items():
            descale = torch.tensor([max(v, _TINY) * margin / FP8_MAX for v in values], device=device)
            self.attention_scales[int(index)] = (1.0 / descale, tuple(d.reshape(1, 1, 1, 1) for d in descale))
        return {int(i): [float(v) for v in vals] for i, vals in amax.items()}

    def _cross_attention(self, index: int, block, h, context_img, context_txt, glue: Glue) -> torch.Tensor:
        """Cross-attention on ``h`` (the normalized tokens, FP8 when ``attn2.to_q`` is quantized)."""
        ops, attn = self.block_ops[index], block.attn2
        to_q, to_out = ops.ops["attn2.to_q"], ops.ops["attn2.to_out.0"]
        q = to_q.forward_fp8(h, to_q.act_scale) if isinstance(to_q, Fp8Linear) else to_q(h)
        heads = attn.heads
        q = glue.rms_norm(q, attn.norm_q.weight, attn.norm_q.eps).unflatten(-1, (heads, -1))
        k = attn.norm_k(_run(ops.ops["attn2.to_k"], context_txt)).unflatten(-1, (heads, -1))
        v = _run(ops.ops["attn2.to_v"], context_txt).unflatten(-1, (heads, -1))
        out, out_img = sdpa_heads(q, k, v), None
        if ops.ops["attn2.add_k_proj"] is not None:  # the CLIP image context branch
            k_img = attn.norm_added_k(_run(ops.ops["attn2.add_k_proj"], context_img)).unflatten(-1, (heads, -1))
            v_img = _run(ops.ops["attn2.add_v_proj"], context_img).unflatten(-1, (heads, -1))
            out_img = sdpa_heads(q, k_img, v_img)
        act = _act_scale(to_out)
        merged = glue.merge_heads(out, out_img, act)
        return to_out.forward_fp8(merged, act) if act is not None else to_out(merged)

    def _ffn(self, index: int, h, glue: Glue) -> torch.Tensor:
        """The FFN on ``h`` (the normalized, modulated tokens; FP8 when ``ffn.net.0.proj`` is quantized)."""
        ops = self.block_ops[index]
        up, down = ops.ops["ffn.net.0.proj"], ops.ops["ffn.net.2"]
        u = up.forward_fp8(h, up.act_scale) if isinstance(up, Fp8Linear) else up(h)
        act = _act_scale(down)
        g = glue.gelu_quant(u, act)
        return down.forward_fp8(g, act) if act is not None else down(g)

    def _block(self, index: int, x, context_img, context_txt, temb6, rotary, glue: Glue) -> torch.Tensor:
        """One transformer block; each residual update is fused with the norm that follows it."""
        block, ops = self.model.blocks[index], self.block_ops[index]
        mod = (block.scale_shift_table.float() + temb6.float()).chunk(6, dim=1)  # each [B, 1, D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        y = self._self_attention(index, block, x, shift, scale, rotary, glue)
        norm2 = block.norm2
        x, h = glue.residual_norm_affine(x, y, gate, norm2.weight, norm2.bias, norm2.eps,
                                         _act_scale(ops.ops["attn2.to_q"]), self.options.dtype)
        y = self._cross_attention(index, block, h, context_img, context_txt, glue)
        x, h = glue.residual_norm_modulate(x, y, c_shift, c_scale, block.norm3.eps,
                                           _act_scale(ops.ops["ffn.net.0.proj"]), self.options.dtype)
        return glue.gated_residual(x, self._ffn(index, h, glue), c_gate)

    # ---- the graph -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, latent_input, timestep, text_embeds, image_embeds, pose_latents, motion_vectors):
        model, dtype = self.model, self.options.dtype
        glue = self._glue_fns(latent_input.device)
        latent_input, text_embeds, image_embeds, pose_latents, motion_vectors = (
            t.to(dtype) for t in (latent_input, text_embeds, image_embeds, pose_latents, motion_vectors))
        batch, _, frames, height, width = latent_input.shape
        p_t, p_h, p_w = model.config.patch_size
        cos, sin = model.rope(latent_input)
        rotary = (cos.to(torch.float32), sin.to(torch.float32))

        tokens = model.patch_embedding(latent_input)
        pose = model.pose_patch_embedding(pose_latents)
        tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + pose], dim=2)
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()
        if self.options.residual == "fp32":
            tokens = tokens.float()

        temb, timestep_proj, text_context, image_context = model.condition_embedder(
            timestep, text_embeds, image_embeds, timestep_seq_len=None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        face_tokens = model.face_encoder(motion_vectors)
        face_tokens = torch.cat([torch.zeros_like(face_tokens[:, :1]), face_tokens], dim=1)

        every = model.config.inject_face_latents_blocks
        for index in range(len(model.blocks)):
            tokens = self._block(index, tokens, image_context, text_context, timestep_proj, rotary, glue)
            if index % every == 0:
                tokens = model.face_adapter[index // every](tokens.to(dtype), face_tokens) + tokens

        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (model.norm_out(tokens.float()) * (1 + scale) + shift).to(dtype)
        tokens = model.proj_out(tokens)
        tokens = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        velocity = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return (velocity.float(),)


def _run(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return op(x)


def _act_scale(op: torch.nn.Module | None) -> torch.Tensor | None:
    """The static input scale of an FP8 Linear (its input is quantized by the kernel before it), else None."""
    return op.act_scale if isinstance(op, Fp8Linear) else None


def to_inference_dtype(module: torch.nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype`` except those whose name contains one of ``keep_fp32``
    (diffusers' ``_keep_in_fp32_modules``: time embedder, modulation tables, norms, RoPE, motion basis)."""
    for name, p in module.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if any(k in name for k in keep_fp32) else dtype)
    for mod_name, mod in module.named_modules():
        for key, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != FP8:
                full = f"{mod_name}.{key}"
                mod._buffers[key] = b.to(torch.float32 if any(k in full for k in keep_fp32) else dtype)
    return module


# ------------------------------------------------------------------------------------------------
# VAE decode with an in-place cache
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Engines for `infer --fast`
# ------------------------------------------------------------------------------------------------

class FastEngine:
    """A graph module on the GPU in bf16: float inputs cast on the way in; caches stay on the device,
    other outputs come back as float32 on the host. ``offload``: the module lives on the host and
    visits the GPU only for its call (the memory plan of the one-shot encoders)."""

    def __init__(self, module: torch.nn.Module, spec, device: str = "cuda", dtype: torch.dtype | None = torch.bfloat16,
                 offload: bool = False) -> None:
        self.module, self.spec, self.device, self.dtype, self.offload = module, spec, device, dtype, offload
        self.module.to("cpu" if offload else device)
        self.seconds = 0.0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import time

        args = []
        for t in self.spec.inputs:
            value = feed[t.name].to(self.device, non_blocking=True)
            args.append(value.to(self.dtype) if self.dtype is not None and value.is_floating_point() else value)
        start = time.perf_counter()
        if self.offload:
            self.module.to(self.device)
        with torch.inference_mode():
            outputs = self.module(*args)
        if self.offload:
            self.module.to("cpu")
            torch.cuda.empty_cache()
        result = pipeline_outputs(self.spec.output_names, outputs, torch.float32)  # the host copy waits for the GPU
        self.seconds += time.perf_counter() - start
        return result


def fast_plan(graph: torch.nn.Module, directory, manifest,
              smoothing: str = "auto") -> tuple[QuantPlan, dict[int, tuple[float, float, float]], str]:
    """The FP8 plan of a quantized engines directory (its calibration cache and policy, as the build made it),
    the calibrated |q|, |k|, |v| ranges of the blocks whose self-attention it quantizes (k's and v's less
    their token mean where the smoothing subtracts it), and that smoothing: ``smoothing``, or for auto
    ``DEFAULT_SMOOTHING`` where the cache has its ranges, else none (logged: a cache from before smoothing)."""
    from wan_trt.calibration.attention import stats_key
    from wan_trt.calibration.cache import load_cache
    from wan_trt.calibration.policy import PrecisionPolicy
    from wan_trt.calibration.quantize import linear_layers, make_plan

    q = manifest.quantization
    policy = PrecisionPolicy.from_json(q["policy"])
    path = directory / q["calibration_file"]
    cache = load_cache(path)
    plan = make_plan(linear_layers(graph), cache, policy, q["precision"], int(manifest.preset.transformer["num_layers"]),
                     head_dim=int(graph.transformer.config.attention_head_dim))
    def keys(mode: str) -> list[list[str]]:
        return [[stats_key(block, name) for name in range_names(mode)] for block in sorted(plan.attention)]

    def missing(mode: str) -> list[str]:
        return [key for row in keys(mode) for key in row if key not in cache.layers]

    if smoothing == "auto":
        smoothing = DEFAULT_SMOOTHING
        if missing(smoothing):
            log.warning("%s predates FP8 attention smoothing (no %s): --fast runs its FP8 attention unsmoothed; "
                        "re-run wan-trt calibrate and wan-trt build --calibration for about half the error "
                        "(docs/precision.md)", path, missing(smoothing)[0])
            smoothing = "none"
    if missing(smoothing):
        raise EngineError(f"{path} has no range for {missing(smoothing)[0]} (--fp8-attention-smoothing {smoothing}; "
                          "caches calibrated before smoothing existed lack them): re-run wan-trt calibrate and "
                          "wan-trt build --calibration with the new cache, or pass --fp8-attention-smoothing none")
    ranges = {block: tuple(cache.layers[key].amax for key in row)
              for block, row in zip(sorted(plan.attention), keys(smoothing))}
    return plan, ranges, smoothing


def fast_torch_engines(manifest, device: str, directory, fp8_attention_kernel: str = "auto",
                       fp8_attention_smoothing: str = "auto") -> dict:
    """The ``--fast`` engines for an fp32 or fp8 engines directory (see the module docstring)."""
    from wan_trt.runtime.loading import reference_graph_modules

    if device == "cpu" or not torch.cuda.is_available():
        raise EngineError("--fast needs a CUDA GPU (torch.cuda.is_available() is False): run without --fast on a CPU")
    precision = manifest.precision
    if precision not in ("fp32", "fp8"):
        raise EngineError(f"--fast runs fp32 and fp8 engines; these are {precision}: run them without --fast")
    modules = reference_graph_modules(manifest, directory, "cuda", torch.bfloat16)  # straight to the GPU in bf16
    plan, attention_ranges, smoothing = (fast_plan(modules["transformer"], directory, manifest, fp8_attention_smoothing)
                                         if precision == "fp8" else (None, {}, "none"))
    graph = modules["transformer"]
    keep = tuple(getattr(graph.transformer, "_keep_in_fp32_modules", None) or ())
    to_inference_dtype(graph, torch.bfloat16, keep).to("cuda")
    options = FastOptions(attention="fp8" if attention_ranges else "bf16", fp8_attention_blocks="plan",
                          fp8_attention_kernel=fp8_attention_kernel, attention_smoothing=smoothing)
    fast = FastTransformer(graph, plan, options, release_bf16=True).to("cuda")
    if attention_ranges:  # the calibrated ranges the Q/DQ graph uses, with the fast path's headroom
        fast.use_static_attention(attention_ranges)
        fast._attention_fp8()  # choose (and check) the kernel now, before any video is decoded
    if len(fast.fp8_attention) < len(fast.block_ops):
        fast._attention_bf16_kernel()  # the same for the bf16 self-attention's kernel
    torch.cuda.empty_cache()
    log.info("fast DiT: %s Linears; %s self-attention (FP8 in %d of %d blocks%s%s; bf16 on %s)",
             "FP8" if plan else "bf16", options.attention, len(fast.fp8_attention), len(fast.block_ops),
             f", {fast.fp8_kernel_name}" if fast.fp8_kernel_name else "",
             f", smoothing {options.attention_smoothing}" if fast.fp8_attention else "", fast.bf16_kernel_name)
    engines = {}
    for name, entry in manifest.graphs.items():
        if name == "transformer":
            engines[name] = FastEngine(fast, entry.spec, "cuda", dtype=None)  # casts itself; timestep stays fp32
            continue
        offload = name in ("text_encoder", "image_encoder")  # run once per video, before the DiT
        module = to_inference_dtype(modules[name], torch.bfloat16, ("basis_q_t",))  # the motion basis stays fp32
        engines[name] = FastEngine(module, entry.spec, "cuda", torch.bfloat16, offload=offload)
    return engines
