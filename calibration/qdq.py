"""Write standard ONNX QuantizeLinear/DequantizeLinear into the exported fp32 DiT graph.

Written by hand rather than with onnxruntime.quantization or ModelOpt's ONNX PTQ because this
project needs (a) the exact per-layer selection of its precision policy, keyed by the module path
the dynamo exporter records on every node (``pkg.torch.onnx.name_scopes``), (b) scales from its own
calibration cache, shared bit for bit with the PyTorch fake-quant proof, and (c) no dependency pins:
ModelOpt's ONNX extra pins onnx/onnxruntime-gpu versions that clobber the runtime's onnxruntime.

Per quantized Linear (an ONNX MatMul with a constant weight, or a Gemm):
activation → [Mul 1/s (INT8 SmoothQuant)] → QuantizeLinear → DequantizeLinear → MatMul;
weight stored as an FP8 E4M3 / INT8 initializer → DequantizeLinear (per output channel) → MatMul.
Per quantized self-attention (FP8, see ``attention.py``): per-tensor Q/DQ on both inputs of the
q·kᵀ matmul and of the softmax·v matmul, found as the two activation×activation MatMuls the
exporter records under ``transformer.blocks.N.attn1``.
Opset 19 (FLOAT8E4M3FN needs it). TensorRT's strongly typed mode compiles exactly these dtypes.
In an fp16/bf16 graph the scales (and the SmoothQuant factors) are tensors of the graph's type, so
activations are quantized from and weights dequantized to that type (the plan holds rounded values).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wan_trt.calibration.attention import stats_key
from wan_trt.calibration.policy import BLOCK_PREFIX
from wan_trt.calibration.quantize import QMAX, QuantPlan

log = logging.getLogger(__name__)

_ONNX_TYPE = {"fp8": TensorProto.FLOAT8E4M3FN, "int8": TensorProto.INT8}
_NUMPY_TYPE = {"fp8": ml_dtypes.float8_e4m3fn, "int8": np.int8}
_FLOAT_TYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


@dataclass
class QdqSummary:
    quantized: list[str]  # module paths
    activation_tensors: dict[str, str]  # module path (or attention input key) -> ONNX tensor feeding it


def module_path(node: onnx.NodeProto) -> str | None:
    """The module path the dynamo exporter recorded for a node (``transformer.blocks.3.attn1.to_q``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) < 2:
                return None
            path = scopes[-2]
            return path.removeprefix("inner.")  # a half-precision wrapper's graph (wan_trt.models.precision)
    return None


