"""The command line end to end (build → infer → mp4 read back), the demo, and bad input:
one clear line naming the offending path, a documented exit code, and no output file left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wan_trt.cli import main
from wan_trt.demo_media import make_demo_inputs
from wan_trt.media import probe_video, read_video, write_video

FAST = ["--segment-frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_demo_inputs(tmp_path_factory.mktemp("demo") / "inputs", width=64, height=48, num_frames=13, fps=12.0)


def _wan_trt(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wan_trt.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_build_then_infer_from_the_command_line(tmp_path, inputs):
    engines = tmp_path / "engines"
    built = _wan_trt("build", "--preset", "tiny", "--out", str(engines))
    assert built.returncode == 0, built.stderr[-2000:]
    assert built.stdout.strip() == str(engines)
    assert "[8/8] exporting transformer" in built.stderr  # progress per component on stderr
    manifest = json.loads((engines / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"text_encoder", "image_encoder", "vae_encoder_first", "vae_encoder_step",
                                       "vae_decoder_first", "vae_decoder_step", "motion_encoder", "transformer"}
    assert not list(tmp_path.glob(".engines.building-*")), "the staging directory must be gone"

    out = tmp_path / "animation.mp4"
    ran = _wan_trt("infer", "--engines", str(engines), "--input", str(inputs), "--out", str(out), *FAST)
    assert ran.returncode == 0, ran.stderr[-2000:]
    video = read_video(out)
    source = probe_video(inputs / "src_pose.mp4")
    assert (video.num_frames, video.height, video.width) == (source.num_frames, source.height, source.width) == (13, 48, 64)
    assert video.fps == pytest.approx(12.0, abs=1e-3)

    # explicit files instead of the folder, on the PyTorch backend
    out_torch = tmp_path / "animation_torch.mp4"
    ran = _wan_trt("infer", "--engines", str(engines), "--ref", str(inputs / "src_ref.png"),
                   "--pose", str(inputs / "src_pose.mp4"), "--face", str(inputs / "src_face.mp4"),
                   "--out", str(out_torch), "--backend", "torch", *FAST)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert read_video(out_torch).num_frames == 13


def test_infer_compare_prints_table_and_passes(tiny_engines, inputs, tmp_path):
    out = tmp_path / "a.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                       "--out", str(out), "--compare", "torch", *FAST])
    assert result.exit_code == 0, result.output
    assert "transformer" in result.stdout and "video PSNR onnxruntime vs torch" in result.stdout
    assert "NO" not in result.stdout


def test_demo_runs_whole_flow(tiny_engines, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(tiny_engines, root / "engines")  # the export itself is covered by the build test above
    result = CliRunner().invoke(main, ["demo", "--out", str(root), "--frames", "9", "--width", "48",
                                       "--height", "32", "--steps", "2"])
    assert result.exit_code == 0, result.output
    video = read_video(root / "animation.mp4")
    assert (video.num_frames, video.height, video.width) == (9, 32, 48)


def test_infer_imports_neither_diffusers_nor_transformers(tiny_engines, inputs, tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from wan_trt.inference import InferenceOptions, run_inference\n"
        f"run_inference(InferenceOptions(engines_dir=Path({str(tiny_engines)!r}), out_path=Path({str(tmp_path / 'x.mp4')!r}),"
        f" input_dir={str(inputs)!r}, steps=1, segment_frames=9))\n"
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "x.mp4").is_file()


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _copy_inputs(inputs: Path, target: Path) -> Path:
    shutil.copytree(inputs, target)
    return target


def _case_missing_folder(inputs, tmp):
    return ["--input", str(tmp / "nope")], str(tmp / "nope"), 2


def _case_missing_face(inputs, tmp):
    folder = _copy_inputs(inputs, tmp / "in")
    (folder / "src_face.mp4").unlink()
    return ["--input", str(folder)], "src_face.mp4", 2


def _case_pose_not_a_video(inputs, tmp):
    folder = _copy_inputs(inputs, tmp / "in")
    (folder / "src_pose.mp4").write_text("not a video")
    return ["--input", str(folder)], "src_pose.mp4", 2


def _case_frame_count_mismatch(inputs, tmp):
    folder = _copy_inputs(inputs, tmp / "in")
    face = read_video(folder / "src_face.mp4")
    write_video(folder / "src_face.mp4", face.frames[:10], face.fps)
    return ["--input", str(folder)], "src_face.mp4", 2


def _case_size_not_multiple_of_16(inputs, tmp):
    folder = _copy_inputs(inputs, tmp / "in")
    pose = read_video(folder / "src_pose.mp4")
    write_video(folder / "src_pose.mp4", np.ascontiguousarray(pose.frames[:, :, :56]), pose.fps)
    return ["--input", str(folder)], "src_pose.mp4", 2


def _case_ref_not_an_image(inputs, tmp):
    folder = _copy_inputs(inputs, tmp / "in")
    (folder / "src_ref.png").write_bytes(b"\x00garbage")
    return ["--input", str(folder)], "src_ref.png", 2


def _case_engines_missing(inputs, tmp, engines=None):
    return ["--input", str(inputs), "--engines", str(tmp / "no-engines")], str(tmp / "no-engines"), 3


def _case_manifest_corrupt(inputs, tmp, engines=None):
    broken = tmp / "engines"
    shutil.copytree(engines, broken)
    (broken / "manifest.json").write_text("{ not json")
    return ["--input", str(inputs), "--engines", str(broken)], str(broken / "manifest.json"), 3


def _case_engine_file_missing(inputs, tmp, engines=None):
    broken = tmp / "engines"
    shutil.copytree(engines, broken)
    (broken / "transformer.onnx").unlink()
    return ["--input", str(inputs), "--engines", str(broken)], "transformer.onnx", 3


def _case_engine_file_changed(inputs, tmp, engines=None):
    broken = tmp / "engines"
    shutil.copytree(engines, broken)
    data = bytearray((broken / "motion_encoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (broken / "motion_encoder.onnx").write_bytes(bytes(data))
    return ["--input", str(inputs), "--engines", str(broken)], "motion_encoder.onnx", 3


def _case_mixed_input_forms(inputs, tmp):
    return ["--input", str(inputs), "--pose", str(inputs / "src_pose.mp4")], "src_pose.mp4", 2


def _case_bad_segment_frames(inputs, tmp):
    return ["--input", str(inputs), "--segment-frames", "10"], "--segment-frames", 2


BAD_CASES = [
    _case_missing_folder, _case_missing_face, _case_pose_not_a_video, _case_frame_count_mismatch,
    _case_size_not_multiple_of_16, _case_ref_not_an_image, _case_engines_missing, _case_manifest_corrupt,
    _case_engine_file_missing, _case_engine_file_changed, _case_mixed_input_forms, _case_bad_segment_frames,
]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.__name__[len("_case_"):])
def test_bad_input_is_one_clear_line_and_leaves_no_output(case, inputs, tiny_engines, tmp_path):
    kwargs = {"engines": tiny_engines} if "engines" in case.__code__.co_varnames else {}
    args, named, code = case(inputs, tmp_path, **kwargs)
    if "--engines" not in args:
        args += ["--engines", str(tiny_engines)]
    out = tmp_path / "out" / "video.mp4"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["infer", *args, "--out", str(out), "--steps", "1"])
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not any((tmp_path / "out").iterdir()), "no output (or temp) file may be left behind"


@pytest.mark.parametrize("out_name, named", [("video.avi", "video.avi"), ("missing/dir/video.mp4", "missing/dir")])
def test_bad_output_path(out_name, named, inputs, tiny_engines, tmp_path):
    out = tmp_path / out_name
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                       "--out", str(out)])
    assert result.exit_code == 2 and named in result.stderr
    assert not out.exists()


def test_build_refuses_unknown_preset_and_foreign_out_dir(tmp_path):
    result = CliRunner().invoke(main, ["build", "--preset", "huge", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "huge" in result.stderr
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    result = CliRunner().invoke(main, ["build", "--out", str(foreign)])
    assert result.exit_code == 2 and str(foreign) in result.stderr
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_animate_14b_needs_weights(tmp_path):
    result = CliRunner().invoke(main, ["build", "--preset", "animate-14b", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--checkpoint" in result.stderr
    assert not (tmp_path / "e").exists()


def test_relight_needs_engines_with_the_lora(tiny_engines, inputs, tmp_path):
    out = tmp_path / "r.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                       "--out", str(out), "--relight"])
    assert result.exit_code == 3 and "--lora relighting_lora.ckpt" in result.stderr and not out.exists()
