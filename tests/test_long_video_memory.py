"""Long videos in bounded memory: the driving videos are decoded segment by segment, never whole.

The lazy reader gives exactly the pixels of a whole decode for every window the pipeline asks
for, and ``wan-trt infer`` on 300 frames (realistic 512² face crops) peaks at about the memory
of 77 frames.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from wan_trt.runtime import conditioning as cond
from wan_trt.runtime.loading import open_pipeline
from wan_trt.runtime.pipeline import GenerationRequest
from wan_trt.runtime.samplers import Sampling

from wan_trt.demo_media import make_demo_inputs
from wan_trt.driving_inputs import load_driving_inputs
from wan_trt.errors import BadInputError
from wan_trt.media import probe_video, read_video, write_image, write_video

FACE = 512  # the official preprocessing's face crop side
FPS = 25.0


def _windows(num_frames: int, segment: int, guide: int) -> list[list[int]]:
    """The frame indices each segment of the pipeline reads (ping-pong padded to whole segments)."""
    padded, segments = cond.segment_plan(num_frames, segment, guide)
    order = cond.ping_pong(num_frames, padded)
    stride = segment - guide
    return [order[k * stride:k * stride + segment] for k in range(segments)]


@pytest.mark.parametrize("num_frames, segment, guide", [(60, 13, 1), (60, 13, 5), (23, 17, 5), (7, 13, 1)])
def test_reader_windows_equal_a_whole_decode(tmp_path: Path, num_frames: int, segment: int, guide: int) -> None:
    folder = make_demo_inputs(tmp_path / "in", width=32, height=16, num_frames=num_frames, face_size=24)
    inputs = load_driving_inputs(folder)
    pose, face = read_video(folder / "src_pose.mp4").frames, read_video(folder / "src_face.mp4").frames
    for window in _windows(num_frames, segment, guide):
        got_pose, got_face = inputs.pose[window], inputs.face[window]
        np.testing.assert_array_equal(got_pose, pose[window])
        np.testing.assert_array_equal(got_face, face[window])
        assert not got_face.flags.writeable  # the reader keeps views of it for the next window
    np.testing.assert_array_equal(inputs.face.frames, face)
    np.testing.assert_array_equal(inputs.pose[3], pose[3])
    np.testing.assert_array_equal(inputs.pose[-1], pose[-1])
    np.testing.assert_array_equal(inputs.pose[2:5], pose[2:5])
    with pytest.raises(IndexError):
        inputs.pose[[num_frames]]


def test_reader_decodes_a_long_video_in_one_forward_pass(tmp_path: Path, monkeypatch) -> None:
    """Consecutive segments and the ping-pong tail come from the frames kept of the last window."""
    from wan_trt.media import VideoReader, open_video

    frames = np.stack([np.full((16, 16, 3), t % 251, np.uint8) for t in range(300)])
    path = tmp_path / "long.mp4"
    write_video(path, frames, 16, preset="ultrafast")
    whole = read_video(path).frames
    opened = []
    original = VideoReader._restart
    monkeypatch.setattr(VideoReader, "_restart", lambda self: opened.append(1) or original(self))
    for guide in (1, 5):
        reader = open_video(path)
        for window in _windows(300, 77, guide):
            np.testing.assert_array_equal(reader[window], whole[window])
        assert len(opened) == 1  # opened once, never re-opened to go back
        opened.clear()
    reader[[0]]  # going back before the kept frames re-opens the file
    assert len(opened) == 1


def test_a_size_change_is_refused_before_any_work(tmp_path: Path) -> None:
    """Checks that reading in full used to make (here: a size change) are made up front, word for word."""
    import av

    folder = tmp_path / "in"
    folder.mkdir()
    raw = b""
    for side in (32, 48):  # two H.264 elementary streams back to back: the size changes at frame 3
        part = tmp_path / f"{side}.h264"
        with av.open(str(part), "w", format="h264") as container:
            stream = container.add_stream("libx264", rate=16)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for t in range(3):
                frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 40 * t, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        raw += part.read_bytes()
    pose = folder / "src_pose.mp4"
    pose.write_bytes(raw)
    write_video(folder / "src_face.mp4", np.zeros((6, 32, 32, 3), np.uint8), 16, preset="ultrafast")
    write_image(folder / "src_ref.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(BadInputError) as whole:
        read_video(pose, what="pose video")
    assert "changes size at frame 3 from 32x32 to 48x48" in str(whole.value)
    with pytest.raises(BadInputError) as lazy:
        load_driving_inputs(folder)
    assert str(lazy.value) == str(whole.value)


def test_lazy_inputs_give_the_video_of_whole_arrays(tiny_engines: Path, tmp_path: Path) -> None:
    """Replacement mode, CFG, several segments with 5 guide frames and a ping-pong tail: bit for bit."""
    frames = 30
    folder = make_demo_inputs(tmp_path / "in", width=32, height=32, num_frames=frames, face_size=48, seed=2)
    rng = np.random.default_rng(0)
    write_video(folder / "src_bg.mp4", rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8), 16,
                preset="ultrafast")
    mask = np.zeros((frames, 32, 32, 3), np.uint8)
    for t in range(frames):
        mask[t, 6:26, 4 + t // 3:20 + t // 3] = 255
    write_video(folder / "src_mask.mp4", mask, 16, preset="ultrafast")

    lazy = load_driving_inputs(folder, mode="replace")
    whole = {name: read_video(folder / f"src_{name}.mp4").frames for name in ("pose", "face", "bg", "mask")}
    pipeline, _ = open_pipeline(tiny_engines, "onnxruntime")
    runs = []
    for pose, face, background, person in (
        (lazy.pose, lazy.face, lazy.background, lazy.mask),
        (whole["pose"], whole["face"], whole["bg"], whole["mask"][..., 0].astype(np.float32) / 255.0),
    ):
        request = GenerationRequest(ref_image=lazy.ref_image, pose_frames=pose, face_frames=face,
                                    background_frames=background, mask_frames=person, seed=4, sampling=Sampling(steps=2),
                                    segment_frames=13, guide_frames=5, guidance_scale=2.0)
        runs.append(list(pipeline.generate(request)))
    assert len(runs[0]) == cond.segment_plan(frames, 13, 5)[1] >= 3
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert torch.equal(a.latents, b.latents)


@pytest.fixture(scope="module")
def seed_video(tmp_path_factory) -> bytes:
    folder = make_demo_inputs(tmp_path_factory.mktemp("seed") / "demo", width=32, height=32, num_frames=9,
                              face_size=32)
    return (folder / "src_pose.mp4").read_bytes()


@settings(max_examples=150, deadline=5000, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_fuzzed_videos_read_lazily_as_whole_or_fail_cleanly(seed_video, tmp_path, edits, cut):
    """Whatever a damaged file holds, the lazy reader refuses it up front or gives read_video's pixels."""
    from wan_trt.media import open_video

    data = bytearray(seed_video)
    for position, value in edits:
        data[position % len(data)] = value
    path = tmp_path / "pose.mp4"
    path.write_bytes(bytes(data[:cut] if cut else data))
    try:
        whole = read_video(path, what="pose video").frames
    except BadInputError as error:
        with pytest.raises(BadInputError) as lazy:
            open_video(path, what="pose video")
        assert str(lazy.value) == str(error)
        event('refused')
        return
    event('read')
    reader = open_video(path, what="pose video")
    assert reader.shape == whole.shape
    for window in _windows(len(whole), 5, 1):
        np.testing.assert_array_equal(reader[window], whole[window])


