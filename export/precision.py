"""Half-precision graphs (``--precision fp16|bf16``, and the high-precision part of FP8/INT8 graphs).

TensorRT 11 is strongly typed: a graph computes in the dtypes its ONNX tensors carry. So a bf16
engine needs a bf16 ONNX: the graph module is cast the way diffusers' ``from_pretrained(torch_dtype=…)``
casts a model (modules named in ``_keep_in_fp32_modules`` — time embedding, modulation table, norms —
stay fp32) and exported; its inputs and outputs stay float32 (cast at the graph's edges), so the
runtime and the declarations in ``wan_trt.components`` do not change with the precision. The
timestep stays fp32 (bf16 cannot hold 999).

Which graphs follow the precision is decided here, once (``graph_dtypes``): the official recipe runs
the DiT and umT5 in bf16 and keeps the CLIP image encoder in fp32; umT5 overflows in fp16, so under
``fp16`` it stays fp32; the VAE stays fp32. ONNX opset 19's ``Conv`` has no bf16, so in a bf16 graph
the convolutions (the DiT's patch embeddings, the motion encoder's convs) compute in fp32 between casts.

ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 graph is proven here through its fp32
twin (``as_fp32_graph``): the same nodes and the same bf16-rounded weights with every bf16 type
widened to float32, run in ORT against the cast module's fp32 twin (weights rounded, arithmetic
fp32). That proves the graph's structure and weights exactly; the bf16 arithmetic itself is the
engine's, and its effect is measured separately against fp32 in PyTorch (``accuracy.json``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import onnx
import torch
from onnx import TensorProto, numpy_helper

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_PRECISIONS = tuple(DTYPES)
# fp32 twin vs the module widened to fp32. Not ~1e-6 as for fp32 graphs: at opset 19 the exporter
# decomposes tanh-GELU into elementary ops with its constants stored in the graph's type (in bf16
# sqrt(2/pi) = 0.7979 becomes 0.7969, 0.044715 becomes 0.04468), which the widened module (and PyTorch's
# own bf16 GELU kernel) does not round: ~1e-3 on the tiny DiT. TensorRT compiles those same constants.
HALF_TOLERANCE = 5e-3
# With FP8/INT8 Q/DQ on top, that ~1e-3 flips some activations to the neighbouring FP8/INT8 code: ~1e-2.
HALF_QDQ_TOLERANCE = 2e-2
HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP32_INPUTS = frozenset({"timestep"})  # graph inputs that stay float32 inside a half-precision graph

_FOLLOWS_PRECISION = {
    "transformer": ("fp16", "bf16"),
    "motion_encoder": ("fp16",),  # its convs are custom (no bf16 Conv before opset 22): fp32 under bf16
    "text_encoder": ("bf16",),  # umT5 overflows in fp16
    "image_encoder": (),  # fp32, as the official recipe
    # the VAE is all convolutions (no bf16 Conv before opset 22) and unproven in fp16 with real weights
}


def graph_dtypes(precision: str, names: list[str]) -> dict[str, str]:
    """The float type (``fp32``/``fp16``/``bf16``) each graph is exported in for a float ``precision``."""
    if precision not in DTYPES:
        raise ValueError(f"not a float precision: {precision}")
    return {name: precision if precision in _FOLLOWS_PRECISION.get(name, ()) else "fp32" for name in names}


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
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        owner = name.rpartition(".")[0]
        if name.startswith(skip):
            continue
        want = torch.float32 if keep & set(name.split(".")) or owner in fp32_convs else target
        if tensor.dtype != want:
            tensor.data = tensor.data.to(want)
    return module


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


def as_fp32_graph(src: Path, dst: Path) -> Path:
    """The fp32 twin of a half-precision ONNX graph: every FLOAT16/BFLOAT16 type widened to FLOAT.

    Initializers and constants keep their (rounded) values exactly; casts to half become casts to
    float. ORT's CPU provider can run the twin, which has the graph's structure and weights.
    """
    model = onnx.load(str(src))
    half = set(HALF.values())

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type in half:
            array = numpy_helper.to_array(tensor).astype("float32")
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    def widen_type(value_info: onnx.ValueInfoProto) -> None:
        tensor_type = value_info.type.tensor_type
        if tensor_type.elem_type in half:
            tensor_type.elem_type = TensorProto.FLOAT

    def widen_graph(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            widen_tensor(init)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            widen_type(value)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    widen_tensor(attr.t)
                elif attr.name in ("to", "dtype", "output_dtype") and attr.type == onnx.AttributeProto.INT and attr.i in half:
                    attr.i = TensorProto.FLOAT
                elif attr.type == onnx.AttributeProto.GRAPH:
                    widen_graph(attr.g)

    widen_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.name == "to" and attr.i in half:
                    attr.i = TensorProto.FLOAT
    large = sum(len(i.raw_data) for i in model.graph.initializer) > 2**31 - 2**26
    onnx.save(model, str(dst), save_as_external_data=large, location=f"{dst.name}.data" if large else None)
    return dst


def onnx_float_types(path: Path) -> set[str]:
    """The float element types used by a graph's initializers (``fp32``, ``fp16``, ``bf16``, ``fp8``...)."""
    names = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
             TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT8: "int8"}
    model = onnx.load(str(path), load_external_data=False)
    return {names[i.data_type] for i in model.graph.initializer if i.data_type in names}
