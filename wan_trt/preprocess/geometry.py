"""Sizes and the image geometry of the preprocessing: output size, letterboxing, face boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wan_trt.errors import BadInputError

SIZE_MULTIPLE = 16


def output_size(width: int, height: int, area: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The ``(W, H)``, both multiples of ``multiple``, of the largest area ``<= area`` nearest the aspect ``width/height``.

    Among the candidates (for every height, the width just below and just above the ideal one)
    the largest area wins and then the closest aspect ratio: the official preprocessing's rule.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    if area < multiple * multiple:
        raise BadInputError(f"--resolution area {area} is below {multiple}x{multiple}: choose a larger --resolution")
    ratio = width / height
    best: tuple[int, float, int, int] | None = None
    for h in range(multiple, int(math.sqrt(area / ratio)) + 2 * multiple, multiple):
        ideal = h * ratio
        for w in (multiple * math.floor(ideal / multiple), multiple * math.ceil(ideal / multiple)):
            if w <= 0 or w * h > area:
                continue
            key = (w * h, -abs(w / h - ratio), w, h)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:  # an extreme aspect ratio: the thinnest valid strip
        w, h = (multiple, max(multiple, multiple * (area // multiple // multiple))) if ratio < 1 else \
               (max(multiple, multiple * (area // multiple // multiple)), multiple)
        return w, h
    return best[2], best[3]


@dataclass(frozen=True)
class Letterbox:
    """Fit a ``src_w x src_h`` image into ``dst_w x dst_h`` keeping its aspect, centred, black bars."""

    src_w: int
    src_h: int
    dst_w: int
    dst_h: int

    @property
    def scale(self) -> float:
        return min(self.dst_w / self.src_w, self.dst_h / self.src_h)

    @property
    def inner(self) -> tuple[int, int, int, int]:
        """``(x0, y0, w, h)`` of the image inside the destination."""
        w = min(self.dst_w, max(1, round(self.src_w * self.scale)))
        h = min(self.dst_h, max(1, round(self.src_h * self.scale)))
        return (self.dst_w - w) // 2, (self.dst_h - h) // 2, w, h

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Source pixel coordinates ``[N, 2]`` -> destination pixel coordinates."""
        x0, y0, w, h = self.inner
        return np.asarray(xy, np.float32) * np.array([w / self.src_w, h / self.src_h], np.float32) + (x0, y0)

    def image(self, img: np.ndarray, interpolation: int | None = None) -> np.ndarray:
        """``img`` (``[H, W]`` or ``[H, W, C]``) resized into the destination with black bars."""
        import cv2

        x0, y0, w, h = self.inner
        if interpolation is None:
            interpolation = cv2.INTER_AREA if w * h < self.src_w * self.src_h else cv2.INTER_LINEAR
        out = np.zeros((self.dst_h, self.dst_w) + img.shape[2:], img.dtype)
        resized = cv2.resize(img, (w, h), interpolation=interpolation)
        out[y0:y0 + h, x0:x0 + w] = resized.reshape((h, w) + img.shape[2:])
        return out


def face_box(face68: np.ndarray, width: int, height: int, scale: float = 1.3) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the face crop around the 68 face points, the official way.

    The points' box is grown to ``scale`` times its area (same aspect): the extra width is
    split evenly left and right, the extra height goes 3/4 above (forehead and hair) and
    1/4 below; then clipped to the frame.
    """
    xy = face68[:, :2]
    (x_min, y_min), (x_max, y_max) = xy.min(axis=0), xy.max(axis=0)
    bw, bh = max(float(x_max - x_min), 1.0), max(float(y_max - y_min), 1.0)
    grow = math.sqrt(scale)
    dw, dh = (bw * grow - bw) / 2, (bh * grow - bh) / 4
    x0, x1 = max(x_min - dw, 0.0), min(x_max + dw, float(width))
    y0, y1 = max(y_min - 3 * dh, 0.0), min(y_max + dh, float(height))
    x0i, y0i, x1i, y1i = int(x0), int(y0), int(x1), int(y1)
    if x1i <= x0i or y1i <= y0i:  # the face is entirely outside the frame: a 1-px box at the clipped point
        x0i, y0i = min(max(x0i, 0), width - 1), min(max(y0i, 0), height - 1)
        x1i, y1i = x0i + 1, y0i + 1
    return x0i, y0i, x1i, y1i


def crop_face(frame: np.ndarray, box: tuple[int, int, int, int], size: int = 512) -> np.ndarray:
    """The ``box`` of ``frame`` resized to ``size x size`` (not aspect-preserving, as the official crops)."""
    import cv2

    x0, y0, x1, y1 = box
    return cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_LINEAR)
