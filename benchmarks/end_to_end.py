"""The real model's journey through the CLI on one GPU, as a user runs it: ``wan-trt build --backend torch``
then ``wan-trt infer --fast``, at full size (``animate-14b --random-weights``), each a fresh process.

``python -m benchmarks.end_to_end --work /tmp/e2e --out results/JSON [--sizes 832x480,1280x720] [--steps 20]
[--sampler unipc|euler|dpmpp] [--shift S] [--precision bf16|fp8] [--calibration CACHE | --calibration-clip WxHxF]
[--policy NAME] [--max-gpu-memory SIZE]``

``--precision bf16`` (default) runs ``--fast`` on the fp32 torch build (bf16 Linears and attention);
``fp8`` runs the FP8 journey: ``calibrate --device cuda`` on each size's inputs (or ``--calibration``,
a cache made earlier, e.g. at another size, or ``--calibration-clip``, one made here on a short synthetic clip
in segments of its length: the results say which), ``build --precision fp8 --backend
torch`` with that cache (its warm-up compiling ``--fast``'s kernels for the sizes measured: ``--bucket``), then
``infer --fast`` on those engines. ``--sampler``/``--shift``/``--steps``
are the schedule of calibration and inference alike (``--sampler euler --steps 4`` is the
``lightx2v-4step`` recipe's schedule: its speed, on random weights without the distillation LoRA,
which changes no shape or kernel).

Records each command's exit status, wall time, the largest child's peak host RSS
(``RUSAGE_CHILDREN``), a calibration's seconds per denoising step and GPU peak (from its log), and
the infer run's own report (``infer --timings``: load, time to the first denoising step, seconds per
stage, GPU and host peaks). Inputs are the synthetic demo inputs (a portrait, a skeleton video, face
crops) at each size, 77 frames: random weights make a real video's content irrelevant to speed. The
results file is rewritten after every step, so a run cut short (a device command's 10-minute limit)
keeps what finished; ``--skip-build`` reuses ``--work``'s engines.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
from benchmarks.infer_fast_smoke import wan_trt


_STEP_LINE = re.compile(r"step (\d+)/(\d+) \(([\d.]+) s\)")
_PEAK_LINE = re.compile(r"GPU peak ([\d.]+) GiB")
_PINNED_LINE = re.compile(r"(\d+) of (\d+) blocks wait in pinned host memory \(([\d.]+) GiB\)")
_LOADED_LINE = re.compile(r"fast path loaded: (.+)")
_PHASE = re.compile(r"([^,]+?) ([\d.]+) s(?:,|$)")


def run_step(name: str, command: list[str], results: dict[str, Any], out: Path) -> subprocess.CompletedProcess:
    """Run one ``wan-trt`` command; record its status, wall time, host RSS, logged step times and GPU peak."""
    from benchmarks.timing import write_json

    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)  # KiB → GiB, largest child so far
    record: dict[str, Any] = {"command": "wan-trt " + " ".join(command[3:]), "rc": done.returncode,
                              "wall_s": round(time.time() - start, 1), "children_peak_rss_gib": round(rss, 2),
                              "stderr_tail": done.stderr[-2500:]}
    seconds = [float(m.group(3)) for m in _STEP_LINE.finditer(done.stderr)]
    if seconds:  # the first step of a sample includes the encoders and VAE encode: the median is the DiT's
        record.update(steps_logged=len(seconds), step_s_median=round(statistics.median(seconds), 2),
                      step_s_max=round(max(seconds), 2))
    peak = _PEAK_LINE.search(done.stderr)
    if peak:
        record["gpu_peak_gib"] = float(peak.group(1))
    pinned = _PINNED_LINE.search(done.stderr)
    if pinned:
        record.update(streamed_blocks=int(pinned.group(1)), blocks=int(pinned.group(2)),
                      pinned_host_gib=float(pinned.group(3)))
    loaded = _LOADED_LINE.search(done.stderr)
    if loaded:  # where the fast path's loading went (runtime/fast/engines.py's phases)
        record["loading_phases_s"] = {m.group(1).strip(): float(m.group(2)) for m in _PHASE.finditer(loaded.group(1))}
    results["steps"][name] = record
    write_json(out, results)
    print(f"{name}: rc {done.returncode}, {record['wall_s']} s", file=sys.stderr, flush=True)
    return done


def segment_arguments(description: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with ``benchmarks.diffusers_pipeline`` (same work folder and inputs)."""
    from benchmarks.timing import benchmark_parser

    parser = benchmark_parser(description, "scratch folder for engines, inputs and videos")
    parser.add_argument("--sizes", default="832x480,1280x720")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=77)
    return parser


def schedule_name(args: argparse.Namespace) -> str:
    return f"{args.sampler}{args.steps}-shift{args.shift:g}"


def schedule_options(args: argparse.Namespace) -> list[str]:
    return ["--sampler", args.sampler, "--steps", str(args.steps), "--shift", f"{args.shift:g}"]


def warm_up_buckets(sizes: list[str]) -> list[str]:
    """``build``'s warm-up compiles ``--fast``'s kernels for the sizes measured here, in 77-frame segments
    (``infer``'s default; a shorter video is padded to one)."""
    from wan_trt.presets import get_preset

    frames = get_preset("animate-14b").segment_frames
    return [option for size in sizes for option in ("--bucket", f"{size}x{frames}")]


