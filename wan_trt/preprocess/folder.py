"""Raw driving video + reference photo -> the official preprocessed folder, written atomically.

Output size: animation mode generates at the reference photo's aspect (the skeleton is drawn
on a canvas the size of the reference, letterboxed), replacement mode at the driving video's
(the background comes from it); both the largest size of at most ``resolution``'s area with
width and height multiples of 16. The frame rate and frame count of the driving video are kept.

The folder is built in a hidden sibling directory and renamed onto ``out`` only once every
file is complete; an existing ``out`` is replaced only if it holds nothing but ``src_*``
files (an earlier run), and never touched when anything fails.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from wan_trt.errors import BadInputError
from wan_trt.media import VideoWriter, read_image, read_video, write_image
from wan_trt.preprocess.estimator import HolisticEstimator, WholeBody, import_mediapipe
from wan_trt.preprocess.geometry import Letterbox, crop_face, face_box, output_size
from wan_trt.preprocess.retarget import Retarget, fit_retarget
from wan_trt.preprocess.skeleton import render_skeleton

log = logging.getLogger(__name__)

REF_FILE, POSE_FILE, FACE_FILE, BG_FILE, MASK_FILE = (
    "src_ref.png", "src_pose.mp4", "src_face.mp4", "src_bg.mp4", "src_mask.mp4")
FACE_SIZE = 512
DEFAULT_RESOLUTION = (1280, 720)
#: Person-mask growth for replacement, the official defaults: a 7x7 dilation 3 times, then the box around it.
MASK_KERNEL, MASK_ITERATIONS = 7, 3

T = TypeVar("T")


@dataclass
class PreprocessResult:
    """What was written, and the keypoints behind it (for checks)."""

    folder: Path
    width: int
    height: int
    fps: float
    num_frames: int
    source_people: list[WholeBody]  # per frame, driving-frame pixels, gaps filled
    canvas_people: list[WholeBody]  # per frame, as drawn in src_pose.mp4 (output pixels)
    face_boxes: list[tuple[int, int, int, int]]  # per frame, driving-frame pixels (x0, y0, x1, y1)
    reference: WholeBody | None = None  # the reference photo's keypoints on the canvas (animation mode)
    retarget: Retarget | None = None
    filled: list[tuple[int, int]] = field(default_factory=list)  # frame ranges [a, b] carried over


def _q(path: os.PathLike[str] | str) -> str:
    return "'" + os.fspath(path).replace("\n", "\\n") + "'"


def fill_gaps(items: Sequence[T | None], max_gap: int, describe: Callable[[int, int, int], str],
              shift: Callable[[T, int, int], T] | None = None) -> tuple[list[T], list[tuple[int, int]]]:
    """Replace each ``None`` by the nearest earlier item (by the first item for a leading run).

    A run of more than ``max_gap`` missing items raises :class:`BadInputError` with the
    message ``describe(first, last, length)``. ``shift(item, from_index, to_index)`` may
    adapt a carried item to its new frame. Returns the filled list and the filled runs.
    """
    n = len(items)
    present = [i for i, x in enumerate(items) if x is not None]
    if not present:
        raise BadInputError(describe(0, n - 1, n))
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if items[i] is None:
            j = i
            while j + 1 < n and items[j + 1] is None:
                j += 1
            if j - i + 1 > max_gap:
                raise BadInputError(describe(i, j, j - i + 1))
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    out: list[T] = []
    first = present[0]
    last_index = first
    for i, item in enumerate(items):
        if item is not None:
            last_index = i
            out.append(item)
        else:
            source = first if i < first else last_index
            carried = items[source]
            assert carried is not None
            out.append(shift(carried, source, i) if shift else carried)
    return out, runs


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output folder {_q(out)} is a file: pass a folder path for --out")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith("src_")]
        if foreign:
            raise BadInputError(
                f"output folder {_q(out)} already exists and holds other files ({', '.join(sorted(foreign)[:3])}): "
                "choose a new --out (an earlier preprocessed folder, only src_* files, is replaced)")


def _staging_dir(out: Path) -> Path:
    for _ in range(100):
        tmp = out.parent / f".{out.name}.preprocess-{secrets.token_hex(4)}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise BadInputError(f"output folder {_q(out)} cannot be written ({exc.strerror or exc}): "
                                "choose a writable location for --out") from exc
    raise BadInputError(f"cannot create a staging folder beside {_q(out)}: clean up stale .preprocess-* folders")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` onto ``out``; an earlier ``out`` is moved aside first and then removed."""
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.replaced-{secrets.token_hex(4)}"
        os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        if trash is not None:
            os.replace(trash, out)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _shift_face(people: list[WholeBody | None]) -> Callable[[WholeBody, int, int], WholeBody]:
    """Carry a face from frame ``src`` to ``dst`` moved by how far the nose moved between them."""

    def shift(face_person: WholeBody, src: int, dst: int) -> WholeBody:
        target = people[dst]
        out = face_person.copy()
        if target is not None and target.body[0, 2] > 0 and face_person.body[0, 2] > 0:
            out.face[:, :2] += target.body[0, :2] - face_person.body[0, :2]
        return out

    return shift


