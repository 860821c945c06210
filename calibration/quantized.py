"""A quantized build: the DiT's plan, Q/DQ graph and fake-quant reference, and (with the policy's
``vae_decoder_convs``) the same for the streamed VAE decoder's convolutions."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_trt.calibration.cache import CalibrationCache, load_cache
from wan_trt.calibration.conv_quant import (ConvQuantPlan, apply_fake_quant_convs, check_conv_qdq_layers, conv_layers,
                                            make_conv_plan, select_convs, write_conv_qdq)
from wan_trt.calibration.policy import PrecisionPolicy, load_policy
from wan_trt.calibration.qdq import write_qdq
from wan_trt.calibration.quantize import QUANTIZED_PRECISIONS, QuantPlan, apply_fake_quant, linear_layers, make_plan
from wan_trt.errors import BadInputError
from wan_trt.presets import Preset
from wan_trt.registry import TRANSFORMER, VAE_DECODER_STEP
from wan_trt.runtime.compare import QDQ_TOLERANCE, VAE_DECODER_GRAPHS  # noqa: F401  (re-exported for the build)

log = logging.getLogger(__name__)

ACCURACY_FILE = "accuracy.json"
CALIBRATION_FILE = "calibration.json"
ACCURACY_TIMESTEPS = (999.0, 500.0, 1.0)
CONV_LAYER_TOLERANCE = 1e-5  # a quantized Conv's output in ORT vs torch on the same dequantized input


@dataclass(frozen=True)
class QuantizationRequest:
    """``--precision fp8|int8`` with its calibration cache and precision policy."""

    precision: str
    calibration: Path
    policy: Path | None = None
    alpha: float = 0.5  # SmoothQuant migration strength (INT8)
    high_precision: str = "fp32"  # float type of everything the policy leaves unquantized: fp32, fp16, bf16


@dataclass
class QuantizedTransformer:
    precision: str
    cache: CalibrationCache
    calibration_path: Path
    policy: PrecisionPolicy
    plan: QuantPlan
    reference: torch.nn.Module | None  # the TransformerGraph with fake-quant Linears: what the Q/DQ graph computes

    @staticmethod
    def check_request(request: QuantizationRequest, weights_hash: str) -> None:
        """Refuse a bad precision, calibration cache or policy before any slow work."""
        if request.precision not in QUANTIZED_PRECISIONS:
            raise BadInputError(f"--precision {request.precision}: quantized precisions are {', '.join(QUANTIZED_PRECISIONS)}")
        cache = load_cache(request.calibration)
        cache.check_weights(weights_hash, request.calibration)
        if cache.target is not None and cache.target != request.precision:
            raise BadInputError(f"calibration cache '{request.calibration}' was searched (--method {cache.method}) for "
                                f"{cache.target}, not {request.precision}: re-run wan-trt calibrate --target {request.precision}")
        load_policy(request.policy)

    @staticmethod
    def prepare(request: QuantizationRequest, weights_hash: str, transformer_graph: torch.nn.Module,
                preset: Preset, *, reference: bool = True) -> "QuantizedTransformer":
        """The plan (and with ``reference`` the fake-quant copy of the DiT graph, for proving the Q/DQ graph;
        a torch-backend build needs only the plan: the runtime makes the copy from the manifest)."""
        if request.precision not in QUANTIZED_PRECISIONS:
            raise BadInputError(f"--precision {request.precision}: quantized precisions are {', '.join(QUANTIZED_PRECISIONS)}")
        cache = load_cache(request.calibration)
        cache.check_weights(weights_hash, request.calibration)
        policy = load_policy(request.policy)
        args = (cache, policy, request.precision, request.alpha, int(preset.transformer["num_layers"]),
                request.high_precision)
        fake_quant = fake_quant_reference(transformer_graph, *args) if reference else None
        plan = fake_quant.plan if fake_quant is not None else quant_plan(transformer_graph, *args)
        return QuantizedTransformer(request.precision, cache, Path(request.calibration), policy, plan, fake_quant)

    def write(self, onnx_path: Path, engines_dir: Path) -> None:
        """Rewrite the exported fp32 DiT graph with Q/DQ in place; keep the cache beside it."""
        summary = write_qdq(onnx_path, onnx_path, self.plan)
        for path, tensor in summary.activation_tensors.items():
            self.cache.layers[path].onnx_tensor = tensor  # an attention input's key names its tensor too
        self.save_cache(engines_dir)

    def save_cache(self, engines_dir: Path) -> None:
        """The calibration cache in the engines directory, where the runtime reads it (``manifest_entry``)."""
        self.cache.save(engines_dir / CALIBRATION_FILE)

    def manifest_entry(self, vae_decoder_convs: int = 0) -> dict[str, Any]:
        return {"precision": self.precision, "policy": self.policy.to_json(), "calibration_file": CALIBRATION_FILE,
                "calibration_method": self.cache.method, "smoothquant_alpha": self.plan.alpha,
                "high_precision": self.plan.scale_dtype, "quantized_layers": len(self.plan.layers),
                "fp8_attention_blocks": sorted(self.plan.attention), "vae_decoder_convs": vae_decoder_convs}


@dataclass
class QuantizedVaeDecoder:
    """The VAE decoder's conv plan; its Q/DQ graphs are proven layer by layer (``check_conv_qdq_layers``)."""

    plan: ConvQuantPlan

    @staticmethod
    def prepare(cache: CalibrationCache, precision: str, decoder_graph: torch.nn.Module,
                calibration: Path) -> "QuantizedVaeDecoder":
        """``decoder_graph``: a VAE decoder graph module (``VaeDecoderStep``); the convs are the decoder's."""
        convs = {p: c for p, c in conv_layers(decoder_graph).items() if p.startswith("vae.decoder.")}
        amax = {p: cache.layers[p].amax for p in convs if p in cache.layers}
        if not amax:
            raise BadInputError(f"calibration cache '{calibration}' has no VAE conv ranges: re-run wan-trt calibrate "
                                "(this wan-trt records them), or use a policy with \"vae_decoder_convs\": false")
        layers = [p for p in select_convs(convs) if p in amax]
        return QuantizedVaeDecoder(make_conv_plan(convs, amax, precision, layers))

    def write_and_check(self, name: str, onnx_path: Path, module: torch.nn.Module, feed: dict) -> int:
        """Rewrite the exported graph ``name`` with Q/DQ in place and prove each quantized conv in ORT:
        identical quantized inputs and its output within ``CONV_LAYER_TOLERANCE``. Returns the count."""
        quantized = write_conv_qdq(onnx_path, onnx_path, self.plan, require_all=name == VAE_DECODER_STEP)
        convs = conv_layers(module)
        for check in check_conv_qdq_layers(onnx_path, feed, convs, self.plan):
            if check.code_mismatch != 0 or not check.output_rel_l2 <= CONV_LAYER_TOLERANCE:
                raise RuntimeError(f"{name}: Q/DQ conv {check.path} in ORT differs from PyTorch (quantized inputs "
                                   f"differing: {check.code_mismatch:.2e}, output rel-L2 {check.output_rel_l2:.2e})")
        return len(quantized)

    def apply_to(self, decoder_graph: torch.nn.Module) -> None:
        """Make the (shared) VAE behind ``decoder_graph`` compute what the Q/DQ decoder graphs compute."""
        apply_fake_quant_convs(decoder_graph, self.plan)


