"""The ``wan-trt`` command line: build, infer, demo.

Logs and progress go to stderr; results (tables, output paths) to stdout. Every expected failure is
one line on stderr and a documented exit code (see ``wan_trt.errors``; 4 = an accuracy check of
``--compare`` failed).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from wan_trt import __version__
from wan_trt.calibration.attention import DEFAULT_SMOOTHING, SMOOTHING_MODES
from wan_trt.errors import BadInputError, EngineError, WanTrtError
from wan_trt.preflight import MEMORY_SIZE, SEED, FiniteFloatRange
from wan_trt.registry import TRANSFORMER
from wan_trt.runtime.compare import COMPONENT_TOLERANCE, graph_tolerances

log = logging.getLogger("wan_trt")

EXIT_COMPARE_FAILED = 4


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files and staging directories are cleaned up."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch", "torch.onnx", "diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class _Group(click.Group):
    """Turns WanTrtError into one line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WanTrtError as error:
            click.echo(f"wan-trt: error: {error}", err=True)
            sys.exit(error.exit_code)
        except click.UsageError as error:  # a bad option value: one line too, exit 2 as click's own
            sub = error.ctx.info_name if error.ctx and error.ctx.parent else None  # the group's own name is wan-trt
            command = f"wan-trt {sub} --help" if sub else "wan-trt --help"
            click.echo(f"wan-trt: error: {error.format_message()} (see {command})", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="wan-trt")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Deploy Wan 2.2 Animate: build engines from PyTorch, run them end to end."""
    _setup_logging(verbose)
    _exit_on_sigterm()


def _sampling_options(command):
    """``--recipe``, ``--sampler``, ``--steps``, ``--shift``, ``--sigmas``: the same for infer and calibrate
    (resolved by ``wan_trt.runtime.recipes.resolve``: the options given over the recipe over the defaults)."""
    from wan_trt.runtime.recipes import RECIPES
    from wan_trt.runtime.samplers import SAMPLERS

    options = [
        click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
                     help="Named defaults of sampler, steps, shift and guidance (docs/cli.md, \"Recipes, samplers and "
                          "schedules\"); the options given override them. The few-step ones need a step-distillation "
                          "LoRA merged (build --lora)."),
        click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=None,
                     help="Flow-matching sampler [the recipe's, else unipc]."),
        click.option("--steps", type=click.IntRange(1, 1000), default=None,
                     help="Denoising steps [the recipe's, else the preset's: 20]."),
        click.option("--shift", type=FiniteFloatRange(0.0, 100.0, min_open=True), default=None,
                     help="Noise-schedule shift [the recipe's, else the preset's: 5]."),
        click.option("--sigmas", default=None, metavar="S0,S1,...,0",
                     help="The whole schedule instead of --steps/--shift: decreasing noise levels in [0, 1], the last 0."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--preset", default="tiny", show_default=True, help="Model configuration: tiny, tiny-gpu (tiny with FP8-kernel-sized widths) or animate-14b.")
@click.option("--checkpoint", type=click.Path(), default=None, help="Directory of real weights (animate-14b).")
@click.option("--random-weights", is_flag=True, help="Random weights at full size (speed/memory work).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Merge a LoRA (e.g. relighting_lora.ckpt) into the DiT before export and quantization; repeatable, "
                   "merged in order (e.g. a 4-step distillation LoRA and the relighting LoRA); its own engine variant.")
@click.option("--lora-unmatched", type=click.Choice(["error", "warn"]), default="error", show_default=True,
              help="A --lora key that maps to no DiT parameter: error (a LoRA for another model), or warn and merge "
                   "the rest.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "all", "torch"]), default="onnxruntime",
              show_default=True, help="onnxruntime: the verified ONNX files; tensorrt/all: plus TensorRT engines; "
                                      "torch: no ONNX, only what infer --backend torch (and --fast) reads (minutes).")
@click.option("--bucket", "buckets", multiple=True,
              help="TensorRT shape bucket (--backend torch: a size --warm-up compiles for) WIDTHxHEIGHTxFRAMES, "
                   "repeatable [the preset's: 832x480, 1280x720, both orientations, x77].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--workspace", type=FiniteFloatRange(0.0, min_open=True), default=None,
              help="TensorRT workspace limit in GiB.")
@click.option("--refittable", is_flag=True, help="Refittable TensorRT engines (for LoRA weight swaps).")
@click.option("--refit-from", type=click.Path(), default=None,
              help="With --refittable: an engines directory whose refittable TensorRT engines of the same graphs "
                   "(e.g. the base weights) are refitted with this build's weights (e.g. --lora) instead of rebuilt.")
@click.option("--weight-streaming", is_flag=True, help="TensorRT weight streaming (weights larger than the GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8", "int8"]), default="fp32",
              show_default=True,
              help="fp16/bf16: the DiT, motion encoder and (bf16) umT5 in that type. fp8/int8: Q/DQ in the DiT's "
                   "Linear layers per the policy (needs --calibration), the rest in --high-precision.")
@click.option("--high-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="With fp8/int8: the float type of every layer the policy leaves unquantized (bf16 for GPUs; "
                   "ONNX Runtime's CPU provider cannot run bf16).")
@click.option("--accuracy-video/--no-accuracy-video", default=None,
              help="Measure the video PSNR vs fp32 in accuracy.json [on for presets with built-in weights; the real "
                   "model's reference video takes long on a CPU].")
@click.option("--calibration", type=click.Path(), default=None, help="Calibration cache from wan-trt calibrate.")
@click.option("--policy", type=click.Path(), default=None,
              help="Precision policy: a JSON file or a shipped name (default, every-block, all-layers) [default].")
@click.option("--smoothquant-alpha", type=FiniteFloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="INT8 SmoothQuant migration strength.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Engines directory to write.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check each ONNX graph in ONNX Runtime against PyTorch while building.")
@click.option("--warm-up/--no-warm-up", default=None,
              help="--backend torch on a CUDA GPU: compile infer --fast's kernels for each --bucket (default: the "
                   "preset's) into this machine's compile cache, so that the first video does not [on for fp8/int8].")
@click.pass_context
def build(ctx: click.Context, preset: str, checkpoint: str | None, random_weights: bool, loras: tuple[str, ...],
          lora_unmatched: str, backend: str, buckets: tuple[str, ...],
          opt_level: int, workspace: float | None, refittable: bool, weight_streaming: bool, precision: str,
          calibration: str | None, policy: str | None, smoothquant_alpha: float, seed: int, out_dir: str,
          verify: bool, high_precision: str, accuracy_video: bool | None, refit_from: str | None,
          warm_up: bool | None) -> None:
    """Export every component to ONNX and write an engines directory with a manifest (--backend torch: no
    ONNX, the manifest, tokenizer, prompt cache and calibration for the torch backend)."""
    from wan_trt.buckets import Bucket, default_buckets
    from wan_trt.calibration.quantized import QuantizationRequest
    from wan_trt.export.tensorrt import TrtOptions
    from wan_trt.preflight import check_build
    from wan_trt.presets import get_preset

    model = get_preset(preset)
    tensorrt = None
    given = {name for name in ("opt_level", "verify", "accuracy_video")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if backend in ("tensorrt", "all"):
        chosen = [Bucket.parse(b) for b in buckets] or default_buckets(model.buckets, model.segment_frames)
        tensorrt = TrtOptions(tuple(chosen), opt_level, workspace, refittable, weight_streaming)
    elif (buckets and backend != "torch") or refittable or weight_streaming or workspace or refit_from or (
            backend == "torch" and "opt_level" in given):
        raise BadInputError("--bucket/--opt-level/--refittable/--refit-from/--weight-streaming/--workspace apply to "
                            f"--backend tensorrt or all (got --backend {backend}; --bucket also to torch)")
    warm_buckets = [Bucket.parse(b) for b in buckets] if backend == "torch" else []  # bad text: exit 2 before work
    warm = _check_warm_up(warm_up, backend, precision, bool(buckets))
    if backend == "torch" and given & {"verify", "accuracy_video"}:
        raise BadInputError("--verify/--no-verify/--accuracy-video/--no-accuracy-video check ONNX graphs: "
                            "--backend torch exports none; drop them")

    quantization = None
    if precision in ("fp8", "int8"):
        if calibration is None:
            raise BadInputError(f"--precision {precision} needs --calibration CALIB (make one with wan-trt calibrate)")
        quantization = QuantizationRequest(precision, Path(calibration), Path(policy) if policy else None,
                                           smoothquant_alpha, high_precision)
    elif calibration or policy:
        raise BadInputError("--calibration/--policy apply to --precision fp8 or int8 only")
    elif high_precision != "fp32":
        raise BadInputError(f"--high-precision applies to --precision fp8 or int8 (for a {high_precision} build: "
                            f"--precision {high_precision})")
    if lora_unmatched != "error" and not loras:
        raise BadInputError(f"--lora-unmatched {lora_unmatched} applies to --lora PATH[:SCALE]: add a LoRA or drop it")
    from wan_trt.export.request import BuildRequest
    from wan_trt.lora import LoraSpec

    request = BuildRequest(model, Path(out_dir), seed=seed, checkpoint=checkpoint, random_weights=random_weights,
                           loras=tuple(LoraSpec.parse(text, lora_unmatched) for text in loras), verify=verify,
                           precision=precision if quantization is None else "fp32", quantization=quantization,
                           tensorrt=tensorrt, accuracy_video=accuracy_video,
                           refit_from=Path(refit_from) if refit_from else None)  # checks --refit-from's --refittable
    if refit_from and not (Path(refit_from) / "manifest.json").is_file():
        raise BadInputError(f"--refit-from '{refit_from}' is not an engines directory (no manifest.json): "
                            "pass a directory written by wan-trt build --backend tensorrt --refittable")
    check_build(model, request.out_dir, precision=precision, policy=policy, calibration=calibration,  # disk, files
                loras=request.loras, trt_buckets=len(tensorrt.buckets) if tensorrt else 0,
                checkpoint=checkpoint, random_weights=random_weights, high_precision=high_precision,
                graph_files=backend != "torch")
    if backend == "torch":
        from wan_trt.export.torch_build import build_torch

        out = build_torch(request)
        if warm:
            _warm_up(out, warm_buckets or default_buckets(model.buckets, model.segment_frames), asked=bool(warm_up))
        click.echo(str(out))
        return
    from wan_trt.export.build import build as build_onnx

    click.echo(str(build_onnx(request)))


def _check_warm_up(warm_up: bool | None, backend: str, precision: str, buckets: bool) -> bool:
    """Whether ``build`` warms ``infer --fast``'s compile cache (by default: fp8/int8 torch builds on a CUDA GPU);
    a request that cannot be met is one line (exit 2, or 3 without a GPU)."""
    if warm_up is not None and backend != "torch":
        raise BadInputError(f"--warm-up/--no-warm-up compile infer --fast's kernels: they apply to --backend torch "
                            f"(got --backend {backend})")
    if backend != "torch":
        return False
    from wan_trt.preflight import QUANTIZED_PRECISIONS
    from wan_trt.runtime.fast.engines import FAST_PRECISIONS

    if warm_up and precision not in FAST_PRECISIONS:
        raise BadInputError(f"--warm-up compiles infer --fast's kernels and --fast runs "
                            f"{', '.join(FAST_PRECISIONS[:-1])} and {FAST_PRECISIONS[-1]} engines (got --precision {precision}): drop --warm-up")
    warm = warm_up if warm_up is not None else precision in QUANTIZED_PRECISIONS
    if buckets and not warm:
        raise BadInputError("--bucket with --backend torch names the sizes the warm-up compiles for, and this build "
                            "does not warm up (fp32 torch builds only with --warm-up): add --warm-up or drop --bucket")
    if warm and not _cuda_available():
        if warm_up:
            raise EngineError("--warm-up compiles infer --fast's kernels on a CUDA GPU and there is none "
                              "(torch.cuda.is_available() is False): drop --warm-up")
        log.info("no CUDA GPU: infer --fast compiles its kernels on its first denoising step")
        return False
    return warm


def _warm_up(out: Path, buckets: list, asked: bool) -> None:
    """``build``'s warm-up of ``infer --fast``'s kernels for ``out``; a failure of the default one (not
    ``--warm-up``) is a warning: the engines are written and the first ``infer`` compiles what is missing."""
    import gc

    import torch

    from wan_trt.preflight import warm_up_buckets
    from wan_trt.runtime.fast.warm_up import warm_up_fast_path

    gc.collect()  # the build's modules are gone: give their memory back before asking what is free
    torch.cuda.empty_cache()
    try:
        warm_up_fast_path(out, warm_up_buckets(out, buckets))
    except (WanTrtError, torch.OutOfMemoryError) as error:
        if asked:
            raise
        log.warning("the engines in %s are written; compiling infer --fast's kernels failed (%s): the first infer "
                    "compiles them", out, str(error).splitlines()[0])


@main.command()
@click.option("--engines", "engines_dir", type=click.Path(), required=True, help="Directory from wan-trt build.")
@click.option("--input", "input_dir", type=click.Path(), default=None,
              help="Preprocessed folder (src_ref.png, src_pose.mp4, src_face.mp4).")
@click.option("--ref", type=click.Path(), default=None, help="Reference photo (instead of --input).")
@click.option("--pose", type=click.Path(), default=None, help="Skeleton video (instead of --input).")
@click.option("--face", type=click.Path(), default=None, help="Face-crop video (instead of --input).")
@click.option("--out", "out_path", type=click.Path(), required=True, help="Output .mp4 (H.264).")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="tensorrt runs on the GPU (implies --device cuda).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="cpu; cuda/tensorrt use onnxruntime-gpu's execution providers (or CUDA for --backend torch).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@_sampling_options
@click.option("--prompt", default=None, help="Text prompt [the official default].")
@click.option("--negative-prompt", default="", help="Prompt of the unconditional branch (with --guidance-scale > 1).")
@click.option("--guidance-scale", type=FiniteFloatRange(1.0, 50.0), default=None,
              help="> 1: classifier-free guidance on text and facial expression (batch 2 per DiT call) "
                   "[the recipe's, else 1: off].")
@click.option("--mode", type=click.Choice(["animate", "replace"]), default="animate", show_default=True,
              help="replace: put the character into the driving video's scene (needs src_bg.mp4, src_mask.mp4).")
@click.option("--relight", is_flag=True,
              help="Use the relighting LoRA (replacement mode): the engines must be built with --lora.")
@click.option("--background", type=click.Path(), default=None, help="Background video [src_bg.mp4 beside the pose].")
@click.option("--mask", type=click.Path(), default=None, help="Person mask video [src_mask.mp4 beside the pose].")
@click.option("--guide-frames", type=click.Choice(["1", "5"]), default="1", show_default=True,
              help="Frames of temporal guidance between segments.")
@click.option("--segment-frames", type=int, default=None, help="Frames per segment, 4n+1 [preset: 77].")
@click.option("--compare", type=click.Choice(["torch"]), default=None,
              help="Also run the PyTorch reference and print per-component errors; exit 4 past tolerance.")
@click.option("--fallback", type=click.Choice(["torch"]), default=None,
              help="Re-run an engine call that produced NaN/Inf on the PyTorch reference instead of failing.")
@click.option("--gpus", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Sequence-parallel DiT over N processes, one GPU each (torchrun, NCCL; --backend torch). "
                   "N must divide the DiT's attention heads (40: 2, 4, 5, 8, ...). With --device cpu: N gloo processes.")
@click.option("--fast", is_flag=True,
              help="--backend torch --device cuda only: bf16, FP8 _scaled_mm Linears and FP8 attention (fp8 "
                   "engines) or INT8 _int_mm Linears (int8 engines: GPUs without FP8), compiled glue, encoders "
                   "released after use (docs/precision.md).")
@click.option("--fp8-attention-kernel", type=click.Choice(["auto", "cudnn", "fa3"]), default="auto", show_default=True,
              help="With --fast: the attention kernels. fa3 = FlashAttention-3 (flash_attn_3, Hopper) for the FP8 "
                   "self-attention and for the bf16 one (fp32 engines, policy-kept blocks); cudnn = cuDNN's FP8 "
                   "attention and SDPA; auto takes FA3 where it is installed.")
@click.option("--fp8-attention-smoothing", type=click.Choice(["auto", *SMOOTHING_MODES]), default="auto",
              show_default=True,
              help="With --fast and fp8 engines: subtract the token mean of k and/or v before the FP8 attention "
                   "(exact in real arithmetic; v's mean is added back to the output). Cuts the FP8 attention's "
                   f"error (docs/precision.md); none = plain per-tensor FP8; auto = {DEFAULT_SMOOTHING} where "
                   "the calibration cache has its ranges, else none (logged).")
@click.option("--max-gpu-memory", type=MEMORY_SIZE, default=None, metavar="SIZE",
              help="With --fast: keep the run under SIZE of GPU memory (e.g. 24GiB, 22.5GB): when the model does not "
                   "fit, the DiT's blocks wait in pinned host memory and are copied to the GPU a block ahead of "
                   "use; a SIZE too small for any plan is refused, naming the smallest that works (docs/memory.md).")
@click.option("--clip-preprocess", type=click.Choice(["original", "diffusers"]), default="original", show_default=True,
              help="CLIP input: original = the letter-boxed photo squashed to 224² (official Wan code); diffusers = "
                   "the raw photo's short side to 224 and centre-cropped (diffusers' WanAnimatePipeline).")
@click.option("--timings", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
              help="Also write the run's seconds per stage (load, encoders, VAE, DiT, mp4) and memory peaks as JSON "
                   "(the same figures as the last log line).")
def infer(engines_dir: str, input_dir: str | None, ref: str | None, pose: str | None, face: str | None,
          out_path: str, backend: str, device: str, seed: int, recipe: str | None, sampler: str | None,
          steps: int | None, shift: float | None, sigmas: str | None, prompt: str | None,
          negative_prompt: str, guidance_scale: float | None, mode: str, relight: bool, background: str | None,
          mask: str | None,
          guide_frames: str, segment_frames: int | None, compare: str | None, fallback: str | None,
          gpus: int, fast: bool, fp8_attention_kernel: str, fp8_attention_smoothing: str, max_gpu_memory: int | None,
          clip_preprocess: str, timings: str | None) -> None:
    """Animate a reference photo with a driving skeleton and face video; write an mp4."""
    from wan_trt.inference import InferenceOptions, run_inference
    from wan_trt.runtime.options import RuntimeOptions

    runtime = RuntimeOptions(backend=backend, device=device, gpus=gpus, fast=fast,
                             fp8_attention_kernel=fp8_attention_kernel, fp8_attention_smoothing=fp8_attention_smoothing,
                             max_gpu_memory=max_gpu_memory)
    options = InferenceOptions(
        engines_dir=Path(engines_dir), out_path=Path(out_path), runtime=runtime, seed=seed,
        steps=steps, prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale, mode=mode,
        relight=relight, guide_frames=int(guide_frames), segment_frames=segment_frames, compare=compare,
        fallback=fallback, input_dir=input_dir, ref=ref, pose=pose, face=face, background=background, mask=mask,
        clip_preprocess=clip_preprocess, recipe=recipe, sampler=sampler, shift=shift, sigmas=sigmas,
        timings=timings,
    )
    if gpus > 1:  # torchrun workers (wan_trt.launch); rank 0 writes the mp4
        from wan_trt.launch import launch_infer

        code = launch_infer(options)
        if code:
            sys.exit(code)
        report = None
    else:
        report = run_inference(options)
    _finish(out_path, report)


@main.command()
@click.option("--engines", "engines_dir", type=click.Path(), required=True,
              help="fp32 engines directory (its manifest names the weights to calibrate).")
@click.option("--data", type=click.Path(), multiple=True,
              help="Preprocessed folder(s) to calibrate on; repeatable [synthetic demo samples].")
@click.option("--out", "out_path", type=click.Path(), required=True, help="Calibration cache (JSON) to write.")
@_sampling_options
@click.option("--method", type=click.Choice(["max", "percentile", "mse", "entropy"]), default="max", show_default=True,
              help="Range per tensor: largest |x|; largest per-call percentile; least quantization error for "
                   "--target over a histogram; INT8 KL-divergence search (TensorRT's entropy calibration).")
@click.option("--percentile", type=FiniteFloatRange(50.0, 100.0), default=99.99, show_default=True)
@click.option("--target", type=click.Choice(["fp8", "int8"]), default="fp8", show_default=True,
              help="--method mse: the format the error is minimised for (the cache then builds only that precision).")
@click.option("--guidance-scale", type=FiniteFloatRange(1.0), default=None,
              help="> 1: calibrate with classifier-free guidance on, observing both branches [the recipe's, else 1].")
@click.option("--segment-frames", type=int, default=None, help="Frames per segment, 4n+1 [preset: 77].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the bf16 reference rebuilt on one GPU (the ranges of bf16 activations; docs/precision.md).")
@click.option("--dtype", type=click.Choice(["auto", "bf16"]), default="auto", show_default=True,
              help="The DiT's arithmetic: auto = bf16 on cuda, the engines' own on the CPU (fp32 engines: fp32); "
                   "bf16 on the CPU runs the GPU's code path.")
def calibrate(engines_dir: str, data: tuple[str, ...], out_path: str, recipe: str | None, sampler: str | None,
              steps: int | None, shift: float | None, sigmas: str | None, method: str, percentile: float, target: str,
              guidance_scale: float | None, segment_frames: int | None, device: str, dtype: str) -> None:
    """Record the DiT's activation and attention ranges over every denoising step of the calibration samples
    (and the VAE convolutions' input ranges)."""
    import tempfile

    from wan_trt.calibration.collect import check_calibration_device, run_calibration
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.preflight import check_calibrate
    from wan_trt.runtime.recipes import resolve
    from wan_trt.runtime.manifest import read_manifest

    sampling = dict(recipe=recipe, sampler=sampler, steps=steps, shift=shift, sigmas=sigmas,
                    guidance_scale=guidance_scale)
    resolve(**sampling)  # bad values fail before the engines are read
    check_calibration_device(device, dtype)
    manifest = read_manifest(Path(engines_dir))  # the run's one read
    check_calibrate(manifest, Path(engines_dir), Path(out_path), segment_frames)
    with tempfile.TemporaryDirectory(prefix="wan-trt-calib-") as scratch:
        folders = [Path(d) for d in data]
        if not folders:
            log.info("no --data given: calibrating on 2 synthetic demo samples")
            folders = [make_demo_inputs(Path(scratch) / f"sample{i}", seed=i, num_frames=21) for i in range(2)]
        run_calibration(Path(engines_dir), folders, Path(out_path), method=method, percentile=percentile,
                        segment_frames=segment_frames, target=target, device=device, dtype=dtype, manifest=manifest,
                        **sampling)
    click.echo(out_path)


@main.command()
@click.option("--out", "out_dir", type=click.Path(), default="wan-trt-demo", show_default=True,
              help="Folder for the demo inputs, engines and animation.")
@click.option("--frames", type=click.IntRange(1, 1000), default=77, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
@click.option("--height", type=int, default=96, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--compare", type=click.Choice(["torch"]), default="torch", show_default=True,
              help="Check the engines against PyTorch as part of the demo.")
def demo(out_dir: str, frames: int, width: int, height: int, steps: int, compare: str | None) -> None:
    """Make synthetic inputs, build the tiny preset's ONNX engines and animate: the whole flow on a CPU."""
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.export.build import BuildRequest, build as build_onnx
    from wan_trt.inference import InferenceOptions, run_inference
    from wan_trt.presets import get_preset
    from wan_trt.runtime.manifest import MANIFEST_NAME

    root = Path(out_dir)
    inputs = root / "inputs"
    if not (inputs / "src_pose.mp4").is_file():
        log.info("making demo inputs in %s", inputs)
        make_demo_inputs(inputs, width=width, height=height, num_frames=frames)
    engines = root / "engines"
    if not (engines / MANIFEST_NAME).is_file():
        build_onnx(BuildRequest(get_preset("tiny"), engines))
    out_path = root / "animation.mp4"
    report = run_inference(InferenceOptions(engines_dir=engines, out_path=out_path, input_dir=str(inputs),
                                            steps=steps, compare=compare))
    _finish(out_path, report)


@main.command()
@click.option("--engines", "engines_dir", type=click.Path(), required=True)
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma-separated; the first is the reference (torch, onnxruntime, tensorrt).")
@click.option("--size", default=None, help="WIDTHxHEIGHTxFRAMES of the inputs [the smallest bucket].")
@click.option("--seed", type=SEED, default=0, show_default=True)
def compare(engines_dir: str, backends: str, size: str | None, seed: int) -> None:
    """Every graph on several backends at the same fixed inputs (Polygraphy Comparator + error stats)."""
    from wan_trt.buckets import Bucket
    from wan_trt.components import segment_sizes
    from wan_trt.preflight import check_backends
    from wan_trt.runtime.compare import backend_table, compare_backends
    from wan_trt.runtime.engines import BACKENDS
    from wan_trt.runtime.loading import load_engines
    from wan_trt.runtime.manifest import read_manifest

    directory = Path(engines_dir)
    manifest = read_manifest(directory)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if len(names) < 2:
        raise BadInputError(f"--backends '{backends}': name at least two, e.g. torch,onnxruntime")
    check_backends(names, BACKENDS)
    bucket = Bucket.parse(size) if size else min(Bucket(w, h, manifest.preset.segment_frames)
                                                  for w, h in manifest.preset.buckets)
    engines = {name: load_engines(directory, manifest, name, "cuda" if name == "tensorrt" else "cpu") for name in names}
    rows = compare_backends(engines, segment_sizes(bucket.frames, bucket.height, bucket.width), seed=seed)
    click.echo(backend_table(rows, names[0]))
    tolerances = graph_tolerances(manifest)
    bad = [r for r in rows if r.rel_l2 > tolerances.get(r.graph, COMPONENT_TOLERANCE)]
    if bad:
        click.echo(f"wan-trt: error: {len(bad)} outputs past their rel-L2 tolerance, e.g. {bad[0].graph}.{bad[0].output} "
                   f"on {bad[0].backend}: {bad[0].rel_l2:.2e} > {tolerances.get(bad[0].graph, COMPONENT_TOLERANCE):g}",
                   err=True)
        sys.exit(EXIT_COMPARE_FAILED)


@main.command()
@click.argument("engines_dir", type=click.Path())
def inspect(engines_dir: str) -> None:
    """Print the LoRAs merged into an engines directory, each graph, and the precision of every DiT Linear layer
    and self-attention."""
    from wan_trt.calibration.qdq import layer_precisions
    from wan_trt.runtime.recipes import manifest_loras
    from wan_trt.runtime.manifest import read_manifest

    directory = Path(engines_dir)
    manifest = read_manifest(directory)
    click.echo(f"preset {manifest.preset.name}, precision {manifest.precision}, weights {manifest.weights_hash}, "
               f"backends {', '.join(manifest.served_backends())}")
    loras = manifest_loras(manifest)
    click.echo(f"LoRAs merged: {'; '.join(loras) if loras else 'none'}")
    for name, entry in manifest.graphs.items():
        where = f"{entry.file:<24} {entry.size / 1e6:9.2f} MB" if entry.file else f"(no file: torch, {entry.dtype})"
        click.echo(f"  {name:<20} {where}")
    click.echo("DiT Linear layers and self-attention matmuls:")
    entry = manifest.graphs[TRANSFORMER]
    if entry.file:
        precisions = layer_precisions(directory / entry.file, entry.dtype)
    else:
        from wan_trt.calibration.quantized import planned_layer_precisions

        precisions = planned_layer_precisions(manifest)
    for path, precision in precisions.items():
        click.echo(f"  {precision:<5} {path}")


@main.command()
@click.option("--video", type=click.Path(), required=True, help="Driving video (the motion and expressions).")
@click.option("--ref", type=click.Path(), required=True, help="Reference photo (the character).")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Preprocessed folder to write.")
@click.option("--mode", type=click.Choice(["animate", "replace"]), default="animate", show_default=True,
              help="replace: also write src_bg.mp4 and src_mask.mp4.")
@click.option("--resolution", default="1280x720", show_default=True,
              help="WIDTHxHEIGHT whose area bounds the output size (multiples of 16, aspect kept).")
@click.option("--retarget/--no-retarget", default=None,
              help="Fit the driving skeleton to the reference person's size and place [on for animate].")
@click.option("--max-gap", type=click.IntRange(0, None), default=None,
              help="Frames in a row without a detected person that are bridged [one second].")
def preprocess(video: str, ref: str, out_dir: str, mode: str, resolution: str, retarget: bool | None,
               max_gap: int | None) -> None:
    """Raw driving video + reference photo -> the preprocessed folder (needs the [preprocess] extra)."""
    from wan_trt.preprocess import preprocess as run_preprocess

    try:
        res_w, res_h = (int(v) for v in resolution.lower().split("x"))
        if res_w <= 0 or res_h <= 0:
            raise ValueError
    except ValueError:
        raise BadInputError(f"--resolution {resolution!r}: give WIDTHxHEIGHT, e.g. 1280x720") from None
    result = run_preprocess(video, ref, out_dir, mode=mode, resolution=(res_w, res_h), retarget=retarget,
                            max_gap=max_gap)
    click.echo(str(result.folder))


def _finish(out_path: Path, report) -> None:
    """Print the output path and the --compare table; exit 4 if the comparison failed."""
    click.echo(str(out_path))
    if report is not None:
        click.echo(report.table())
        if not report.passed:
            click.echo(f"wan-trt: error: --compare torch: {report.failure_summary()}", err=True)
            sys.exit(EXIT_COMPARE_FAILED)


if __name__ == "__main__":  # pragma: no cover
    main()
