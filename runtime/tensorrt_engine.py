"""The ``tensorrt`` backend: serialized engines run on torch CUDA tensors (no host copies).

One engine per graph and bucket, deserialized lazily on the first call with that bucket's shapes.
Inputs and outputs are torch tensors on the GPU, bound by address; the engine runs on torch's
current CUDA stream, so the denoising loop never copies to the host. Untested here (TensorRT cannot
be installed on the project's machines); the choice of engine and the compatibility checks it
relies on are tested without TensorRT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from wan_trt.buckets import Bucket, select_bucket
from wan_trt.components import GraphSpec, infer_sizes
from wan_trt.errors import EngineError

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}
INSTALL_HINT = "TensorRT is not installed here: pip install '.[trt]' on a machine with an NVIDIA GPU, or use the Dockerfile"


@dataclass(frozen=True)
class TrtEnvironment:
    """What an engine is tied to: TensorRT version and GPU architecture."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def current_environment() -> TrtEnvironment:
    """The TensorRT version and GPU of this machine; EngineError when either is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    if not torch.cuda.is_available():
        raise EngineError("TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return TrtEnvironment(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def check_compatible(section: dict[str, Any], env: TrtEnvironment, directory: Path) -> None:
    """Refuse engines built for another TensorRT version or GPU architecture, naming the mismatch."""
    built = section["environment"]
    rebuild = f"wan-trt build --backend tensorrt --out {directory}"
    if built["tensorrt_version"] != env.tensorrt_version:
        raise EngineError(f"engines in '{directory}' were built with TensorRT {built['tensorrt_version']}, this is "
                          f"TensorRT {env.tensorrt_version}: rebuild with: {rebuild}")
    if built["compute_capability"] != env.compute_capability:
        raise EngineError(f"engines in '{directory}' were built for compute capability {built['compute_capability']} "
                          f"({built['gpu_name']}), this GPU is {env.compute_capability} ({env.gpu_name}): "
                          f"rebuild with: {rebuild}")


class TrtEngine:
    """Engine interface over the per-bucket TensorRT plans of one graph."""

    def __init__(self, directory: Path, spec: GraphSpec, plans: Mapping[str | None, str]) -> None:
        self.directory, self.spec, self.plans = directory, spec, dict(plans)
        self.buckets = [Bucket.parse(name) for name in self.plans if name is not None]
        self._contexts: dict[str | None, Any] = {}
        self._engines: dict[str | None, Any] = {}
        self.seconds = 0.0

    def _bucket_for(self, feed: Mapping[str, torch.Tensor]) -> str | None:
        if None in self.plans:
            return None
        sizes = infer_sizes(self.spec, {name: tuple(value.shape) for name, value in feed.items()})
        frames = 4 * sizes["F"] - 3 if "F" in sizes else None
        rebuild = f"wan-trt build --backend tensorrt --out {self.directory}"
        return select_bucket(self.buckets, 16 * sizes["w2"], 16 * sizes["h2"], frames, rebuild).name

    def _context(self, bucket: str | None):
        if bucket not in self._contexts:
            import tensorrt as trt

            path = self.directory / self.plans[bucket]
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not load '{path}': rebuild with: "
                                  f"wan-trt build --backend tensorrt --out {self.directory}")
            self._engines[bucket] = engine
            self._contexts[bucket] = engine.create_execution_context()
            log.info("loaded TensorRT engine %s", path.name)
        return self._contexts[bucket]

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = self._context(self._bucket_for(feed))
        for tensor in self.spec.inputs:
            value = feed[tensor.name].to("cuda", _TORCH_DTYPES[tensor.dtype]).contiguous()
            context.set_input_shape(tensor.name, tuple(value.shape))
            context.set_tensor_address(tensor.name, value.data_ptr())
            feed = {**feed, tensor.name: value}  # keep the device copy alive until the run ends
        outputs = {}
        for tensor in self.spec.outputs:
            shape = tuple(context.get_tensor_shape(tensor.name))
            outputs[tensor.name] = torch.empty(shape, dtype=_TORCH_DTYPES[tensor.dtype], device="cuda")
            context.set_tensor_address(tensor.name, outputs[tensor.name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT failed to run {self.spec.name}")
        return outputs


def tensorrt_engines(directory: Path, manifest) -> dict[str, TrtEngine]:
    """Engines for every graph from the manifest's ``tensorrt`` section, after the compatibility check."""
    section = manifest.tensorrt
    if not section:
        raise EngineError(f"'{directory}' has no TensorRT engines: build them with: "
                          f"wan-trt build --backend tensorrt --out {directory}")
    check_compatible(section, current_environment(), directory)
    plans: dict[str, dict[str | None, str]] = {}
    for entry in section["engines"]:
        plans.setdefault(entry["graph"], {})[entry["bucket"]] = entry["file"]
    return {name: TrtEngine(directory, manifest.graphs[name].spec, plans[name]) for name in manifest.graphs}
