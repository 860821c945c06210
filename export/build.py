"""``wan-trt build`` (ONNX, TensorRT): reference modules → every declared graph as ONNX → an engines directory.

One :class:`BuildRequest` (``request.py``) runs through small steps inside one ``staged_directory``
(``staging.py``: written atomically): the checks that need no weights, the sources, the fp32 reference
(any build but fp32), the graph modules in their float types with the quantization plans, then in the
staging directory each graph exported, given its Q/DQ and verified, the text files, ``accuracy.json``,
the manifest and the TensorRT engines. The steps every build shares — the weights and graph modules
(``sources.py``), the tokenizer, prompt cache and manifest (``directory.py``), the quantization plan and
its calibration cache — are the same code as ``wan-trt build --backend torch``'s (``torch_build.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from wan_trt.calibration.quantized import QDQ_TOLERANCE, VAE_DECODER_GRAPHS, QuantizationRequest
from wan_trt.components import GraphSpec
from wan_trt.errors import BadInputError, EngineError
from wan_trt.export.accuracy import ACCURACY_FILE, Fp32Reference, write_accuracy
from wan_trt.export.directory import write_text_files
from wan_trt.export.onnx_export import EXPORT_SIZES, export_graph
from wan_trt.export.precision import HALF_QDQ_TOLERANCE, HALF_TOLERANCE, as_fp32_graph, onnx_float_types
from wan_trt.export.request import (BuildModules, BuildRequest, graph_float_types, load_request_sources,
                                    prepare_modules, request_manifest)
from wan_trt.export.sources import BuildSources
from wan_trt.export.staging import check_out_dir, staged_directory
from wan_trt.export.tensorrt import TrtOptions, build_tensorrt_engines
from wan_trt.lora import LoraSpec
from wan_trt.metrics import relative_l2
from wan_trt.models.precision import HalfPrecisionGraph
from wan_trt.presets import Preset
from wan_trt.registry import TEXT_ENCODER, TRANSFORMER, VAE_DECODER_STEP
from wan_trt.runtime.engines import OrtEngine, TorchEngine
from wan_trt.runtime.manifest import ONNX_BACKENDS, GraphEntry, Manifest, file_sha256, write_manifest
from wan_trt.runtime.tensorrt_engine import current_environment

log = logging.getLogger(__name__)

BUILD_TOLERANCE = 1e-4  # rel-L2 of each ONNX graph in ORT vs its PyTorch module, checked at build time
FP16_RUN_TOLERANCE = 2e-2  # an fp16 graph in ORT (fp16 kernels) vs the module in PyTorch fp16: two roundings

__all__ = ["BuildRequest", "build", "build_engines", "verify_graph"]


def build_engines(preset: Preset, out_dir: str | Path, *, seed: int = 0, checkpoint: str | None = None,
                  random_weights: bool = False, loras: Sequence[LoraSpec] = (),
                  verify: bool = True, precision: str = "fp32",
                  quantization: QuantizationRequest | None = None, tensorrt: TrtOptions | None = None,
                  trt_builder=None, accuracy_video: bool | None = None, refit_from: Path | None = None) -> Path:
    """:func:`build` of the request these keywords make (see :class:`BuildRequest`)."""
    request = BuildRequest(preset, Path(out_dir), seed=seed, checkpoint=checkpoint, random_weights=random_weights,
                           loras=tuple(loras), verify=verify, precision=precision, quantization=quantization,
                           tensorrt=tensorrt, accuracy_video=accuracy_video, refit_from=refit_from)
    return build(request, trt_builder=trt_builder)


def build(request: BuildRequest, *, trt_builder=None) -> Path:
    """Export all graphs of ``request.preset`` into ``request.out_dir`` (atomically). Returns the directory.

    fp16/bf16 graphs keep float32 I/O. With ``quantization`` the DiT graph gets FP8/INT8 Q/DQ nodes per
    the policy over a graph whose other layers are in ``quantization.high_precision``, checked in ONNX
    Runtime against the PyTorch fake-quant model. Any build but fp32 writes ``accuracy.json`` (denoiser
    error vs fp32 at t = 999, 500, 1; video PSNR vs fp32 when ``request.with_video``).

    With ``tensorrt`` a TensorRT engine is built from each verified ONNX file per shape bucket;
    engines of an existing directory at ``out_dir`` (or ``refit_from``) whose inputs are unchanged are
    reused, and refittable ones whose graph is unchanged but for its weights are refitted.
    ``trt_builder`` (tests) stands in for TensorRT: an object with ``environment()``, ``build(...)`` and
    ``refit(plan, onnx)``.
    """
    check_out_dir(request.out_dir)
    trt_env = tensorrt_environment(request, trt_builder)  # before any slow work: is TensorRT here at all?
    previous = previous_engines(request)
    sources = load_request_sources(request)
    dtypes = graph_float_types(request, sources)
    fp32_reference = capture_fp32_reference(request, sources, dtypes)
    prepared = prepare_modules(request, sources, dtypes)

    with staged_directory(request.out_dir) as staging:
        graphs, quantized_convs = export_graphs(staging, request, sources, prepared)
        write_text_files(staging, sources, prepared.modules[TEXT_ENCODER])
        quant_entry = prepared.quantization_entry(quantized_convs)
        if prepared.vae_quant is not None:  # from here on the (shared) VAE computes what its Q/DQ graphs compute
            prepared.vae_quant.apply_to(prepared.modules[VAE_DECODER_STEP])
        if fp32_reference is not None:
            measure_accuracy(staging, request, sources, prepared, graphs, fp32_reference, quant_entry)
        manifest = request_manifest(request, sources, graphs, ONNX_BACKENDS, quant_entry)
        if request.tensorrt is not None:
            manifest.tensorrt = build_tensorrt(staging, manifest, request.tensorrt, trt_env, previous, trt_builder)
        write_manifest(staging, manifest)
    log.info("engines written to %s", request.out_dir)
    return request.out_dir


def tensorrt_environment(request: BuildRequest, trt_builder=None):
    """The TensorRT environment a TensorRT build runs in (fails where TensorRT is missing); None without one."""
    if request.tensorrt is None:
        return None
    return trt_builder.environment() if trt_builder else current_environment()


def previous_engines(request: BuildRequest) -> tuple[Path, dict[str, Any]] | None:
    """The TensorRT engines a TensorRT build may reuse or refit: ``refit_from``'s (which must have some), else
    those of the directory it replaces."""
    if request.tensorrt is None:
        return None
    if request.refit_from is None:
        return _previous_trt(request.out_dir)
    previous = _previous_trt(request.refit_from)
    if previous is None:
        raise BadInputError(f"--refit-from '{request.refit_from}' has no TensorRT engines to refit: build them with "
                            "wan-trt build --backend tensorrt --refittable")
    return previous


def capture_fp32_reference(request: BuildRequest, sources: BuildSources,
                           dtypes: dict[str, str]) -> Fp32Reference | None:
    """The fp32 modules' outputs that ``accuracy.json`` compares against: for any build but fp32."""
    if request.quantization is None and all(dtype == "fp32" for dtype in dtypes.values()):
        return None
    return Fp32Reference.capture(sources.modules, sources.specs, request.preset, sources.tokenizer,
                                 request.with_video)


