"""FP8 E4M3 Linears through ``torch._scaled_mm`` (weights per output channel, activations per tensor
with static calibrated scales) and the plan that picks them (the fast path, ``runtime/fast``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from wan_trt.calibration.quantize import LayerPlan, QuantPlan
from wan_trt.devices import to_compute_device
from wan_trt.errors import EngineError


TINY = 1e-12
FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn
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
            weight = to_compute_device(linear.weight.detach())
            w_scale = torch.from_numpy(layer.weight_scale).to(weight.device)
            weights.append(quantize_fp8(weight, w_scale[:, None]).to(linear.weight.device))
            w_scale = w_scale.to(linear.weight.device)
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
        w_amax = to_compute_device(linears[path].weight.detach()).abs().amax(dim=1).to(torch.float32).clamp(min=TINY)
        act_scale = float(np.float32(max(float(act_amax[path]), TINY) / FP8_MAX))  # held as fp32, as make_plan
        layers[path] = LayerPlan(path, act_scale,  # divided on the CPU: CUDA's division by a scalar may differ by an ulp
                                 (w_amax.cpu() / FP8_MAX).numpy().astype(np.float32), None)
    return QuantPlan("fp8", layers)


class AmaxObserver:
    """Records the largest |input| of chosen Linears over calls, on their device (no host sync per call);
    per input channel with ``channels`` (SmoothQuant's statistics)."""

    def __init__(self, linears: Mapping[str, torch.nn.Module], channels: bool = False) -> None:
        self.amax: dict[str, torch.Tensor] = {}
        self.channels = channels
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().abs()
            value = (x.reshape(-1, x.shape[-1]).amax(dim=0) if self.channels else x.amax()).float()
            self.amax[name] = value if name not in self.amax else torch.maximum(self.amax[name], value)
        return hook

    def remove(self) -> dict[str, float]:
        for handle in self.handles:
            handle.remove()
        return {name: float(value.max()) for name, value in self.amax.items()}

    def remove_channels(self) -> dict[str, list[float]]:
        """Stop observing; each Linear's per-input-channel maxima (``channels=True``)."""
        for handle in self.handles:
            handle.remove()
        return {name: value.cpu().tolist() for name, value in self.amax.items()}
