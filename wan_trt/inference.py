"""``wan-trt infer``: validate everything cheap first, then run the pipeline and stream the mp4."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wan_trt.background_writer import BackgroundWriter
from wan_trt.driving_inputs import DrivingInputs, load_driving_inputs
from wan_trt.errors import BadInputError, EngineError
from wan_trt.json_files import write_json_atomic
from wan_trt.media import VideoWriter
from wan_trt.metrics import psnr
from wan_trt.preflight import check_infer
from wan_trt.presets import DEFAULT_PROMPT, OFFICIAL_FACE_SIZE, Preset
from wan_trt.registry import TRANSFORMER
from wan_trt.runtime.compare import CompareReport, RecordingEngine, compare_components, graph_tolerances
from wan_trt.launch import is_main_rank
from wan_trt.runtime.guard import guard_engines
from wan_trt.runtime.loading import pipeline_for, torch_engines
from wan_trt.runtime.options import RuntimeOptions
from wan_trt.runtime.recipes import Settings, check_recipe_engines, resolve
from wan_trt.runtime.manifest import Manifest, built_with, read_manifest, require_backend
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest
from wan_trt.runtime.samplers import Sampling
from wan_trt.runtime.run_report import RunReport, format_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """``wan-trt infer``'s options, made once by the command line. The rules between them are checked when it
    is made (those between the backend, device, ``--fast`` and ``--gpus``: :class:`RuntimeOptions`)."""

    engines_dir: Path
    out_path: Path
    runtime: RuntimeOptions = RuntimeOptions()  # backend, device, --gpus, --fast: what opens the engines
    seed: int = 0
    steps: int | None = None  # None: the recipe's, else the preset's (wan_trt.runtime.recipes.resolve)
    prompt: str | None = None
    negative_prompt: str = ""
    guidance_scale: float | None = None  # None: the recipe's, else 1 (no CFG)
    mode: str = "animate"
    relight: bool = False  # the engines must carry a merged LoRA (wan-trt build --lora relighting_lora.ckpt)
    guide_frames: int = 1
    segment_frames: int | None = None
    compare: str | None = None
    fallback: str | None = None  # "torch": re-run a call that produced NaN/Inf on the PyTorch reference
    input_dir: str | None = None
    ref: str | None = None
    pose: str | None = None
    face: str | None = None
    background: str | None = None
    mask: str | None = None
    clip_preprocess: str = "original"  # --clip-preprocess: CLIP input convention (wan_trt.runtime.conditioning)
    recipe: str | None = None  # --recipe: named sampling defaults (wan_trt.runtime.recipes)
    sampler: str | None = None  # --sampler unipc|euler|dpmpp [the recipe's, else unipc]
    shift: float | None = None  # --shift [the recipe's, else the preset's]
    sigmas: str | None = None  # --sigmas: the whole schedule, comma-separated, ending at 0
    timings: str | None = None  # --timings FILE.json: the run's seconds per stage and memory peaks

    def __post_init__(self) -> None:
        gpus = self.runtime.gpus
        if gpus > 1 and (self.compare or self.fallback):
            raise BadInputError(f"--gpus {gpus} cannot be combined with --compare or --fallback yet: "
                                "run them on one GPU")
        self.sampling()  # the recipe and sampling options fit together (before any file is read)

    def to_json(self) -> dict:
        """The options as JSON values (``infer --gpus N`` hands them to its workers: ``wan_trt.launch``)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_json(cls, data: dict) -> InferenceOptions:
        return cls(**{**data, "engines_dir": Path(data["engines_dir"]), "out_path": Path(data["out_path"]),
                      "runtime": RuntimeOptions(**data["runtime"])})

    def sampling(self, preset: Preset | None = None) -> Settings:
        """The recipe and the sampling options resolved (over ``preset``'s defaults where given)."""
        return resolve(self.recipe, sampler=self.sampler, steps=self.steps, shift=self.shift, sigmas=self.sigmas,
                       guidance_scale=self.guidance_scale, preset=preset)


