"""Speed and accuracy of the self-attention kernels at the DiT's token counts: cuDNN vs FlashAttention-3.

    python -m benchmarks.fp8_attention_kernels --json benchmarks/results/fp8_attention_kernels_h200.json

Per size (32,760 tokens = 832×480×77, 75,600 = 1280×720×77; 40 heads × 128, batch 1) and attention
sharpness: random q, k, v, an fp32 reference (memory-efficient SDPA on fp32 inputs), then each kernel's
median time (CUDA events, 2 warm-ups, 10 repeats), TFLOP/s (4·S²·H·D) and rel-L2 vs the reference:

* ``cudnn_bf16``: bf16 ``scaled_dot_product_attention`` on cuDNN (the fast path's bf16 attention);
* ``cudnn_fp8``: cuDNN's ``sdpa_fp8`` as ``runtime/fast/attention.py`` calls it (FP8 output);
* ``fa3_fp8``: FlashAttention-3's FP8 forward (bf16 output), same E4M3 q, k, v and descales;
* ``fa3_bf16``: FlashAttention-3's bf16 forward.

q, k and v are quantized per tensor from their amax (``quant_dynamic``), as the fast path does without a
calibration cache. ``sharpness`` multiplies q and k (logit std = sharpness²). Random data, not the model's
activations. A kernel that is not installed is recorded with the reason.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
import torch

from benchmarks.fp8_attention_accuracy import HEAD_DIM, HEADS, SIZES, _draw, _reference
from benchmarks.timing import environment, time_cuda, write_json
from wan_trt.metrics import relative_l2

log = logging.getLogger("benchmarks.fp8_attention_kernels")


def _kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], torch.Tensor] | str]:
    """name -> a call returning the attention output as fp32 ``[B, S, H*D]`` (or why it is unavailable)."""
    from wan_trt.runtime.fast.attention import CudnnFp8Attention, Fa3Fp8Attention, sdpa
    from wan_trt.runtime.fast.glue import quant_dynamic

    bf = [t.to(torch.bfloat16) for t in (q, k, v)]
    (q8, dq), (k8, dk), (v8, dv) = (quant_dynamic(t) for t in bf)
    out: dict[str, Callable[[], torch.Tensor] | str] = {"cudnn_bf16": lambda: sdpa(*bf)}
    try:
        cudnn = CudnnFp8Attention()

        def cudnn_fp8():
            o, do = cudnn(q8, k8, v8, dq, dk, dv)
            return o.float() * do.reshape(())
        out["cudnn_fp8"] = cudnn_fp8
    except Exception as error:  # noqa: BLE001 - recorded in the JSON
        out["cudnn_fp8"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    try:
        fa3 = Fa3Fp8Attention()
        out["fa3_fp8"] = lambda: fa3(q8, k8, v8, dq, dk, dv)[0]
        out["fa3_bf16"] = lambda: fa3.attention(*bf, causal=False)
    except Exception as error:  # noqa: BLE001
        out["fa3_fp8"] = out["fa3_bf16"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    return out


def measure(tokens: int, sharpness: float, repeats: int) -> dict[str, Any]:
    q, k, v = _draw(tokens, sharpness, seed=2, device="cuda")
    want = _reference(q, k, v, torch.float32).cpu()
    flop = 4 * tokens * tokens * HEADS * HEAD_DIM
    row: dict[str, Any] = {"tokens": tokens, "heads": HEADS, "head_dim": HEAD_DIM, "sharpness": sharpness,
                           "tflop": flop / 1e12}
    with torch.no_grad():
        for name, call in _kernels(q, k, v).items():
            if isinstance(call, str):
                row[name] = {"error": call}
                continue
            got = call()
            got = (got[0] if isinstance(got, tuple) else got).float().reshape(want.shape).cpu()
            t = time_cuda(call, 2, repeats)
            row[name] = {"median_ms": round(t["median_ms"], 3), "tflops": round(flop / t["median_ms"] / 1e9, 1),
                         "rel_l2_vs_fp32": relative_l2(got, want), "samples_ms": t["samples_ms"]}
            log.info("%d tokens, sharpness %g: %-10s %8.2f ms %6.0f TFLOP/s rel-L2 %.3e", tokens, sharpness, name,
                     t["median_ms"], row[name]["tflops"], row[name]["rel_l2_vs_fp32"])
    del q, k, v, want
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--sizes", default="832x480x77,1280x720x77")
    parser.add_argument("--sharpness", default="1,2")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fp8_attention_kernels: no CUDA device here")
    rows = [{"size": size, **measure(SIZES[size], float(s), args.repeats)}
            for size in args.sizes.split(",") for s in args.sharpness.split(",")]
    write_json(args.json, {"what": __doc__.splitlines()[0], "rows": rows, "env": environment(),
                           "timing": "CUDA events, median of repeats after 2 warm-ups",
                           "note": "random q/k/v; FP8 inputs scaled per tensor from their amax"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
