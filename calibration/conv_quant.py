"""FP8 / INT8 Q/DQ for the convolutions of the streamed VAE graphs, and their PyTorch simulation.

The same scheme as the DiT's Linear layers (``quantize.py`` / ``qdq.py``), applied to ``Conv`` nodes:

* activation: per-tensor scale ``amax / qmax``, ``amax`` = the largest |x| calibration saw at the conv's
  input. A causal 3-D conv's ONNX input is ``cat(cache, x)`` (zero-padded by the Conv's ``pads``), so
  the cache tensor diffusers' ``WanCausalConv3d`` takes as its second argument is observed too; zeros
  quantize to zero, so quantizing each piece is the same as quantizing the padded concatenation;
* weight: per-output-channel scale (axis 0 of ``[out, in, k...]``), stored quantized (FP8 E4M3 / INT8)
  behind a ``DequantizeLinear(axis=0)``.

No SmoothQuant: per-input-channel factors could be folded into conv weights as into Linear ones,
but that is not done here (activations are quantized per tensor, as they enter the conv).

Convs are named by their module path in the graph module (``vae.decoder.up_blocks.0.resnets.0.conv1``),
which is what ``qdq.module_path`` reads off the exported ``Conv`` nodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from wan_trt.calibration.qdq import (_ONNX_TYPE, _float_tensor, _fp8_tensor, _quantize_array, module_path, qdq_pair,
                                     save_rewritten)
from wan_trt.calibration.quantize import _TINY, QMAX, _round_to, fake_quant
from wan_trt.errors import BadInputError

log = logging.getLogger(__name__)

Conv = torch.nn.Conv2d | torch.nn.Conv3d
CHANNEL_MULTIPLE = 16  # TensorRT's FP8/INT8 conv kernels want in and out channels in multiples of 16
IO_CONVS = ("conv_in", "conv_out", "quant_conv", "post_quant_conv")  # touch pixels or latents: kept in float


# ------------------------------------------------------------------------------------------------
# Layers and calibration
# ------------------------------------------------------------------------------------------------

def conv_layers(module: torch.nn.Module) -> dict[str, Conv]:
    """Every Conv2d/Conv3d of ``module`` by module path (the keys the exported Conv nodes carry).

    Pass the graph module itself (``VaeDecoderStep``: paths start with ``vae.``); a half-precision
    wrapper's ``inner`` prefix is dropped, as ``qdq.module_path`` drops it.
    """
    return {name.removeprefix("inner."): m for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))}


def _conv_inputs(conv: Conv, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors that make up the ONNX Conv's input: ``x`` and, for a causal conv that uses it, the cache."""
    tensors = [args[0]]
    cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
    causal_padding = getattr(conv, "_padding", None)  # diffusers' WanCausalConv3d
    if isinstance(cache, torch.Tensor) and causal_padding is not None and causal_padding[4] > 0:
        tensors.append(cache)
    return tensors


class ConvRangeObserver:
    """Per-conv, per-tensor input range: ``amax[path]`` = max |x| over all calls (cache included), kept as
    running maxima on the convs' device and read when ``amax`` is (one host sync for all convs)."""

    def __init__(self) -> None:
        self._amax: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    @property
    def amax(self) -> dict[str, float]:
        return dict(zip(self._amax, torch.stack(list(self._amax.values())).tolist())) if self._amax else {}

    def hook(self, path: str):
        def observe(module, args, kwargs) -> None:
            best = self._amax.get(path)
            if best is None:
                best = torch.zeros((), dtype=torch.float32, device=args[0].device)
            for tensor in _conv_inputs(module, args, kwargs):
                if tensor.numel():
                    low, high = torch.aminmax(tensor.detach())
                    best = torch.maximum(best, torch.maximum(high, -low).to(torch.float32))
            self._amax[path] = best
            self.calls[path] = self.calls.get(path, 0) + 1

        return observe


@contextlib.contextmanager
def observe_convs(module: torch.nn.Module, paths: Iterable[str] | None = None) -> Iterator[ConvRangeObserver]:
    """Record the input ranges of ``module``'s convs (all, or ``paths``) while the block runs.

    Convs that never run (e.g. the encoder's, while a decoder graph runs) get no entry.
    """
    convs = conv_layers(module)
    wanted = list(convs) if paths is None else list(paths)
    observer = ConvRangeObserver()
    handles = []
    try:
        for path in wanted:
            if path not in convs:
                raise BadInputError(f"conv {path}: no such Conv2d/Conv3d in {type(module).__name__}")
            handles.append(convs[path].register_forward_pre_hook(observer.hook(path), with_kwargs=True))
        yield observer
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------

