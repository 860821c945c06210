"""Tests for wan_trt.media, wan_trt.driving_inputs and wan_trt.demo_media.

Videos are kept tiny (a few frames, tens of pixels) so the suite runs in seconds on a
loaded 2-core machine; one test builds the default-sized demo folder.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wan_trt.demo_media import BODY_KEYPOINTS, BODY_LIMBS, make_demo_inputs, pose_keypoints
from wan_trt.driving_inputs import DrivingInputs, load_driving_inputs, nearest_valid_size
from wan_trt.errors import BadInputError
from wan_trt.media import (
    Video,
    VideoInfo,
    VideoSizeError,
    VideoWriter,
    probe_video,
    read_image,
    read_video,
    write_image,
    write_video,
)


# --------------------------------------------------------------------------- helpers


def smooth_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth, moving colour gradients: easy for H.264, so PSNR should be high."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        ph = rng.uniform(0, 0.3) + i * 0.15
        r = 128 + 90 * np.sin(x / w * 2 * np.pi + ph)
        g = 128 + 90 * np.cos(y / h * 2 * np.pi - ph)
        b = 128 + 60 * np.sin((x + y) / (w + h) * 2 * np.pi + 2 * ph)
        out[i] = np.stack([r, g, b], -1).round().astype(np.uint8)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_bad(exc_info: pytest.ExceptionInfo, path: os.PathLike | str) -> str:
    msg = str(exc_info.value)
    assert os.fspath(path) in msg, msg
    assert "\n" not in msg, msg
    assert ": " in msg, msg  # "<what> '<path>' <problem>: <fix>"
    assert exc_info.value.exit_code == 2
    return msg


def make_folder(
    root: Path,
    *,
    pose_wh: tuple[int, int] = (32, 16),
    face_wh: tuple[int, int] = (16, 16),
    n_pose: int = 3,
    n_face: int | None = None,
    fps: float = 16.0,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n_face = n_pose if n_face is None else n_face
    write_image(root / "src_ref.png", np.full((20, 12, 3), 200, np.uint8))
    pw, ph = pose_wh
    fw, fh = face_wh
    write_video(root / "src_pose.mp4", smooth_frames(n_pose, ph, pw, seed=1), fps, preset="ultrafast")
    write_video(root / "src_face.mp4", smooth_frames(n_face, fh, fw, seed=2), fps, preset="ultrafast")
    return root


def leftovers(folder: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- video round trip


@pytest.mark.parametrize("fps", [30.0, 23.976, 16.0, 12.5])
def test_write_read_round_trip(tmp_path: Path, fps: float) -> None:
    frames = smooth_frames(9, 48, 64)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps)
    video = read_video(path)
    assert isinstance(video, Video)
    assert video.frames.dtype == np.uint8
    assert video.frames.shape == frames.shape
    assert (video.num_frames, video.height, video.width) == (9, 48, 64)
    assert video.fps == pytest.approx(fps, abs=1e-3)
    assert psnr(video.frames, frames) >= 30.0
    # Frame order is kept: each decoded frame is closest to its own source frame.
    for i in range(len(frames)):
        errors = [np.abs(video.frames[i].astype(int) - f).mean() for f in frames]
        assert int(np.argmin(errors)) == i
    assert leftovers(tmp_path) == ["clip.mp4"]


def test_ntsc_rate_is_stored_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ntsc.mp4"
    write_video(path, smooth_frames(4, 16, 16), 23.976)
    assert read_video(path).fps == pytest.approx(24000 / 1001, abs=1e-9)


def test_video_writer_streams_chunks_and_single_frames(tmp_path: Path) -> None:
    frames = smooth_frames(7, 32, 48)
    path = tmp_path / "streamed.mp4"
    with VideoWriter(path, width=48, height=32, fps=24, crf=10, preset="ultrafast") as writer:
        writer.write(frames[:3])
        writer.write(frames[3])  # [H, W, 3]
        writer.write(frames[4:])
        assert not path.exists()  # nothing at the target until the writer closes
    assert writer.num_frames == 7
    video = read_video(path)
    assert video.num_frames == 7
    assert psnr(video.frames, frames) >= 35.0


def test_video_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, width=32, height=32, fps=16) as writer:
            writer.write(smooth_frames(3, 32, 32))
            raise RuntimeError("boom")
    assert not path.exists()
    assert leftovers(tmp_path) == []  # the temp file is gone too


def test_video_writer_exception_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    write_video(path, smooth_frames(2, 16, 16), 16)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, width=16, height=16, fps=16) as writer:
            writer.write(smooth_frames(5, 16, 16, seed=9))
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == ["out.mp4"]


def test_video_writer_bad_frames_raise_and_leave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="expects frames"):
        with VideoWriter(path, width=32, height=16, fps=16) as writer:
            writer.write(np.zeros((2, 32, 16, 3), np.uint8))  # H and W swapped
    with pytest.raises(ValueError, match="uint8"):
        with VideoWriter(path, width=32, height=16, fps=16) as writer:
            writer.write(np.zeros((2, 16, 32, 3), np.float32))
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(path, width=32, height=16, fps=16):
            pass
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("size", [(63, 48), (64, 47), (0, 16)])
def test_video_writer_rejects_odd_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "odd.mp4"
    with pytest.raises(VideoSizeError) as info:
        VideoWriter(path, width=size[0], height=size[1], fps=16)
    assert isinstance(info.value, BadInputError) and isinstance(info.value, ValueError)
    assert_bad(info, path)
    assert "even" in str(info.value)
    assert leftovers(tmp_path) == []


def test_video_writer_rejects_bad_fps(tmp_path: Path) -> None:
    for fps in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            VideoWriter(tmp_path / "x.mp4", 16, 16, fps)
    assert leftovers(tmp_path) == []


def test_probe_agrees_with_read(tmp_path: Path) -> None:
    path = tmp_path / "probe.mp4"
    write_video(path, smooth_frames(11, 32, 48), 23.976, preset="ultrafast")
    info = probe_video(path)
    video = read_video(path)
    assert isinstance(info, VideoInfo)
    assert info == (video.num_frames, video.height, video.width, video.fps)
    assert info == (11, 32, 48, pytest.approx(23.976, abs=1e-3))


def test_read_video_max_frames(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    frames = smooth_frames(8, 32, 48)
    write_video(path, frames, 16, preset="ultrafast")
    video = read_video(path, max_frames=3)
    assert video.num_frames == 3
    assert psnr(video.frames, frames[:3]) >= 30.0


# --------------------------------------------------------------------------- images


def test_read_image_jpeg_named_png(tmp_path: Path) -> None:
    rgb = smooth_frames(1, 40, 60)[0]
    path = tmp_path / "src_ref.png"
    Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"  # really a JPEG
    image = read_image(path)
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    assert psnr(image, rgb) >= 30.0


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    image = read_image(path)
    assert image.shape == (40, 20, 3)
    top, bottom = image[:15].mean(axis=(0, 1)), image[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_read_image_converts_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    base = Image.fromarray(smooth_frames(1, 8, 10)[0])
    if mode == "I;16":
        Image.fromarray(np.full((8, 10), 65535, np.uint16)).save(path)
        expected_white = True
    else:
        base.convert(mode).save(path)
        expected_white = False
    image = read_image(path)
    assert image.shape == (8, 10, 3) and image.dtype == np.uint8
    if expected_white:
        assert image.min() == 255


def test_write_image_round_trip_and_atomic(tmp_path: Path) -> None:
    rgb = smooth_frames(1, 12, 16)[0]
    write_image(tmp_path / "a.png", rgb)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    write_image(tmp_path / "b.jpg", rgb)
    assert (tmp_path / "b.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    with pytest.raises(BadInputError) as info:
        write_image(tmp_path / "c.unknownsuffix", rgb)
    assert_bad(info, tmp_path / "c.unknownsuffix")
    assert leftovers(tmp_path) == ["a.png", "b.jpg"]


# --------------------------------------------------------------------------- bad inputs


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp_path / "nope.mp4"
    files["directory"] = tmp_path / "adir.mp4"
    files["directory"].mkdir()
    files["empty"] = tmp_path / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "notes.mp4"
    files["text"].write_text("this is not a video\n" * 20)
    files["png"] = tmp_path / "picture.mp4"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    files["png"].write_bytes(buf.getvalue())
    files["truncated"] = tmp_path / "truncated.mp4"
    write_video(tmp_path / "whole.mp4", smooth_frames(3, 16, 16), 16, preset="ultrafast")
    files["truncated"].write_bytes((tmp_path / "whole.mp4").read_bytes()[:40])
    return files


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "png", "truncated"])
@pytest.mark.parametrize("reader", [read_video, probe_video])
def test_bad_videos(tmp_path: Path, kind: str, reader) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(BadInputError) as info:
        reader(path, what="pose video")
    msg = assert_bad(info, path)
    assert msg.startswith("pose video ")


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated"])
def test_bad_images(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(BadInputError) as info:
        read_image(path, what="reference image")
    assert assert_bad(info, path).startswith("reference image ")


def test_video_without_frames_or_video_stream(tmp_path: Path) -> None:
    import av

    no_frames = tmp_path / "no_frames.avi"  # a video stream header, zero frames
    with av.open(os.fspath(no_frames), "w") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    audio = tmp_path / "sound.mp4"
    with av.open(os.fspath(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    for path, problem in ((no_frames, "no decodable video frames"), (audio, "no video stream")):
        assert path.stat().st_size > 0
        for reader in (read_video, probe_video):
            with pytest.raises(BadInputError) as info:
                reader(path)
            assert problem in assert_bad(info, path)


def test_truncated_jpeg_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(smooth_frames(1, 64, 64)[0]).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(BadInputError) as info:
        read_image(path)
    assert_bad(info, path)


# --------------------------------------------------------------------------- driving inputs


def test_load_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre", pose_wh=(32, 16), face_wh=(16, 16), n_pose=4)
    inputs = load_driving_inputs(folder)
    assert isinstance(inputs, DrivingInputs)
    assert inputs.ref_image.shape == (20, 12, 3)
    assert inputs.pose.frames.shape == (4, 16, 32, 3)
    assert inputs.face.frames.shape == (4, 16, 16, 3)
    assert (inputs.num_frames, inputs.height, inputs.width) == (4, 16, 32)
    assert inputs.fps == pytest.approx(16.0)
    assert os.fspath(folder) in inputs.source


def test_load_explicit_paths(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre")
    inputs = load_driving_inputs(
        ref=folder / "src_ref.png", pose=os.fspath(folder / "src_pose.mp4"), face=folder / "src_face.mp4"
    )
    assert inputs.pose.num_frames == inputs.face.num_frames == 3
    assert "src_pose.mp4" in inputs.source


def test_face_of_other_square_size_is_accepted(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre", face_wh=(24, 24))
    assert load_driving_inputs(folder).face.width == 24


def test_mixing_folder_and_paths_is_rejected(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre")
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder, pose=folder / "src_pose.mp4")
    assert_bad(info, folder)
    assert "not both" in str(info.value)


def test_incomplete_explicit_paths_are_rejected(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre")
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(ref=folder / "src_ref.png", pose=folder / "src_pose.mp4")
    assert "face" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BadInputError):
        load_driving_inputs()


def test_missing_folder_and_file_in_folder(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(tmp_path / "nowhere")
    assert_bad(info, tmp_path / "nowhere")
    folder = make_folder(tmp_path / "pre")
    (folder / "src_pose.mp4").unlink()
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    msg = assert_bad(info, folder / "src_pose.mp4")
    assert "does not exist" in msg and "src_pose.mp4" in msg
    file_instead = folder / "src_face.mp4"
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(file_instead)
    assert_bad(info, file_instead)


@pytest.mark.parametrize("which", ["src_pose.mp4", "src_face.mp4", "src_ref.png"])
def test_undecodable_file_in_folder(tmp_path: Path, which: str) -> None:
    folder = make_folder(tmp_path / "pre")
    (folder / which).write_text("garbage, not media\n" * 10)
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    assert_bad(info, folder / which)


def test_png_named_mp4_in_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre")
    shutil.copy(folder / "src_ref.png", folder / "src_face.mp4")
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    assert "image" in assert_bad(info, folder / "src_face.mp4")


def test_frame_count_mismatch(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre", n_pose=4, n_face=6)
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    msg = assert_bad(info, folder / "src_pose.mp4")
    assert os.fspath(folder / "src_face.mp4") in msg
    assert "has 4 frames" in msg and "has 6" in msg and "frame for frame" in msg


def test_pose_size_not_multiple_of_16(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre", pose_wh=(120, 88))
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    msg = assert_bad(info, folder / "src_pose.mp4")
    assert "120x88" in msg and "128x96" in msg


def test_nearest_valid_size() -> None:
    assert nearest_valid_size(120, 88) == (128, 96)
    assert nearest_valid_size(830, 470) == (832, 464)
    assert nearest_valid_size(4, 6) == (16, 16)


def test_non_square_face(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pre", face_wh=(32, 16))
    with pytest.raises(BadInputError) as info:
        load_driving_inputs(folder)
    msg = assert_bad(info, folder / "src_face.mp4")
    assert "square" in msg and "32x16" in msg


# --------------------------------------------------------------------------- demo inputs


def test_demo_defaults_load(tmp_path: Path) -> None:
    out = make_demo_inputs(tmp_path / "demo")
    assert out == tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir()) == ["src_face.mp4", "src_pose.mp4", "src_ref.png"]
    assert (out / "src_ref.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inputs = load_driving_inputs(out)
    assert inputs.ref_image.shape == (96, 128, 3)
    assert inputs.pose.frames.shape == (77, 96, 128, 3)
    assert inputs.face.frames.shape == (77, 512, 512, 3)
    assert inputs.fps == pytest.approx(16.0)
    assert leftovers(tmp_path) == ["demo"]  # no temp sibling left

    pose = inputs.pose.frames
    dark = (pose.max(axis=-1) < 40).mean()
    assert 0.6 < dark < 0.99  # a skeleton on black
    assert np.abs(pose[0].astype(int) - pose[40]).mean() > 0.5  # it moves
    colours = {tuple(c) for c in (pose[0][pose[0].max(axis=-1) > 200] // 64)}
    assert len(colours) >= 6  # many distinct limb/joint colours
    face = inputs.face.frames
    assert np.abs(face[0].astype(int) - face[10]).mean() > 1.0  # mouth / eyes / head move
    ref = inputs.ref_image.astype(float)
    assert ref.std() > 20  # not a flat image


def test_demo_custom_sizes_and_determinism(tmp_path: Path) -> None:
    kw = dict(width=64, height=48, num_frames=9, fps=23.976, face_size=64, seed=3)
    a = load_driving_inputs(make_demo_inputs(tmp_path / "a", **kw))
    b = load_driving_inputs(make_demo_inputs(tmp_path / "b", **kw))
    assert a.pose.frames.shape == (9, 48, 64, 3)
    assert a.face.frames.shape == (9, 64, 64, 3)
    assert a.ref_image.shape == (48, 64, 3)
    assert a.fps == pytest.approx(23.976, abs=1e-3)
    assert (tmp_path / "a" / "src_ref.png").read_bytes() == (tmp_path / "b" / "src_ref.png").read_bytes()
    np.testing.assert_array_equal(a.pose.frames, b.pose.frames)
    np.testing.assert_array_equal(a.face.frames, b.face.frames)
    np.testing.assert_array_equal(a.ref_image, b.ref_image)
    c = load_driving_inputs(make_demo_inputs(tmp_path / "c", **{**kw, "seed": 4}))
    assert not np.array_equal(a.ref_image, c.ref_image)
    assert not np.array_equal(a.face.frames, c.face.frames)


def test_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    kw = dict(width=32, height=32, num_frames=2, face_size=16)
    with pytest.raises(BadInputError) as info:
        make_demo_inputs(out, **kw)
    assert_bad(info, out)
    assert (out / "keep.txt").read_text() == "mine"
    make_demo_inputs(out, overwrite=True, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["src_face.mp4", "src_pose.mp4", "src_ref.png"]
    assert leftovers(tmp_path) == ["demo"]
    empty = tmp_path / "empty"
    empty.mkdir()
    make_demo_inputs(empty, **kw)  # an existing empty folder is fine
    assert load_driving_inputs(empty).num_frames == 2


def test_demo_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="128x96"):
        make_demo_inputs(tmp_path / "d", width=120, height=88)
    with pytest.raises(BadInputError):
        make_demo_inputs(tmp_path / "d", face_size=31)
    with pytest.raises(BadInputError):
        make_demo_inputs(tmp_path / "d", num_frames=0)
    assert leftovers(tmp_path) == []


def test_pose_keypoints_shape_and_motion() -> None:
    assert len(BODY_KEYPOINTS) == 18 and len(BODY_LIMBS) == 17
    p0 = pose_keypoints(0.0, 128, 96)
    p1 = pose_keypoints(1.0, 128, 96)
    assert p0.shape == (18, 2)
    for t in np.linspace(0.0, 10.0, 41):  # the figure stays inside the frame
        p = pose_keypoints(float(t), 128, 96)
        assert np.all((p[:, 0] >= 0) & (p[:, 0] < 128) & (p[:, 1] >= 0) & (p[:, 1] < 96)), t
    wrists = [BODY_KEYPOINTS.index("right_wrist"), BODY_KEYPOINTS.index("left_wrist")]
    assert np.linalg.norm(p0[wrists] - p1[wrists], axis=1).max() > 3  # arms wave
    nose, neck = BODY_KEYPOINTS.index("nose"), BODY_KEYPOINTS.index("neck")
    ankle = BODY_KEYPOINTS.index("right_ankle")
    assert p0[nose, 1] < p0[neck, 1] < p0[ankle, 1]  # upright
