"""``wan-trt build``: reference modules → every declared graph as ONNX → an engines directory.

The directory is built in a temporary sibling and renamed into place only when complete, so an
interrupted or failed build never leaves a half-written directory, and an existing one stays usable
until the new one replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from wan_trt import __version__
from wan_trt.components import GraphSpec, graph_specs
from wan_trt.errors import BadInputError, EngineError
from wan_trt.metrics import relative_l2
from wan_trt.calibration.quantized import (QDQ_TOLERANCE, VAE_DECODER_GRAPHS, QuantizationRequest,
                                          QuantizedTransformer, QuantizedVaeDecoder)
from wan_trt.export.accuracy import ACCURACY_FILE, Fp32Reference, write_accuracy
from wan_trt.export.graphs import cache_layouts, graph_modules
from wan_trt.export.onnx_export import EXPORT_SIZES, export_graph
from wan_trt.export.precision import (FLOAT_PRECISIONS, HALF_QDQ_TOLERANCE, HALF_TOLERANCE, HalfPrecisionGraph,
                                      as_fp32_graph, graph_dtypes, onnx_float_types)
from wan_trt.export.tensorrt import TrtOptions, build_tensorrt_engines, current_environment
from wan_trt.presets import Preset
from wan_trt.reference_models import build_reference_models
from wan_trt.runtime.engines import OrtEngine, TorchEngine
from wan_trt.runtime.manifest import GraphEntry, Manifest, file_sha256, write_manifest
from wan_trt.presets import DEFAULT_PROMPT
from wan_trt.tokenizer import build_tiny_tokenizer, clean_prompt, tokenize

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
PROMPT_CACHE_FILE = "prompt_embeds.npz"
CACHED_PROMPTS = (DEFAULT_PROMPT, "")  # the default prompt and the default (empty) negative prompt
BUILD_TOLERANCE = 1e-4  # rel-L2 of each ONNX graph in ORT vs its PyTorch module, checked at build time
FP16_RUN_TOLERANCE = 2e-2  # an fp16 graph in ORT (fp16 kernels) vs the module in PyTorch fp16: two roundings


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {"wan_trt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_engines(preset: Preset, out_dir: str | Path, *, seed: int = 0, checkpoint: str | None = None,
                  random_weights: bool = False, lora: str | None = None, lora_scale: float = 1.0,
                  verify: bool = True, precision: str = "fp32",
                  quantization: QuantizationRequest | None = None, tensorrt: TrtOptions | None = None,
                  trt_builder=None, accuracy_video: bool | None = None, refit_from: Path | None = None) -> Path:
    """Export all graphs of ``preset`` into ``out_dir`` (atomically). Returns the directory.

    ``precision`` fp16/bf16 exports the graphs ``export.precision.graph_dtypes`` names in that type
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
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise BadInputError(f"--out '{out_dir}' exists and is not an engines directory: choose a new or empty path")
    trt_env = None
    if tensorrt is not None:  # before any slow work: is TensorRT here at all?
        trt_env = trt_builder.environment() if trt_builder else current_environment()
    if refit_from is not None and (tensorrt is None or _previous_trt(Path(refit_from)) is None):
        raise BadInputError(f"--refit-from '{refit_from}' has no TensorRT engines to refit: build them with "
                            "wan-trt build --backend tensorrt --refittable")
    tokenizer = checkpoint_tokenizer(checkpoint) if checkpoint else build_tiny_tokenizer()
    vocab_size = int(preset.text_encoder.get("vocab_size", tokenizer.get_vocab_size()))
    log.info("building reference modules for preset '%s' (%s)", preset.name,
             f"checkpoint {checkpoint}" if checkpoint else f"seed {seed}")
    models = build_reference_models(preset, seed=seed, vocab_size=vocab_size, checkpoint=checkpoint,
                                    random_weights=random_weights, lora=lora, lora_scale=lora_scale)
    encoder_caches, decoder_caches = cache_layouts(models)
    specs = graph_specs(preset, encoder_caches, decoder_caches, vocab_size)
    modules = graph_modules(models)
    weights_hash = models.weights_hash()
    if precision not in FLOAT_PRECISIONS:
        raise BadInputError(f"--precision {precision}: float precisions are {', '.join(FLOAT_PRECISIONS)} "
                            "(fp8/int8 come with a calibration cache)")
    float_precision = quantization.high_precision if quantization is not None else precision
    if float_precision not in FLOAT_PRECISIONS:
        raise BadInputError(f"--high-precision {float_precision}: choose one of {', '.join(FLOAT_PRECISIONS)}")
    dtypes = graph_dtypes(float_precision, list(specs))
    fp32_reference = None
    if quantization is not None or float_precision != "fp32":
        if quantization is not None:  # fail on a bad cache or policy before minutes of reference runs
            QuantizedTransformer.check_request(quantization, weights_hash)
        with_video = accuracy_video if accuracy_video is not None else not preset.needs_checkpoint
        fp32_reference = Fp32Reference.capture(modules, specs, preset, tokenizer, with_video)
    modules = {name: HalfPrecisionGraph(module, dtypes[name], specs[name].input_names) if dtypes[name] != "fp32" else module
               for name, module in modules.items()}
    quant = vae_quant = None
    if quantization is not None:
        quant = QuantizedTransformer.prepare(quantization, weights_hash, modules["transformer"], preset)
        if quant.policy.vae_decoder_convs:
            vae_quant = QuantizedVaeDecoder.prepare(quant.cache, quant.precision, modules["vae_decoder_step"],
                                                    quant.calibration_path)
    quantized_convs = 0

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-{os.getpid()}-", dir=out_dir.parent))
    try:
        tokenizer.save(str(staging / TOKENIZER_FILE))
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
        _write_prompt_cache(staging / PROMPT_CACHE_FILE, tokenizer, modules["text_encoder"])
        quant_entry = {**quant.manifest_entry(), "vae_decoder_convs": quantized_convs} if quant else None
        if vae_quant is not None:  # from here on the (shared) VAE computes what its Q/DQ graphs compute
            vae_quant.apply_to(modules["vae_decoder_step"])
        if fp32_reference is not None:
            _write_accuracy(staging, fp32_reference, quant.precision if quant else precision, dtypes, graphs, specs,
                            {**modules, "transformer": quant.reference} if quant else modules, preset, tokenizer,
                            quant_entry)
        manifest = Manifest(preset=preset, seed=seed, weights_hash=weights_hash,
                            precision=quant.precision if quant else precision, tokenizer_file=TOKENIZER_FILE,
                            graphs=graphs, versions=tool_versions(),
                            checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
                            quantization=quant_entry,
                            lora={"file": str(Path(lora).resolve()), "scale": lora_scale} if lora else None,
                            prompt_cache_file=PROMPT_CACHE_FILE)
        if tensorrt is not None:
            previous = _previous_trt(Path(refit_from) if refit_from else out_dir)
            manifest.tensorrt = build_tensorrt_engines(staging, manifest, tensorrt, trt_env, previous,
                                                       build=trt_builder.build if trt_builder else None,
                                                       refit=trt_builder.refit if trt_builder else None)
        write_manifest(staging, manifest)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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