def export_graphs(staging: Path, request: BuildRequest, sources: BuildSources,
                  prepared: BuildModules) -> tuple[dict[str, GraphEntry], int]:
    """Every graph exported into ``staging`` with its Q/DQ and verified; the manifest's entries and the
    count of Q/DQ convs of the VAE decoder graphs."""
    graphs: dict[str, GraphEntry] = {}
    quantized_convs = 0
    specs = sources.specs
    for number, (name, spec) in enumerate(specs.items(), start=1):
        log.info("[%d/%d] exporting %s", number, len(specs), name)
        start = time.monotonic()
        path = export_graph(spec, prepared.modules[name], staging / f"{name}.onnx")
        if prepared.vae_quant is not None and name in VAE_DECODER_GRAPHS:
            count = write_vae_qdq(name, spec, path, prepared)
            quantized_convs = max(quantized_convs, count)
            log.info("[%d/%d] %s: %d convs with %s Q/DQ, each proven in ORT on its own inputs", number, len(specs),
                     name, count, prepared.quant.precision)
        else:  # end to end, a VAE graph's boundary flips compound through the convs: see runtime.compare
            module, optimization, tolerance = checked_graph(staging, name, path, prepared)
            if request.verify:
                error = verify_graph(spec, path, module, optimization, tolerance)
                log.info("[%d/%d] %s: ORT vs PyTorch rel-L2 %.2e (%.1f s)", number, len(specs), name, error,
                         time.monotonic() - start)
        graphs[name] = GraphEntry(spec, path.name, path.stat().st_size, file_sha256(path), prepared.dtypes[name])
    return graphs, quantized_convs


def checked_graph(staging: Path, name: str, path: Path, prepared: BuildModules) -> tuple[torch.nn.Module, str, float]:
    """What an exported graph is verified against: the module, ORT's optimisation level and the tolerance.
    The DiT of a quantized build gets its Q/DQ nodes here and is checked against the fake-quant model."""
    module, optimization, tolerance = prepared.modules[name], "all", BUILD_TOLERANCE
    if prepared.quant is not None and name == TRANSFORMER:
        prepared.quant.write(path, staging)
        module, optimization, tolerance = prepared.quant.reference, "basic", QDQ_TOLERANCE
    if prepared.dtypes[name] != "fp32":
        half_tolerance = HALF_QDQ_TOLERANCE if tolerance == QDQ_TOLERANCE else HALF_TOLERANCE
        optimization, tolerance = "basic", max(tolerance, half_tolerance)
    return module, optimization, tolerance


