"""Half-precision ONNX graphs (``--precision fp16|bf16``, and the high-precision part of FP8/INT8 graphs).

TensorRT 11 is strongly typed: a graph computes in the dtypes its ONNX tensors carry. So a bf16
engine needs a bf16 ONNX, exported from the graph module cast by ``wan_trt.models.precision`` (which
also decides which graphs follow the precision).

ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 graph is proven here through its fp32
twin (``as_fp32_graph``): the same nodes and the same bf16-rounded weights with every bf16 type
widened to float32, run in ORT against the cast module's fp32 twin (weights rounded, arithmetic
fp32). That proves the graph's structure and weights exactly; the bf16 arithmetic itself is the
engine's, and its effect is measured separately against fp32 in PyTorch (``accuracy.json``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

# fp32 twin vs the module widened to fp32. Not ~1e-6 as for fp32 graphs: at opset 19 the exporter
# decomposes tanh-GELU into elementary ops with its constants stored in the graph's type (in bf16
# sqrt(2/pi) = 0.7979 becomes 0.7969, 0.044715 becomes 0.04468), which the widened module (and PyTorch's
# own bf16 GELU kernel) does not round: ~1e-3 on the tiny DiT. TensorRT compiles those same constants.
HALF_TOLERANCE = 5e-3
# With FP8/INT8 Q/DQ on top, that ~1e-3 flips some activations to the neighbouring FP8/INT8 code: ~1e-2.
HALF_QDQ_TOLERANCE = 2e-2
HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


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