def checkpoint_tokenizer(checkpoint: str):
    """The umT5 tokenizer shipped with a checkpoint (its ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    from wan_trt.checkpoints import detect_layout

    layout = detect_layout(checkpoint)
    if layout.tokenizer_file is None:
        raise BadInputError(f"checkpoint '{checkpoint}' has no {layout.tokenizer_dir / 'tokenizer.json'}: "
                            "use a download that includes the umT5 tokenizer's tokenizer.json")
    return Tokenizer.from_file(str(layout.tokenizer_file))


def _write_prompt_cache(path: Path, tokenizer, text_encoder: torch.nn.Module) -> None:
    """Text embeddings of the default prompts, so the umT5 engine runs only for a custom prompt."""
    import numpy as np

    embeds = {}
    for prompt in CACHED_PROMPTS:
        ids, mask = tokenize(tokenizer, prompt)
        with torch.no_grad():
            embeds[f"prompt_{len(embeds)}"] = text_encoder(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
    np.savez(path, prompts=np.array([clean_prompt(p) for p in CACHED_PROMPTS]), **embeds)


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


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete staging directories left by builds that were killed (their process no longer exists)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
        try:
            pid = int(stale.name.split("-")[-2])
            os.kill(pid, 0)  # raises if there is no such process
        except (ValueError, IndexError, ProcessLookupError):
            log.info("removing %s, left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` onto ``target``; an existing target is kept until the new one is in place."""
    if not target.exists():
        staging.rename(target)
        return
    backup = target.with_name(f".{target.name}.old-{int(time.time())}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
