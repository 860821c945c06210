"""``wan-trt calibrate --device cuda`` on a GPU: its ranges against ``--device cpu``, the fused softmax maximum
against the exact one at full-size attention shapes, and a full-size calibration's time and GPU memory.

``python -m benchmarks.calibrate_gpu_check --work /tmp/calib --out results/JSON [--parts tiny,attention,full]
[--sizes 832x480] [--steps 20]``

* ``tiny``: ``wan-trt build --preset tiny-gpu --backend torch``, then ``calibrate`` of one demo sample
  (128×96, 17 frames, 4 steps) with ``--device cuda``, ``--device cpu`` (fp32) and ``--device cpu --dtype bf16``;
  the largest relative range differences per kind (``calibration.cache.range_differences``) of cuda vs cpu fp32,
  cuda vs cpu bf16 and cpu bf16 vs cpu fp32, each against ``BF16_RANGE_TOLERANCE``.
* ``attention``: ``fused_max_probability`` vs ``exact_max_probability`` on the GPU for bf16 q, k of 40 heads × 128
  at 32,760 and 75,600 tokens (832×480 and 1280×720 × 77 frames), four logit spreads: relative difference
  against ``FUSED_TOLERANCE``, and each one's time (CUDA events, median of 3) per call, i.e. per block and step.
* ``full``: ``wan-trt build --preset animate-14b --random-weights --backend torch``, then per ``--sizes`` one
  synthetic 77-frame sample (``wan_trt.demo_media.make_demo_inputs``) calibrated with ``--device cuda --steps N``:
  exit status, wall time, seconds per denoising step (from its log) and its GPU peak (its last log line).

Each CLI step is a fresh ``wan-trt`` process; the results file is rewritten after every step, so a run cut short
(a device command's 10-minute limit) keeps what finished. What ``--work`` already holds (engines, inputs,
caches) is reused: run the parts in separate commands (``--parts full`` after ``--parts tiny,attention``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
from benchmarks.end_to_end import run_step
from benchmarks.infer_fast_smoke import wan_trt

TINY_SIZE, TINY_FRAMES, TINY_STEPS = (128, 96), 17, 4


def tiny_part(work: Path, results: dict[str, Any], out: Path) -> bool:
    from benchmarks.timing import write_json
    from wan_trt.calibration.cache import BF16_RANGE_TOLERANCE, load_cache, range_differences
    from wan_trt.demo_media import make_demo_inputs

    engines, inputs = work / "tiny-gpu-engines", work / "tiny-gpu-inputs"
    if not engines.is_dir() and run_step("tiny_build", wan_trt("build", "--preset", "tiny-gpu", "--backend", "torch",
                                                               "--out", str(engines)), results, out).returncode:
        return False
    if not inputs.is_dir():
        make_demo_inputs(inputs, width=TINY_SIZE[0], height=TINY_SIZE[1], num_frames=TINY_FRAMES)
    caches = {}
    for name, flags in (("cuda", ("--device", "cuda")), ("cpu_fp32", ("--device", "cpu")),
                        ("cpu_bf16", ("--device", "cpu", "--dtype", "bf16"))):
        caches[name] = work / f"tiny-{name}.json"
        if not caches[name].is_file() and run_step(
                f"tiny_calibrate_{name}", wan_trt("calibrate", "--engines", str(engines), "--data", str(inputs),
                                                  "--out", str(caches[name]), "--steps", str(TINY_STEPS),
                                                  "--segment-frames", str(TINY_FRAMES), *flags), results, out).returncode:
            return False
    loaded = {name: load_cache(path) for name, path in caches.items()}
    comparisons = {f"{a}_vs_{b}": range_differences(loaded[b], loaded[a])
                   for a, b in (("cuda", "cpu_fp32"), ("cuda", "cpu_bf16"), ("cpu_bf16", "cpu_fp32"))}
    results["tiny"] = {"worst_relative_difference": comparisons, "tolerance": BF16_RANGE_TOLERANCE,
                       "recorded": {name: [c.device, c.dtype] for name, c in loaded.items()},
                       "within_tolerance": all(v <= BF16_RANGE_TOLERANCE for c in comparisons.values()
                                               for v in c.values())}
    write_json(out, results)
    return results["tiny"]["within_tolerance"]


def attention_part(results: dict[str, Any], out: Path) -> bool:
    import torch

    from benchmarks.timing import time_cuda, write_json
    from wan_trt.calibration.attention import FUSED_TOLERANCE, exact_max_probability, fused_max_probability

    rows = []
    for tokens in (32_760, 75_600):
        for logit_std in (0.3, 1.0, 2.0, 3.0):  # the attention logits' spread: flat to peaked rows
            generator = torch.Generator(device="cuda").manual_seed(tokens + int(logit_std * 10))
            q = torch.randn(1, tokens, 40, 128, device="cuda", generator=generator) * logit_std ** 0.5
            k = torch.randn(1, tokens, 40, 128, device="cuda", generator=generator) * logit_std ** 0.5
            q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
            exact, fused = float(exact_max_probability(q, k)), float(fused_max_probability(q, k))
            row = {"tokens": tokens, "logit_std": logit_std, "exact": exact, "fused": fused,
                   "relative_difference": abs(fused - exact) / exact}
            if logit_std == 1.0:  # the time does not depend on the values
                row["exact_ms"] = time_cuda(lambda: exact_max_probability(q, k))["median_ms"]
                row["fused_ms"] = time_cuda(lambda: fused_max_probability(q, k))["median_ms"]
            rows.append(row)
            del q, k
            torch.cuda.empty_cache()
            results["attention"] = {"rows": rows, "tolerance": FUSED_TOLERANCE}
            write_json(out, results)
    results["attention"]["within_tolerance"] = all(r["relative_difference"] <= FUSED_TOLERANCE for r in rows)
    write_json(out, results)
    return results["attention"]["within_tolerance"]


def full_part(work: Path, results: dict[str, Any], out: Path, sizes: list[str], steps: int) -> bool:
    from wan_trt.demo_media import make_demo_inputs

    engines = work / "animate-14b-engines"
    if not engines.is_dir() and run_step(
            "full_build", wan_trt("build", "--preset", "animate-14b", "--random-weights", "--backend", "torch",
                                  "--out", str(engines)), results, out).returncode:
        return False
    ok = True
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        inputs = work / f"inputs-{size}"
        if not inputs.is_dir():
            make_demo_inputs(inputs, width=width, height=height, num_frames=77)
        done = run_step(f"full_calibrate_{size}_steps{steps}",
                        wan_trt("calibrate", "--engines", str(engines), "--data", str(inputs), "--out",
                                str(work / f"full-{size}.json"), "--steps", str(steps), "--device", "cuda"),
                        results, out)
        ok &= done.returncode == 0
    return ok


def main(argv: list[str] | None = None) -> int:
    from benchmarks.timing import benchmark_parser, environment, write_json

    parser = benchmark_parser(__doc__.splitlines()[0], "scratch folder for engines, inputs and caches")
    parser.add_argument("--parts", default="tiny,attention,full", help="which of tiny, attention, full [all]")
    parser.add_argument("--sizes", default="832x480", help="full part: WIDTHxHEIGHT, comma-separated [832x480]")
    parser.add_argument("--steps", type=int, default=20, help="full part: denoising steps [20]")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or not set(parts) <= {"tiny", "attention", "full"}:
        parser.error(f"--parts {args.parts}: choose from tiny, attention, full")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"kind": "calibrate_gpu_check", "env": environment(), "parts": parts, "steps": {}}
    write_json(out, results)
    ok = True
    if "tiny" in parts:
        ok &= tiny_part(work, results, out)
    if "attention" in parts:
        ok &= attention_part(results, out)
    if "full" in parts:
        ok &= full_part(work, results, out, [s for s in args.sizes.split(",") if s], args.steps)
    results["ok"] = bool(ok)
    write_json(out, results)
    print(out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
