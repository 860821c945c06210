"""`wan-trt preprocess`: a raw video and a photo -> the official preprocessed folder.

A real photo (scikit-image's astronaut) is moved and warped by known affine transforms to make a
33-frame driving video; the keypoints found in it, the skeleton video and the face crops must
follow that known motion. The folder must run through `wan-trt infer`, and a video without a
person must fail with one line and leave nothing behind.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from wan_trt.cli import main
from wan_trt.errors import BadInputError, EngineError
from wan_trt.media import probe_video, read_image, read_video, write_image, write_video
from wan_trt.preprocess.folder import fill_gaps
from wan_trt.preprocess.geometry import output_size

needs_mediapipe = pytest.mark.skipif(
    importlib.util.find_spec("mediapipe") is None,
    reason="mediapipe (the [preprocess] extra, part of [test]) is not installed: pip install -e '.[test]'",
)

SIZE = 256  # driving video size (square)
FRAMES = 33
FPS = 16.0
CONFIDENT = 0.5
FAST = ["--segment-frames", "9", "--steps", "2"]


# ----------------------------------------------------------------------------- pure geometry


@pytest.mark.parametrize("src, area, expected", [
    ((1920, 1080), 1280 * 720, (1280, 720)),
    ((1080, 1920), 1280 * 720, (720, 1280)),
    ((512, 512), 1280 * 720, (960, 960)),
    ((640, 480), 256 * 256, (288, 224)),
    ((512, 512), 256 * 256, (256, 256)),
])
def test_output_size_is_area_bounded_multiple_of_16(src, area, expected):
    w, h = output_size(*src, area)
    assert (w, h) == expected
    assert w % 16 == 0 and h % 16 == 0 and w * h <= area
    assert abs(w / h - src[0] / src[1]) / (src[0] / src[1]) < 0.1


def test_fill_gaps_carries_over_and_names_the_frames():
    items = [None, 1, None, None, 4, None]
    filled, runs = fill_gaps(items, 2, lambda a, b, n: f"frames {a}-{b} ({n})")
    assert filled == [1, 1, 1, 1, 4, 4]
    assert runs == [(0, 0), (2, 3), (5, 5)]
    with pytest.raises(BadInputError, match=r"frames 2-3 \(2\)"):
        fill_gaps(items, 1, lambda a, b, n: f"frames {a}-{b} ({n})")
    with pytest.raises(BadInputError, match=r"frames 0-2 \(3\)"):
        fill_gaps([None] * 3, 5, lambda a, b, n: f"frames {a}-{b} ({n})")


def test_hands_follow_the_body_wrists():
    from wan_trt.preprocess.estimator import WholeBody, _match_hands_to_wrists

    body = np.zeros((20, 3), np.float32)
    body[4] = (50, 200, 0.9)   # right wrist
    body[7] = (150, 200, 0.9)  # left wrist
    near_right = np.tile(np.array([[52, 205, 1.0]], np.float32), (21, 1))
    near_left = np.tile(np.array([[148, 205, 1.0]], np.float32), (21, 1))
    person = WholeBody(body, near_right.copy(), near_left.copy(), np.zeros((68, 3), np.float32))
    _match_hands_to_wrists(person)
    assert np.array_equal(person.left_hand, near_left) and np.array_equal(person.right_hand, near_right)
    _match_hands_to_wrists(person)  # already right: unchanged
    assert np.array_equal(person.left_hand, near_left)


def test_missing_mediapipe_is_an_install_hint(monkeypatch):
    from wan_trt.preprocess.estimator import import_mediapipe

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe -> ImportError
    with pytest.raises(EngineError, match=r"pip install 'wan-trt\[preprocess\]'"):
        import_mediapipe()


@needs_mediapipe
def test_skeleton_uses_the_official_colours_and_threshold():
    from wan_trt.preprocess.estimator import WholeBody
    from wan_trt.preprocess.skeleton import (
        BODY_COLORS,
        BODY_LIMBS,
        HAND_JOINT_COLOR,
        LIMB_DIM,
        render_skeleton,
    )

    body = np.zeros((20, 3), np.float32)
    body[0] = (100, 40, 1.0)    # nose
    body[1] = (100, 100, 1.0)   # neck
    body[2] = (60, 100, 1.0)    # right shoulder
    body[5] = (140, 100, 0.4)   # left shoulder: below the threshold
    hand = np.zeros((21, 3), np.float32)
    hand[:, :2] = np.stack([np.linspace(30, 50, 21), np.full(21, 180.0)], axis=1)
    hand[:, 2] = 1.0
    person = WholeBody(body, hand, np.zeros((21, 3), np.float32), np.zeros((68, 3), np.float32))
    canvas = render_skeleton(person, 400, 400)  # stick width max(400 // 200 - 1, 1) = 1
    for k in (0, 1, 2):
        x, y = body[k, :2].astype(int)
        assert tuple(canvas[y, x]) == BODY_COLORS[k], k
    limb = BODY_LIMBS.index((1, 2))
    assert tuple(canvas[100, 80]) == tuple(int(c * LIMB_DIM) for c in BODY_COLORS[limb])
    assert not canvas[95:106, 120:150].any(), "the left shoulder (score 0.4) and its limb must not be drawn"
    assert tuple(canvas[180, 30]) == HAND_JOINT_COLOR


# ----------------------------------------------------------------------------- the real photo


def _affine(t: int) -> np.ndarray:
    """The known motion of frame t: a 2x3 matrix (translate, scale, rotate about the centre)."""
    phase = 2 * math.pi * t / (FRAMES - 1)
    dx, dy = 24 * math.sin(phase), 14 * math.sin(2 * phase)
    scale, angle = 1 + 0.08 * math.sin(phase), 5 * math.sin(phase)
    a = math.radians(angle)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = np.array([SIZE / 2, SIZE / 2])
    return np.concatenate([rot, (centre - rot @ centre + (dx, dy))[:, None]], axis=1).astype(np.float32)


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:, :2].T + m[:, 2]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def driving(tmp_path_factory, photo):
    """(video path, reference photo path, the photo at the video's size, per-frame affines)."""
    import cv2

    root = tmp_path_factory.mktemp("preprocess")
    small = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    motions = [_affine(t) for t in range(FRAMES)]
    frames = np.stack([cv2.warpAffine(small, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REPLICATE) for m in motions])
    write_video(root / "driving.mp4", frames, FPS)
    write_image(root / "astronaut.png", photo)
    return root / "driving.mp4", root / "astronaut.png", small, motions


@pytest.fixture(scope="module")
def photo_keypoints(driving):
    """Keypoints of the still photo at the video's size (the truth every frame is moved from)."""
    from wan_trt.preprocess.estimator import HolisticEstimator

    with HolisticEstimator(video=False) as estimator:
        person, _ = estimator(driving[2])
    assert person is not None
    return person


def _body_height(person) -> float:
    """Vertical extent of the confidently seen body joints and face points: the yardstick of the tolerances."""
    pts = np.concatenate([person.body[person.body[:, 2] >= CONFIDENT, :2], person.face[:, :2]])
    return float(pts[:, 1].max() - pts[:, 1].min())


@pytest.fixture(scope="module")
def animated(driving, tmp_path_factory):
    from wan_trt.preprocess import preprocess

    video, ref, _, _ = driving
    out = tmp_path_factory.mktemp("animate") / "folder"
    return preprocess(video, ref, out, resolution=(SIZE, SIZE), retarget=False)


@needs_mediapipe
def test_pose_and_face_are_found_on_the_photo(photo):
    from wan_trt.preprocess.estimator import HolisticEstimator
    from wan_trt.preprocess.skeleton import BODY_JOINTS

    with HolisticEstimator(video=False) as estimator:
        person, _ = estimator(photo)
    assert person is not None
    seen = {BODY_JOINTS[i] for i in np.flatnonzero(person.body[:, 2] >= CONFIDENT)}
    assert {"nose", "neck", "right_shoulder", "left_shoulder", "right_eye", "left_eye"} <= seen
    assert person.has_face
    face = person.face[:, :2]
    # the 68 points sit on the face: the eyes (36-47) above the mouth (48-67), the nose tip between
    assert face[36:48, 1].mean() < face[30, 1] < face[48:68, 1].mean()
    assert face[36:42, 0].mean() < face[42:48, 0].mean()  # the subject's right eye is on the image's left
    nose = person.body[0, :2]
    assert face[:, 0].min() < nose[0] < face[:, 0].max() and face[:, 1].min() < nose[1] < face[:, 1].max()


@needs_mediapipe
def test_keypoints_track_the_known_motion(animated, driving, photo_keypoints):
    _, _, _, motions = driving
    height = _body_height(photo_keypoints)
    joints = photo_keypoints.body[:, 2] >= CONFIDENT
    body_err, face_err = [], []
    for t, (person, m) in enumerate(zip(animated.canvas_people, motions)):
        truth = _apply(m, photo_keypoints.body[joints, :2])  # the canvas is the video's size: no letterbox
        body_err.append(np.linalg.norm(person.body[joints, :2] - truth, axis=1).mean())
        face_err.append(np.linalg.norm(person.face[:, :2] - _apply(m, photo_keypoints.face[:, :2]), axis=1).mean())
    assert animated.filled == []
    assert np.mean(body_err) <= 0.05 * height, (np.mean(body_err), height)
    assert np.mean(face_err) <= 0.05 * height, (np.mean(face_err), height)
    assert max(body_err) <= 0.10 * height


@needs_mediapipe
def test_skeleton_video_draws_those_keypoints_and_follows_the_motion(animated, driving, photo_keypoints):
    from wan_trt.preprocess.skeleton import render_skeleton

    _, _, _, motions = driving
    pose = read_video(animated.folder / "src_pose.mp4")
    assert (pose.num_frames, pose.height, pose.width) == (FRAMES, SIZE, SIZE)
    assert pose.fps == pytest.approx(FPS, abs=1e-3)
    height = _body_height(photo_keypoints)
    errors = []
    for t, (frame, person, m) in enumerate(zip(pose.frames, animated.canvas_people, motions)):
        drawn = render_skeleton(person, SIZE, SIZE)
        ink, expected_ink = frame.max(axis=2) > 40, drawn.max(axis=2) > 40
        overlap = (ink & expected_ink).sum() / max((ink | expected_ink).sum(), 1)
        assert overlap > 0.5, (t, overlap)  # the video is the drawing of the keypoints (through H.264)
        # the truth: the photo's keypoints moved by the known motion, drawn with this frame's scores (same limbs)
        truth = person.copy()
        truth.body[:, :2] = _apply(m, photo_keypoints.body[:, :2])
        truth_ink = render_skeleton(truth, SIZE, SIZE).max(axis=2) > 40
        centre = np.argwhere(ink).mean(axis=0)
        errors.append(np.linalg.norm(centre - np.argwhere(truth_ink).mean(axis=0)))
    assert np.mean(errors) <= 0.05 * height, (np.mean(errors), height)


@needs_mediapipe
def test_face_crops_follow_the_face(animated, driving, photo_keypoints):
    import mediapipe as mp

    _, _, _, motions = driving
    face = read_video(animated.folder / "src_face.mp4")
    assert (face.num_frames, face.height, face.width) == (FRAMES, 512, 512)
    height = _body_height(photo_keypoints)
    for t, (box, m) in enumerate(zip(animated.face_boxes, motions)):
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        truth = _apply(m, photo_keypoints.face[:, :2]).mean(axis=0)
        assert np.linalg.norm(centre - truth) <= 0.05 * height, t
    with mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5) as detector:
        for t, crop in enumerate(face.frames):
            found = detector.process(crop).detections
            assert found, f"no face in crop {t}"
            b = found[0].location_data.relative_bounding_box
            cx, cy = b.xmin + b.width / 2, b.ymin + b.height / 2
            assert abs(cx - 0.5) < 0.15 and abs(cy - 0.5) < 0.2, (t, cx, cy)
            assert b.width > 0.5, (t, b.width)  # the crop is mostly face


