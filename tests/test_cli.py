"""The command line end to end (build → infer → mp4 read back) and the demo. Bad input (one clear line
naming the offending path or value, a documented exit code, nothing left behind) is in test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wan_trt.cli import main
from wan_trt.demo_media import make_demo_inputs
from wan_trt.media import probe_video, read_video

FAST = ["--segment-frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_demo_inputs(tmp_path_factory.mktemp("demo") / "inputs", width=64, height=48, num_frames=13, fps=12.0)


def _wan_trt(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wan_trt.cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


def test_build_then_infer_from_the_command_line(tiny_engines, tiny_build_log, tmp_path, inputs):
    """``wan-trt build`` as a user runs it (the subprocess that made the shared ``tiny_engines``, its output kept
    with the cache), then ``wan-trt infer`` on the directory it printed."""
    assert tiny_build_log["returncode"] == 0, tiny_build_log["stderr"][-2000:]
    engines = Path(tiny_build_log["stdout"].strip())
    assert engines == tiny_engines
    assert "[8/8] exporting transformer" in tiny_build_log["stderr"]  # progress per component on stderr
    manifest = json.loads((engines / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"text_encoder", "image_encoder", "vae_encoder_first", "vae_encoder_step",
                                       "vae_decoder_first", "vae_decoder_step", "motion_encoder", "transformer"}
    assert not list(engines.parent.glob(f".{engines.name}.building-*")), "the staging directory must be gone"

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
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "x.mp4").is_file()
