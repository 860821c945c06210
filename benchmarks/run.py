"""``python -m benchmarks.run gpu|cpu-overhead|gate ...`` — see ``benchmarks/__init__.py``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
from benchmarks import gate
from benchmarks.timing import environment, write_json

RESULTS = Path(__file__).resolve().parent / "results"
CPU_BASELINE = RESULTS / "cpu_overhead_baseline.json"


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not match:
            raise SystemExit(f"--sizes '{text}': give WIDTHxHEIGHT[,WIDTHxHEIGHT...], e.g. 832x480,1280x720")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def cmd_gpu(args) -> int:
    import torch

    from benchmarks.gpu import GpuConfig, run_gpu
    from wan_trt.presets import get_preset

    if not torch.cuda.is_available():
        print("benchmarks gpu: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    cfg = GpuConfig(preset=get_preset("animate-14b"), sizes=_sizes(args.sizes), frames=args.frames,
                    repeats=args.repeats, warmup=args.warmup, num_layers=args.layers,
                    components=not args.no_components, micro=not args.no_micro,
                    variants=tuple(v for v in args.variants.split(",") if v), policy=args.policy,
                    fp8_attention_kernel=args.fp8_attention_kernel, reference_noise=args.reference_noise)
    start = time.time()
    results = {"kind": "gpu", "env": environment(),
               "config": {"preset": "animate-14b --random-weights", "sizes": args.sizes, "frames": args.frames,
                          "repeats": args.repeats, "warmup": args.warmup, "num_layers": args.layers or "all",
                          "policy": args.policy or "default", "fp8_attention_kernel": args.fp8_attention_kernel,
                          "variants": list(cfg.variants), "reference_noise": args.reference_noise,
                          "timing": "CUDA events, median of repeats after warm-up",
                          "baseline": "diffusers modules as shipped, bf16 (+ diffusers' fp32 modules), eager, "
                                      "default SDPA"}}
    try:
        results.update(run_gpu(cfg))
    finally:
        results["wall_s"] = round(time.time() - start, 1)
        write_json(args.out, results)
    print(gpu_table(results))
    return 0


def gpu_table(results: dict) -> str:
    lines = [f"GPU: {results['env'].get('gpu')}  torch {results['env'].get('torch')}  cuDNN {results['env'].get('cudnn')}"]
    for name in ("text_encoder", "image_encoder"):
        if name in results:
            r = results[name]
            lines.append(f"{name:<14} {r['timing']['median_ms']:9.1f} ms  peak {r['memory']['peak_allocated_gib']:.2f} GiB")
    for key, r in results.get("vae", {}).items():
        if isinstance(r, dict) and "decode" in r:
            lines.append(f"vae {key:<10} encode {r['encode']['timing']['median_ms']:8.1f} ms "
                         f"(peak {r['encode']['memory']['peak_allocated_gib']:.2f} GiB)  decode "
                         f"{r['decode']['timing']['median_ms']:8.1f} ms (peak {r['decode']['memory']['peak_allocated_gib']:.2f} GiB)")
    dit = results.get("dit", {})
    if "motion_encoder" in dit:
        lines.append(f"motion encoder {dit['motion_encoder']['timing']['median_ms']:9.1f} ms")
    for key, row in dit.get("sizes", {}).items():
        base = row["diffusers_eager_bf16"]
        lines.append(f"DiT {key}: diffusers eager bf16 {base['timing']['median_ms']:9.1f} ms "
                     f"({base['achieved_tflops']:.0f} TFLOP/s, peak {base['memory']['peak_allocated_gib']:.1f} GiB)")
        for name, r in row.items():
            if name.startswith("fast") and "timing" in r:
                lines.append(f"  {name:<28} {r['timing']['median_ms']:9.1f} ms  ratio {r['ratio_to_baseline']:.3f}  "
                             f"{r['achieved_tflops']:.0f} TFLOP/s  rel-L2 {r['rel_l2_vs_diffusers_bf16']:.2e}")
    for key, row in results.get("micro", {}).get("attention", {}).items():
        parts = [f"{k} {v['median_ms']:.1f} ms/{v['tflops']:.0f} TF" for k, v in row.items()
                 if isinstance(v, dict) and "median_ms" in v]
        lines.append(f"attention {key}: " + ", ".join(parts))
    for key, row in results.get("micro", {}).get("gemm", {}).items():
        parts = [f"{k} {v['tflops']:.0f}" for k, v in row.items() if "tflops" in v]
        lines.append(f"gemm {key} TFLOP/s: " + ", ".join(parts))
    for key, row in results.get("segment_estimate", {}).items():
        if isinstance(row, dict) and "seconds" in row:
            lines.append(f"segment {key} (s): " + ", ".join(f"{k} {v}" for k, v in row["seconds"].items()))
    return "\n".join(lines)


def cmd_cpu_overhead(args) -> int:
    from benchmarks.cpu_overhead import measure_overhead

    result = measure_overhead(steps=args.steps, runs=args.runs)
    data = {"kind": "cpu-overhead", "env": environment(), **result}
    write_json(args.out, data)
    print(f"runtime overhead per step {result['overhead_ms_per_step']:.3f} ms, bare engine "
          f"{result['engine_ms_per_step']:.3f} ms, ratio {result['overhead_ratio']:.4f} ({result['samples']} steps)")
    if args.baseline:
        return _gate_files(args.out, args.baseline, "cpu")
    return 0


def _gate_files(run_paths, baseline_path, kind: str, tolerance: float | None = None) -> int:
    runs = [json.loads(Path(p).read_text()) for p in ([run_paths] if isinstance(run_paths, (str, Path)) else run_paths)]
    run = runs[0] if len(runs) == 1 else gate.merge_runs(runs)
    baseline = json.loads(Path(baseline_path).read_text())
    if kind == "cpu":
        rows = gate.check(run, baseline, gate.CPU_OVERHEAD_METRICS,
                          gate.CPU_TOLERANCE if tolerance is None else tolerance)
    else:
        rows = gate.check(run, baseline, gate.GPU_METRICS, gate.GPU_TOLERANCE if tolerance is None else tolerance,
                          device_key="gpu")
    print(gate.report(rows))
    return 0 if all(r.ok for r in rows) else 1


def cmd_gate(args) -> int:
    try:
        return _gate_files(args.run, args.baseline, args.kind, args.tolerance)
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as error:  # one line, not a traceback
        print(f"gate: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gpu", help="time every component of animate-14b --random-weights on the GPU")
    g.add_argument("--sizes", default="832x480,1280x720")
    g.add_argument("--frames", type=int, default=77)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (smoke runs)")
    g.add_argument("--variants", default="fast_bf16,fast_fp8,fast_fp8_every_block",
                   help="fast variants (benchmarks/gpu.py::_variants); NAME+MOD runs NAME with one option changed: "
                        "+eager_glue, +fp32_residual, +fa3_bf16, +sdpa_bf16")
    g.add_argument("--no-components", action="store_true", help="skip umT5, CLIP and the VAE")
    g.add_argument("--no-micro", action="store_true", help="skip the GEMM/attention micro-benchmarks")
    g.add_argument("--out", default=str(RESULTS / "gpu.json"))
    g.add_argument("--policy", default=None, help="precision policy (JSON file or shipped name) of fast_fp8 [default]")
    g.add_argument("--fp8-attention-kernel", choices=["auto", "cudnn", "fa3"], default="auto",
                   help="attention kernel of the variants without a _cudnn/_fa3 suffix: their FP8 attention, and "
                        "their bf16 self-attention follows it (fa3: FA3's bf16 forward; cudnn: SDPA)")
    g.add_argument("--reference-noise", action="store_true",
                   help="also run the baseline with SDPA pinned to flash and to cuDNN (the bf16 reference's own floor)")
    c = sub.add_parser("cpu-overhead", help="runtime overhead per denoising step (tiny preset, CPU)")
    c.add_argument("--steps", type=int, default=12)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--out", default=str(RESULTS / "cpu_overhead_run.json"))
    c.add_argument("--baseline", default=None, help=f"gate against this baseline (e.g. {CPU_BASELINE})")
    t = sub.add_parser("gate", help="compare a results file to a committed baseline (ratios)")
    t.add_argument("--run", required=True, nargs="+", help="the run's results JSON (GPU: one file, or one per size)")
    t.add_argument("--baseline", required=True)
    t.add_argument("--kind", choices=["cpu", "gpu"], required=True)
    t.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return {"gpu": cmd_gpu, "cpu-overhead": cmd_cpu_overhead, "gate": cmd_gate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
