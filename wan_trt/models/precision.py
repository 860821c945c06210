"""The dtype each graph computes in, and casting a graph module to it (fp16/bf16 graphs, and the
high-precision part of FP8/INT8 graphs), for export, the PyTorch reference and calibration alike.

A graph module is cast the way diffusers' ``from_pretrained(torch_dtype=…)`` casts a model (modules
named in ``_keep_in_fp32_modules`` — time embedding, modulation table, norms — stay fp32); its inputs
and outputs stay float32 (cast at the graph's edges), so the runtime and the declarations in
``wan_trt.components`` do not change with the precision. The timestep stays fp32 (bf16 cannot hold 999).

Which graphs follow the precision is declared in ``wan_trt.registry`` (``Graph.half_precisions``): the
official recipe runs the DiT and umT5 in bf16 and keeps the CLIP image encoder in fp32; umT5 overflows
in fp16, so under ``fp16`` it stays fp32; the VAE stays fp32. ONNX opset 19's ``Conv`` has no bf16, so
in a bf16 graph the convolutions (the DiT's patch embeddings, the motion encoder's convs) compute in
fp32 between casts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from wan_trt.dtypes import cast_floats

from wan_trt.registry import graph_dtype

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_PRECISIONS = tuple(DTYPES)
FP32_INPUTS = frozenset({"timestep"})  # graph inputs that stay float32 inside a half-precision graph


def graph_dtypes(precision: str, names: list[str]) -> dict[str, str]:
    """The float type (``fp32``/``fp16``/``bf16``) each graph is exported in for a float ``precision``."""
    if precision not in DTYPES:
        raise ValueError(f"not a float precision: {precision}")
    return {name: graph_dtype(name, precision) for name in names}


def _keep_fp32_names(module: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_keep_in_fp32_modules", None) or ())
    return names


def cast_module(module: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Cast ``module`` in place like ``from_pretrained(torch_dtype=dtype)``: keep-fp32 modules stay fp32."""
    target = DTYPES[dtype]
    keep = _keep_fp32_names(module)
    skip = tuple(f"{prefix}." for prefix in getattr(module, "_not_in_graph", ()))
    fp32_convs = set()
    if target == torch.bfloat16:
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.modules.conv._ConvNd):
                fp32_convs.add(name)
                sub.register_forward_pre_hook(_inputs_to_fp32)
                sub.register_forward_hook(_output_to_input_dtype)
    return cast_floats(module, target, keep, skip=skip, fp32_modules=fp32_convs)


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    module._wan_trt_input_dtype = args[0].dtype
    return tuple(a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_input_dtype(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module._wan_trt_input_dtype)


class HalfPrecisionGraph(torch.nn.Module):
    """A graph module computing in ``dtype`` behind float32 inputs and outputs."""

    def __init__(self, graph: torch.nn.Module, dtype: str, input_names: list[str]) -> None:
        super().__init__()
        self.inner, self.dtype = cast_module(graph, dtype), dtype
        self.cast_inputs = [name not in FP32_INPUTS for name in input_names]
        self._compute = DTYPES[dtype]

    @contextlib.contextmanager
    def widened(self) -> Iterator["HalfPrecisionGraph"]:
        """Temporarily compute in fp32 with the rounded weights (what the graph's fp32 twin computes).

        Widening is exact (bf16/fp16 values are fp32 values) and so is narrowing them back afterwards.
        """
        tensors = [t for t in list(self.parameters()) + list(self.buffers()) if t.is_floating_point()]
        saved = [t.dtype for t in tensors]
        for tensor in tensors:
            tensor.data = tensor.data.to(torch.float32)
        self._compute = torch.float32
        try:
            yield self
        finally:
            for tensor, dtype in zip(tensors, saved):
                tensor.data = tensor.data.to(dtype)
            self._compute = DTYPES[self.dtype]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = self._compute
        args = tuple(a.to(dtype) if cast and a.is_floating_point() else a for a, cast in zip(args, self.cast_inputs))
        return tuple(o.to(torch.float32) if o.is_floating_point() else o for o in self.inner(*args))
