"""The driving inputs of Wan-Animate: the folder written by the official preprocessing.

The official Wan 2.2 Animate preprocessing (``preprocess_data.py``) turns one reference
photo and one driving video into a folder::

    src_ref.png    the reference photo (the character to animate). Despite the name its
                   bytes may be a JPEG; it is read by content, at its original size.
    src_pose.mp4   the rendered body skeleton of the driving video. Its H x W is the
                   generation resolution (a multiple of 16 in both) and its frame count
                   the length of the output video.
    src_face.mp4   square face crops of the driving video (512 x 512 expected), one per
                   pose frame. Other square sizes are accepted here; the runtime resizes
                   them (and says so).
    src_bg.mp4     replacement mode only: the driving video's background.
    src_mask.mp4   replacement mode only: the mask of the person to replace.

Animation mode needs the first three; ``src_bg.mp4`` and ``src_mask.mp4`` are not used
yet and are ignored when present.

:func:`load_driving_inputs` takes either that folder or the three files given one by
one, checks sizes and frame counts cheaply (:func:`~wan_trt.media.open_video` decodes every
frame once without keeping any) and raises :class:`~wan_trt.errors.BadInputError` with one
line naming the file and the fix for every problem it finds. The videos are not held in
memory: each is a :class:`~wan_trt.media.VideoReader` that decodes the frames a segment asks
for, so memory does not grow with the video's length.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wan_trt.errors import BadInputError
from wan_trt.media import VideoInfo, VideoReader, open_video, read_image

__all__ = [
    "DrivingInputs",
    "FACE_FILE",
    "FACE_SIZE",
    "MaskFrames",
    "POSE_FILE",
    "REF_FILE",
    "SIZE_MULTIPLE",
    "load_driving_inputs",
    "nearest_valid_size",
]

log = logging.getLogger(__name__)

REF_FILE = "src_ref.png"
POSE_FILE = "src_pose.mp4"
FACE_FILE = "src_face.mp4"
BG_FILE = "src_bg.mp4"
MASK_FILE = "src_mask.mp4"

#: The generation resolution (pose video size) must be a multiple of this in H and W.
SIZE_MULTIPLE = 16
#: The face crop size the face encoder expects.
FACE_SIZE = 512

_PREPROCESS_HINT = "re-run the Wan-Animate preprocessing (preprocess_data.py)"


class MaskFrames:
    """The replacement mask, decoded on demand: ``mask[indices]`` → ``[N, H, W]`` float32 in [0, 1].

    Channel 0 of ``src_mask.mp4`` / 255, as the official code reads it (1 = the person).
    """

    def __init__(self, video: VideoReader) -> None:
        self.video = video

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.video.shape[:3]

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, key) -> np.ndarray:
        return self.video[key][..., 0].astype(np.float32) / 255.0


@dataclass(eq=False)
class DrivingInputs:
    """Validated driving inputs; the videos are readers that decode the frames asked for.

    ``pose`` fixes the generation size (``height`` x ``width``) and the output length
    (``num_frames``); ``face`` has exactly as many frames, square.
    """

    ref_image: np.ndarray  # [H, W, 3] uint8 RGB, original size
    pose: VideoReader
    face: VideoReader
    source: str  # the folder, or the three files, for messages
    background: VideoReader | None = None  # replacement mode: src_bg.mp4
    mask: MaskFrames | None = None  # replacement mode: [T, H, W] float32 in [0, 1] (channel 0 / 255; 1 = person)

    @property
    def num_frames(self) -> int:
        return self.pose.num_frames

    @property
    def height(self) -> int:
        return self.pose.height

    @property
    def width(self) -> int:
        return self.pose.width

    @property
    def fps(self) -> float:
        return self.pose.fps


def _q(path: str | os.PathLike[str]) -> str:
    return "'" + os.fspath(path).replace("\n", "\\n") + "'"


def nearest_valid_size(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The closest ``(width, height)`` with both a positive multiple of ``multiple``."""

    def snap(v: int) -> int:
        return max(multiple, int(v / multiple + 0.5) * multiple)  # ties round up

    return snap(width), snap(height)


