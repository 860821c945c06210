"""``wan-trt infer --fast`` end to end on a GPU: the ``tiny-gpu`` preset's FP8 engines, fast path vs reference.

``python -m benchmarks.infer_fast_smoke --work /tmp/smoke --out results/infer_fast_smoke.json``

Runs the user's commands, each a fresh ``wan-trt`` process, on one set of demo inputs: build fp32
engines, calibrate, build FP8 engines (the default policy), then ``infer --backend torch --device cuda``
on the FP8 engines with ``--fast`` (FP8 ``_scaled_mm`` Linears, FP8 attention — FA3 where installed,
else cuDNN — with the calibrated q/k/v scales, compiled glue) and without it (the fake-quant PyTorch
reference), and the same pair on the fp32 engines (bf16 fast path vs fp32). Records each command's exit status, wall time and log tail, and
the PSNR of each fast video against its reference video (both H.264 at the writer's settings). The
results file is rewritten after every step, so a run cut short still reports what finished.

What ``--work`` already holds is used, not made again (inputs, engines folders, calibration cache): the
CPU-side steps can run elsewhere first (``--prepare-only``; a GPU machine's transfer limit may allow only
some of them: e.g. the inputs and the calibration cache, the FP8 build then runs there). ``--engines fp8``
(or fp32) runs one pair.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)

SEGMENT, STEPS, WIDTH, HEIGHT = 17, 8, 128, 96


def wan_trt(*args: str) -> list[str]:
    """A ``wan-trt`` command line that also runs from a plain checkout (``import benchmarks`` maps the subpackages)."""
    return [sys.executable, "-c", "import sys, benchmarks; from wan_trt.cli import main; main(sys.argv[1:], prog_name='wan-trt')",
            *args]


def run_step(name: str, command: list[str], results: dict[str, Any], out: Path) -> bool:
    from benchmarks.timing import write_json

    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results["steps"][name] = {"command": "wan-trt " + " ".join(command[3:]), "rc": done.returncode,
                              "wall_s": round(time.time() - start, 1),
                              "stderr_tail": done.stderr[-1500:], "stdout_tail": done.stdout[-500:]}
    write_json(out, results)
    print(f"{name}: rc {done.returncode}, {results['steps'][name]['wall_s']} s", file=sys.stderr, flush=True)
    return done.returncode == 0


def video_psnr(a: Path, b: Path) -> float:
    from wan_trt.media import read_video
    from wan_trt.metrics import psnr

    return psnr(read_video(a).frames, read_video(b).frames)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.timing import benchmark_parser, environment, write_json
    from wan_trt.demo_media import make_demo_inputs

    parser = benchmark_parser(__doc__.splitlines()[0], "scratch folder for inputs, engines and videos")
    parser.add_argument("--prepare-only", action="store_true", help="make the inputs and build the engines, then stop")
    parser.add_argument("--engines", default="fp8,fp32", help="which engine pairs to run: fp8, fp32 or both [fp8,fp32]")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"kind": "infer_fast_smoke", "env": environment(), "preset": "tiny-gpu",
                               "video": f"{WIDTH}x{HEIGHT}, {SEGMENT} frames, {STEPS} steps", "steps": {}}
    inputs = work / "inputs"
    e32, e8, calib = work / "e32", work / "e8", work / "calibration.json"
    chosen = [p for p in args.engines.split(",") if p]
    if not chosen or not set(chosen) <= {"fp8", "fp32"}:
        parser.error(f"--engines {args.engines}: choose fp8, fp32 or fp8,fp32")
    if not inputs.is_dir():
        make_demo_inputs(inputs, width=WIDTH, height=HEIGHT, num_frames=SEGMENT)
    infer = ("--input", str(inputs), "--backend", "torch", "--device", "cuda", "--steps", str(STEPS),
             "--segment-frames", str(SEGMENT))
    quick = ("--no-verify", "--no-accuracy-video")  # the builds are proven on the CPU; this is about infer --fast
    needs_calibration = "fp8" in chosen and not (calib.is_file() or e8.is_dir())
    steps = (("build_fp32", ("fp32" in chosen or needs_calibration) and not e32.is_dir(),
              ("build", "--preset", "tiny-gpu", *quick, "--out", str(e32))),
             ("calibrate", needs_calibration,
              ("calibrate", "--engines", str(e32), "--data", str(inputs), "--out", str(calib), "--steps", "4",
               "--segment-frames", str(SEGMENT))),
             ("build_fp8", "fp8" in chosen and not e8.is_dir(),
              ("build", "--preset", "tiny-gpu", "--precision", "fp8", "--calibration", str(calib), *quick,
               "--out", str(e8))))
    results["reused"] = [name for name, needed, _ in steps if not needed]
    ok = all(run_step(name, wan_trt(*command), results, out) for name, needed, command in steps if needed)
    if ok and not args.prepare_only:
        videos = {}
        runs = (("fp8_fast", e8, True), ("fp8_reference", e8, False),
                ("fp32_fast_bf16", e32, True), ("fp32_reference", e32, False))
        for name, engines, fast in (r for r in runs if r[0].split("_")[0] in chosen):
            video = work / f"{name}.mp4"
            flags = ("--fast",) if fast else ()
            if run_step(f"infer_{name}", wan_trt("infer", "--engines", str(engines), "--out", str(video),
                                                 *infer, *flags), results, out):
                videos[name] = video
        pairs = (("fp8_fast", "fp8_reference"), ("fp32_fast_bf16", "fp32_reference"), ("fp8_reference", "fp32_reference"))
        results["psnr_db"] = {f"{a}_vs_{b}": round(video_psnr(videos[a], videos[b]), 2)
                              for a, b in pairs if a in videos and b in videos}
    write_json(out, results)
    print(out)
    return 0 if ok and all(s["rc"] == 0 for s in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
