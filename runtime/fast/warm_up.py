"""``wan-trt build --backend torch`` on a GPU: compile ``--fast``'s kernels ahead of the first video.

The first denoising step of a fresh process compiles the fast DiT's fused glue (``runtime.fast.compiled``):
measured 14 to 28 s of a 1280x720 segment's first step on freshly started H100s, against 3 to 6 s when
Inductor's on-disk cache already held those kernels. The build warms that cache: it opens the engines it
just wrote as ``infer --fast`` does and runs the DiT once at each bucket size, so that ``infer`` on the same
machine (or with the same ``$WAN_TRT_COMPILE_CACHE``) finds every kernel compiled.

The glue's shapes depend on the segment's latent frames and tokens per frame only, so a bucket and its
transpose (832x480 and 480x832) share their kernels: one forward serves both. The inputs are random (the
kernels do not depend on values); the DiT's batch is 1 (no classifier-free guidance, the default): a run
with ``--guidance-scale`` > 1 compiles its batch-2 kernels on its first step. Between sizes, dynamo's state
is reset, so that each size compiles what a fresh ``infer`` process at that size compiles (a function that
had seen another shape in the same process would be compiled shape-generic instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from wan_trt.buckets import Bucket
from wan_trt.components import segment_sizes
from wan_trt.registry import TRANSFORMER

log = logging.getLogger(__name__)


def kernel_buckets(buckets: Iterable[Bucket]) -> list[Bucket]:
    """The buckets whose DiT kernels differ, in order: one per (latent frames, tokens per frame)."""
    chosen: dict[tuple[int, int], Bucket] = {}
    for bucket in buckets:
        sizes = segment_sizes(bucket.frames, bucket.height, bucket.width)
        chosen.setdefault((sizes["F"], sizes["h2"] * sizes["w2"]), bucket)
    return list(chosen.values())


def run_dit_once_per_bucket(engine, spec, buckets: Iterable[Bucket]) -> dict[str, float]:
    """One DiT call of ``engine`` on fresh random inputs of ``spec`` at each of :func:`kernel_buckets`
    (``buckets``); the seconds each took, by bucket name (logged as they finish)."""
    todo = kernel_buckets(buckets)
    seconds = {}
    for index, bucket in enumerate(todo, 1):
        if index > 1:  # compile each size as a fresh infer process would (static shapes, its own compile limits)
            torch._dynamo.reset()
        feed = {name: torch.from_numpy(value) for name, value in
                spec.sample_inputs(segment_sizes(bucket.frames, bucket.height, bucket.width), seed=index).items()}
        started = time.perf_counter()
        engine.run(feed)
        seconds[bucket.name] = time.perf_counter() - started
        log.info("warmed --fast's kernels for %s (%d/%d) in %.1f s", bucket.name, index, len(todo),
                 seconds[bucket.name])
    return seconds


def warm_up_fast_path(directory: Path, buckets: Iterable[Bucket]) -> dict[str, float]:
    """Open the engines in ``directory`` as ``infer --backend torch --device cuda --fast`` does and run the DiT
    once per kernel bucket (:func:`run_dit_once_per_bucket`), filling the persistent compile cache. The
    caller chose ``buckets`` that fit the GPU (``wan_trt.preflight.warm_up_buckets``)."""
    from wan_trt.runtime.fast.engines import fast_torch_engines
    from wan_trt.runtime.manifest import read_manifest
    from wan_trt.runtime.options import RuntimeOptions

    buckets = list(buckets)
    if not buckets:
        return {}
    manifest = read_manifest(directory)
    log.info("compiling --fast's kernels ahead of the first video (wan-trt build --no-warm-up skips this)")
    engines = fast_torch_engines(manifest, directory, RuntimeOptions(backend="torch", device="cuda", fast=True))
    try:
        return run_dit_once_per_bucket(engines[TRANSFORMER], manifest.graphs[TRANSFORMER].spec, buckets)
    finally:
        del engines
        torch.cuda.empty_cache()
