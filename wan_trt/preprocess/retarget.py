"""Pose retargeting, basic: one uniform scale and an offset from the driving body to the reference body.

The scale is the median, over the body segments confidently seen in both the reference photo
and the first driving frame with a person, of (reference length / driving length). Segments
used: shoulder width, neck-nose, eye distance, ear distance, neck-hips, upper arms and thighs.
The offset puts the driving neck of that frame on the reference neck, so the skeleton then
moves relative to where the reference person stands, at the reference person's size: a short
person driven by a tall one keeps their own size and place in the frame. Limb proportions
are not changed (the official retargeting also rescales every bone; not done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wan_trt.preprocess.estimator import WholeBody
from wan_trt.preprocess.skeleton import BODY_JOINTS

_J = {name: i for i, name in enumerate(BODY_JOINTS)}
NECK = _J["neck"]

#: Body segments (joint index pairs) whose lengths set the scale.
SCALE_SEGMENTS: tuple[tuple[int, int], ...] = (
    (_J["right_shoulder"], _J["left_shoulder"]),
    (_J["neck"], _J["nose"]),
    (_J["right_eye"], _J["left_eye"]),
    (_J["right_ear"], _J["left_ear"]),
    (_J["neck"], _J["right_hip"]),
    (_J["neck"], _J["left_hip"]),
    (_J["right_shoulder"], _J["right_elbow"]),
    (_J["left_shoulder"], _J["left_elbow"]),
    (_J["right_hip"], _J["right_knee"]),
    (_J["left_hip"], _J["left_knee"]),
)
CONFIDENT = 0.5


@dataclass(frozen=True)
class Retarget:
    """``x -> dst_anchor + scale * (x - src_anchor)``, on every keypoint."""

    scale: float
    src_anchor: np.ndarray  # [2]
    dst_anchor: np.ndarray  # [2]
    segments: int  # how many segments the scale came from

    def __call__(self, person: WholeBody) -> WholeBody:
        return person.map_xy(lambda xy: self.dst_anchor + self.scale * (xy - self.src_anchor))


def _lengths(body: np.ndarray) -> dict[tuple[int, int], float]:
    out = {}
    for a, b in SCALE_SEGMENTS:
        if body[a, 2] >= CONFIDENT and body[b, 2] >= CONFIDENT:
            length = float(np.hypot(*(body[a, :2] - body[b, :2])))
            if length > 1.0:
                out[(a, b)] = length
    return out


def fit_retarget(driving: WholeBody, reference: WholeBody) -> Retarget | None:
    """The scale and offset mapping ``driving`` onto ``reference`` (same canvas), or ``None`` if no segment is shared."""
    if driving.body[NECK, 2] < CONFIDENT or reference.body[NECK, 2] < CONFIDENT:
        return None
    src, dst = _lengths(driving.body), _lengths(reference.body)
    shared = sorted(set(src) & set(dst))
    if not shared:
        return None
    scale = float(np.median([dst[s] / src[s] for s in shared]))
    return Retarget(scale=scale, src_anchor=driving.body[NECK, :2].copy(), dst_anchor=reference.body[NECK, :2].copy(),
                    segments=len(shared))
