"""Where the fast DiT's time goes: a kernel profile of a few full-size blocks, and cuDNN FP8 attention plans.

``python -m benchmarks.profile_dit --layers 2 --size 1280x720 --out results/profile.json``

* ``profile``: a ``--layers``-block ``animate-14b --random-weights`` DiT (full width) runs the fast FP8
  path (FP8 attention in every block, static q/k/v scales) under ``torch.profiler``; every CUDA kernel's
  total time is summed and put in a category (attention, FP8 GEMM, bf16 GEMM, compiled glue, other),
  and each part of a block (self-attention, cross-attention, FFN, face adapter) is timed with CUDA events.
* ``attention_plans``: cuDNN's FP8 fused attention at the DiT's token count, every execution plan the
  heuristics offer, for the [B, S, H, D] layout the fast path uses and the [B, H, S, D] one.

Random weights and inputs: speed does not depend on their values.
"""

# ruff: noqa: B023  (every timed lambda is called at once, inside the loop iteration that made it)
from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from collections import defaultdict
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)

log = logging.getLogger("benchmarks.profile_dit")

CATEGORIES = (  # first match wins; matched against the lower-cased kernel name
    ("attention_fp8", r"fprop_fp8|fp8.*(fmha|sdpa|flash)|(fmha|sdpa|flash).*(fp8|e4m3)"),
    ("attention", r"fmha|flash|sdpa|attention|cudnn_generated"),
    ("gemm_fp8", r"e4m3|fp8|f8f8"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|wgmma"),
    ("compiled_glue", r"^triton_"),
    ("elementwise_eager", r"elementwise|vectorized|reduce|copy|cat|layer_norm|norm|softmax|index"),
)


def categorize(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def kernel_table(prof) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        row = totals[event.name]
        row[0] += event.device_time_total / 1e3 if hasattr(event, "device_time_total") else event.cuda_time_total / 1e3
        row[1] += 1
    rows = [{"kernel": n[:160], "category": categorize(n), "total_ms": round(t, 3), "calls": c}
            for n, (t, c) in totals.items()]
    return sorted(rows, key=lambda r: -r["total_ms"])


def profile_blocks(layers: int, width: int, height: int, frames: int, policy_name: str) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from wan_trt.calibration.policy import load_policy
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.runtime.fast.linear import AmaxObserver, fp8_plan
    from wan_trt.runtime.fast.transformer import FastOptions, FastTransformer

    from benchmarks.gpu import dit_inputs
    from benchmarks.models import build_transformer, stock_processors
    from benchmarks.timing import time_cuda
    from wan_trt.presets import get_preset

    preset = get_preset("animate-14b")
    model = build_transformer(preset, num_layers=layers)
    graph = stock_processors(TransformerGraph(model))
    inputs = dit_inputs(width, height, frames)
    policy = load_policy(policy_name)
    linears = {f"transformer.{n}": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {p: linears[p] for p in policy.quantized_layers(layers)}
    with torch.inference_mode():
        observer = AmaxObserver(quantized)
        graph(*inputs)
        amax = observer.remove()
        baseline = time_cuda(lambda: graph(*inputs), 1, 3)
        plan = fp8_plan(quantized, amax, policy, layers)
        fast = FastTransformer(graph, plan, FastOptions(attention="fp8", fp8_attention_blocks="policy")).to("cuda")
        fast.record_attention_amax()
        fast(*inputs)
        fast.use_static_attention()
        fast_t = time_cuda(lambda: fast(*inputs), 2, 3)
        parts = time_parts(fast, inputs)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fast(*inputs)
            torch.cuda.synchronize()
    table = kernel_table(prof)
    by_category: dict[str, float] = defaultdict(float)
    for row in table:
        by_category[row["category"]] += row["total_ms"]
    return {"layers": layers, "policy": policy.to_json(), "size": f"{width}x{height}", "frames": frames, "tokens": int(parts.pop("tokens")),
            "diffusers_eager_bf16": baseline, "fast_fp8": fast_t, "parts_ms_per_call": parts,
            "kernel_ms_by_category": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "kernels": table[:60]}


def time_parts(fast, inputs) -> dict[str, float]:
    """CUDA-event medians of each part of block 0 (self-attention, cross-attention, FFN, face adapter)."""
    from benchmarks.timing import time_cuda

    model = fast.model
    glue = fast._glue_fns(inputs[0].device)
    captured: dict[str, Any] = {}
    original = fast._block

    def spy(index, x, context_img, context_txt, temb6, rotary, glue_):
        if index == 0:
            captured.update(x=x, img=context_img, txt=context_txt, temb6=temb6, rotary=rotary)
        return original(index, x, context_img, context_txt, temb6, rotary, glue_)

    def face_args(module, args):
        captured["face_tokens"] = args[1]

    fast._block = spy
    hook = model.face_adapter[0].register_forward_pre_hook(face_args)
    fast(*inputs)
    fast._block = original
    hook.remove()
    block = model.blocks[0]
    mod = (block.scale_shift_table.float() + captured["temb6"].float()).chunk(6, dim=1)
    x = captured["x"]
    face_tokens = captured["face_tokens"]
    ops = fast.block_ops[0]
    act = {name: getattr(ops.ops[name], "act_scale", None) for name in ("attn2.to_q", "ffn.net.0.proj")}
    h_cross = glue.norm_affine(x, block.norm2.weight, block.norm2.bias, block.norm2.eps, act["attn2.to_q"])
    h_ffn = glue.norm_modulate(x, mod[3], mod[4], block.norm3.eps, act["ffn.net.0.proj"])
    parts = {
        "block": lambda: fast._block(0, x, captured["img"], captured["txt"], captured["temb6"], captured["rotary"], glue),
        "self_attention": lambda: fast._self_attention(0, block, x, mod[0], mod[1], captured["rotary"], glue),
        "cross_attention": lambda: fast._cross_attention(0, block, h_cross, captured["img"], captured["txt"], glue),
        "ffn": lambda: fast._ffn(0, h_ffn, glue),
        "face_adapter": lambda: model.face_adapter[0](x, face_tokens),
        "face_encoder": lambda: model.face_encoder(inputs[5]),
    }
    out = {name: time_cuda(fn, 1, 5)["median_ms"] for name, fn in parts.items()}
    out["tokens"] = x.shape[1]
    out.update(attention_inputs(fast, block, x, mod, captured["rotary"], glue))
    return out


def attention_inputs(fast, block, x, mod, rotary, glue) -> dict[str, float]:
    """The FP8 attention kernel on block 0's own q/k/v and on random E4M3 inputs of the same shape: is its
    speed in the model (not the kernel's) a property of the data?"""
    import torch

    from benchmarks.timing import time_cuda

    attention = fast._attention_fp8()
    seen: dict[str, Any] = {}
    original = attention.__class__.__call__

    def spy(self, q, k, v, dq, dk, dv):
        seen.update(args=(q, k, v, dq, dk, dv))
        return original(self, q, k, v, dq, dk, dv)

    attention.__class__.__call__ = spy
    try:
        fast._self_attention(0, block, x, mod[0], mod[1], rotary, glue)
    finally:
        attention.__class__.__call__ = original
    if "args" not in seen:
        return {}
    q, k, v, dq, dk, dv = seen["args"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = [torch.randn(q.shape, generator=gen, device="cuda").mul(40).to(q.dtype) for _ in range(3)]
    return {"attention_kernel_model_qkv_ms": time_cuda(lambda: attention(q, k, v, dq, dk, dv), 2, 10)["median_ms"],
            "attention_kernel_random_qkv_ms": time_cuda(lambda: attention(*rand, dq, dk, dv), 2, 10)["median_ms"],
            "attention_kernel_model_qkv_again_ms": time_cuda(lambda: attention(q, k, v, dq, dk, dv), 2, 10)["median_ms"],
            "model_q_abs_mean": float(q.float().abs().mean()), "random_q_abs_mean": float(rand[0].float().abs().mean())}


def attention_plans(tokens: int, heads: int = 40, dim: int = 128) -> dict[str, Any]:
    import cudnn
    import torch

    from benchmarks.timing import time_cuda

    flop = 4 * tokens * tokens * heads * dim
    handle = cudnn.create_handle()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, Any] = {"tokens": tokens, "tflop": flop / 1e12, "layouts": {}}
    for layout in ("bshd", "bhsd"):
        shape = (1, tokens, heads, dim) if layout == "bshd" else (1, heads, tokens, dim)
        q, k, v = (torch.randn(*shape, generator=gen, device="cuda").mul(40).to(torch.float8_e4m3fn) for _ in range(3))
        dims = (1, heads, tokens, dim)
        strides = (tokens * heads * dim, dim, heads * dim, 1) if layout == "bshd" else (heads * tokens * dim, tokens * dim, dim, 1)
        dt = cudnn.data_type
        rows = []
        try:
            graph = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT,
                                  compute_data_type=dt.FLOAT, handle=handle)
            tq, tk, tv = (graph.tensor(name=n, dim=dims, stride=strides, data_type=dt.FP8_E4M3) for n in "qkv")
            names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
            scal = {n: graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT) for n in names}
            o, _, amax_s, amax_o = graph.sdpa_fp8(name="sdpa", q=tq, k=tk, v=tv, **scal, generate_stats=False,
                                                  attn_scale=1 / math.sqrt(dim), use_causal_mask=False)
            o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(dt.FP8_E4M3)
            for t in (amax_s, amax_o):
                t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            count = graph.get_execution_plan_count()
            result = torch.empty_like(q)
            one = {n: torch.full((1, 1, 1, 1), 1.0 / 40 if n.startswith("descale_") and n != "descale_s" else 1.0,
                                 device="cuda") for n in names}
            one["descale_s"].fill_(1 / 448.0)
            one["scale_s"].fill_(448.0)
            pack = {tq: q, tk: k, tv: v, o: result, amax_s: torch.empty(1, 1, 1, 1, device="cuda"),
                    amax_o: torch.empty(1, 1, 1, 1, device="cuda"), **{scal[n]: one[n] for n in names}}
            for index in range(count):
                row: dict[str, Any] = {"index": index}
                try:
                    row["name"] = graph.get_plan_name_at_index(index)
                except Exception as error:  # noqa: BLE001 - the name is informative only
                    row["name"] = f"unknown ({type(error).__name__})"
                try:
                    graph.build_plan_at_index(index)
                    ws = torch.empty(max(graph.get_workspace_size_plan_at_index(index), 1), device="cuda",
                                     dtype=torch.uint8)
                    t = time_cuda(lambda: graph.execute_plan_at_index(pack, ws, index=index, handle=handle), 1, 5)
                    row.update(median_ms=t["median_ms"], tflops=flop / t["median_ms"] / 1e9)
                except Exception as error:  # noqa: BLE001 - a plan that does not build is a finding
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                log.info("%s plan %d: %s", layout, index, row.get("median_ms", row.get("error")))
        except Exception as error:  # noqa: BLE001
            out["layouts"][layout] = {"error": f"{type(error).__name__}: {error}"[:500]}
            continue
        out["layouts"][layout] = {"plans": rows}
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.timing import environment, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=77)
    parser.add_argument("--policy", default="every-block", help="precision policy (file or shipped name)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: profile, attention_plans")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("profile_dit: no CUDA device here", file=sys.stderr)
        return 3
    width, height = (int(v) for v in args.size.split("x"))
    skip = set(filter(None, args.skip.split(",")))
    start = time.time()
    results: dict[str, Any] = {"kind": "profile_dit", "env": environment()}
    tokens = ((args.frames - 1) // 4 + 2) * (height // 16) * (width // 16)
    if "attention_plans" not in skip:
        results["attention_plans"] = attention_plans(tokens)
        write_json(args.out, results)
    if "profile" not in skip:
        results["profile"] = profile_blocks(args.layers, width, height, args.frames, args.policy)
    results["wall_s"] = round(time.time() - start, 1)
    write_json(args.out, results)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
