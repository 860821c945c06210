"""The quantization plan of the DiT and its PyTorch simulation (fake-quant).

One plan, computed once from the calibration cache, the precision policy and the weights, drives
both the ONNX Q/DQ writer (``qdq.py``: what TensorRT will compute) and the fake-quant PyTorch
module used to prove that graph. Per layer:

* activations: per-tensor scale ``amax / qmax`` (static, from calibration);
* weights: per-output-channel scale ``amax_c / qmax``, stored quantized (FP8 E4M3 or INT8);
* INT8 only, SmoothQuant: per-input-channel factors ``s_j = amax_x_j^α / amax_w_j^(1-α)`` divide
  the activation and multiply the weight before quantizing (the product is unchanged).

FP8 E4M3: qmax 448, round to nearest even, saturating. INT8: symmetric, qmax 127, zero point 0.

With the policy's ``fp8_self_attention`` (FP8), the plan also holds per-tensor scales of each
quantized block's self-attention matmul inputs (``attention.py``).

In a graph whose high-precision part is fp16/bf16 the scales are tensors of that type, so the plan
rounds them to it (``scale_dtype``) and the fake-quant uses exactly the rounded values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wan_trt.calibration.attention import AttentionPlan, FakeQuantAttention, self_attention_processors, split_scale, stats_key
from wan_trt.calibration.cache import CalibrationCache
from wan_trt.calibration.policy import PrecisionPolicy
from wan_trt.devices import to_compute_device
from wan_trt.errors import BadInputError

QMAX = {"fp8": 448.0, "int8": 127.0}
QUANTIZED_PRECISIONS = tuple(QMAX)
_TINY = 1e-12


@dataclass
class LayerPlan:
    path: str
    act_scale: float  # per tensor
    weight_scale: np.ndarray  # [out] float32
    smooth: np.ndarray | None  # [in] float32: W is multiplied by it (INT8 SmoothQuant) ...
    inv_smooth: np.ndarray | None = None  # [in] ... and x by this, its inverse as the graph holds it


@dataclass
class QuantPlan:
    precision: str
    layers: dict[str, LayerPlan]
    alpha: float | None = None
    scale_dtype: str = "fp32"  # the float type of the scales in the graph (its high-precision type)
    attention: dict[int, AttentionPlan] = field(default_factory=dict)  # block -> its self-attention's scales


def _round_to(values: np.ndarray | float, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` (fp32/fp16/bf16) and back: what a scale initializer holds."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return torch.as_tensor(np.asarray(values, dtype=np.float32)).to(torch_dtype).to(torch.float32).numpy()


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float32).cpu().numpy()


def make_plan(linears: dict[str, torch.nn.Linear], cache: CalibrationCache, policy: PrecisionPolicy,
              precision: str, num_blocks: int, alpha: float = 0.5, scale_dtype: str = "fp32",
              head_dim: int | None = None) -> QuantPlan:
    """Scales for every layer the policy quantizes, from calibrated activation ranges and the weights.

    ``head_dim`` (the DiT's attention head size) is needed when the policy quantizes attention.
    """
    if precision not in QMAX:
        raise BadInputError(f"--precision {precision}: quantized precisions are {', '.join(QMAX)}")
    qmax = QMAX[precision]
    layers = {}
    for path in policy.quantized_layers(num_blocks):
        if path not in linears:
            raise BadInputError(f"policy '{policy.source}' names layer {path}, which this model does not have")
        stats = cache.layers.get(path)
        if stats is None:
            raise BadInputError(f"calibration cache has no statistics for {path}: re-run wan-trt calibrate")
        weight = to_compute_device(linears[path].weight.detach())  # [out, in]; maxima are exact on any device
        smooth = inverse = None
        act_amax = stats.amax
        if precision == "int8":
            channel = np.maximum(np.asarray(stats.channel_amax, dtype=np.float64), _TINY)
            w_channel = np.maximum(_numpy(weight.abs().amax(dim=0)).astype(np.float64), _TINY)
            # the graph multiplies x by 1/s held in scale_dtype: make s the exact inverse of that value
            inverse = _round_to((w_channel ** (1.0 - alpha) / channel**alpha).astype(np.float32), scale_dtype)
            smooth = (1.0 / inverse.astype(np.float64)).astype(np.float32)
            act_amax = float(np.max(channel * inverse))
            weight = weight.to(torch.float32) * torch.from_numpy(smooth).to(weight.device)[None, :]
        w_amax = np.maximum(_numpy(weight.abs().amax(dim=1)), _TINY)
        act_scale = float(_round_to(max(act_amax, _TINY) / qmax, scale_dtype))
        layers[path] = LayerPlan(path, act_scale, _round_to(w_amax / qmax, scale_dtype), smooth, inverse)
    attention = {block: _attention_plan(block, cache, qmax, scale_dtype, head_dim)
                 for block in policy.attention_blocks(num_blocks, precision)}
    return QuantPlan(precision, layers, alpha if precision == "int8" else None, scale_dtype, attention)


def _attention_plan(block: int, cache: CalibrationCache, qmax: float, scale_dtype: str,
                    head_dim: int | None) -> AttentionPlan:
    if head_dim is None:
        raise ValueError("make_plan needs head_dim when the policy quantizes attention")
    amax = {}
    for tensor in ("q", "k", "v", "softmax"):
        stats = cache.layers.get(stats_key(block, tensor))
        if stats is None:
            raise BadInputError(f"calibration cache has no attention statistics for {stats_key(block, tensor)}: re-run "
                                "wan-trt calibrate (this wan-trt records them), or use a policy with "
                                '"fp8_self_attention": false')
        amax[tensor] = max(stats.amax, _TINY)
    c = split_scale(head_dim)  # the graph quantizes q·c and k·c
    scale = {t: float(_round_to(v * (c if t in ("q", "k") else 1.0) / qmax, scale_dtype)) for t, v in amax.items()}
    return AttentionPlan(block, scale["q"], scale["k"], scale["v"], scale["softmax"])


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, precision: str) -> torch.Tensor:
    """Quantize-dequantize exactly as ONNX QuantizeLinear/DequantizeLinear do (saturating, ties to even)."""
    scaled = x / scale
    if precision == "fp8":
        q = scaled.clamp(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn).to(torch.float32)
    else:
        q = torch.round(scaled).clamp(-128, 127)
    return q * scale


def quantized_weight(weight: torch.Tensor, layer: LayerPlan, precision: str) -> torch.Tensor:
    """The dequantized weight [out, in] the engine computes with (smoothing folded in)."""
    w = weight.detach().to(torch.float32)
    if layer.smooth is not None:
        w = w * torch.from_numpy(layer.smooth).to(w.device)[None, :]
    return fake_quant(w, torch.from_numpy(layer.weight_scale).to(w.device)[:, None], precision)


class FakeQuantLinear(torch.nn.Module):
    """A Linear that computes what its Q/DQ ONNX counterpart computes."""

    def __init__(self, linear: torch.nn.Linear, layer: LayerPlan, precision: str) -> None:
        super().__init__()
        self.precision, self.act_scale = precision, layer.act_scale
        self.register_buffer("weight", quantized_weight(linear.weight, layer, precision))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("inv_smooth", None if layer.inv_smooth is None else torch.from_numpy(layer.inv_smooth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.to(torch.float32)  # quantized math in fp32; the result in the graph's dtype
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return torch.nn.functional.linear(fake_quant(x, self.act_scale, self.precision), self.weight, bias).to(dtype)


def apply_fake_quant(module: torch.nn.Module, plan: QuantPlan) -> torch.nn.Module:
    """Replace the planned Linear layers of the DiT graph ``module`` (in place) by FakeQuantLinear, and
    the planned blocks' self-attention by FakeQuantAttention; returns it."""
    for path, layer in plan.layers.items():
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        setattr(parent, name, FakeQuantLinear(getattr(parent, name), layer, plan.precision))
    processors = self_attention_processors(module) if plan.attention else {}
    for block, attention in plan.attention.items():
        processors[block].self_attention = FakeQuantAttention(attention, plan.precision, fake_quant)
    return module


def linear_layers(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