@dataclass
class ConvLayerPlan:
    path: str
    act_scale: float  # per tensor
    weight_scale: np.ndarray  # [out] float32


@dataclass
class ConvQuantPlan:
    precision: str
    layers: dict[str, ConvLayerPlan]
    scale_dtype: str = "fp32"  # the float type of the scales in the graph (its high-precision type)


def select_convs(convs: dict[str, Conv], multiple: int = CHANNEL_MULTIPLE, min_channels: int = CHANNEL_MULTIPLE,
                 exclude: tuple[str, ...] = IO_CONVS) -> list[str]:
    """The default selection: convs whose in and out channels are multiples of ``multiple`` (and at
    least ``min_channels``), except those named in ``exclude``.

    Excluded by name: the VAE's ``conv_in``/``conv_out`` and ``(post_)quant_conv``. They read or write
    pixels (3 channels) or latents (z channels): few FLOPs, the most precision-sensitive tensors, and
    with ``z_dim`` = 16 the channel rule alone would not keep the decoder's ``conv_in`` in float.
    The channel rule is the one recorded for TensorRT's FP8/INT8 conv kernels, which want channel
    counts in multiples of 16 (not measured in this repository); the tiny preset's 8-channel convs
    fail it, every conv of the full VAE between conv_in and conv_out passes it.
    """
    chosen = []
    for path, conv in convs.items():
        if path.rsplit(".", 1)[-1] in exclude or conv.groups != 1:
            continue
        if all(c % multiple == 0 and c >= min_channels for c in (conv.in_channels, conv.out_channels)):
            chosen.append(path)
    return chosen


def make_conv_plan(convs: dict[str, Conv], amax: dict[str, float], precision: str, layers: list[str] | None = None,
                   scale_dtype: str = "fp32") -> ConvQuantPlan:
    """Scales for the convs ``layers`` (default: ``select_convs`` among the convs ``amax`` has seen run)."""
    if precision not in QMAX:
        raise BadInputError(f"--precision {precision}: quantized precisions are {', '.join(QMAX)}")
    qmax = QMAX[precision]
    if layers is None:
        layers = [path for path in select_convs(convs) if path in amax]
    plan = {}
    for path in layers:
        if path not in convs:
            raise BadInputError(f"conv {path}: this VAE has no such Conv2d/Conv3d (choose among conv_layers())")
        if path not in amax:
            raise BadInputError(f"conv {path}: no calibration range for it: calibrate with the graphs that run it")
        weight = convs[path].weight.detach().to(torch.float32)
        w_amax = np.maximum(weight.abs().flatten(1).amax(dim=1).numpy(), _TINY)
        act_scale = float(_round_to(max(float(amax[path]), _TINY) / qmax, scale_dtype))
        plan[path] = ConvLayerPlan(path, act_scale, _round_to(w_amax / qmax, scale_dtype))
    return ConvQuantPlan(precision, plan, scale_dtype)


# ------------------------------------------------------------------------------------------------
# PyTorch simulation
# ------------------------------------------------------------------------------------------------

def quantized_conv_weight(weight: torch.Tensor, layer: ConvLayerPlan, precision: str) -> torch.Tensor:
    """The dequantized weight ``[out, in, k...]`` the engine computes with (fp32)."""
    w = weight.detach().to(torch.float32)
    scale = torch.from_numpy(np.asarray(layer.weight_scale, dtype=np.float32)).view(-1, *[1] * (w.dim() - 1))
    return fake_quant(w, scale, precision)


class ConvFakeQuant:
    """Handle of ``apply_fake_quant_convs``: ``remove()`` (or leaving the ``with`` block) restores the convs."""

    def __init__(self) -> None:
        self._handles: list = []
        self._weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for parameter, original in self._weights:
            parameter.data = original
        self._handles, self._weights = [], []

    def __enter__(self) -> ConvFakeQuant:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _input_quantizer(layer: ConvLayerPlan, precision: str):
    def quantize(t: torch.Tensor) -> torch.Tensor:  # in fp32, back to the tensor's type (what Q/DQ does in the graph)
        return fake_quant(t.to(torch.float32), layer.act_scale, precision).to(t.dtype)

    def hook(module, args, kwargs):
        used = {id(t) for t in _conv_inputs(module, args, kwargs)}
        args = tuple(quantize(a) if id(a) in used else a for a in args)
        kwargs = {k: quantize(v) if id(v) in used else v for k, v in kwargs.items()}
        return args, kwargs

    return hook