def fake_quant_reference(transformer_graph: torch.nn.Module, cache: CalibrationCache, policy: PrecisionPolicy,
                         precision: str, alpha: float, num_blocks: int, high_precision: str = "fp32") -> torch.nn.Module:
    """A copy of the DiT graph module whose planned Linears compute the quantized math (``.plan`` set).

    ``transformer_graph`` may be a half-precision wrapper (``HalfPrecisionGraph``); layers are named
    by their path in the DiT graph itself either way.
    """
    reference = copy.deepcopy(transformer_graph)
    plan = quant_plan(reference, cache, policy, precision, alpha, num_blocks, high_precision)
    apply_fake_quant(getattr(reference, "inner", reference), plan)
    reference.plan = plan
    return reference


def quant_plan(transformer_graph: torch.nn.Module, cache: CalibrationCache, policy: PrecisionPolicy, precision: str,
               alpha: float, num_blocks: int, high_precision: str = "fp32") -> QuantPlan:
    """The DiT graph's quantization plan (``transformer_graph`` may be a ``HalfPrecisionGraph``; unchanged)."""
    core = getattr(transformer_graph, "inner", transformer_graph)
    return make_plan(linear_layers(core), cache, policy, precision, num_blocks, alpha, high_precision,
                     head_dim=int(core.transformer.config.attention_head_dim))


