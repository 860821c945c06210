"""W8A8 INT8 Linears through ``torch._int_mm`` for GPUs without FP8 (Ampere: A10, A100, RTX 3090, Orin).

The plan is the INT8 Q/DQ graph's (``calibration.quantize.make_plan(..., "int8")``): weights symmetric per
output channel, activations per tensor with the calibrated static scale, SmoothQuant's per-input-channel
factors folded into the weights (the input is multiplied by their inverse first). The GEMM accumulates
in int32 (exact) and the two scales are applied to its result, so a layer computes what its
``FakeQuantLinear`` computes up to fp32 rounding of the final product.
"""

from __future__ import annotations

import torch

from wan_trt.calibration.quantize import LayerPlan, quantized_weight
from wan_trt.devices import to_compute_device
from wan_trt.runtime.fast.compiled import on_device

INT8_MIN, INT8_MAX = -128, 127  # the plan's scales are amax / 127 (calibration.quantize.QMAX)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``round(x / scale)`` (ties to even) saturated to [-128, 127], as ONNX QuantizeLinear computes it."""
    return torch.round(x.float() / scale).clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_input(x: torch.Tensor, inv_smooth: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """A Linear's input ``[rows, in]`` → int8: times SmoothQuant's inverse factors (if any), then quantized."""
    x = x.float()
    return quantize_int8(x if inv_smooth is None else x * inv_smooth, scale)


def dequantize_output(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The int32 GEMM result times the activation · weight scales, plus the bias, in ``out_dtype``."""
    out = acc.float() * scale
    return (out if bias is None else out + bias).to(out_dtype)


class Int8Linear(torch.nn.Module):
    """``y = x Wᵀ + b`` with x (times SmoothQuant's inverse factors) quantized per tensor, W per output channel."""

    def __init__(self, linear: torch.nn.Linear, layer: LayerPlan, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        home = linear.weight.device
        weight = to_compute_device(linear.weight.detach())
        weight_scale = torch.from_numpy(layer.weight_scale).to(weight.device)
        dequantized = quantized_weight(weight.to(torch.float32), layer, "int8")  # smoothing folded in
        weight_q = torch.round(dequantized / weight_scale[:, None]).clamp(INT8_MIN, INT8_MAX).to(torch.int8).to(home)
        weight_scale = weight_scale.to(home)
        self.register_buffer("weight_q", weight_q.contiguous())  # [out, in]: its transpose is the column-major B
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).reshape(1, -1))
        self.register_buffer("act_scale", torch.tensor(float(layer.act_scale), dtype=torch.float32))
        inverse = None if layer.inv_smooth is None else torch.from_numpy(layer.inv_smooth).to(linear.weight.device)
        self.register_buffer("inv_smooth", inverse)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.float32).clone())

    @property
    def in_features(self) -> int:
        return self.weight_q.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel each on the GPU (static for the first token count, shape-generic after one more)
        quantize, dequantize = on_device(quantize_input, x.device), on_device(dequantize_output, x.device)
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        x_q = quantize(x, self.inv_smooth, self.act_scale)
        rows = x_q.shape[0]
        if x_q.is_cuda and rows <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows
            x_q = torch.nn.functional.pad(x_q, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(x_q, self.weight_q.t())[:rows]
        return dequantize(acc, self.act_scale * self.weight_scale, self.bias, self.out_dtype).reshape(*lead, -1)

