"""The real model's journey through the CLI on one GPU, as a user runs it: ``wan-trt build --backend torch``
then ``wan-trt infer --fast``, at full size (``animate-14b --random-weights``), each a fresh process.

``python -m benchmarks.end_to_end --work /tmp/e2e --out results/JSON [--sizes 832x480,1280x720] [--steps 20]``

Records each command's exit status, wall time, the build's peak host RSS (``RUSAGE_CHILDREN``) and the
infer run's own report (``infer --timings``: load, time to the first denoising step, seconds per stage,
GPU and host peaks). Inputs are the synthetic demo inputs (a portrait, a skeleton video, face crops) at
each size, 77 frames: random weights make a real video's content irrelevant to speed. The results file
is rewritten after every step, so a run cut short (a device command's 10-minute limit) keeps what
finished; ``--skip-build`` reuses ``--work``'s engines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
from benchmarks.infer_fast_smoke import wan_trt


def run_step(name: str, command: list[str], results: dict[str, Any], out: Path) -> bool:
    from benchmarks.timing import write_json

    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)  # KiB → GiB, largest child so far
    results["steps"][name] = {"command": "wan-trt " + " ".join(command[3:]), "rc": done.returncode,
                              "wall_s": round(time.time() - start, 1), "children_peak_rss_gib": round(rss, 2),
                              "stderr_tail": done.stderr[-2500:]}
    write_json(out, results)
    print(f"{name}: rc {done.returncode}, {results['steps'][name]['wall_s']} s", file=sys.stderr, flush=True)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.timing import environment, write_json
    from wan_trt.demo_media import make_demo_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="832x480,1280x720")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=77)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"kind": "end_to_end", "env": environment(), "preset": "animate-14b --random-weights",
                               "steps_per_segment": args.steps, "frames": args.frames,
                               "inputs": "synthetic demo inputs (wan_trt.demo_media)", "steps": {}, "runs": {}}
    engines = work / "engines-fp32"
    if not args.skip_build:
        if not run_step("build_torch_fp32", wan_trt("build", "--preset", "animate-14b", "--random-weights",
                                                    "--backend", "torch", "--out", str(engines)), results, out):
            return 1
    ok = True
    for size in [s for s in args.sizes.split(",") if s]:
        width, height = (int(v) for v in size.split("x"))
        inputs = work / f"inputs-{size}"
        if not inputs.is_dir():
            make_demo_inputs(inputs, width=width, height=height, num_frames=args.frames)
        timings = work / f"timings-{size}.json"
        name = f"infer_fast_bf16_{size}"
        ok &= run_step(name, wan_trt("infer", "--engines", str(engines), "--input", str(inputs), "--out",
                                     str(work / f"{size}.mp4"), "--backend", "torch", "--device", "cuda", "--fast",
                                     "--steps", str(args.steps), "--timings", str(timings)), results, out)
        if timings.is_file():
            results["runs"][name] = json.loads(timings.read_text())
            write_json(out, results)
    print(out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