def write_vae_qdq(name: str, spec: GraphSpec, path: Path, prepared: BuildModules) -> int:
    """A VAE decoder graph's Q/DQ convs, each proven in ORT on its own inputs; returns their count."""
    feed = spec.sample_inputs(EXPORT_SIZES, seed=1)
    return prepared.vae_quant.write_and_check(name, path, prepared.modules[name], feed)


def measure_accuracy(staging: Path, request: BuildRequest, sources: BuildSources, prepared: BuildModules,
                     graphs: dict[str, GraphEntry], reference: Fp32Reference, quant_entry: dict | None) -> None:
    """``accuracy.json``: the built graphs (a quantized DiT: its fake-quant model) against the fp32 reference."""
    modules = prepared.modules
    if prepared.quant is not None:
        modules = {**modules, TRANSFORMER: prepared.quant.reference}
    _write_accuracy(staging, reference, request.directory_precision, prepared.dtypes, graphs, sources.specs,
                    modules, request.preset, sources.tokenizer, quant_entry)


def build_tensorrt(staging: Path, manifest: Manifest, options: TrtOptions, trt_env,
                   previous: tuple[Path, dict[str, Any]] | None, trt_builder=None) -> dict[str, Any]:
    """The manifest's ``tensorrt`` section: an engine per graph and bucket from the verified ONNX files."""
    return build_tensorrt_engines(staging, manifest, options, trt_env, previous,
                                  build=trt_builder.build if trt_builder else None,
                                  refit=trt_builder.refit if trt_builder else None)


def _write_accuracy(staging: Path, reference: Fp32Reference, precision: str, dtypes: dict[str, str],
                    graphs: dict[str, GraphEntry], specs: dict[str, GraphSpec], modules: dict[str, torch.nn.Module],
                    preset: Preset, tokenizer, quantization: dict | None) -> None:
    """``accuracy.json`` in the staging directory; the DiT graph runs in ORT (via its fp32 twin if bf16)."""
    path = staging / graphs[TRANSFORMER].file
    runnable, runs_as = path, "onnxruntime (CPU, optimisation BASIC)"
    if "bf16" in onnx_float_types(path):
        runnable = as_fp32_graph(path, staging / ".transformer.fp32-twin.onnx")
        runs_as = "onnxruntime on the graph's fp32 twin (bf16 weights, fp32 arithmetic: ORT's CPU has no bf16)"
    try:
        extra = {"quantization": quantization} if quantization else None
        write_accuracy(staging / ACCURACY_FILE, reference, precision=precision, graph_dtypes=dtypes, onnx_path=path,
                       runnable_path=runnable, runs_as=runs_as, modules=modules, specs=specs, preset=preset,
                       tokenizer=tokenizer, extra=extra)
    finally:
        if runnable != path:
            runnable.unlink(missing_ok=True)


def _previous_trt(out_dir: Path):
    """An existing engines directory's TensorRT section, for reusing unchanged engines."""
    from wan_trt.runtime.manifest import read_manifest

    if not (out_dir / "manifest.json").is_file():
        return None
    try:
        old = read_manifest(out_dir, check_files=False)
    except EngineError:
        return None
    return (out_dir, old.tensorrt) if old.tensorrt else None


def verify_graph(spec: GraphSpec, path: Path, module: torch.nn.Module, optimization: str = "all",
                 tolerance: float = BUILD_TOLERANCE) -> float:
    """Run the fresh ONNX file in ORT and its module in PyTorch on random inputs; fail past ``tolerance``.

    A half-precision graph is checked through its fp32 twin against the module widened to fp32 (same
    rounded weights, fp32 arithmetic), which proves the graph's structure and weights; an fp16 graph
    is also run as it is (ORT's CPU provider has fp16 kernels, not bf16) against the module in fp16.
    """
    feed = {k: torch.from_numpy(v) for k, v in spec.sample_inputs(EXPORT_SIZES, seed=1).items()}
    if not isinstance(module, HalfPrecisionGraph):
        got = OrtEngine(path, spec, optimization=optimization).run(feed)
        want = TorchEngine(module, spec).run(feed)
        return _check(spec, got, want, tolerance)
    twin = as_fp32_graph(path, path.with_name(f".{path.stem}.fp32-twin.onnx"))
    try:
        got = OrtEngine(twin, spec, optimization=optimization).run(feed)
    finally:
        twin.unlink(missing_ok=True)
    with module.widened():
        want = TorchEngine(module, spec).run(feed)
    error = _check(spec, got, want, tolerance)
    if module.dtype == "fp16":
        direct = OrtEngine(path, spec, optimization="basic").run(feed)
        _check(spec, direct, TorchEngine(module, spec).run(feed), FP16_RUN_TOLERANCE)
    return error


def _check(spec: GraphSpec, got: dict, want: dict, tolerance: float) -> float:
    error = max(relative_l2(got[n], want[n]) for n in spec.output_names)
    if not error <= tolerance:
        raise RuntimeError(f"{spec.name}: the exported ONNX differs from PyTorch (rel-L2 {error:.2e} > {tolerance})")
    return error
