"""Engines: named tensors in, named tensors out, one small interface for every backend.

A backend knows nothing about the model: it gets a graph declaration and runs it. Tensors at the
interface are torch tensors on the host, except the streamed VAE's feature caches, which may stay on
the engine's device between calls (``pipeline_outputs``), so the pipeline's orchestration code is the
same for every backend and device.

* ``onnxruntime``: the exported ONNX files in an ORT session (CPU EP; CUDA/TensorRT EPs when
  onnxruntime-gpu is installed and asked for; a silent fall back to CPU is refused).
* ``torch``: the export-friendly PyTorch modules the ONNX files were exported from, built from
  the preset and seed recorded in the manifest (imports diffusers/transformers lazily).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import torch

from wan_trt.components import CACHE_OUTPUT_PREFIX, GraphSpec
from wan_trt.errors import EngineError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Engine(Protocol):
    spec: GraphSpec

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph on named inputs; return its named outputs. An engine of a streamed graph may take
        its ``cache_*`` inputs out of ``feed`` (a dict then): the caller hands them over."""


class OrtEngine:
    """One ONNX file in an ONNX Runtime session, created on first use."""

    def __init__(self, path: Path, spec: GraphSpec, providers: list[str] | None = None,
                 optimization: str = "all") -> None:
        self.path, self.spec = path, spec
        self.providers = providers or ["CPUExecutionProvider"]
        self.optimization = optimization
        self._session = None
        self.seconds = 0.0  # total time spent in session.run, for benchmarks

    def _open(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,  # Q/DQ graphs: keep them as TensorRT sees them
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        options.log_severity_level = 3
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise EngineError(
                f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT execution providers"
            )
        session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        used = session.get_providers()
        if self.providers[0] not in used:  # ORT falls back to CPU silently when CUDA libraries are missing
            raise EngineError(f"ONNX Runtime could not start {self.providers[0]} for '{self.path}' (it fell back to {used})")
        return session

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._session is None:
            self._session = self._open()
        arrays = {t.name: np.ascontiguousarray(feed[t.name].detach().cpu().numpy(), dtype=t.dtype) for t in self.spec.inputs}
        start = time.perf_counter()
        outputs = self._session.run(self.spec.output_names, arrays)
        self.seconds += time.perf_counter() - start
        return {name: torch.from_numpy(value) for name, value in zip(self.spec.output_names, outputs)}


class TorchEngine:
    """The PyTorch module a graph was exported from, run eagerly."""

    def __init__(self, module: torch.nn.Module, spec: GraphSpec, device: str = "cpu") -> None:
        self.module, self.spec, self.device = module.to(device), spec, device
        self.seconds = 0.0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feed[t.name].to(self.device) for t in self.spec.inputs]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = pipeline_outputs(self.spec.output_names, self.module(*args))
        self.seconds += time.perf_counter() - start
        return outputs


def pipeline_outputs(names: list[str], outputs, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Named outputs where the pipeline takes them: streamed feature caches (``next_cache*``) stay on the
    engine's device, to be fed straight back; everything else comes to the host (in ``dtype`` if given).
    From a GPU, each is copied in its own type into a pinned staging tensor (a pageable copy runs at a
    fraction of the bus: 0.56 s of a 720p decode's 4.7 s), then converted into ordinary host memory, so that
    the staging blocks go back to torch's pinned cache for the next call instead of piling up."""
    result, staged = {}, []
    for name, value in zip(names, outputs, strict=True):
        if name.startswith(CACHE_OUTPUT_PREFIX):
            result[name] = value
        elif value.is_cuda:
            staging = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            staging.copy_(value, non_blocking=True)
            staged.append((name, staging, value.device))
        else:
            result[name] = value if dtype is None else value.to(dtype)
    for device in {device for _, _, device in staged}:
        torch.cuda.current_stream(device).synchronize()
    for name, staging, _ in staged:
        result[name] = torch.empty(staging.shape, dtype=dtype or staging.dtype).copy_(staging)
    return {name: result[name] for name in names}  # in the declared order


def ort_providers(device: str) -> list[str]:
    """Execution providers for a device name: cpu, cuda, tensorrt."""
    return {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[device]