def _quantize_array(values: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    scaled = values.astype(np.float32) / scale
    if precision == "fp8":
        return np.clip(scaled, -QMAX["fp8"], QMAX["fp8"]).astype(ml_dtypes.float8_e4m3fn)
    return np.clip(np.rint(scaled), -128, 127).astype(np.int8)


def write_qdq(src: Path, dst: Path, plan: QuantPlan) -> QdqSummary:
    """Insert Q/DQ for every layer of ``plan`` into the graph at ``src``; save to ``dst``."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    precision = plan.precision
    zero_type = _ONNX_TYPE[precision]
    new_inits: list[onnx.TensorProto] = []
    done: dict[str, str] = {}
    nodes_out: list[onnx.NodeProto] = []
    attention = _AttentionMatmuls(graph, plan)
    for node in graph.node:
        if node.name in attention.roles:
            nodes_out.extend(attention.quantize_inputs(node, new_inits, done))
            continue
        path = module_path(node) if node.op_type in ("MatMul", "Gemm") else None
        layer = plan.layers.get(path) if path else None
        if layer is None or path in done or node.input[1] not in inits:
            nodes_out.append(node)
            continue
        tag = path.replace(".", "_")
        float_type = inits[node.input[1]].data_type  # FLOAT, FLOAT16 or BFLOAT16: the scales' type
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w_in_out = weight.T if trans_b else weight  # [in, out]
        activation = node.input[0]
        if layer.smooth is not None:
            w_in_out = w_in_out * layer.smooth[:, None]
            inv = _float_tensor(layer.inv_smooth, float_type, f"{tag}_inv_smooth")
            new_inits.append(inv)
            nodes_out.append(helper.make_node("Mul", [activation, inv.name], [f"{tag}_smoothed"], name=f"{tag}_smooth"))
            activation = f"{tag}_smoothed"
        # activation Q/DQ (per tensor)
        a_scale = _float_tensor(np.array(layer.act_scale, dtype=np.float32), float_type, f"{tag}_act_scale")
        a_zero = helper.make_tensor(f"{tag}_act_zero", zero_type, [], [0])
        new_inits += [a_scale, a_zero]
        nodes_out += qdq_pair(activation, a_scale.name, a_zero.name, f"{tag}_act")
        # weight: quantized initializer + DQ per output channel
        w_scale = layer.weight_scale.astype(np.float32)
        stored = w_in_out.T if trans_b else w_in_out  # keep the node's layout
        axis = 0 if trans_b else 1
        scale_shape = (-1, 1) if trans_b else (1, -1)
        q = _quantize_array(stored, w_scale.reshape(scale_shape), precision)
        w_q = numpy_helper.from_array(q, f"{tag}_weight_q") if precision == "int8" else _fp8_tensor(q, f"{tag}_weight_q")
        w_s = _float_tensor(w_scale, float_type, f"{tag}_weight_scale")
        w_zero = helper.make_tensor(f"{tag}_weight_zero", zero_type, [len(w_scale)], [0] * len(w_scale))
        new_inits += [w_q, w_s, w_zero]
        nodes_out.append(helper.make_node("DequantizeLinear", [w_q.name, w_s.name, w_zero.name], [f"{tag}_weight_dq"],
                                          name=f"{tag}_weight_dequantize", axis=axis))
        rewired = onnx.NodeProto()
        rewired.CopyFrom(node)
        rewired.input[0] = f"{tag}_act_dq"
        rewired.input[1] = f"{tag}_weight_dq"
        nodes_out.append(rewired)
        done[path] = node.input[0]
    missing = sorted(set(plan.layers) - set(done)) + attention.missing()
    if missing:
        raise RuntimeError(f"Q/DQ writer found no MatMul/Gemm for {len(missing)} planned layers, e.g. {missing[0]}")
    save_rewritten(model, nodes_out, new_inits, dst)
    log.info("wrote %s Q/DQ for %d layers and %d self-attentions to %s", precision, len(plan.layers),
             len(plan.attention), dst)
    return QdqSummary(quantized=[p for p in done if p in plan.layers], activation_tensors=done)


class _AttentionMatmuls:
    """The q·kᵀ and softmax·v MatMuls of the planned blocks' self-attention, and their input Q/DQ."""

    def __init__(self, graph: onnx.GraphProto, plan: QuantPlan) -> None:
        self.plan = plan
        self.float_type = _FLOAT_TYPE[plan.scale_dtype]
        self.zero_type = _ONNX_TYPE[plan.precision]
        constants = {i.name for i in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        scopes = {f"{BLOCK_PREFIX}.{block}.attn1": block for block in plan.attention}
        self.roles: dict[str, tuple[int, tuple[str, str]]] = {}  # node name -> (block, its inputs' tensors)
        for node in graph.node:
            block = scopes.get(module_path(node)) if node.op_type == "MatMul" else None
            if block is None or any(name in constants for name in node.input):
                continue
            if any(c.op_type == "Softmax" for c in consumers.get(node.output[0], [])):
                self.roles[node.name] = (block, ("q", "k"))
            elif getattr(producer.get(node.input[0]), "op_type", None) == "Softmax":
                self.roles[node.name] = (block, ("softmax", "v"))

    def missing(self) -> list[str]:
        found = {(block, tensors) for block, tensors in self.roles.values()}
        return [f"{BLOCK_PREFIX}.{block}.attn1 ({'·'.join(tensors)} matmul)" for block in self.plan.attention
                for tensors in (("q", "k"), ("softmax", "v")) if (block, tensors) not in found]

    def quantize_inputs(self, node: onnx.NodeProto, new_inits: list, done: dict[str, str]) -> list[onnx.NodeProto]:
        """Q/DQ nodes for both inputs of the matmul ``node``, then the matmul reading them (in graph order)."""
        block, tensors = self.roles[node.name]
        scales = self.plan.attention[block].scales()
        rewired = onnx.NodeProto()
        rewired.CopyFrom(node)
        nodes: list[onnx.NodeProto] = []
        for slot, tensor in enumerate(tensors):
            tag = stats_key(block, tensor).replace(".", "_")
            scale = _float_tensor(np.array(scales[tensor], dtype=np.float32), self.float_type, f"{tag}_scale")
            zero = helper.make_tensor(f"{tag}_zero", self.zero_type, [], [0])
            new_inits += [scale, zero]
            nodes += qdq_pair(node.input[slot], scale.name, zero.name, tag)
            done[stats_key(block, tensor)] = node.input[slot]
            rewired.input[slot] = f"{tag}_dq"
        return nodes + [rewired]


def save_rewritten(model: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
                   dst: Path) -> None:
    """Give ``model`` the rewritten ``nodes``, drop initializers no node reads any more, add ``new_inits``,
    check it and save it to ``dst``."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def qdq_pair(tensor: str, scale: str, zero: str, tag: str) -> list[onnx.NodeProto]:
    """QuantizeLinear → DequantizeLinear of ``tensor`` (output ``{tag}_dq``)."""
    return [helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tag}_q"], name=f"{tag}_quantize"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zero], [f"{tag}_dq"], name=f"{tag}_dequantize")]


def _float_tensor(values: np.ndarray, data_type: int, name: str) -> onnx.TensorProto:
    """An initializer of ``data_type`` (FLOAT/FLOAT16/BFLOAT16) holding float32 ``values`` (already rounded)."""
    values = np.asarray(values, dtype=np.float32)
    if data_type == TensorProto.FLOAT:
        return numpy_helper.from_array(values, name)
    numpy_type = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}[data_type]
    return numpy_helper.from_array(values.astype(numpy_type), name)


def _fp8_tensor(values: np.ndarray, name: str) -> onnx.TensorProto:
    """FLOAT8E4M3FN initializer from ml_dtypes' float8 array (one byte per value in raw_data)."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT8E4M3FN
    tensor.dims.extend(values.shape)
    tensor.raw_data = values.view(np.uint8).tobytes()
    return tensor


def count_qdq_by_block(path: Path) -> dict[int, int]:
    """Number of QuantizeLinear nodes per DiT block (by the module path in their names)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[int, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.name.startswith("transformer_blocks_"):
            block = int(node.name.split("_")[2])
            counts[block] = counts.get(block, 0) + 1
    return counts


def layer_precisions(path: Path, float_type: str = "fp32") -> dict[str, str]:
    """Module path → precision of every DiT MatMul/Gemm with a weight (fp8, int8 or the float type), and of
    each self-attention's two matmuls (``….attn1 q·k`` / ``….attn1 softmax·v``: fp8, or ``float_type``)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    produced_by = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    names = {TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT8: "int8", TensorProto.FLOAT: "fp32",
             TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    result = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = node.input[1]
        source = produced_by.get(weight)
        if source is not None and source.op_type == "DequantizeLinear":
            weight = source.input[0]
        path_ = module_path(node) or node.name
        if weight in inits:
            result[path_] = names.get(inits[weight].data_type, "other")
        elif path_.endswith(".attn1") and node.input[0] not in inits:
            role = "q·k" if "Softmax" in consumers.get(node.output[0], []) else "softmax·v"
            source = produced_by.get(node.input[0])
            quantized = source is not None and source.op_type == "DequantizeLinear" and len(source.input) > 2
            result[f"{path_} {role}"] = names.get(inits[source.input[2]].data_type, "other") if quantized else float_type
    return result
