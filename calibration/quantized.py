"""A quantized DiT at build time: the plan, the Q/DQ graph, its fake-quant reference, the accuracy report."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_trt.calibration.cache import CalibrationCache, load_cache
from wan_trt.calibration.policy import PrecisionPolicy, load_policy
from wan_trt.calibration.qdq import write_qdq
from wan_trt.calibration.quantize import QUANTIZED_PRECISIONS, QuantPlan, apply_fake_quant, linear_layers, make_plan
from wan_trt.components import GraphSpec, segment_sizes
from wan_trt.errors import BadInputError
from wan_trt.metrics import relative_l2
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


@dataclass
class QuantizedTransformer:
    precision: str
    cache: CalibrationCache
    calibration_path: Path
    policy: PrecisionPolicy
    plan: QuantPlan
    reference: torch.nn.Module  # the TransformerGraph with fake-quant Linears: what the Q/DQ graph computes

    @staticmethod
    def prepare(request: QuantizationRequest, weights_hash: str, transformer_graph: torch.nn.Module,
                preset: Preset) -> "QuantizedTransformer":
        if request.precision not in QUANTIZED_PRECISIONS:
            raise BadInputError(f"--precision {request.precision}: quantized precisions are {', '.join(QUANTIZED_PRECISIONS)}")
        cache = load_cache(request.calibration)
        cache.check_weights(weights_hash, request.calibration)
        policy = load_policy(request.policy)
        reference = fake_quant_reference(transformer_graph, cache, policy, request.precision, request.alpha,
                                         int(preset.transformer["num_layers"]))
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
                "quantized_layers": len(self.plan.layers)}

    def write_accuracy(self, out: Path, onnx_path: Path, spec: GraphSpec, fp32_module: torch.nn.Module) -> dict:
        """Quantized DiT (ONNX Runtime) vs fp32 DiT (PyTorch) at fixed timesteps, on fixed random inputs."""
        from wan_trt.runtime.engines import OrtEngine, TorchEngine

        engine = OrtEngine(onnx_path, spec, optimization="basic")
        reference = TorchEngine(fp32_module, spec)
        feed = {k: torch.from_numpy(v) for k, v in spec.sample_inputs(segment_sizes(21, 64, 64), seed=7).items()}
        rows = {}
        for t in ACCURACY_TIMESTEPS:
            feed["timestep"] = torch.tensor([t], dtype=torch.float32)
            rows[str(int(t))] = relative_l2(engine.run(feed)["velocity"], reference.run(feed)["velocity"])
        report = {"precision": self.precision, "denoiser_rel_l2_vs_fp32": rows,
                  "inputs": "random latents 21 frames at 64x64, fixed seed", "layers_quantized": len(self.plan.layers)}
        out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("%s denoiser rel-L2 vs fp32 at t=999/500/1: %s", self.precision,
                 ", ".join(f"{v:.3e}" for v in rows.values()))
        return report


class _FakeQuantGraph(torch.nn.Module):
    def __init__(self, graph: torch.nn.Module, plan: QuantPlan) -> None:
        super().__init__()
        self.graph, self.plan = graph, plan

    def forward(self, *args):
        return self.graph(*args)


def fake_quant_reference(transformer_graph: torch.nn.Module, cache: CalibrationCache, policy: PrecisionPolicy,
                         precision: str, alpha: float, num_blocks: int) -> _FakeQuantGraph:
    """A copy of the DiT graph module whose planned Linears compute the quantized math."""
    plan = make_plan(linear_layers(transformer_graph), cache, policy, precision, num_blocks, alpha)
    return _FakeQuantGraph(apply_fake_quant(copy.deepcopy(transformer_graph), plan), plan)


def reference_for_manifest(transformer_graph: torch.nn.Module, engines_dir: Path, manifest) -> torch.nn.Module:
    """The torch backend's DiT for a quantized engines directory (fake-quant with the stored cache)."""
    q = manifest.quantization
    policy = PrecisionPolicy(q["policy"]["keep_first_blocks"], q["policy"]["keep_last_blocks"],
                             tuple(q["policy"]["block_layers"]), q["policy"].get("source", "manifest"))
    cache = load_cache(engines_dir / q["calibration_file"])
    return fake_quant_reference(transformer_graph, cache, policy, q["precision"], q.get("smoothquant_alpha") or 0.5,
                                int(manifest.preset.transformer["num_layers"]))
