"""Shape buckets: the resolutions × segment lengths TensorRT engines are built for, declared once.

A bucket is ``WIDTHxHEIGHTxFRAMES``. Every graph whose shapes depend on the video (the VAE graphs
and the DiT) gets one static-shape engine per bucket (dynamic-shape engines are slower: TensorRT
issue #3246); the text, image and motion encoders get one engine each. Only the batch stays
dynamic where classifier-free guidance needs batch 2 (DiT, text encoder), and the face-crop count
of the motion encoder (it is called in batches of up to 8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wan_trt.components import GraphSpec, evaluate_dim, segment_sizes
from wan_trt.errors import BadInputError, EngineError
from wan_trt.registry import GRAPHS

MAX_BATCH = 2  # classifier-free guidance (``wan_trt.registry.Graph.batched``)
MOTION_BATCH = 8  # face crops per motion-encoder call (the pipeline's batch)


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"

    @staticmethod
    def parse(text: str) -> "Bucket":
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
        if not match:
            raise BadInputError(f"--bucket '{text}': expected WIDTHxHEIGHTxFRAMES, e.g. 1280x720x77")
        bucket = Bucket(*(int(g) for g in match.groups()))
        if bucket.width % 16 or bucket.height % 16 or (bucket.frames - 1) % 4:
            raise BadInputError(f"--bucket '{text}': width and height must be multiples of 16 and frames 4n+1")
        return bucket


def default_buckets(sizes: tuple[tuple[int, int], ...], frames: int) -> list[Bucket]:
    return [Bucket(width, height, frames) for width, height in sizes]


def is_bucketed(spec: GraphSpec) -> bool:
    """True when the graph's shapes depend on the video size or length (``wan_trt.registry.Graph.bucketed``
    declares the same; a test checks the two agree)."""
    return any(isinstance(d, str) and any(s in d for s in ("h2", "w2", "F")) for t in spec.inputs for d in t.dims)


def profile(spec: GraphSpec, bucket: Bucket | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input of ``spec`` for one bucket (None: a bucket-free graph)."""
    base = segment_sizes(bucket.frames, bucket.height, bucket.width) if bucket else segment_sizes(5, 32, 32)
    low, opt, high = dict(base), dict(base), dict(base)
    if spec.name in GRAPHS and GRAPHS[spec.name].batched:
        high["B"] = MAX_BATCH
    low["N"], opt["N"], high["N"] = 1, MOTION_BATCH, MOTION_BATCH
    return {t.name: tuple(tuple(evaluate_dim(d, s) for d in t.dims) for s in (low, opt, high)) for t in spec.inputs}


def select_bucket(buckets: list[Bucket], width: int, height: int, frames: int | None, rebuild: str) -> Bucket:
    """The bucket for a segment (``frames=None``: any length, for the per-chunk VAE graphs), or one
    clear EngineError listing the buckets that were built and the command that adds this one."""
    for bucket in buckets:
        if (bucket.width, bucket.height) == (width, height) and frames in (None, bucket.frames):
            return bucket
    wanted = f"{width}x{height}x{frames if frames is not None else '<frames>'}"
    built = ", ".join(b.name for b in buckets) or "none"
    raise EngineError(f"no TensorRT engine for {wanted} (built: {built}); rebuild with: {rebuild} --bucket {wanted}")
