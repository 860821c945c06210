"""Which FP8 layers cost the DiT its accuracy: one layer type at a time, at full size on the GPU.

``python -m benchmarks.fp8_sensitivity --size 832x480 --out results/fp8_sensitivity.json``

The full ``animate-14b --random-weights`` DiT runs once as shipped (diffusers, bf16, eager: the
reference, and the calibration of every block Linear's input range by max), then the fast path
runs with FP8 in the policy's blocks for one group of layers at a time (bf16 attention), with all of
them, with all of them and exact (not fast) FP8 accumulation, and with FP8 self-attention only.
Each row is the rel-L2 of the velocity against the reference at the same inputs. The glue runs
uncompiled (the numbers are about precision, not speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)

log = logging.getLogger("benchmarks.fp8_sensitivity")

GROUPS = {
    "self_attention_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "self_attention_out": ("attn1.to_out.0",),
    "cross_attention_q": ("attn2.to_q",),
    "cross_attention_text_kv": ("attn2.to_k", "attn2.to_v"),
    "cross_attention_image_kv": ("attn2.add_k_proj", "attn2.add_v_proj"),
    "cross_attention_out": ("attn2.to_out.0",),
    "ffn_up": ("ffn.net.0.proj",),
    "ffn_down": ("ffn.net.2",),
}


def run(width: int, height: int, frames: int, layers: int | None) -> dict[str, Any]:
    import torch
    from wan_trt.calibration.policy import load_policy
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.runtime.fast.linear import AmaxObserver, fp8_plan
    from wan_trt.runtime.fast.transformer import FastOptions, FastTransformer

    from benchmarks.gpu import dit_inputs
    from benchmarks.models import build_transformer, stock_processors
    from wan_trt.metrics import relative_l2
    from wan_trt.presets import get_preset

    model = build_transformer(get_preset("animate-14b"), num_layers=layers)
    graph = stock_processors(TransformerGraph(model))
    num_blocks = len(model.blocks)
    inputs = dit_inputs(width, height, frames)
    default = load_policy(None)
    linears = {f"transformer.{n}": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    every = dataclasses.replace(default, block_layers=tuple(n for g in GROUPS.values() for n in g),
                                keep_first_blocks=0, keep_last_blocks=0)
    with torch.inference_mode():
        observer = AmaxObserver({p: linears[p] for p in every.quantized_layers(num_blocks)})
        reference = graph(*inputs)[0].float()
        amax = observer.remove()
        ref = reference.cpu().numpy()
        rows: dict[str, Any] = {}

        def measure(name: str, policy, options: FastOptions, attention_blocks: set[int] | None = None) -> None:
            start = time.time()
            plan = None
            if policy is not None:
                plan = fp8_plan({p: linears[p] for p in policy.quantized_layers(num_blocks)}, amax, policy, num_blocks)
            fast = FastTransformer(graph, plan, options).to("cuda")
            if attention_blocks is not None:
                fast.fp8_attention = attention_blocks
            got = fast(*inputs)[0].float().cpu().numpy()
            rows[name] = {"layers": list(policy.block_layers) if policy is not None else [],
                          "fp8_linear_blocks": len(policy.quantized_blocks(num_blocks)) if policy is not None else 0,
                          "fp8_attention_blocks": len(fast.fp8_attention), "fast_accum": options.fast_accum,
                          "rel_l2_vs_diffusers_bf16": relative_l2(got, ref)}
            log.info("%s: rel-L2 %.3e (%.0f s)", name, rows[name]["rel_l2_vs_diffusers_bf16"], time.time() - start)
            del fast, plan
            gc.collect()
            torch.cuda.empty_cache()

        bf16 = FastOptions(attention="bf16", compile=False)
        measure("bf16_fast_path", None, bf16)
        for name, group in GROUPS.items():
            measure(name, dataclasses.replace(default, block_layers=group), bf16)
        measure("all_policy_layers", default, bf16)
        measure("all_policy_layers_exact_accum", default, dataclasses.replace(bf16, fast_accum=False))
        attention_blocks = set(default.quantized_blocks(num_blocks))
        fp8_attention = FastOptions(attention="fp8", compile=False)
        measure("self_attention_fp8_only", None, fp8_attention, attention_blocks)
        no_cross = dataclasses.replace(default, block_layers=tuple(n for n in default.block_layers
                                                                   if not n.startswith("attn2.")))
        measure("self_attention_and_ffn_layers", no_cross, bf16)
        measure("self_attention_and_ffn_layers_fp8_attention", no_cross, fp8_attention, attention_blocks)
        everything = dataclasses.replace(no_cross, keep_first_blocks=0, keep_last_blocks=0)
        measure("self_attention_and_ffn_layers_fp8_attention_every_block", everything, fp8_attention,
                set(range(num_blocks)))
    return {"size": f"{width}x{height}", "frames": frames, "num_blocks": num_blocks,
            "policy": default.to_json(), "calibration": "max of one diffusers bf16 forward on the same inputs",
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.timing import environment, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--frames", type=int, default=77)
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (smoke runs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("fp8_sensitivity: no CUDA device here", file=sys.stderr)
        return 3
    width, height = (int(v) for v in args.size.split("x"))
    start = time.time()
    results = {"kind": "fp8_sensitivity", "env": environment(), **run(width, height, args.frames, args.layers)}
    results["wall_s"] = round(time.time() - start, 1)
    write_json(args.out, results)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