def fp8_engines(work: Path, fp32_engines: Path, inputs: Path, size: str, args: argparse.Namespace,
                results: dict[str, Any], out: Path) -> Path | None:
    """Calibrate on the GPU (unless ``--calibration``) and build FP8 torch engines from the cache."""
    sizes, measured = [s for s in args.sizes.split(",") if s], size
    segment: list[str] = []
    if args.calibration_clip:  # one short clip calibrates every size (the ranges' values do not change speed);
        size, inputs = args.calibration_clip, calibration_clip(work, args.calibration_clip)
        segment = ["--segment-frames", size.split("x")[2]]  # a shorter clip alone is padded to a 77-frame segment
    cache = Path(args.calibration) if args.calibration else work / f"calibration-{size}-{schedule_name(args)}.json"
    if not cache.is_file() and run_step(
            f"calibrate_cuda_{size}_{schedule_name(args)}",
            wan_trt("calibrate", "--engines", str(fp32_engines), "--data", str(inputs), "--out", str(cache),
                    *schedule_options(args), *segment, "--device", "cuda"), results, out).returncode:
        return None
    results.setdefault("calibration", {})[size] = str(cache)
    engines = work / f"engines-fp8-{args.policy}-{cache.stem}"
    if not engines.is_dir() and run_step(
            f"build_torch_fp8_{size}", wan_trt("build", "--preset", "animate-14b", "--random-weights", "--backend",
                                               "torch", "--precision", "fp8", "--calibration", str(cache),
                                               "--policy", args.policy, "--out", str(engines),
                                               # one cache for every size (a clip or --calibration), else this size's
                                               *warm_up_buckets(sizes if args.calibration_clip or args.calibration
                                                                else [measured])),
            results, out).returncode:
        return None
    return engines


def calibration_clip(work: Path, clip: str) -> Path:
    """The synthetic inputs of ``--calibration-clip WxHxF`` (made once in ``work``)."""
    from wan_trt.demo_media import make_demo_inputs

    width, height, frames = (int(v) for v in clip.split("x"))
    folder = work / f"inputs-{clip}"
    if not folder.is_dir():
        make_demo_inputs(folder, width=width, height=height, num_frames=frames)
    return folder


def main(argv: list[str] | None = None) -> int:
    from benchmarks.timing import environment, write_json
    from wan_trt.demo_media import make_demo_inputs

    parser = segment_arguments(__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true", help="reuse --work's fp32 torch engines")
    parser.add_argument("--sampler", choices=("unipc", "euler", "dpmpp"), default="unipc")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--calibration", help="fp8: this calibration cache instead of calibrating at each size")
    parser.add_argument("--policy", default="default", help="fp8: the build's precision policy [default]")
    parser.add_argument("--max-gpu-memory", metavar="SIZE", help="infer --max-gpu-memory SIZE (e.g. 24GiB)")
    parser.add_argument("--calibration-clip", metavar="WxHxF",
                        help="fp8: calibrate once on synthetic inputs of this size and frame count (e.g. 832x480x13), "
                             "with --segment-frames F (a 13-frame clip alone is padded to a 77-frame segment and "
                             "costs as much: measured), instead of on each size's 77 frames")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"kind": "end_to_end", "env": environment(), "preset": "animate-14b --random-weights",
                               "precision": args.precision, "steps_per_segment": args.steps,
                               "schedule": schedule_name(args), "frames": args.frames,
                               "inputs": "synthetic demo inputs (wan_trt.demo_media)", "steps": {}, "runs": {}}
    fp32_engines = work / "engines-fp32"
    needs_fp32 = args.precision == "bf16" or not args.calibration  # fp8 with a cache given: no fp32 build
    if needs_fp32 and not args.skip_build and not fp32_engines.is_dir():
        if run_step("build_torch_fp32", wan_trt("build", "--preset", "animate-14b", "--random-weights",
                                                "--backend", "torch", "--out", str(fp32_engines),
                                                # fp32 engines run --fast only for a bf16 measurement; else calibrate
                                                *(["--warm-up", *warm_up_buckets([s for s in args.sizes.split(",") if s])]
                                                  if args.precision == "bf16" else [])),
                    results, out).returncode:
            return 1
    ok = True
    for size in [s for s in args.sizes.split(",") if s]:
        width, height = (int(v) for v in size.split("x"))
        inputs = work / f"inputs-{size}"
        if not inputs.is_dir():
            make_demo_inputs(inputs, width=width, height=height, num_frames=args.frames)
        engines = fp32_engines
        if args.precision == "fp8":
            engines = fp8_engines(work, fp32_engines, inputs, size, args, results, out)
            if engines is None:
                ok = False
                continue
        cap = ["--max-gpu-memory", args.max_gpu_memory] if args.max_gpu_memory else []
        name = f"infer_fast_{args.precision}_{size}_{schedule_name(args)}" + (
            f"_max{args.max_gpu_memory}" if args.max_gpu_memory else "")
        timings = work / f"timings-{name}.json"
        ok &= run_step(name, wan_trt("infer", "--engines", str(engines), "--input", str(inputs), "--out",
                                     str(work / f"{name}.mp4"), "--backend", "torch", "--device", "cuda", "--fast",
                                     *schedule_options(args), *cap, "--timings", str(timings)),
                       results, out).returncode == 0
        if timings.is_file():
            results["runs"][name] = json.loads(timings.read_text())
            write_json(out, results)
    print(out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