def run_inference(options: InferenceOptions) -> CompareReport | None:
    """Generate the animation into ``options.out_path``; with ``compare``, also return the error report."""
    report = RunReport()
    runtime = options.runtime
    _check_output_path(options.out_path)
    manifest = read_manifest(options.engines_dir)  # the run's one read; before any video: a bad directory fails fast
    require_backend(options.engines_dir, manifest, runtime.backend)
    settings = options.sampling(manifest.preset)
    check_recipe_engines(settings, manifest, options.engines_dir, built_with(manifest))
    _check_calibrated_schedule(options.engines_dir, manifest, settings.sampling)
    options = replace(options, guidance_scale=settings.guidance_scale)
    log.info("sampling: %s, guidance scale %g%s", settings.sampling.describe(), settings.guidance_scale,
             f" (recipe {settings.recipe.name})" if settings.recipe else "")
    if options.relight and not manifest.loras:
        raise EngineError(f"--relight: the engines in '{options.engines_dir}' have no LoRA merged; build the relighting "
                          f"variant with: wan-trt build --lora relighting_lora.ckpt --out ENGINES_RELIGHT")
    if manifest.loras and not options.relight:
        log.info("these engines carry merged LoRAs: %s",
                 ", ".join(f"{record['file']} (scale {record['scale']:g})" for record in manifest.loras))
    inputs = load_driving_inputs(options.input_dir, ref=options.ref, pose=options.pose, face=options.face,
                                 mode=options.mode, background=options.background, mask=options.mask)
    preset = manifest.preset
    segment_frames = options.segment_frames or preset.segment_frames
    if segment_frames < 5 or (segment_frames - 1) % 4:
        raise BadInputError(f"--segment-frames {segment_frames}: must be 4n+1 and at least 5 (e.g. 77)")
    if options.guide_frames >= segment_frames:
        raise BadInputError(f"--guide-frames {options.guide_frames} must be smaller than --segment-frames {segment_frames}")
    _check_resolution(inputs, preset.transformer["rope_max_seq_len"])
    streamed = check_infer(options, manifest, inputs.width, inputs.height, inputs.num_frames, segment_frames)
    if streamed is not None:  # --max-gpu-memory's plan: loaded on the host, this many DiT blocks stream from it
        runtime = replace(runtime, stream_blocks=streamed)
        options = replace(options, runtime=runtime)
    if inputs.face.width != OFFICIAL_FACE_SIZE:
        log.warning("face crops are %dx%d, the official format has %dx%d; resizing them to the model's %dx%d",
                    inputs.face.width, inputs.face.height, OFFICIAL_FACE_SIZE, OFFICIAL_FACE_SIZE,
                    preset.face_size, preset.face_size)
    request = GenerationRequest(
        ref_image=inputs.ref_image, pose_frames=inputs.pose, face_frames=inputs.face,  # decoded segment by segment
        prompt=options.prompt if options.prompt is not None else DEFAULT_PROMPT, seed=options.seed,
        negative_prompt=options.negative_prompt, guidance_scale=options.guidance_scale,
        background_frames=inputs.background,
        mask_frames=inputs.mask,
        sampling=settings.sampling, segment_frames=segment_frames, guide_frames=options.guide_frames,
        clip_preprocess=options.clip_preprocess,
    )

    device = runtime.engine_device
    pipeline = pipeline_for(options.engines_dir, manifest, runtime)
    if runtime.gpus > 1:  # one rank of `infer --gpus N`: the DiT runs sequence-parallel over the process group
        from wan_trt.runtime.sequence_parallel import shard_dit_engine

        shard_dit_engine(pipeline.engines[TRANSFORMER])
    fallback = (lambda: torch_engines(manifest, device, options.engines_dir)) if options.fallback == "torch" else None
    pipeline.engines = guard_engines(report.time(pipeline.engines), fallback)
    recorders = None
    if options.compare:
        recorders = {name: RecordingEngine(engine) for name, engine in pipeline.engines.items()}
        pipeline = AnimatePipeline(recorders, preset, pipeline.tokenize, pipeline.prompt_cache)
    frames = _generate_to_file(pipeline, request, options.out_path, inputs.fps, runtime.backend,
                               keep=bool(options.compare), report=report)
    if is_main_rank():
        summary = report.summary(cuda=device != "cpu")
        if runtime.fast:  # where the first step's warm-up went
            from wan_trt.runtime.fast.engines import warm_up_seconds

            summary.update(warm_up_seconds())
        log.info("%s", format_summary(summary))
        if options.timings:
            write_json_atomic(Path(options.timings), {"engines": str(options.engines_dir), "backend": runtime.backend,
                                                      "device": device, "fast": runtime.fast, **summary})
    if not options.compare:
        return None

    log.info("--compare torch: running the PyTorch reference on the same inputs")
    reference = torch_engines(manifest, runtime.device, options.engines_dir)
    report = CompareReport(backend=runtime.backend,
                           rows=compare_components(recorders, reference, graph_tolerances(manifest)))
    reference_pipeline = AnimatePipeline(reference, preset, pipeline.tokenize, pipeline.prompt_cache)
    reference_frames = np.concatenate([s.frames for s in _with_progress(reference_pipeline, request, "torch")])
    report.video_psnr = psnr(frames, reference_frames)
    return report


