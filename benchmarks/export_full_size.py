"""Export the full-size DiT (bf16, random weights) to ONNX and record time, peak host memory and disk.

    python -m benchmarks.export_full_size --out-dir /tmp/dit --json benchmarks/results/export_full_size.json

The transformer is materialised module by module in bf16 on the host (``benchmarks.models``: the fp32
copy never exists), wrapped exactly as ``wan-trt build --precision bf16`` wraps it
(``TransformerGraph`` + ``HalfPrecisionGraph``) and exported with the build's own ``export_graph``
(dynamo, opset 19, external data, ``onnx.checker`` full check). ``--layers N`` exports fewer blocks
(a smoke test on a small machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path

from benchmarks._bootstrap import ensure_wan_trt

ensure_wan_trt()

import torch  # noqa: E402

from benchmarks.models import build_transformer  # noqa: E402
from wan_trt.components import graph_specs  # noqa: E402
from wan_trt.presets import get_preset  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    from wan_trt.export.graphs import TransformerGraph
    from wan_trt.export.onnx_export import export_graph
    from wan_trt.export.precision import HalfPrecisionGraph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="animate-14b")
    parser.add_argument("--layers", type=int, default=None, help="export only this many DiT blocks (smoke test)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    preset = get_preset(args.preset)
    spec = graph_specs(preset, [], [], int(preset.text_encoder.get("vocab_size", 256384)))["transformer"]
    times = {}
    start = time.monotonic()
    model = build_transformer(preset, device="cpu", dtype=torch.bfloat16, num_layers=args.layers)
    times["materialise_s"] = time.monotonic() - start
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("motion_encoder."))
    rss_after_weights = _peak_rss_gib()
    graph = HalfPrecisionGraph(TransformerGraph(model).eval(), "bf16", spec.input_names)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "transformer.onnx"
    start = time.monotonic()
    export_graph(spec, graph, path)
    times["export_and_check_s"] = time.monotonic() - start
    files = {p.name: p.stat().st_size for p in args.out_dir.iterdir() if p.is_file()}
    result = {
        "what": "full-size DiT exported as `wan-trt build --precision bf16` does (random weights, no ORT verify)",
        "preset": preset.name, "layers": args.layers or int(preset.transformer["num_layers"]),
        "parameters": params, "times": times,
        "peak_rss_gib": round(_peak_rss_gib(), 2), "rss_after_weights_gib": round(rss_after_weights, 2),
        "files_bytes": files, "total_bytes": sum(files.values()),
        "disk_free_after_bytes": shutil.disk_usage(args.out_dir).free,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
                "machine": platform.node()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("parameters", "times", "peak_rss_gib", "total_bytes")}))


if __name__ == "__main__":
    main()
