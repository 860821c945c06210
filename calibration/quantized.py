"""A quantized DiT at build time: the plan, the Q/DQ graph, its fake-quant reference, the accuracy report."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_trt.calibration.cache import CalibrationCache, load_cache
from wan_trt.calibration.policy import PrecisionPolicy, load_policy
from wan_trt.calibration.qdq import write_qdq
from wan_trt.calibration.quantize import QUANTIZED_PRECISIONS, QuantPlan, apply_fake_quant, linear_layers, make_plan
from wan_trt.errors import BadInputError
from wan_trt.presets import Preset
from wan_trt.runtime.compare import QDQ_TOLERANCE  # noqa: F401  (re-exported for the build)

log = logging.getLogger(__name__)

ACCURACY_FILE = "accuracy.json"
CALIBRATION_FILE = "calibration.json"
ACCURACY_TIMESTEPS = (999.0, 500.0, 1.0)


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
    reference: torch.nn.Module  # the TransformerGraph with fake-quant Linears: what the Q/DQ graph computes

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
                preset: Preset) -> "QuantizedTransformer":
        if request.precision not in QUANTIZED_PRECISIONS:
            raise BadInputError(f"--precision {request.precision}: quantized precisions are {', '.join(QUANTIZED_PRECISIONS)}")
        cache = load_cache(request.calibration)
        cache.check_weights(weights_hash, request.calibration)
        policy = load_policy(request.policy)
        reference = fake_quant_reference(transformer_graph, cache, policy, request.precision, request.alpha,
                                         int(preset.transformer["num_layers"]), request.high_precision)
        plan = reference.plan
        return QuantizedTransformer(request.precision, cache, Path(request.calibration), policy, plan, reference)

    def write(self, onnx_path: Path, engines_dir: Path) -> None:
        """Rewrite the exported fp32 DiT graph with Q/DQ in place; keep the cache beside it."""
        summary = write_qdq(onnx_path, onnx_path, self.plan)
        for path, tensor in summary.activation_tensors.items():
            self.cache.layers[path].onnx_tensor = tensor
        self.cache.save(engines_dir / CALIBRATION_FILE)

    def manifest_entry(self) -> dict[str, Any]:
        return {"precision": self.precision, "policy": self.policy.to_json(), "calibration_file": CALIBRATION_FILE,
                "calibration_method": self.cache.method, "smoothquant_alpha": self.plan.alpha,
                "high_precision": self.plan.scale_dtype, "quantized_layers": len(self.plan.layers)}

def fake_quant_reference(transformer_graph: torch.nn.Module, cache: CalibrationCache, policy: PrecisionPolicy,
                         precision: str, alpha: float, num_blocks: int, high_precision: str = "fp32") -> torch.nn.Module:
    """A copy of the DiT graph module whose planned Linears compute the quantized math (``.plan`` set).

    ``transformer_graph`` may be a half-precision wrapper (``HalfPrecisionGraph``); layers are named
    by their path in the DiT graph itself either way.
    """
    reference = copy.deepcopy(transformer_graph)
    core = getattr(reference, "inner", reference)
    plan = make_plan(linear_layers(core), cache, policy, precision, num_blocks, alpha, high_precision)
    apply_fake_quant(core, plan)
    reference.plan = plan
    return reference


def reference_for_manifest(transformer_graph: torch.nn.Module, engines_dir: Path, manifest) -> torch.nn.Module:
    """The torch backend's DiT for a quantized engines directory (fake-quant with the stored cache)."""
    q = manifest.quantization
    policy = PrecisionPolicy(q["policy"]["keep_first_blocks"], q["policy"]["keep_last_blocks"],
                             tuple(q["policy"]["block_layers"]), q["policy"].get("source", "manifest"))
    cache = load_cache(engines_dir / q["calibration_file"])
    return fake_quant_reference(transformer_graph, cache, policy, q["precision"], q.get("smoothquant_alpha") or 0.5,
                                int(manifest.preset.transformer["num_layers"]), q.get("high_precision", "fp32"))
