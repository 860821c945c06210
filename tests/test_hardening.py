"""Unattended use: an interrupted build (kill -9, SIGTERM) leaves the previous engines usable, and the
media readers survive thousands of mutated files with nothing but clean validation errors."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wan_trt.cli import main
from wan_trt.demo_media import make_demo_inputs
from wan_trt.errors import BadInputError
from wan_trt.media import probe_video, read_image, read_video, write_image
from wan_trt.runtime.manifest import read_manifest


def _start_build(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wan_trt.cli", "build", "--out", str(out), "--no-verify"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_staging(out: Path, process: subprocess.Popen, timeout: float = 240.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staging = [p for p in out.parent.glob(f".{out.name}.building-*") if list(p.glob("*.onnx"))]
        if staging:
            return staging[0]
        assert process.poll() is None, "the build ended before it wrote anything"
        time.sleep(0.5)
    raise AssertionError("no staging directory appeared")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_build_keeps_previous_engines_usable(how, tiny_engines, tmp_path):
    out = Path(shutil.copytree(tiny_engines, tmp_path / "engines"))
    before = (out / "manifest.json").read_bytes()
    process = _start_build(out)
    try:
        staging = _wait_for_staging(out, process)
        process.send_signal(getattr(signal, how))
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert (out / "manifest.json").read_bytes() == before
    read_manifest(out)  # every file still matches its hash
    if how == "SIGTERM":
        assert not staging.exists(), "SIGTERM unwinds and removes the staging directory"
    else:
        assert staging.exists()  # nothing can clean up after kill -9 ...
        from wan_trt.export.staging import remove_stale_staging

        remove_stale_staging(out)  # ... so the next build removes it
        assert not staging.exists()
    inputs = make_demo_inputs(tmp_path / "in", width=48, height=32, num_frames=5)
    result = CliRunner().invoke(main, ["infer", "--engines", str(out), "--input", str(inputs), "--out",
                                       str(tmp_path / "a.mp4"), "--steps", "1", "--segment-frames", "5"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    inputs = make_demo_inputs(folder / "demo", width=32, height=32, num_frames=5, face_size=32)
    write_image(folder / "ref.png", read_image(inputs / "src_ref.png"))
    write_image(folder / "ref.jpg", read_image(inputs / "src_ref.png"))
    return {"video": (inputs / "src_pose.mp4").read_bytes(), "png": (folder / "ref.png").read_bytes(),
            "jpg": (folder / "ref.jpg").read_bytes()}


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut else buffer)


_EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12)
_CUT = st.one_of(st.none(), st.integers(0, 1 << 16))
_SETTINGS = dict(deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                       HealthCheck.too_slow], database=None, derandomize=True)


@settings(max_examples=1200, **_SETTINGS)
@given(edits=_EDITS, cut=_CUT)
def test_fuzzed_videos_fail_cleanly(seeds, tmp_path, edits, cut):
    path = tmp_path / "pose.mp4"
    path.write_bytes(_mutate(seeds["video"], edits, cut))
    for reader in (probe_video, read_video):
        try:
            reader(path, what="pose video")
        except BadInputError as error:
            assert str(path) in str(error) and "\n" not in str(error)


@settings(max_examples=900, **_SETTINGS)
@given(kind=st.sampled_from(["png", "jpg"]), edits=_EDITS, cut=_CUT)
def test_fuzzed_images_fail_cleanly(seeds, tmp_path, kind, edits, cut):
    path = tmp_path / f"ref.{kind}"
    path.write_bytes(_mutate(seeds[kind], edits, cut))
    try:
        image = read_image(path, what="reference image")
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    except BadInputError as error:
        assert str(path) in str(error) and "\n" not in str(error)