def _resolve_paths(
    folder: str | os.PathLike[str] | None,
    ref: str | os.PathLike[str] | None,
    pose: str | os.PathLike[str] | None,
    face: str | os.PathLike[str] | None,
) -> tuple[Path, Path, Path, str, bool]:
    explicit = {"ref": ref, "pose": pose, "face": face}
    given = [k for k, v in explicit.items() if v is not None]
    if folder is not None:
        if given:
            names = ", ".join(f"{k}={_q(explicit[k])}" for k in given)  # type: ignore[arg-type]
            raise BadInputError(
                f"driving inputs folder {_q(folder)} was given together with {names}: "
                "pass either the preprocessed folder or all of ref, pose and face, not both"
            )
        d = Path(os.fspath(folder))
        files = f"{REF_FILE}, {POSE_FILE} and {FACE_FILE}"
        if not d.exists():
            raise BadInputError(
                f"driving inputs folder {_q(d)} does not exist: pass the folder written by the "
                f"Wan-Animate preprocessing (it contains {files})"
            )
        if not d.is_dir():
            raise BadInputError(
                f"driving inputs folder {_q(d)} is a file, not a folder: pass the folder written by the "
                f"Wan-Animate preprocessing (it contains {files}), or give ref, pose and face one by one"
            )
        return d / REF_FILE, d / POSE_FILE, d / FACE_FILE, os.fspath(d), True
    if not given:
        raise BadInputError(
            "no driving inputs given: pass a preprocessed folder "
            f"(containing {REF_FILE}, {POSE_FILE}, {FACE_FILE}) or all of ref, pose and face"
        )
    missing = [k for k in explicit if explicit[k] is None]
    if missing:
        have = ", ".join(f"{k}={_q(explicit[k])}" for k in given)  # type: ignore[arg-type]
        raise BadInputError(
            f"driving inputs incomplete: got {have} but no {' or '.join(missing)}: "
            "pass all of ref, pose and face, or a preprocessed folder instead"
        )
    r, p, f = (Path(os.fspath(v)) for v in (ref, pose, face))  # type: ignore[arg-type]
    return r, p, f, f"{r}, {p}, {f}", False


def _require_file(path: Path, what: str, name: str, in_folder: bool) -> None:
    if path.exists():
        return  # anything else (directory, empty, ...) is reported by media with the file named
    if in_folder:
        raise BadInputError(
            f"{what} {_q(path)} does not exist: pass a preprocessed folder containing {name} "
            "(the Wan-Animate preprocessing, preprocess_data.py, writes it)"
        )
    raise BadInputError(f"{what} {_q(path)} does not exist: check the path")


def _check_pose(info: VideoInfo, path: Path) -> None:
    w, h = info.width, info.height
    if w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        nw, nh = nearest_valid_size(w, h)
        raise BadInputError(
            f"pose video {_q(path)} is {w}x{h} (WxH) but the generation size must be a multiple of "
            f"{SIZE_MULTIPLE} in width and height: {_PREPROCESS_HINT} at the nearest valid size {nw}x{nh}"
        )


def _check_face(info: VideoInfo, path: Path) -> None:
    if info.width != info.height:
        raise BadInputError(
            f"face video {_q(path)} has {info.width}x{info.height} (WxH) crops but face crops must be square "
            f"({FACE_SIZE}x{FACE_SIZE} expected): {_PREPROCESS_HINT} to crop the face again"
        )


def _check_counts(pose_n: int, pose_path: Path, face_n: int, face_path: Path) -> None:
    if pose_n != face_n:
        raise BadInputError(
            f"pose video {_q(pose_path)} has {pose_n} frames but face video {_q(face_path)} has {face_n}: "
            f"they must match frame for frame; {_PREPROCESS_HINT} so both come from the same driving video"
        )