def prepare_quantization(request: QuantizationRequest, weights_hash: str, modules: dict[str, torch.nn.Module],
                         preset: Preset, *, reference: bool = True
                         ) -> tuple[QuantizedTransformer, QuantizedVaeDecoder | None]:
    """A quantized build's DiT plan and, where the policy quantizes them, the VAE decoder's convs'."""
    quant = QuantizedTransformer.prepare(request, weights_hash, modules[TRANSFORMER], preset, reference=reference)
    vae_quant = None
    if quant.policy.vae_decoder_convs:
        vae_quant = QuantizedVaeDecoder.prepare(quant.cache, quant.precision, modules[VAE_DECODER_STEP],
                                                quant.calibration_path)
    return quant, vae_quant


def quantize_vae_for_manifest(decoder_graph: torch.nn.Module, engines_dir: Path, manifest) -> None:
    """The torch backend's VAE for an engines directory with Q/DQ decoder convs (fake-quant, in place)."""
    q = manifest.quantization
    if q.get("vae_decoder_convs"):
        cache = load_cache(engines_dir / q["calibration_file"])
        QuantizedVaeDecoder.prepare(cache, q["precision"], decoder_graph, engines_dir).apply_to(decoder_graph)


def reference_for_manifest(transformer_graph: torch.nn.Module, engines_dir: Path, manifest) -> torch.nn.Module:
    """The torch backend's DiT for a quantized engines directory (fake-quant with the stored cache)."""
    q = manifest.quantization
    policy = PrecisionPolicy.from_json(q["policy"])
    cache = load_cache(engines_dir / q["calibration_file"])
    return fake_quant_reference(transformer_graph, cache, policy, q["precision"], q.get("smoothquant_alpha") or 0.5,
                                int(manifest.preset.transformer["num_layers"]), q.get("high_precision", "fp32"))


def planned_layer_precisions(manifest) -> dict[str, str]:
    """What ``qdq.layer_precisions`` reads from a DiT ONNX graph, for a directory without one (``build
    --backend torch``): each DiT Linear's precision and each self-attention matmul's, as the torch backend
    computes them from the manifest's policy and dtype (the DiT's structure from the preset, on meta)."""
    from wan_trt.checkpoints import empty_transformer

    with torch.device("meta"):
        transformer = empty_transformer(manifest.preset)
    q = manifest.quantization or {}
    float_type = manifest.graphs[TRANSFORMER].dtype
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    num_blocks = int(manifest.preset.transformer["num_layers"])
    quantized = set(PrecisionPolicy.from_json(q["policy"]).quantized_layers(num_blocks)) if q else set()
    result = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("motion_encoder."):
            path = f"transformer.{name}"
            result[path] = q["precision"] if path in quantized else "fp32" if keep & set(name.split(".")) else float_type
    attention = set(q.get("fp8_attention_blocks", ()))
    for block in range(num_blocks):
        for role in ("q·k", "softmax·v"):
            result[f"transformer.blocks.{block}.attn1 {role}"] = "fp8" if block in attention else float_type
    return result