# x264's macroblock tree makes the bitstream depend on thread timing; off, the same frames give the same bytes
DETERMINISTIC_X264 = {"x264-params": "mbtree=0"}


def _generate_to_file(pipeline: AnimatePipeline, request: GenerationRequest, out_path: Path, fps: float,
                      label: str, keep: bool, report: RunReport | None = None) -> np.ndarray | None:
    """Run the pipeline, streaming each decoded chunk's frames into the mp4 (atomic) on a thread as it comes.

    Memory does not grow with the video's length unless ``keep`` (for ``--compare``) holds all frames.
    """
    if not is_main_rank():  # `infer --gpus N`: every rank denoises, rank 0 writes
        for _ in _with_progress(pipeline, request, label, report):
            pass
        return None
    height, width = request.pose_frames.shape[1:3]
    produced = []
    with VideoWriter(out_path, width=width, height=height, fps=fps, options=DETERMINISTIC_X264) as writer, \
            BackgroundWriter(writer) as background:  # each chunk encoded while the next ones decode
        for segment in _with_progress(pipeline, replace(request, on_frames=background.write), label, report):
            if keep:
                produced.append(segment.frames)
    if report is not None:  # the with block's end waited for the last frames
        report.writing = background.waited
    return np.concatenate(produced) if keep else None


def _with_progress(pipeline: AnimatePipeline, request: GenerationRequest, label: str,
                   report: RunReport | None = None):
    bar = tqdm(desc=f"denoising ({label})", unit="step", leave=False, dynamic_ncols=True, disable=not is_main_rank())

    def on_step(segment: int, segments: int, step: int, steps: int) -> None:
        bar.total = segments * steps
        bar.set_postfix_str(f"segment {segment + 1}/{segments}")
        bar.update(1)
        if report is not None:
            report.step_done()

    try:
        yield from pipeline.generate(replace(request, on_step=on_step))
    finally:
        bar.close()


def _check_calibrated_schedule(directory: Path, manifest: Manifest, sampling: Sampling) -> None:
    """Quantized engines run the schedule their calibration cache observed (``CalibrationCache.check_schedule``)."""
    quantization = manifest.quantization
    if quantization and quantization.get("calibration_file"):
        from wan_trt.calibration.cache import load_cache

        path = directory / quantization["calibration_file"]
        load_cache(path).check_schedule(sampling, path)


def _check_output_path(out_path: Path) -> None:
    if out_path.suffix.lower() != ".mp4":
        raise BadInputError(f"--out '{out_path}' must end in .mp4")
    if out_path.is_dir():
        raise BadInputError(f"--out '{out_path}' is a directory: give a file name ending in .mp4")
    if not out_path.parent.exists():
        raise BadInputError(f"--out '{out_path}': folder '{out_path.parent}' does not exist; create it first")


def _check_resolution(inputs: DrivingInputs, max_positions: int) -> None:
    """The DiT's RoPE tables cover ``max_positions`` tokens per axis (height/16, width/16)."""
    limit = max_positions * 16
    if inputs.height > limit or inputs.width > limit:
        raise BadInputError(
            f"pose video '{inputs.source}' is {inputs.width}x{inputs.height}: this model supports at most "
            f"{limit} pixels per side; preprocess it to a smaller resolution"
        )
