"""What a build is asked for (:class:`BuildRequest`) and the steps every build shares.

``wan-trt build`` makes one request; the ONNX build (``build.py``) and the torch-backend build
(``torch_build.py``) compose their steps around it inside one ``staged_directory``: load the reference
weights, put each graph in its float type, plan the quantization, write the text files and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wan_trt.calibration.quantized import (QuantizationRequest, QuantizedTransformer, QuantizedVaeDecoder,
                                          prepare_quantization)
from wan_trt.errors import BadInputError
from wan_trt.export.directory import directory_manifest
from wan_trt.export.sources import BuildSources, float_dtypes, in_dtypes, load_sources
from wan_trt.lora import LoraSpec
from wan_trt.presets import Preset
from wan_trt.runtime.manifest import GraphEntry, Manifest

if TYPE_CHECKING:
    from wan_trt.export.tensorrt import TrtOptions


@dataclass(frozen=True)
class BuildRequest:
    """One engines directory to build: its weights, float types, quantization and engines.

    ``precision`` fp16/bf16 puts the graphs ``wan_trt.models.precision.graph_dtypes`` names in that type
    (with ``quantization``: its ``high_precision``; ``precision`` stays fp32). ``verify``, ``accuracy_video``,
    ``tensorrt`` and ``refit_from`` concern the ONNX build only.
    """

    preset: Preset
    out_dir: Path
    seed: int = 0
    checkpoint: str | None = None
    random_weights: bool = False
    loras: tuple[LoraSpec, ...] = ()
    verify: bool = True  # each ONNX graph in ONNX Runtime against PyTorch
    precision: str = "fp32"
    quantization: QuantizationRequest | None = None
    tensorrt: TrtOptions | None = None
    accuracy_video: bool | None = None  # None: on for presets with built-in weights
    refit_from: Path | None = None  # an engines directory whose refittable TensorRT engines are refitted

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "loras", tuple(self.loras))
        if self.refit_from is not None:
            object.__setattr__(self, "refit_from", Path(self.refit_from))
            if self.tensorrt is None or not self.tensorrt.refittable:
                raise BadInputError("--refit-from needs --refittable (only refittable engines can be refitted)")

    @property
    def directory_precision(self) -> str:
        """The manifest's precision: the quantized one, else the float one."""
        return self.quantization.precision if self.quantization is not None else self.precision

    @property
    def with_video(self) -> bool:
        """``accuracy.json`` measures the video PSNR too (default: presets with built-in weights; the real
        model's reference video takes long on a CPU)."""
        return self.accuracy_video if self.accuracy_video is not None else not self.preset.needs_checkpoint


@dataclass
class BuildModules:
    """Each graph's module in its float type, and the quantization plans of a quantized build."""

    dtypes: dict[str, str]
    modules: dict[str, torch.nn.Module]
    quant: QuantizedTransformer | None = None
    vae_quant: QuantizedVaeDecoder | None = None

    def quantization_entry(self, vae_decoder_convs: int) -> dict[str, Any] | None:
        """The manifest's ``quantization`` (None for a float build)."""
        return self.quant.manifest_entry(vae_decoder_convs) if self.quant is not None else None


def load_request_sources(request: BuildRequest, **bounds: Any) -> BuildSources:
    """The reference weights and graph modules of ``request`` (``bounds``: where and which weights,
    ``sources.load_sources``'s ``device``, ``dtype`` and ``components``)."""
    return load_sources(request.preset, seed=request.seed, checkpoint=request.checkpoint,
                        random_weights=request.random_weights, loras=request.loras, **bounds)


def graph_float_types(request: BuildRequest, sources: BuildSources) -> dict[str, str]:
    """The float type of each graph; a quantized build's cache and policy are checked here, before slow work."""
    dtypes = float_dtypes(request.precision, request.quantization, list(sources.specs))
    if request.quantization is not None:
        QuantizedTransformer.check_request(request.quantization, sources.weights_hash)
    return dtypes


def prepare_modules(request: BuildRequest, sources: BuildSources, dtypes: dict[str, str], *,
                    reference: bool = True) -> BuildModules:
    """The graph modules in ``dtypes`` and, for a quantized build, its plans (with ``reference``: the
    fake-quant DiT the Q/DQ graph is proven against)."""
    prepared = BuildModules(dtypes, in_dtypes(sources.modules, dtypes, sources.specs))
    if request.quantization is not None:
        prepared.quant, prepared.vae_quant = prepare_quantization(
            request.quantization, sources.weights_hash, prepared.modules, request.preset, reference=reference)
    return prepared


def request_manifest(request: BuildRequest, sources: BuildSources, graphs: dict[str, GraphEntry],
                     backends: tuple[str, ...], quantization: dict[str, Any] | None) -> Manifest:
    """The manifest of the directory ``request`` builds, serving ``backends``."""
    return directory_manifest(sources, precision=request.directory_precision, graphs=graphs, backends=backends,
                              quantization=quantization)
