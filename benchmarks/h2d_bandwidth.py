"""Host-to-device copy bandwidth from page-locked memory, as ``infer --max-gpu-memory`` streams DiT blocks:
one flat buffer the size of a streamed block (FP8 ≈ 0.43 GiB at animate-14b) registered with
``cudaHostRegister`` and copied on a side stream. Writes the median GB/s to ``--out``."""

from __future__ import annotations

import argparse

import torch

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)
from benchmarks.timing import environment, time_cpu, write_json
from wan_trt.runtime.fast.streaming import _pin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=0.43, help="buffer size (one FP8 block of animate-14b)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30)
    host = torch.empty(nbytes, dtype=torch.uint8)
    _pin(host)
    stream = torch.cuda.Stream()

    def copy() -> None:
        with torch.cuda.stream(stream):
            host.to("cuda", non_blocking=True)
        stream.synchronize()

    timing = time_cpu(copy, warmup=3, repeats=args.repeats)  # each copy waited for: wall time is copy time
    gb_per_s = nbytes / 1e9 / (timing["median_ms"] / 1e3)
    print(f"host-to-device from pinned memory: {gb_per_s:.1f} GB/s ({args.gib} GiB copies, median of {args.repeats})")
    write_json(args.out, {"kind": "h2d_bandwidth", "env": environment(), "bytes": nbytes,
                            "gb_per_s": gb_per_s, "copy": timing})


if __name__ == "__main__":
    main()
