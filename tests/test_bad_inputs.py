"""Bad input through the real command line: every case exits 2 (bad input) or 3 (engines/environment),
prints one ``wan-trt: error:`` line naming the offending path or value, and leaves nothing behind
(no output, no temporary file, no staging directory: the whole scratch tree is unchanged).

Also the pre-flight estimates (``wan_trt.preflight``): disk for an engines directory and a video,
device memory per resolution, with injected free space / free memory instead of a full disk or a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from wan_trt.runtime.manifest import GraphEntry, Manifest, file_sha256

from wan_trt import preflight
from wan_trt.cli import main
from wan_trt.demo_media import make_demo_inputs
from wan_trt.errors import BadInputError, EngineError
from wan_trt.media import read_video, write_video
from wan_trt.presets import get_preset
from wan_trt.registry import GRAPH_NAMES, GRAPHS

FAST = ["--steps", "1", "--segment-frames", "9"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_demo_inputs(tmp_path_factory.mktemp("demo") / "inputs", width=64, height=48, num_frames=13, fps=12.0)


@dataclass
class Env:
    """What a case may use: the demo inputs, the cached tiny engines, a scratch folder, monkeypatch."""

    inputs: Path
    engines: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def copy_inputs(self) -> Path:
        return Path(shutil.copytree(self.inputs, self.tmp / "in"))

    def copy_engines(self) -> Path:
        return Path(shutil.copytree(self.engines, self.tmp / "engines-copy"))

    def edit_manifest(self, engines: Path, edit: Callable[[dict], None]) -> None:
        path = engines / "manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))


@dataclass
class Case:
    argv: list[str]  # the whole command line after "wan-trt"
    named: str  # must appear in the error line
    code: int
    out: Path | None = None  # must not exist afterwards (None: the command writes nothing)
    extra: list[str] = field(default_factory=list)


CASES: dict[str, Callable[[Env], Case]] = {}


def case(function: Callable[[Env], Case]) -> Callable[[Env], Case]:
    CASES[function.__name__] = function
    return function


def _infer(env: Env, *args: str, engines: Path | None = None, named: str, code: int = 2) -> Case:
    out = env.tmp / "out" / "video.mp4"
    out.parent.mkdir(exist_ok=True)
    argv = ["infer", "--engines", str(engines or env.engines), *args]
    if "--out" not in args:
        argv += ["--out", str(out)]
    for option, value in zip(FAST[::2], FAST[1::2]):
        if option not in args:
            argv += [option, value]
    return Case(argv, named, code, out)


def _frames(path: Path) -> np.ndarray:
    return read_video(path).frames


# ----------------------------------------------------------------------------------- infer: inputs


@case
def infer_input_folder_missing(env):
    return _infer(env, "--input", str(env.tmp / "nope"), named=str(env.tmp / "nope"))


@case
def infer_input_folder_is_a_file(env):
    return _infer(env, "--input", str(env.inputs / "src_ref.png"), named="src_ref.png")


@case
def infer_face_video_missing(env):
    folder = env.copy_inputs()
    (folder / "src_face.mp4").unlink()
    return _infer(env, "--input", str(folder), named="src_face.mp4")


@case
def infer_pose_is_text_named_mp4(env):
    folder = env.copy_inputs()
    (folder / "src_pose.mp4").write_text("this is a text file, not a video\n")
    return _infer(env, "--input", str(folder), named="src_pose.mp4")


@case
def infer_pose_is_empty_file(env):
    folder = env.copy_inputs()
    (folder / "src_pose.mp4").write_bytes(b"")
    return _infer(env, "--input", str(folder), named="src_pose.mp4")


@case
def infer_pose_has_zero_frames(env):
    import av

    folder = env.copy_inputs()
    with av.open(str(folder / "src_pose.mp4"), "w", format="avi") as container:  # a stream header, no frames
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return _infer(env, "--input", str(folder), named="src_pose.mp4")


@case
def infer_ref_is_garbage(env):
    folder = env.copy_inputs()
    (folder / "src_ref.png").write_bytes(b"\x00garbage")
    return _infer(env, "--input", str(folder), named="src_ref.png")


@case
def infer_video_given_as_ref(env):
    pose = str(env.inputs / "src_pose.mp4")
    return _infer(env, "--ref", pose, "--pose", pose, "--face", str(env.inputs / "src_face.mp4"),
                  named="src_pose.mp4")


@case
def infer_image_given_as_pose(env):
    ref = str(env.inputs / "src_ref.png")
    return _infer(env, "--ref", ref, "--pose", ref, "--face", str(env.inputs / "src_face.mp4"), named="src_ref.png")


@case
def infer_frame_count_mismatch_pose_face(env):
    folder = env.copy_inputs()
    write_video(folder / "src_face.mp4", _frames(folder / "src_face.mp4")[:10], 12.0)
    return _infer(env, "--input", str(folder), named="src_face.mp4")


@case
def infer_face_crops_not_square(env):
    folder = env.copy_inputs()
    write_video(folder / "src_face.mp4", np.ascontiguousarray(_frames(folder / "src_face.mp4")[:, :, :256]), 12.0)
    return _infer(env, "--input", str(folder), named="src_face.mp4")


@case
def infer_size_not_multiple_of_16(env):
    folder = env.copy_inputs()
    write_video(folder / "src_pose.mp4", np.ascontiguousarray(_frames(folder / "src_pose.mp4")[:, :, :56]), 12.0)
    return _infer(env, "--input", str(folder), named="56x48")


def _replace_folder(env: Env, bg_frames: int) -> Path:
    folder = env.copy_inputs()
    pose = _frames(folder / "src_pose.mp4")
    write_video(folder / "src_bg.mp4", pose[:bg_frames], 12.0)
    write_video(folder / "src_mask.mp4", np.full_like(pose, 255), 12.0)
    return folder


@case
def infer_replace_background_frame_mismatch(env):
    folder = _replace_folder(env, bg_frames=7)
    return _infer(env, "--input", str(folder), "--mode", "replace", named="src_bg.mp4")


@case
def infer_replace_mask_missing(env):
    folder = _replace_folder(env, bg_frames=13)
    (folder / "src_mask.mp4").unlink()
    return _infer(env, "--input", str(folder), "--mode", "replace", named="src_mask.mp4")


@case
def infer_folder_and_files_together(env):
    return _infer(env, "--input", str(env.inputs), "--pose", str(env.inputs / "src_pose.mp4"), named="src_pose.mp4")


@case
def infer_explicit_files_incomplete(env):
    return _infer(env, "--ref", str(env.inputs / "src_ref.png"), named="src_ref.png")


# ----------------------------------------------------------------------------------- infer: values


@case
def infer_segment_frames_not_4n_plus_1(env):
    return _infer(env, "--input", str(env.inputs), "--segment-frames", "10", named="--segment-frames 10")


@case
def infer_guide_frames_not_a_choice(env):
    return _infer(env, "--input", str(env.inputs), "--guide-frames", "3", named="--guide-frames")


@case
def infer_guide_frames_not_below_segment(env):
    return _infer(env, "--input", str(env.inputs), "--guide-frames", "5", "--segment-frames", "5",
                  named="--guide-frames 5")


@case
def infer_steps_zero(env):
    return _infer(env, "--input", str(env.inputs), "--steps", "0", named="--steps")


@case
def infer_seed_negative(env):
    return _infer(env, "--input", str(env.inputs), "--seed", "-1", named="--seed")


@case
def infer_seed_not_a_number(env):
    return _infer(env, "--input", str(env.inputs), "--seed", "abc", named="--seed")


@case
def infer_guidance_scale_nan(env):
    return _infer(env, "--input", str(env.inputs), "--guidance-scale", "nan", named="--guidance-scale")


@case
def infer_guidance_scale_below_one(env):
    return _infer(env, "--input", str(env.inputs), "--guidance-scale", "0.5", named="--guidance-scale")


@case
def infer_unknown_mode(env):
    return _infer(env, "--input", str(env.inputs), "--mode", "dance", named="--mode")


@case
def infer_unknown_backend(env):
    return _infer(env, "--input", str(env.inputs), "--backend", "tvm", named="--backend")


# --------------------------------------------------------------------------------- infer: engines


@case
def infer_engines_dir_missing(env):
    return _infer(env, "--input", str(env.inputs), engines=env.tmp / "no-engines", named=str(env.tmp / "no-engines"),
                  code=3)


@case
def infer_manifest_corrupt(env):
    engines = env.copy_engines()
    (engines / "manifest.json").write_text("{ not json")
    return _infer(env, "--input", str(env.inputs), engines=engines, named=str(engines / "manifest.json"), code=3)


@case
def infer_manifest_from_newer_format(env):
    engines = env.copy_engines()
    env.edit_manifest(engines, lambda d: d.update(format_version=99))
    return _infer(env, "--input", str(env.inputs), engines=engines, named="format version 99", code=3)


@case
def infer_manifest_lacks_a_graph(env):
    engines = env.copy_engines()
    env.edit_manifest(engines, lambda d: d["graphs"].pop("motion_encoder"))
    return _infer(env, "--input", str(env.inputs), engines=engines, named="motion_encoder", code=3)


@case
def infer_engine_file_missing(env):
    engines = env.copy_engines()
    (engines / "transformer.onnx").unlink()
    return _infer(env, "--input", str(env.inputs), engines=engines, named="transformer.onnx", code=3)


@case
def infer_engine_file_edited_hash_mismatch(env):
    engines = env.copy_engines()
    data = bytearray((engines / "motion_encoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (engines / "motion_encoder.onnx").write_bytes(bytes(data))
    return _infer(env, "--input", str(env.inputs), engines=engines, named="motion_encoder.onnx", code=3)


@case
def infer_relight_without_lora_engines(env):
    return _infer(env, "--input", str(env.inputs), "--relight", named="--lora relighting_lora.ckpt", code=3)


@case
def infer_few_step_recipe_without_distillation_lora(env):
    return _infer(env, "--input", str(env.inputs), "--recipe", "lightx2v-4step",
                  named="--lora lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors:1", code=3)


@case
def infer_quantized_engines_calibrated_for_another_schedule(env):
    from wan_trt.calibration.cache import CalibrationCache
    from wan_trt.runtime.samplers import Sampling

    engines = env.copy_engines()
    env.edit_manifest(engines, lambda d: d.update(quantization={"calibration_file": "calibration.json"}))
    CalibrationCache(weights_hash="w", preset="tiny", method="max", samples=[], steps=20,
                     sampling=Sampling().to_json()).save(engines / "calibration.json")
    return _infer(env, "--input", str(env.inputs), "--sampler", "euler", engines=engines,
                  named="was made for --sampler unipc --steps 20 --shift 5")


@case
def infer_tensorrt_without_tensorrt_engines(env):
    return _infer(env, "--input", str(env.inputs), "--backend", "tensorrt", named=str(env.engines), code=3)


def _fake_tensorrt_section(engines: Path, data: dict, bucket: str) -> None:
    """A TensorRT section for one bucket whose plan files exist with matching hashes (TensorRT is not needed:
    the size check comes first)."""
    (engines / "tensorrt").mkdir()
    entries = []
    for graph in data["graphs"]:
        bucketed = GRAPHS[graph].bucketed
        file = f"tensorrt/{graph}{'.' + bucket if bucketed else ''}.plan"
        (engines / file).write_bytes(f"plan {graph}".encode())
        entries.append({"graph": graph, "bucket": bucket if bucketed else None, "file": file,
                        "sha256": file_sha256(engines / file), "onnx_sha256": data["graphs"][graph]["sha256"],
                        "key": "k", "profile": {}})
    data["tensorrt"] = {"environment": {"tensorrt_version": "10.0", "gpu_name": "none", "compute_capability": "9.0"},
                        "options": {}, "timing_cache": "tensorrt/timing.cache", "engines": entries}


@case
def infer_size_outside_every_tensorrt_bucket(env):
    engines = env.copy_engines()
    env.edit_manifest(engines, lambda d: _fake_tensorrt_section(engines, d, "128x96x9"))
    return _infer(env, "--input", str(env.inputs), "--backend", "tensorrt", engines=engines, named="64x48x9", code=3)


# ------------------------------------------------------------------------------------ infer: output


@case
def infer_out_not_mp4(env):
    return _infer(env, "--input", str(env.inputs), "--out", str(env.tmp / "video.avi"), named="video.avi")


@case
def infer_out_in_missing_folder(env):
    return _infer(env, "--input", str(env.inputs), "--out", str(env.tmp / "missing" / "dir" / "v.mp4"),
                  named=str(env.tmp / "missing" / "dir"))


@case
def infer_out_is_a_directory(env):
    (env.tmp / "taken.mp4").mkdir()
    result = _infer(env, "--input", str(env.inputs), "--out", str(env.tmp / "taken.mp4"), named="taken.mp4")
    result.out = None  # it exists before and after: the snapshot proves it is untouched
    return result


@case
def infer_out_inside_a_file(env):
    (env.tmp / "notes.txt").write_text("x")
    return _infer(env, "--input", str(env.inputs), "--out", str(env.tmp / "notes.txt" / "v.mp4"), named="notes.txt")


@case
def infer_out_in_readonly_folder(env):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = env.tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return _infer(env, "--input", str(env.inputs), "--out", str(folder / "v.mp4"), named=str(folder))


@case
def infer_not_enough_disk_for_the_video(env):
    env.monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 1000)
    return _infer(env, "--input", str(env.inputs), named=str(env.tmp / "out"))


@case
def infer_not_enough_host_memory(env):  # a CPU run: weights + ONNX Runtime's attention scores past what is free
    env.monkeypatch.setattr(preflight, "available_host_bytes", lambda: 64 * 1024**2)
    return _infer(env, "--input", str(env.inputs), named="host memory", code=3)


@case
def infer_not_enough_device_memory(env):
    env.monkeypatch.setattr(preflight, "free_device_bytes", lambda device: 64 * 1024**2)
    return _infer(env, "--input", str(env.inputs), "--device", "cuda", named="64x48", code=3)


# ------------------------------------------------------------------------------------------- build


def _build(env: Env, *args: str, named: str, code: int = 2) -> Case:
    out = env.tmp / "engines"
    argv = ["build", *args]
    if "--out" not in args:
        argv += ["--out", str(out)]
    return Case(argv + ["--no-verify"], named, code, out if "--out" not in args else None)


@case
def build_unknown_preset(env):
    return _build(env, "--preset", "huge", named="huge")


@case
def build_out_is_a_foreign_folder(env):
    foreign = env.tmp / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    return _build(env, "--out", str(foreign), named=str(foreign))


@case
def build_out_inside_a_file(env):
    (env.tmp / "notes.txt").write_text("x")
    result = _build(env, "--out", str(env.tmp / "notes.txt" / "engines"), named="notes.txt")
    result.out = env.tmp / "notes.txt" / "engines"
    return result


@case
def build_animate_14b_without_weights(env):
    return _build(env, "--preset", "animate-14b", named="--checkpoint")


@case
def build_checkpoint_missing(env):
    return _build(env, "--checkpoint", str(env.tmp / "no-weights"), named=str(env.tmp / "no-weights"))


@case
def build_bucket_malformed(env):
    return _build(env, "--backend", "tensorrt", "--bucket", "1280x720", named="1280x720")


@case
def build_bucket_not_multiple_of_16(env):
    return _build(env, "--backend", "tensorrt", "--bucket", "100x96x77", named="100x96x77")


@case
def build_bucket_without_tensorrt(env):
    return _build(env, "--bucket", "128x96x77", named="--bucket")


@case
def build_workspace_nan(env):
    return _build(env, "--backend", "tensorrt", "--workspace", "nan", named="--workspace")


@case
def build_opt_level_out_of_range(env):
    return _build(env, "--opt-level", "9", named="--opt-level")


@case
def build_seed_too_large(env):
    return _build(env, "--seed", str(2**70), named="--seed")


@case
def build_lora_missing(env):
    return _build(env, "--lora", str(env.tmp / "relight.ckpt"), named=str(env.tmp / "relight.ckpt"))


@case
def build_lora_scale_not_finite(env):
    lora = env.tmp / "relight.ckpt"
    lora.write_bytes(b"x")
    return _build(env, "--lora", f"{lora}:nan", named=f"{lora}:nan")


@case
def build_quantized_without_calibration(env):
    return _build(env, "--precision", "fp8", named="--calibration")


@case
def build_calibration_missing(env):
    return _build(env, "--precision", "int8", "--calibration", str(env.tmp / "calib.json"),
                  named=str(env.tmp / "calib.json"))


def _calibration_cache(path: Path, weights_hash: str = "0123456789abcdef") -> Path:
    path.write_text(json.dumps({"format_version": 1, "weights_hash": weights_hash, "preset": "tiny", "method": "max",
                                "percentile": None, "samples": [], "steps": 1, "layers": {}}))
    return path


@case
def build_calibration_for_other_weights(env):
    calib = _calibration_cache(env.tmp / "calib.json")
    return _build(env, "--precision", "fp8", "--calibration", str(calib), named=str(calib))


@case
def build_policy_missing(env):
    calib = _calibration_cache(env.tmp / "calib.json")
    return _build(env, "--precision", "fp8", "--calibration", str(calib), "--policy", str(env.tmp / "policy.json"),
                  named=str(env.tmp / "policy.json"))


@case
def build_policy_names_unknown_layer(env):
    calib = _calibration_cache(env.tmp / "calib.json")
    policy = env.tmp / "policy.json"
    policy.write_text(json.dumps({"keep_first_blocks": 1, "keep_last_blocks": 1, "block_layers": ["attn9.to_q"]}))
    return _build(env, "--precision", "fp8", "--calibration", str(calib), "--policy", str(policy),
                  named="attn9.to_q")


@case
def build_policy_without_quantization(env):
    return _build(env, "--policy", str(env.tmp / "policy.json"), named="--policy")


@case
def build_not_enough_disk(env):
    env.monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 1000)
    return _build(env, named=str(env.tmp))


# --------------------------------------------------------------------------------------- calibrate


def _calibrate(env: Env, *args: str, engines: Path | None = None, named: str, code: int = 2) -> Case:
    out = env.tmp / "calib.json"
    argv = ["calibrate", "--engines", str(engines or env.engines), *args]
    if "--out" not in args:
        argv += ["--out", str(out)]
    return Case(argv + ["--steps", "1", "--data", str(env.inputs)], named, code, out if "--out" not in args else None)


@case
def calibrate_few_step_recipe_without_distillation_lora(env):
    return _calibrate(env, "--recipe", "comfy-6step", named="--recipe comfy-6step needs a step-distillation LoRA",
                      code=3)


@case
def calibrate_engines_missing(env):
    return _calibrate(env, engines=env.tmp / "none", named=str(env.tmp / "none"), code=3)


@case
def calibrate_quantized_engines(env):
    engines = env.copy_engines()
    env.edit_manifest(engines, lambda d: d.update(precision="fp8"))
    return _calibrate(env, engines=engines, named=str(engines), code=3)


@case
def calibrate_data_folder_missing(env):
    return _calibrate(env, "--data", str(env.tmp / "no-data"), named=str(env.tmp / "no-data"))


@case
def calibrate_segment_frames_bad(env):
    return _calibrate(env, "--segment-frames", "12", named="--segment-frames 12")


@case
def calibrate_percentile_nan(env):
    return _calibrate(env, "--method", "percentile", "--percentile", "nan", named="--percentile")


@case
def calibrate_cuda_without_a_gpu(env):
    env.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return _calibrate(env, "--device", "cuda", named="--device cuda", code=3)


@case
def calibrate_out_is_a_directory(env):
    (env.tmp / "calib-dir").mkdir()
    return _calibrate(env, "--out", str(env.tmp / "calib-dir"), named=str(env.tmp / "calib-dir"))


# ----------------------------------------------------------------------------------- compare, inspect


@case
def compare_one_backend(env):
    return Case(["compare", "--engines", str(env.engines), "--backends", "torch"], "--backends", 2)


@case
def compare_unknown_backend(env):
    return Case(["compare", "--engines", str(env.engines), "--backends", "torch,tvm"], "tvm", 2)


@case
def compare_size_malformed(env):
    return Case(["compare", "--engines", str(env.engines), "--size", "64x48"], "64x48", 2)


@case
def compare_engines_missing(env):
    return Case(["compare", "--engines", str(env.tmp / "none")], str(env.tmp / "none"), 3)


@case
def inspect_engines_missing(env):
    return Case(["inspect", str(env.tmp / "none")], str(env.tmp / "none"), 3)


@case
def inspect_not_an_engines_dir(env):
    (env.tmp / "folder").mkdir()
    return Case(["inspect", str(env.tmp / "folder")], str(env.tmp / "folder"), 3)


@case
def inspect_engine_file_edited(env):
    engines = env.copy_engines()
    with open(engines / "transformer.onnx", "ab") as handle:
        handle.write(b"\0")
    return Case(["inspect", str(engines)], "transformer.onnx", 3)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``, files with their size and modification time (a folder's time changes when
    the pre-flight probes it for writability with a file it removes at once)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        found.update({str((Path(dirpath) / name).relative_to(root)): (0, 0) for name in dirnames})
        for name in filenames:
            stat = (Path(dirpath) / name).lstat()
            found[str((Path(dirpath) / name).relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_code_and_nothing_written(name, inputs, tiny_engines, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    env = Env(inputs, tiny_engines, work, monkeypatch)
    bad = CASES[name](env)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, bad.argv)
    errors = [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert result.exit_code == bad.code, (result.exit_code, result.stderr[-3000:])
    assert len(errors) == 1 and bad.named in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output[-3000:]
    assert bad.out is None or not bad.out.exists()
    assert _snapshot(tmp_path) == before, "nothing may be written, renamed or left behind"


def test_there_are_at_least_25_distinct_cases_over_every_command():
    assert len(CASES) >= 25
    assert {name.split("_")[0] for name in CASES} == {"infer", "build", "calibrate", "compare", "inspect"}


# ------------------------------------------------------------------------------- pre-flight estimates


def test_engines_estimate_bounds_the_real_tiny_directory_and_scales_with_the_options(tiny_engines):
    tiny = get_preset("tiny")
    counts = preflight.graph_parameter_counts(preflight.meta_modules(tiny, preflight._tiny_vocab()))
    assert set(counts) == set(GRAPH_NAMES)
    actual = sum(f.stat().st_size for f in tiny_engines.rglob("*") if f.is_file())
    estimate = preflight.estimate_engines_bytes(counts, "fp32", text_dim=tiny.text_encoder["d_model"])
    assert actual <= estimate <= 20 * actual, (actual, estimate)  # generous, not absurd
    with_trt = preflight.estimate_engines_bytes(counts, "fp32", trt_buckets=4, text_dim=tiny.text_encoder["d_model"])
    assert with_trt > 2 * estimate
    # fp8: the quantized Linears' weights at 1 byte, plus the fp32 DiT while it is rewritten
    quantized = 1000
    fp8 = preflight.estimate_engines_bytes(counts, "fp8", quantized=quantized, text_dim=tiny.text_encoder["d_model"])
    extra = counts["transformer"] * 4 - quantized * 3
    assert fp8 - estimate == pytest.approx(extra * preflight.DISK_MARGIN, abs=2)


def test_full_size_parameter_counts_and_engines_estimate():
    """The animate-14b graphs' parameters, counted on the meta device (docs/memory.md: DiT 17.3 B, umT5 5.7 B,
    CLIP 0.6 B, VAE 0.13 B) and the fp32 engines directory they need."""
    real = get_preset("animate-14b")
    modules = preflight.meta_modules(real, real.text_encoder["vocab_size"])
    counts = preflight.graph_parameter_counts(modules)
    assert counts["transformer"] + counts["motion_encoder"] == pytest.approx(17.3e9, rel=0.01)
    assert counts["text_encoder"] == pytest.approx(5.7e9, rel=0.01)
    assert counts["image_encoder"] == pytest.approx(0.63e9, rel=0.01)
    assert counts["vae_encoder_first"] + counts["vae_decoder_first"] == pytest.approx(0.127e9, rel=0.01)
    from wan_trt.calibration.policy import load_policy

    quantized = preflight.quantized_parameter_count(modules["transformer"], load_policy())
    dim, ffn = real.transformer["num_attention_heads"] * real.transformer["attention_head_dim"], real.transformer["ffn_dim"]
    # the default policy: self-attention q, k, v, out and the FFN's two Linears in 34 of the 40 blocks
    assert quantized == 34 * (4 * dim * dim + 2 * dim * ffn)
    fp32 = preflight.estimate_engines_bytes(counts, "fp32", text_dim=4096)
    assert 4 * sum(counts.values()) < fp32 < 1.2 * 4 * sum(counts.values())
    bf16 = preflight.estimate_engines_bytes(counts, "bf16", text_dim=4096)  # CLIP stays fp32
    assert 2 * sum(counts.values()) < bf16 < 0.55 * fp32
    fp8 = preflight.estimate_engines_bytes(counts, "fp8", high_precision="bf16", quantized=quantized, text_dim=4096)
    assert fp8 - bf16 == pytest.approx((2 * counts["transformer"] - quantized) * preflight.DISK_MARGIN, abs=2)


def test_disk_check_names_directory_free_and_needed(tmp_path):
    with pytest.raises(BadInputError) as info:
        preflight.check_disk(tmp_path / "new" / "engines", needed=5 * 1024**3, what="the engines", free=1024**3)
    message = str(info.value)
    assert f"'{tmp_path}'" in message and "5368709120 bytes" in message and "1073741824 bytes" in message
    preflight.check_disk(tmp_path, needed=10, what="x", free=11)  # fits
    assert preflight.free_disk_bytes(tmp_path / "not" / "yet") == shutil.disk_usage(tmp_path).free


def test_video_estimate_bounds_a_written_video(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 96, 128, 3), dtype=np.uint8)  # noise: the hardest case for x264
    write_video(tmp_path / "noise.mp4", frames, 12.0)
    per_pixel_bound = preflight.estimate_video_bytes(9, 128, 96) - preflight.VIDEO_OVERHEAD
    assert (tmp_path / "noise.mp4").stat().st_size <= per_pixel_bound + 64 * 1024  # + the container's header


def _full_size_manifest(precision: str) -> Manifest:
    """A manifest of animate-14b with file sizes = parameters × bytes (no files: sizes are all the estimate reads)."""
    real = get_preset("animate-14b")
    counts = preflight.graph_parameter_counts(preflight.meta_modules(real, real.text_encoder["vocab_size"]))
    graphs = {name: GraphEntry(spec=None, file=f"{name}.onnx", sha256="", dtype=preflight.graph_dtype(name, precision),
                               size=params * preflight.graph_bytes_per_param(name, precision))
              for name, params in counts.items()}
    return Manifest(preset=real, seed=0, weights_hash="", precision=precision, tokenizer_file="", graphs=graphs)


def test_device_estimate_reproduces_the_measured_vae_decode():
    """docs/memory.md: diffusers decodes a 720p × 77 segment in 21.5 GB (fp32) / 10.8 GB (bf16) on an H100."""
    manifest = _full_size_manifest("fp32")
    for dtype, measured in (("fp32", 21.5e9), ("bf16", 10.8e9)):  # (our bf16 builds keep the VAE in fp32 today)
        manifest.graphs["vae_decoder_step"].dtype = dtype
        estimate = preflight.estimate_device_bytes(manifest, Path("/nonexistent"), 1280, 720, 77)
        assert estimate.vae_activations == pytest.approx(measured, rel=0.1)


def test_device_memory_refusal_suggests_the_largest_smaller_bucket_that_fits():
    manifest = _full_size_manifest("bf16")
    directory = Path("/nonexistent")
    at_720p = preflight.estimate_device_bytes(manifest, directory, 1280, 720, 77, text_encoder=False)
    at_480p = preflight.estimate_device_bytes(manifest, directory, 832, 480, 77, text_encoder=False)
    assert at_480p.total < at_720p.total
    assert manifest.graphs["transformer"].size == pytest.approx(34.6e9, rel=0.01)  # docs/precision.md: the bf16 DiT's weights
    free = (at_480p.total + at_720p.total) // 2
    with pytest.raises(EngineError) as info:
        preflight.check_device_memory(manifest, directory, 1280, 720, 77, device="cuda", text_encoder=False,
                                      buckets=manifest.preset.buckets, free=free)
    assert "1280x720" in str(info.value) and "832x480" in str(info.value) and info.value.exit_code == 3
    fits = preflight.check_device_memory(manifest, directory, 832, 480, 77, device="cuda", text_encoder=False,
                                         buckets=manifest.preset.buckets, free=free)
    assert fits == at_480p
    with pytest.raises(EngineError, match="no smaller bucket fits"):
        preflight.check_device_memory(manifest, directory, 1280, 720, 77, device="cuda", text_encoder=False,
                                      buckets=manifest.preset.buckets, free=at_480p.total - 1)
    # classifier-free guidance doubles the DiT's activations; the text encoder adds its weights
    assert preflight.estimate_device_bytes(manifest, directory, 1280, 720, 77, batch=2).total > at_720p.total
    fp32 = _full_size_manifest("fp32")
    with pytest.raises(EngineError, match="fp8"):  # the real model in fp32 does not fit an 80 GB GPU at any size
        preflight.check_device_memory(fp32, directory, 1280, 720, 77, device="cuda", text_encoder=False,
                                      buckets=fp32.preset.buckets, free=80 * 10**9)


def test_bucketed_graphs_agree_with_the_bucket_rules(manifest):
    from wan_trt.buckets import is_bucketed

    assert {name for name, entry in manifest.graphs.items() if is_bucketed(entry.spec)} == {
        name for name, graph in GRAPHS.items() if graph.bucketed}
    assert set(manifest.graphs) == set(GRAPH_NAMES)


@pytest.mark.parametrize("argv, help_command", [(["badcmd"], "wan-trt --help"),
                                                 (["infer", "--bogus"], "wan-trt infer --help")])
def test_usage_errors_name_the_help_to_read(argv, help_command):
    """An unknown command or option: one line, exit 2, pointing at the right ``--help``."""
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wan-trt: error:") and f"(see {help_command})" in lines[0]