def load_driving_inputs(
    folder: str | os.PathLike[str] | None = None,
    *,
    ref: str | os.PathLike[str] | None = None,
    pose: str | os.PathLike[str] | None = None,
    face: str | os.PathLike[str] | None = None,
    mode: str = "animate",
    background: str | os.PathLike[str] | None = None,
    mask: str | os.PathLike[str] | None = None,
) -> DrivingInputs:
    """Load and validate the driving inputs: a preprocessed ``folder``, or ``ref``, ``pose`` and ``face``.

    Checks, each a :class:`BadInputError` naming the file and the fix: the folder or
    paths (not both, none missing), every file present and decodable, the pose size a
    multiple of 16, the face crops square, and pose and face frame counts equal. Every
    video is decoded once here (no frame kept); the frames themselves are decoded segment
    by segment when the pipeline asks for them.
    """
    ref_p, pose_p, face_p, source, in_folder = _resolve_paths(folder, ref, pose, face)
    _require_file(ref_p, "reference image", REF_FILE, in_folder)
    _require_file(pose_p, "pose video", POSE_FILE, in_folder)
    _require_file(face_p, "face video", FACE_FILE, in_folder)

    # Decodes every frame without keeping any; a frame that does not convert to RGB is
    # reported after the size and count checks (in check()), as reading in full used to.
    pose_v = open_video(pose_p, what="pose video", defer=True)
    _check_pose(pose_v.info, pose_p)
    face_v = open_video(face_p, what="face video", defer=True)
    _check_face(face_v.info, face_p)
    _check_counts(pose_v.num_frames, pose_p, face_v.num_frames, face_p)

    ref_image = read_image(ref_p, what="reference image")
    pose_v.check()
    face_v.check()

    if pose_v.fps > 0 and face_v.fps > 0 and abs(pose_v.fps - face_v.fps) > 1e-3:
        log.warning(
            "pose video %s is %.3f fps but face video %s is %.3f fps; frames are paired by index and "
            "the output uses the pose rate", _q(pose_p), pose_v.fps, _q(face_p), face_v.fps,
        )
    log.info(
        "driving inputs %s: %d frames at %dx%d, %.3f fps; face crops %dx%d; reference %dx%d",
        source, pose_v.num_frames, pose_v.width, pose_v.height, pose_v.fps,
        face_v.width, face_v.height, ref_image.shape[1], ref_image.shape[0],
    )
    inputs = DrivingInputs(ref_image=ref_image, pose=pose_v, face=face_v, source=source)
    if mode == "replace":
        bg_p = Path(os.fspath(background)) if background is not None else pose_p.with_name(BG_FILE)
        mask_p = Path(os.fspath(mask)) if mask is not None else pose_p.with_name(MASK_FILE)
        _require_file(bg_p, "background video", BG_FILE, in_folder)
        _require_file(mask_p, "mask video", MASK_FILE, in_folder)
        bg_v = open_video(bg_p, what="background video")
        mask_v = open_video(mask_p, what="mask video")
        for video, path in ((bg_v, bg_p), (mask_v, mask_p)):
            if (video.num_frames, video.height, video.width) != (pose_v.num_frames, pose_v.height, pose_v.width):
                raise BadInputError(
                    f"{_q(path)} is {video.width}x{video.height} with {video.num_frames} frames but the pose video "
                    f"is {pose_v.width}x{pose_v.height} with {pose_v.num_frames}: they must match; {_PREPROCESS_HINT}"
                )
        inputs.background = bg_v
        inputs.mask = MaskFrames(mask_v)
    elif mode != "animate":
        raise BadInputError(f"--mode {mode}: choose animate or replace")
    elif in_folder:
        for extra in (BG_FILE, MASK_FILE):
            if (pose_p.parent / extra).exists():
                log.info("%s has %s (replacement mode); it is not used in animation mode", source, extra)
    return inputs
