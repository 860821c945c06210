"""``wan-trt build`` (ONNX, TensorRT): reference modules → every declared graph as ONNX → an engines directory.

Written atomically (``staging.py``); the steps every build shares — the weights and graph modules
(``sources.py``), the tokenizer, prompt cache and manifest (``directory.py``), the quantization plan
and its calibration cache — are the same code as ``wan-trt build --backend torch``'s (``torch_build.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from wan_trt.calibration.quantized import (QDQ_TOLERANCE, VAE_DECODER_GRAPHS, QuantizationRequest,
                                          QuantizedTransformer, prepare_quantization)
from wan_trt.components import GraphSpec
from wan_trt.errors import BadInputError, EngineError
from wan_trt.export.accuracy import ACCURACY_FILE, Fp32Reference, write_accuracy
from wan_trt.export.directory import directory_manifest, write_text_files
from wan_trt.export.onnx_export import EXPORT_SIZES, export_graph
from wan_trt.models.precision import HalfPrecisionGraph
from wan_trt.export.precision import HALF_QDQ_TOLERANCE, HALF_TOLERANCE, as_fp32_graph, onnx_float_types
from wan_trt.export.sources import float_dtypes, in_dtypes, load_sources
from wan_trt.export.staging import check_out_dir, staged_directory
from wan_trt.export.tensorrt import TrtOptions, build_tensorrt_engines
from wan_trt.runtime.tensorrt_engine import current_environment
from wan_trt.lora import LoraSpec
from wan_trt.metrics import relative_l2
from wan_trt.presets import Preset
from wan_trt.runtime.engines import OrtEngine, TorchEngine
from wan_trt.runtime.manifest import ONNX_BACKENDS, GraphEntry, file_sha256, write_manifest

log = logging.getLogger(__name__)

BUILD_TOLERANCE = 1e-4  # rel-L2 of each ONNX graph in ORT vs its PyTorch module, checked at build time
FP16_RUN_TOLERANCE = 2e-2  # an fp16 graph in ORT (fp16 kernels) vs the module in PyTorch fp16: two roundings


def build_engines(preset: Preset, out_dir: str | Path, *, seed: int = 0, checkpoint: str | None = None,
                  random_weights: bool = False, loras: Sequence[LoraSpec] = (),
                  verify: bool = True, precision: str = "fp32",
                  quantization: QuantizationRequest | None = None, tensorrt: TrtOptions | None = None,
                  trt_builder=None, accuracy_video: bool | None = None, refit_from: Path | None = None) -> Path:
    """Export all graphs of ``preset`` into ``out_dir`` (atomically). Returns the directory.

    ``precision`` fp16/bf16 exports the graphs ``wan_trt.models.precision.graph_dtypes`` names in that type
    (I/O stays float32). With ``quantization`` the DiT graph gets FP8/INT8 Q/DQ nodes per the policy
    over a graph whose other layers are in ``quantization.high_precision``, checked in ONNX Runtime
    against the PyTorch fake-quant model. Any build but fp32 writes ``accuracy.json`` (denoiser error
    vs fp32 at t = 999, 500, 1; video PSNR vs fp32 when ``accuracy_video``, default: small presets).

    With ``tensorrt`` a TensorRT engine is built from each verified ONNX file per shape bucket;
    engines of an existing directory at ``out_dir`` (or ``refit_from``) whose inputs are unchanged are
    reused, and refittable ones whose graph is unchanged but for its weights are refitted.
    ``trt_builder`` (tests) stands in for TensorRT: an object with ``environment()``, ``build(...)`` and
    ``refit(plan, onnx)``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    trt_env = None
    if tensorrt is not None:  # before any slow work: is TensorRT here at all?
        trt_env = trt_builder.environment() if trt_builder else current_environment()
    if refit_from is not None and (tensorrt is None or _previous_trt(Path(refit_from)) is None):
        raise BadInputError(f"--refit-from '{refit_from}' has no TensorRT engines to refit: build them with "
                            "wan-trt build --backend tensorrt --refittable")
    sources = load_sources(preset, seed=seed, checkpoint=checkpoint, random_weights=random_weights, loras=loras)
    specs, modules, tokenizer = sources.specs, sources.modules, sources.tokenizer
    dtypes = float_dtypes(precision, quantization, list(specs))
    fp32_reference = None
    if quantization is not None or any(dtype != "fp32" for dtype in dtypes.values()):
        if quantization is not None:  # fail on a bad cache or policy before minutes of reference runs
            QuantizedTransformer.check_request(quantization, sources.weights_hash)
        with_video = accuracy_video if accuracy_video is not None else not preset.needs_checkpoint
        fp32_reference = Fp32Reference.capture(modules, specs, preset, tokenizer, with_video)
    modules = in_dtypes(modules, dtypes, specs)
    quant = vae_quant = None
    if quantization is not None:
        quant, vae_quant = prepare_quantization(quantization, sources.weights_hash, modules, preset)
    quantized_convs = 0

    with staged_directory(out_dir) as staging:
        graphs: dict[str, GraphEntry] = {}
        for number, (name, spec) in enumerate(specs.items(), start=1):
            log.info("[%d/%d] exporting %s", number, len(specs), name)
            start = time.monotonic()
            path = export_graph(spec, modules[name], staging / f"{name}.onnx")
            module, optimization, tolerance = modules[name], "all", BUILD_TOLERANCE
            if quant is not None and name == "transformer":
                quant.write(path, staging)
                module, optimization, tolerance = quant.reference, "basic", QDQ_TOLERANCE
            if vae_quant is not None and name in VAE_DECODER_GRAPHS:
                feed = spec.sample_inputs(EXPORT_SIZES, seed=1)
                count = vae_quant.write_and_check(name, path, modules[name], feed)
                quantized_convs = max(quantized_convs, count)
                log.info("[%d/%d] %s: %d convs with %s Q/DQ, each proven in ORT on its own inputs", number, len(specs),
                         name, count, quant.precision)
                graphs[name] = GraphEntry(spec, path.name, path.stat().st_size, file_sha256(path), dtypes[name])
                continue  # end to end, boundary flips compound through the convs: see runtime.compare
            if dtypes[name] != "fp32":
                half_tolerance = HALF_QDQ_TOLERANCE if tolerance == QDQ_TOLERANCE else HALF_TOLERANCE
                optimization, tolerance = "basic", max(tolerance, half_tolerance)
            if verify:
                error = verify_graph(spec, path, module, optimization, tolerance)
                log.info("[%d/%d] %s: ORT vs PyTorch rel-L2 %.2e (%.1f s)", number, len(specs), name, error,
                         time.monotonic() - start)
            graphs[name] = GraphEntry(spec, path.name, path.stat().st_size, file_sha256(path), dtypes[name])
        write_text_files(staging, sources, modules["text_encoder"])
        quant_entry = quant.manifest_entry(quantized_convs) if quant else None
        if vae_quant is not None:  # from here on the (shared) VAE computes what its Q/DQ graphs compute
            vae_quant.apply_to(modules["vae_decoder_step"])
        if fp32_reference is not None:
            _write_accuracy(staging, fp32_reference, quant.precision if quant else precision, dtypes, graphs, specs,
                            {**modules, "transformer": quant.reference} if quant else modules, preset, tokenizer,
                            quant_entry)
        manifest = directory_manifest(sources, precision=quant.precision if quant else precision, graphs=graphs,
                                      backends=ONNX_BACKENDS, quantization=quant_entry)
        if tensorrt is not None:
            previous = _previous_trt(Path(refit_from) if refit_from else out_dir)
            manifest.tensorrt = build_tensorrt_engines(staging, manifest, tensorrt, trt_env, previous,
                                                       build=trt_builder.build if trt_builder else None,
                                                       refit=trt_builder.refit if trt_builder else None)
        write_manifest(staging, manifest)
    log.info("engines written to %s", out_dir)
    return out_dir


def _write_accuracy(staging: Path, reference: Fp32Reference, precision: str, dtypes: dict[str, str],
                    graphs: dict[str, GraphEntry], specs: dict[str, GraphSpec], modules: dict[str, torch.nn.Module],
                    preset: Preset, tokenizer, quantization: dict | None) -> None:
    """``accuracy.json`` in the staging directory; the DiT graph runs in ORT (via its fp32 twin if bf16)."""
    path = staging / graphs["transformer"].file
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
