"""Whole-body keypoints from MediaPipe Holistic, in the layout the Wan-Animate skeleton uses.

MediaPipe 0.10.14 ships its pose, face-mesh, hand and segmentation models inside the wheel
(``mediapipe/modules/*/*.tflite``), so nothing is downloaded at run time. Only the "full"
pose model is shipped, hence ``model_complexity=1`` always (0 and 2 would try to download).

The landmarks are mapped onto the COCO-WholeBody-derived layout of the official
preprocessing (see :mod:`wan_trt.preprocess` for the table): a 20-point body, two 21-point
hands (MediaPipe's hand order is the same as COCO-WholeBody's) and the 68 iBUG face points.
Coordinates are pixels of the analysed frame; the third column is a score in [0, 1].
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from typing_extensions import Self

from wan_trt.errors import EngineError

log = logging.getLogger(__name__)

#: The MediaPipe release whose wheel carries the models this module uses.
MEDIAPIPE_VERSION = "0.10.14"
INSTALL_HINT = "pip install 'wan-trt[preprocess]' (it pins mediapipe==0.10.14, whose wheel ships the models)"

# MediaPipe Pose (33 landmarks) -> the 20-point body. A pair means the midpoint of both.
# Index names are MediaPipe's: 0 nose, 2/5 left/right eye, 7/8 left/right ear,
# 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles,
# 31/32 left/right foot index (tip of the foot: the midpoint of big and small toe in
# COCO-WholeBody, which is what the official skeleton draws as the toe).
BODY_FROM_MEDIAPIPE: tuple[tuple[int, int], ...] = (
    (0, 0),     # 0  nose
    (11, 12),   # 1  neck = mid-shoulders
    (12, 12),   # 2  right shoulder
    (14, 14),   # 3  right elbow
    (16, 16),   # 4  right wrist
    (11, 11),   # 5  left shoulder
    (13, 13),   # 6  left elbow
    (15, 15),   # 7  left wrist
    (24, 24),   # 8  right hip
    (26, 26),   # 9  right knee
    (28, 28),   # 10 right ankle
    (23, 23),   # 11 left hip
    (25, 25),   # 12 left knee
    (27, 27),   # 13 left ankle
    (5, 5),     # 14 right eye
    (2, 2),     # 15 left eye
    (8, 8),     # 16 right ear
    (7, 7),     # 17 left ear
    (31, 31),   # 18 left toe
    (32, 32),   # 19 right toe
)

# MediaPipe Face Mesh (468 points) -> the 68 iBUG / COCO-WholeBody face points:
# jaw 0-16 (from the subject's right ear down the chin to the left), eyebrows 17-26,
# nose bridge and base 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67.
FACE68_FROM_MESH: tuple[int, ...] = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)
assert len(FACE68_FROM_MESH) == 68


@dataclass
class WholeBody:
    """One person's keypoints: ``[N, 3]`` arrays of x, y (pixels) and score."""

    body: np.ndarray  # [20, 3]
    left_hand: np.ndarray  # [21, 3] (the subject's left hand)
    right_hand: np.ndarray  # [21, 3]
    face: np.ndarray  # [68, 3]
    extras: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> WholeBody:
        return WholeBody(self.body.copy(), self.left_hand.copy(), self.right_hand.copy(), self.face.copy())

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.body, self.left_hand, self.right_hand, self.face

    def map_xy(self, fn) -> WholeBody:
        """A copy with ``fn`` (``[N, 2] -> [N, 2]``) applied to every part's coordinates."""
        out = self.copy()
        for part in out.parts():
            part[:, :2] = fn(part[:, :2])
        return out

    @property
    def has_face(self) -> bool:
        return bool(self.face[:, 2].max() > 0)


def _empty(n: int) -> np.ndarray:
    return np.zeros((n, 3), np.float32)