@needs_mediapipe
def test_reference_photo_is_kept(animated, photo):
    assert np.array_equal(read_image(animated.folder / "src_ref.png"), photo)
    assert sorted(p.name for p in animated.folder.iterdir()) == ["src_face.mp4", "src_pose.mp4", "src_ref.png"]


@needs_mediapipe
def test_retarget_fits_the_skeleton_to_a_smaller_reference_person(driving, photo, tmp_path):
    """A person 0.6x as big, off-centre in the reference photo: the skeleton takes their size and place."""
    import cv2

    from wan_trt.preprocess import preprocess
    from wan_trt.preprocess.estimator import HolisticEstimator

    video, _, _, motions = driving
    s = 0.6
    shrink = np.array([[s, 0, (1 - s) * 256 - 80], [0, s, (1 - s) * 256 + 60]], np.float32)
    ref = cv2.warpAffine(photo, shrink, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    write_image(tmp_path / "small.png", ref)
    result = preprocess(video, tmp_path / "small.png", tmp_path / "out", resolution=(SIZE, SIZE))
    # the driving person is the photo at 0.5x on the canvas, the reference person at 0.3x
    assert result.retarget is not None and result.retarget.scale == pytest.approx(s, rel=0.15)
    with HolisticEstimator(video=False) as estimator:
        small_ref, _ = estimator(cv2.resize(ref, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    height = _body_height(small_ref)

    seen = (result.canvas_people[0].body[:, 2] >= CONFIDENT) & (small_ref.body[:, 2] >= CONFIDENT)
    assert seen.sum() >= 6

    def box(body: np.ndarray) -> np.ndarray:
        pts = body[seen, :2]
        return np.concatenate([pts.min(axis=0), pts.max(axis=0)])

    # frame 0 of the driving video is the photo unmoved: its skeleton lands on the reference person
    got, want = box(result.canvas_people[0].body), box(small_ref.body)
    assert np.linalg.norm((got[:2] + got[2:]) / 2 - (want[:2] + want[2:]) / 2) <= 0.1 * height, (got, want)
    # size: loose, since MediaPipe itself sees the small spacesuit's shoulders ~15% narrower than 0.6x
    assert np.linalg.norm(got[2:] - got[:2]) == pytest.approx(np.linalg.norm(want[2:] - want[:2]), rel=0.35)
    # later frames move by the driving motion times the scale
    neck0 = result.source_people[0].body[1, :2]
    for t in (FRAMES // 4, FRAMES // 2 + FRAMES // 4):
        moved = result.canvas_people[t].body[1, :2] - result.canvas_people[0].body[1, :2]
        expected = result.retarget.scale * (_apply(motions[t], neck0[None])[0] - neck0)
        assert np.linalg.norm(moved - expected) <= 0.1 * height, (t, moved, expected)
    everything = np.concatenate([p.body[p.body[:, 2] >= CONFIDENT, :2] for p in result.canvas_people])
    assert everything.min() >= 0 and everything.max() < SIZE, "the retargeted skeleton stays in frame"


# ----------------------------------------------------------------------------- end to end, errors


@needs_mediapipe
def test_animate_folder_from_the_cli_runs_through_infer(driving, tiny_engines, tmp_path):
    video, ref, _, _ = driving
    folder = tmp_path / "animate"
    made = CliRunner().invoke(main, ["preprocess", "--video", str(video), "--ref", str(ref), "--out", str(folder),
                                     "--resolution", "128x128"])  # 128 x 128: a cheap generation
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == str(folder)
    out = tmp_path / "animation.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(folder),
                                       "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    info = probe_video(out)
    assert (info.num_frames, info.height, info.width) == (FRAMES, 128, 128)
    assert info.fps == pytest.approx(FPS, abs=1e-3)


@needs_mediapipe
def test_replace_folder_from_the_cli_runs_through_infer(driving, tiny_engines, tmp_path):
    video, ref, _, _ = driving
    folder = tmp_path / "replace"
    result = CliRunner().invoke(main, ["preprocess", "--video", str(video), "--ref", str(ref), "--out", str(folder),
                                       "--mode", "replace", "--resolution", "128x128"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["src_bg.mp4", "src_face.mp4", "src_mask.mp4", "src_pose.mp4", "src_ref.png"]
    mask = read_video(folder / "src_mask.mp4").frames[..., 0] > 127
    bg = read_video(folder / "src_bg.mp4").frames
    assert mask.shape == (FRAMES, 128, 128)
    assert 0.1 < mask.mean() < 0.95  # the person, not everything
    assert bg[mask].mean() < 20 and bg[~mask].mean() > 60  # the person's area is blacked out, the rest kept
    out = tmp_path / "replaced.mp4"
    ran = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(folder),
                                    "--mode", "replace", "--out", str(out), *FAST])
    assert ran.exit_code == 0, ran.output
    assert probe_video(out).num_frames == FRAMES


@needs_mediapipe
def test_video_without_a_person_is_one_line_and_leaves_nothing(driving, tmp_path):
    _, ref, _, _ = driving
    y, x = np.mgrid[0:96, 0:128]
    frames = np.stack([np.stack([(x * 2 + t * 5) % 256, (y * 2) % 256, np.full_like(x, 90)], axis=-1)
                       for t in range(9)]).astype(np.uint8)
    empty = tmp_path / "empty.mp4"
    write_video(empty, frames, 8)
    out = tmp_path / "nobody"
    result = CliRunner().invoke(main, ["preprocess", "--video", str(empty), "--ref", str(ref), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("wan-trt: error: driving video") and "no person detected in any of its 9 frames" \
        in lines[-1]
    assert str(empty) in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mp4"], "no folder, no staging leftovers"
    # an earlier preprocessed folder at --out is left exactly as it was
    out.mkdir()
    (out / "src_pose.mp4").write_bytes(b"earlier run")
    result = CliRunner().invoke(main, ["preprocess", "--video", str(empty), "--ref", str(ref), "--out", str(out)])
    assert result.exit_code == 2
    assert [p.name for p in out.iterdir()] == ["src_pose.mp4"] and (out / "src_pose.mp4").read_bytes() == b"earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mp4", "nobody"]


@needs_mediapipe
def test_person_absent_too_long_names_the_frames(driving, tmp_path):
    from wan_trt.preprocess import preprocess

    video, ref, _, _ = driving
    frames = read_video(video).frames[:, ::2, ::2].copy()  # 128 x 128: cheaper
    frames[10:26] = frames[0, :8, :8].mean(axis=(0, 1)).astype(np.uint8)  # the person leaves: a plain wall
    gap = tmp_path / "gap.mp4"
    write_video(gap, frames, FPS)
    with pytest.raises(BadInputError, match=r"no person detected in frames 10-25 .*16 frames in a row, more than "
                                            r"--max-gap 4"):
        preprocess(gap, ref, tmp_path / "too_long", resolution=(128, 128), max_gap=4)
    assert not (tmp_path / "too_long").exists() and not list(tmp_path.glob(".too_long*"))
    (tmp_path / "bridged").mkdir()  # an earlier run's folder is replaced whole
    (tmp_path / "bridged" / "src_bg.mp4").write_bytes(b"earlier run")
    result = preprocess(gap, ref, tmp_path / "bridged", resolution=(128, 128), max_gap=16)
    assert sorted(p.name for p in result.folder.iterdir()) == ["src_face.mp4", "src_pose.mp4", "src_ref.png"]
    assert not list(tmp_path.glob(".bridged*"))
    assert (10, 25) in result.filled
    assert np.allclose(result.source_people[25].body, result.source_people[9].body)
    assert probe_video(result.folder / "src_pose.mp4").num_frames == FRAMES


@needs_mediapipe
def test_out_holding_other_files_is_refused_untouched(driving, tmp_path):
    video, ref, _, _ = driving
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["preprocess", "--video", str(video), "--ref", str(ref), "--out", str(out)])
    assert result.exit_code == 2 and "holds other files" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