def apply_fake_quant_convs(module: torch.nn.Module, plan: ConvQuantPlan) -> ConvFakeQuant:
    """Make ``module``'s planned convs compute what their Q/DQ ONNX counterparts compute, in place.

    The conv modules stay (diffusers' causal padding and cache handling run unchanged): a forward
    pre-hook quantize-dequantizes the input tensors (``x`` and the cache a causal conv concatenates),
    and the weight's values are replaced by the dequantized weight. The VAE is shared by the
    encoder/decoder graph modules, so this affects all of them until the returned handle is removed
    (a lasting reference, as for the ``torch`` backend: apply it to a deep copy and keep the copy).
    """
    convs = conv_layers(module)
    result = ConvFakeQuant()
    try:
        for path, layer in plan.layers.items():
            if path not in convs:
                raise BadInputError(f"conv plan names {path}, which {type(module).__name__} does not have")
            conv = convs[path]
            original = conv.weight.data
            conv.weight.data = quantized_conv_weight(original, layer, plan.precision).to(original.dtype)
            result._weights.append((conv.weight, original))
            result._handles.append(conv.register_forward_pre_hook(_input_quantizer(layer, plan.precision),
                                                                  with_kwargs=True))
    except BaseException:
        result.remove()
        raise
    return result


# ------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------

def write_conv_qdq(src: Path, dst: Path, plan: ConvQuantPlan, require_all: bool = True) -> list[str]:
    """Insert Q/DQ for the planned ``Conv`` nodes of the graph at ``src``; save to ``dst``. Returns the
    quantized module paths in graph order.

    Per conv: input → QuantizeLinear → DequantizeLinear (per tensor) → Conv; weight stored FP8/INT8 →
    DequantizeLinear (axis 0) → Conv. Every node of a planned path is rewritten (the weight is stored
    once). A graph need not run every planned conv (the first-chunk decoder skips the upsamplers'
    time convs): ``require_all=False`` accepts that; with ``True`` a planned conv missing here raises.
    """
    model = onnx.load(str(src))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    precision = plan.precision
    zero_type = _ONNX_TYPE[precision]
    new_inits: list[onnx.TensorProto] = []
    weights: dict[str, str] = {}  # path -> its dequantized weight tensor
    nodes_out: list[onnx.NodeProto] = []
    uses: dict[str, int] = {}
    for node in graph.node:
        path = module_path(node) if node.op_type == "Conv" else None
        layer = plan.layers.get(path) if path else None
        if layer is None:
            nodes_out.append(node)
            continue
        if node.input[1] not in inits and path not in weights:
            raise RuntimeError(f"{src}: Conv of {path} has no constant weight ({node.input[1]}): cannot quantize it")
        tag = path.replace(".", "_")
        uses[path] = uses.get(path, 0) + 1
        act = f"{tag}_{uses[path] - 1}" if uses[path] > 1 else tag  # a conv run twice gets a second Q/DQ pair
        if path not in weights:
            weight_init = inits[node.input[1]]
            float_type = weight_init.data_type  # FLOAT, FLOAT16 or BFLOAT16: the scales' type
            weight = numpy_helper.to_array(weight_init).astype(np.float32)  # [out, in, k...]
            w_scale = np.asarray(layer.weight_scale, dtype=np.float32)
            if w_scale.shape != (weight.shape[0],):
                raise RuntimeError(f"{src}: conv plan for {path} has {w_scale.size} weight scales, "
                                   f"the graph's weight has {weight.shape[0]} output channels")
            q = _quantize_array(weight, w_scale.reshape(-1, *[1] * (weight.ndim - 1)), precision)
            w_name = f"{tag}_weight_q"
            w_q = numpy_helper.from_array(q, w_name) if precision == "int8" else _fp8_tensor(q, w_name)
            w_s = _float_tensor(w_scale, float_type, f"{tag}_weight_scale")
            w_zero = helper.make_tensor(f"{tag}_weight_zero", zero_type, [len(w_scale)], [0] * len(w_scale))
            a_scale = _float_tensor(np.array(layer.act_scale, dtype=np.float32), float_type, f"{tag}_act_scale")
            a_zero = helper.make_tensor(f"{tag}_act_zero", zero_type, [], [0])
            new_inits += [w_q, w_s, w_zero, a_scale, a_zero]
            nodes_out.append(helper.make_node("DequantizeLinear", [w_q.name, w_s.name, w_zero.name],
                                              [f"{tag}_weight_dq"], name=f"{tag}_weight_dequantize", axis=0))
            weights[path] = f"{tag}_weight_dq"
        nodes_out += qdq_pair(node.input[0], f"{tag}_act_scale", f"{tag}_act_zero", f"{act}_act")
        rewired = onnx.NodeProto()
        rewired.CopyFrom(node)
        rewired.input[0] = f"{act}_act_dq"
        rewired.input[1] = weights[path]
        nodes_out.append(rewired)
    missing = sorted(set(plan.layers) - set(weights))
    if missing and require_all:
        raise RuntimeError(f"{src}: conv Q/DQ writer found no Conv node for {len(missing)} planned convs, "
                           f"e.g. {missing[0]}")
    save_rewritten(model, nodes_out, new_inits, dst)
    log.info("wrote %s Q/DQ for %d convs to %s (%d planned convs not in this graph)", precision, len(weights), dst,
             len(missing))
    return list(weights)