def _person_mask(mask: np.ndarray | None, box: Letterbox) -> np.ndarray | None:
    """The segmentation in output pixels: thresholded, letterboxed, dilated and filled to its bounding box."""
    import cv2

    if mask is None:
        return None
    binary = (mask >= 0.5).astype(np.uint8)
    if not binary.any():
        return None
    canvas = box.image(binary, interpolation=cv2.INTER_NEAREST)
    canvas = cv2.dilate(canvas, np.ones((MASK_KERNEL, MASK_KERNEL), np.uint8), iterations=MASK_ITERATIONS)
    ys, xs = np.nonzero(canvas)
    if len(xs) == 0:
        return None
    filled = np.zeros_like(canvas)
    filled[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    return filled


def preprocess(
    video: os.PathLike[str] | str,
    ref: os.PathLike[str] | str,
    out: os.PathLike[str] | str,
    *,
    mode: str = "animate",
    resolution: tuple[int, int] = DEFAULT_RESOLUTION,
    retarget: bool | None = None,
    max_gap: int | None = None,
    crf: int = 18,
) -> PreprocessResult:
    """Write the preprocessed folder for ``video`` driving ``ref`` at ``out`` (see the module docstring).

    ``retarget`` (animation mode only; default on there) scales and moves the driving skeleton
    onto the reference person. ``max_gap``: how many frames in a row without a detected person
    (or face) are bridged by carrying the last detection over [one second of frames].
    """
    if mode not in ("animate", "replace"):
        raise BadInputError(f"--mode {mode}: choose animate or replace")
    if retarget is None:
        retarget = mode == "animate"
    elif retarget and mode == "replace":
        raise BadInputError("--retarget applies to --mode animate only (replacement keeps the driving video's framing)")
    video_p, ref_p, out_p = Path(os.fspath(video)), Path(os.fspath(ref)), Path(os.fspath(out))
    _check_out(out_p)
    import_mediapipe()  # fail on a missing extra before any decoding

    ref_image = read_image(ref_p, what="reference image")
    driving = read_video(video_p, what="driving video")
    n, vh, vw = driving.num_frames, driving.height, driving.width
    fps = driving.fps if driving.fps > 0 else 30.0
    if max_gap is None:
        max_gap = max(1, round(fps))
    aspect_w, aspect_h = (ref_image.shape[1], ref_image.shape[0]) if mode == "animate" else (vw, vh)
    width, height = output_size(aspect_w, aspect_h, resolution[0] * resolution[1])
    log.info("preprocess %s: %d frames %dx%d @ %.3f fps -> %s %dx%d", _q(video_p), n, vw, vh, fps, mode, width, height)
    to_canvas = Letterbox(vw, vh, width, height)

    # 1. keypoints (and, for replacement, the person mask) of every driving frame
    people: list[WholeBody | None] = []
    masks: list[np.ndarray | None] = []
    step = max(1, n // 10)
    with HolisticEstimator(video=True, segmentation=mode == "replace") as estimator:
        for i, frame in enumerate(driving.frames):
            person, mask = estimator(frame)
            people.append(person)
            masks.append(_person_mask(mask, to_canvas) if person is not None else None)
            if (i + 1) % step == 0 or i + 1 == n:
                log.info("pose estimation: %d/%d frames", i + 1, n)

    def absent(what: str) -> Callable[[int, int, int], str]:
        def describe(a: int, b: int, length: int) -> str:
            if length == n:
                return (f"driving video {_q(video_p)}: no {what} detected in any of its {n} frames: "
                        f"use a video in which one person is clearly visible")
            return (f"driving video {_q(video_p)}: no {what} detected in frames {a}-{b} (counting from 0; {length} "
                    f"frames in a row, more than --max-gap {max_gap}): trim those frames or raise --max-gap")
        return describe

    source_people, filled = fill_gaps(people, max_gap, absent("person"), shift=lambda p, src, dst: p.copy())
    with_face = [p if p is not None and p.has_face else None for p in people]
    faces, face_filled = fill_gaps(with_face, max_gap, absent("face"), shift=_shift_face(source_people))
    for p, f in zip(source_people, faces):
        if not p.has_face:
            p.face = f.face.copy()
    if mode == "replace":
        person_masks, _ = fill_gaps(masks, max_gap, absent("person mask"))
    for a, b in sorted(set(filled) | set(face_filled)):
        log.warning("driving video %s: frames %d-%d had no detection; the nearest detection was carried over",
                    _q(video_p), a, b)

    # 2. onto the output canvas, retargeted onto the reference person
    canvas_people = [p.map_xy(to_canvas.points) for p in source_people]
    reference = fit = None
    if retarget:
        to_ref = Letterbox(ref_image.shape[1], ref_image.shape[0], width, height)
        with HolisticEstimator(video=False) as estimator:
            found, _ = estimator(ref_image)
        if found is None:
            raise BadInputError(f"reference image {_q(ref_p)}: no person detected, so the motion cannot be "
                                "retargeted onto it: use a photo showing the person's head and shoulders, "
                                "or pass --no-retarget")
        reference = found.map_xy(to_ref.points)
        first = next(i for i, p in enumerate(people) if p is not None)
        fit = fit_retarget(canvas_people[first], reference)
        if fit is None:
            raise BadInputError(f"reference image {_q(ref_p)}: no body segment (shoulders, neck-nose, eyes, ...) is "
                                f"seen in both it and frame {first} of the driving video, so the motion cannot be "
                                "retargeted: use a photo with head and shoulders visible, or pass --no-retarget")
        log.info("retarget: scale %.3f from %d body segments", fit.scale, fit.segments)
        canvas_people = [fit(p) for p in canvas_people]

    # 3. write the folder in a staging directory, then rename it into place
    boxes = [face_box(p.face, vw, vh) for p in source_people]
    tmp = _staging_dir(out_p)
    try:
        write_image(tmp / REF_FILE, ref_image)
        with VideoWriter(tmp / POSE_FILE, width, height, fps, crf, what="pose video") as pose_w, \
                VideoWriter(tmp / FACE_FILE, FACE_SIZE, FACE_SIZE, fps, crf, what="face video") as face_w:
            for frame, person, box in zip(driving.frames, canvas_people, boxes):
                pose_w.write(render_skeleton(person, height, width))
                face_w.write(crop_face(frame, box, FACE_SIZE))
        if mode == "replace":
            with VideoWriter(tmp / BG_FILE, width, height, fps, crf, what="background video") as bg_w, \
                    VideoWriter(tmp / MASK_FILE, width, height, fps, crf, what="mask video") as mask_w:
                for frame, mask in zip(driving.frames, person_masks):
                    bg_w.write(to_canvas.image(frame) * (1 - mask[..., None]))
                    mask_w.write(np.repeat(mask[..., None] * 255, 3, axis=-1))
        _publish(tmp, out_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote preprocessed folder %s (%s mode, %d frames %dx%d @ %.3f fps)", _q(out_p), mode, n, width, height, fps)
    return PreprocessResult(folder=out_p, width=width, height=height, fps=fps, num_frames=n,
                            source_people=source_people, canvas_people=canvas_people, face_boxes=boxes,
                            reference=reference, retarget=fit, filled=sorted(set(filled) | set(face_filled)))
