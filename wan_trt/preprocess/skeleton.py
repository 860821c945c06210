"""Render a :class:`~wan_trt.preprocess.estimator.WholeBody` the way the Wan-Animate pose video is drawn.

The convention (that of the official ``draw_aapose_by_meta_new``, stick width "v2",
threshold 0.5) on a black RGB canvas:

* body: 19 limbs, each a filled ellipse between its two joints whose half-width is
  ``max(min(H, W) // 200 - 1, 1)`` px, in 0.6x its colour; then every joint a disc of the
  same radius in its full colour. The limb ``k`` and the joint ``k`` share ``BODY_COLORS[k]``.
* hands: 20 bones (wrist to each finger tip), bone ``i`` coloured by the hue ``i / 20`` at full
  saturation and value, as a line of width ``max(max(min(H, W) // 200 - 1, 1) // 2, 1)``; then every
  joint a blue (0, 0, 255) disc of that radius.
* the face: not drawn (only nose, eyes and ears of the body are); the 68 face points serve the
  face crops.

A part is drawn only where its score is at least the threshold (both ends, for a limb).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from wan_trt.preprocess.estimator import WholeBody

#: Names of the 20 body joints, in order.
BODY_JOINTS: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear", "left_toe", "right_toe",
)

#: The limbs as pairs of body-joint indices (0-based), in drawing order.
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5),            # neck to the shoulders
    (2, 3), (3, 4),            # right arm
    (5, 6), (6, 7),            # left arm
    (1, 8), (8, 9), (9, 10),   # right leg
    (1, 11), (11, 12), (12, 13),  # left leg
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),  # head: neck-nose, eyes, ears
    (13, 18), (10, 19),        # feet
)

#: RGB colour of limb k and of joint k.
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
    (200, 200, 0), (100, 100, 0),
)

#: Hand bones (21-point hand: 0 wrist, then 4 points per finger from thumb to little finger).
HAND_BONES: tuple[tuple[int, int], ...] = tuple(
    pair for finger in range(5) for pair in
    ((0 if j == 0 else 1 + 4 * finger + j - 1, 1 + 4 * finger + j) for j in range(4))
)
HAND_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    tuple(255.0 * c for c in colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0)) for i in range(len(HAND_BONES))
)
HAND_JOINT_COLOR = (0, 0, 255)
LIMB_DIM = 0.6
THRESHOLD = 0.5

assert len(BODY_JOINTS) == len(BODY_COLORS) == 20 and len(BODY_LIMBS) == 19 and len(HAND_BONES) == 20


def body_stick_width(height: int, width: int) -> int:
    return max(min(height, width) // 200 - 1, 1)


def hand_stick_width(height: int, width: int) -> int:
    return max(body_stick_width(height, width) // 2, 1)


def draw_skeleton(canvas: np.ndarray, person: WholeBody | None, threshold: float = THRESHOLD) -> np.ndarray:
    """Draw ``person`` (pixel coordinates of ``canvas``) onto ``canvas`` (``[H, W, 3]`` uint8 RGB) in place."""
    import cv2

    if person is None:
        return canvas
    h, w = canvas.shape[:2]
    stick = body_stick_width(h, w)
    body = person.body
    for (a, b), color in zip(BODY_LIMBS, BODY_COLORS):
        if body[a, 2] < threshold or body[b, 2] < threshold:
            continue
        (x1, y1), (x2, y2) = body[a, :2], body[b, :2]
        length = math.hypot(x2 - x1, y2 - y1)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * LIMB_DIM) for c in color])
    for (x, y, score), color in zip(body, BODY_COLORS):
        if score >= threshold:
            cv2.circle(canvas, (int(x), int(y)), stick, color, thickness=-1)

    hstick = hand_stick_width(h, w)
    for hand in (person.left_hand, person.right_hand):
        for (a, b), color in zip(HAND_BONES, HAND_COLORS):
            if hand[a, 2] < threshold or hand[b, 2] < threshold:
                continue
            p1, p2 = hand[a, :2].astype(int), hand[b, :2].astype(int)
            if min(p1.min(), p2.min()) <= 0:  # the official drawing skips points on or past the top/left edge
                continue
            cv2.line(canvas, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), color, thickness=hstick)
        for x, y, score in hand:
            if score >= threshold and int(x) > 0 and int(y) > 0:
                cv2.circle(canvas, (int(x), int(y)), hstick, HAND_JOINT_COLOR, thickness=-1)
    return canvas


def render_skeleton(person: WholeBody | None, height: int, width: int) -> np.ndarray:
    """A black ``[height, width, 3]`` uint8 canvas with ``person`` drawn on it."""
    return draw_skeleton(np.zeros((height, width, 3), np.uint8), person)