# ru_maxrss of a fresh process's only child: the peak RSS of `wan-trt infer` alone (KiB on Linux).
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def _infer_peak_rss(engines: Path, folder: Path, out: Path) -> int:
    """Run ``wan-trt infer`` (ONNX Runtime, 1 step) in a subprocess; its peak RSS in bytes."""
    report = out.with_suffix(".rss")
    command = [sys.executable, "-c", _PEAK_RSS, str(report), sys.executable, "-m", "wan_trt.cli", "infer",
               "--engines", str(engines), "--input", str(folder), "--out", str(out), "--steps", "1", "--seed", "5"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(report.read_text()) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is KiB on Linux only")
def test_300_frames_peak_at_the_memory_of_77(tiny_engines: Path, tmp_path: Path) -> None:
    peaks = {}
    for frames in (77, 300):
        folder = make_demo_inputs(tmp_path / f"in{frames}", width=64, height=48, num_frames=frames, fps=FPS,
                                  face_size=FACE, seed=frames)
        out = tmp_path / f"out{frames}.mp4"
        peaks[frames] = _infer_peak_rss(tiny_engines, folder, out)
        info = probe_video(out)
        assert (info.num_frames, info.width, info.height) == (frames, 64, 48)
        assert info.fps == pytest.approx(FPS, abs=1e-3)
    ratio = peaks[300] / peaks[77]
    growth = peaks[300] - peaks[77]
    extra_faces = (300 - 77) * FACE * FACE * 3  # what holding the decoded face crops whole would add
    print(f"peak RSS: 77 frames {peaks[77] / 2**20:.0f} MiB, 300 frames {peaks[300] / 2**20:.0f} MiB "
          f"(x{ratio:.3f}, +{growth / 2**20:.0f} MiB; whole face crops would add {extra_faces / 2**20:.0f} MiB)")
    assert ratio <= 1.3
    assert growth <= 0.5 * extra_faces