def count_conv_qdq(path: Path) -> int:
    """Number of ``Conv`` nodes whose input and weight both come from a DequantizeLinear."""
    model = onnx.load(str(path), load_external_data=False)
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    return sum(1 for node in model.graph.node if node.op_type == "Conv"
               and produced_by.get(node.input[0]) == "DequantizeLinear"
               and produced_by.get(node.input[1]) == "DequantizeLinear")


# ------------------------------------------------------------------------------------------------
# Layer-by-layer proof of a Q/DQ graph
# ------------------------------------------------------------------------------------------------

@dataclass
class ConvLayerCheck:
    path: str
    code_mismatch: float  # fraction of the conv input's elements whose Q/DQ value differs from fake_quant's
    output_rel_l2: float  # the graph's Conv output vs torch's conv of the same dequantized input


def check_conv_qdq_layers(path: Path, feed: dict[str, np.ndarray], convs: dict[str, Conv],
                          plan: ConvQuantPlan) -> list[ConvLayerCheck]:
    """Run the Q/DQ graph at ``path`` in ONNX Runtime (CPU, BASIC) and check every quantized Conv on
    its own inputs: its activation Q/DQ against ``fake_quant`` of the tensor the graph fed it, and its
    output against ``torch`` convolving that dequantized tensor with ``quantized_conv_weight`` of the
    module's weight (``convs``) and bias.

    End to end, a graph and its fake-quant module part ways by more than their float arithmetic: an
    input within float rounding of a quantization boundary lands in another code in one of them (one
    step apart), and through a chain of quantized convs those steps multiply. Checked per layer, both
    sides see the same tensors, so the comparison is exact but for float summation order.
    """
    import onnxruntime as ort

    model = onnx.load(str(path))
    produced_by = {out: node for node in model.graph.node for out in node.output}
    targets = []  # (path, node, tensor quantized, its Q/DQ value)
    for node in model.graph.node:
        key = module_path(node) if node.op_type == "Conv" else None
        dq = produced_by.get(node.input[0])
        if key not in plan.layers or dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = produced_by[dq.input[0]]
        targets.append((key, node, q.input[0], node.input[0]))
    wanted = {name for _, node, pre, post in targets for name in (pre, post, node.output[0])}
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in sorted(wanted - existing))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, dict(feed))))
    checks = []
    for key, node, pre, post in targets:
        layer = plan.layers[key]
        got_dq = torch.from_numpy(values[post])
        want_dq = fake_quant(torch.from_numpy(values[pre]), layer.act_scale, plan.precision)
        mismatch = float((got_dq != want_dq).to(torch.float32).mean()) if got_dq.numel() else 0.0
        conv = convs[key]
        weight = quantized_conv_weight(conv.weight, layer, plan.precision)
        bias = None if conv.bias is None else conv.bias.detach().to(torch.float32)
        want = _onnx_conv(node, got_dq, weight, bias)
        checks.append(ConvLayerCheck(key, mismatch, _rel_l2(values[node.output[0]], want.numpy())))
    return checks


def _onnx_conv(node: onnx.NodeProto, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's convolution with an ONNX Conv node's attributes (explicit pads)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise RuntimeError(f"Conv {node.name}: auto_pad {attrs['auto_pad']!r} is not handled here")
    spatial = weight.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    torch_pads = [p for d in reversed(range(spatial)) for p in (pads[d], pads[d + spatial])]
    x = torch.nn.functional.pad(x, torch_pads)
    conv = torch.nn.functional.conv3d if spatial == 3 else torch.nn.functional.conv2d
    with torch.no_grad():
        return conv(x, weight, bias, stride=tuple(attrs.get("strides", [1] * spatial)),
                    dilation=tuple(attrs.get("dilations", [1] * spatial)), groups=int(attrs.get("group", 1)))


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    from wan_trt.metrics import relative_l2

    return relative_l2(got, want)