def _match_hands_to_wrists(person: WholeBody, confident: float = 0.5) -> None:
    """Swap the hands if each sits on the other arm's wrist (both wrists seen, both hands found)."""
    b = person.body
    if min(b[4, 2], b[7, 2]) < confident or min(person.left_hand[0, 2], person.right_hand[0, 2]) <= 0:
        return
    left, right = person.left_hand[0, :2], person.right_hand[0, :2]
    keep = np.linalg.norm(left - b[7, :2]) + np.linalg.norm(right - b[4, :2])
    swap = np.linalg.norm(left - b[4, :2]) + np.linalg.norm(right - b[7, :2])
    if swap < keep:
        person.left_hand, person.right_hand = person.right_hand, person.left_hand


def import_mediapipe():
    """``mediapipe`` with its legacy solutions API, or an :class:`EngineError` saying how to install it."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging: warnings and up only
    try:
        import mediapipe as mp
    except ImportError as exc:
        raise EngineError(f"wan-trt preprocess needs MediaPipe {MEDIAPIPE_VERSION}, which is not installed "
                          f"({exc}): {INSTALL_HINT}") from exc
    version = getattr(mp, "__version__", "?")
    holistic = getattr(getattr(mp, "solutions", None), "holistic", None)
    model = os.path.join(os.path.dirname(mp.__file__), "modules", "pose_landmark", "pose_landmark_full.tflite")
    if holistic is None or not os.path.isfile(model):
        raise EngineError(f"wan-trt preprocess needs MediaPipe {MEDIAPIPE_VERSION} (its wheel ships the models) "
                          f"but found mediapipe {version} without them: {INSTALL_HINT}")
    return mp


class HolisticEstimator:
    """MediaPipe Holistic on RGB frames -> :class:`WholeBody` (or ``None``: no person) and a person mask.

    ``video=True`` tracks from frame to frame (feed the frames in order); ``False`` treats
    every image on its own (the reference photo). ``segmentation=True`` also returns the
    pose model's person mask (float ``[H, W]`` in [0, 1]).
    """

    def __init__(self, *, video: bool, segmentation: bool = False, min_confidence: float = 0.5) -> None:
        mp = import_mediapipe()
        self.segmentation = segmentation
        self._holistic = mp.solutions.holistic.Holistic(
            static_image_mode=not video,
            model_complexity=1,
            smooth_landmarks=video,
            enable_segmentation=segmentation,
            smooth_segmentation=video and segmentation,
            refine_face_landmarks=False,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._holistic.close()

    def __call__(self, rgb: np.ndarray) -> tuple[WholeBody | None, np.ndarray | None]:
        h, w = rgb.shape[:2]
        result = self._holistic.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None:
            return None, None
        scale = np.array([w, h], np.float32)

        pose = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark], np.float32)
        body = _empty(20)
        for i, (a, b) in enumerate(BODY_FROM_MEDIAPIPE):
            body[i, :2] = (pose[a, :2] + pose[b, :2]) / 2 * scale
            body[i, 2] = min(pose[a, 2], pose[b, 2])

        def dense(landmarks, pick: tuple[int, ...] | None, n: int) -> np.ndarray:
            if landmarks is None:
                return _empty(n)
            pts = np.array([(p.x, p.y) for p in landmarks.landmark], np.float32)
            if pick is not None:
                pts = pts[list(pick)]
            # Hand and face landmarks carry no per-point score: 1 where the part was found.
            return np.concatenate([pts * scale, np.ones((len(pts), 1), np.float32)], axis=1)

        person = WholeBody(
            body=body,
            left_hand=dense(result.left_hand_landmarks, None, 21),
            right_hand=dense(result.right_hand_landmarks, None, 21),
            face=dense(result.face_landmarks, FACE68_FROM_MESH, 68),
        )
        _match_hands_to_wrists(person)
        mask = None
        if self.segmentation and result.segmentation_mask is not None:
            mask = np.asarray(result.segmentation_mask, np.float32)
        return person, mask
