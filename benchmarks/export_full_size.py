"""Export full-size graphs (random weights) to ONNX as ``wan-trt build`` does; record time, peak host memory, disk.

    python -m benchmarks.export_full_size --out-dir /tmp/dit --json benchmarks/results/export_full_size.json
    python -m benchmarks.export_full_size --component all-but-transformer --out-dir /tmp/exp \\
        --json benchmarks/results/export_full_size_components.json --timeout-s 300 --budget-s 540

Every graph is built the way ``wan-trt build --precision bf16`` builds it: the graph module of
``wan_trt.models.graphs`` around the reference module, ``HalfPrecisionGraph`` where ``wan_trt.models.precision.graph_dtypes``
gives the graph a half type (umT5 and the DiT in bf16; CLIP, the VAE and the motion encoder stay fp32),
exported with the build's own ``export_graph`` (dynamo, opset 19, external data past 2 GB, ``onnx.checker``
full check). Weights are random; large modules are materialised module by module on the host
(``benchmarks.models``: no fp32 copy of a bf16 model ever exists); no ORT verification.

``--component transformer`` (the default) runs in this process and writes the DiT report as before
(``--layers N`` exports fewer blocks). Any other component list runs each graph in a fresh
subprocess, so each row's ``peak_rss_gib`` (``ru_maxrss``, a process-wide peak) is that graph's alone
(Linux carries ``ru_maxrss`` over exec from the parent, which therefore never imports torch; ``vm_hwm_gib``
is the child's own high-water mark); a graph past ``--timeout-s`` (or the rest of ``--budget-s``) is killed and recorded as ``timeout``,
and the JSON is rewritten after every graph, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._bootstrap import ensure_wan_trt

ensure_wan_trt()

# No torch import at module level: the parent of the per-graph subprocesses stays small.
from wan_trt.components import GraphSpec  # noqa: E402
from wan_trt.registry import graph_specs  # noqa: E402
from wan_trt.errors import BadInputError  # noqa: E402
from wan_trt.json_files import write_json_atomic  # noqa: E402
from wan_trt.presets import Preset, get_preset  # noqa: E402

log = logging.getLogger("export_full_size")

# GraphSpec.component of each graph, per --component choice
COMPONENTS = {
    "transformer": ("transformer",),
    "text_encoder": ("text_encoder",),
    "image_encoder": ("image_encoder",),
    "vae": ("vae_encoder", "vae_decoder"),
    "motion_encoder": ("motion_encoder",),
}
ALL_BUT_TRANSFORMER = ("text_encoder", "image_encoder", "motion_encoder", "vae")
CHOICES = (*COMPONENTS, "all-but-transformer")
KILL_MARGIN_S = 5.0  # budget kept back for killing a timed-out worker and writing the JSON


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _vm_hwm_gib() -> float | None:
    """This process's own RSS high-water mark (``VmHWM``: unlike ``ru_maxrss`` it restarts at exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def vocab_size_of(preset: Preset) -> int:
    """The vocabulary ``wan-trt build`` gives umT5 without a checkpoint (the preset's, else the tiny tokenizer's)."""
    if "vocab_size" in preset.text_encoder:
        return int(preset.text_encoder["vocab_size"])
    from wan_trt.tokenizer import build_tiny_tokenizer

    return int(build_tiny_tokenizer().get_vocab_size())


def graphs_of(preset: Preset, components: list[str]) -> list[str]:
    """Graph names of ``components`` in the order given (each component's graphs in build order)."""
    specs = graph_specs(preset, [], [], vocab_size_of(preset))
    names: list[str] = []
    for component in components:
        for part in ALL_BUT_TRANSFORMER if component == "all-but-transformer" else (component,):
            names += [n for n, s in specs.items() if s.component in COMPONENTS[part] and n not in names]
    return names


def _files(directory: Path) -> dict[str, int]:
    if not directory.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


def _env() -> dict:
    """Versions read from package metadata: importing torch here would raise every child's ``ru_maxrss``."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.node(),
            "memory_total_gib": _mem_total_gib(),
            **{name: ver(name) for name in ("torch", "onnx", "onnxscript", "transformers", "diffusers")}}


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------
# One graph: build its module as `wan-trt build` would (random weights), export it, measure.
# ------------------------------------------------------------------------------------------------

def _motion_encoder(preset: Preset, dtype):
    """The DiT's motion encoder alone (diffusers' WanAnimateMotionEncoder with the transformer's arguments)."""
    from diffusers.models.transformers.transformer_wan_animate import WanAnimateMotionEncoder

    from benchmarks.models import materialize_
    from wan_trt.checkpoints import parameters_on_meta

    tr = preset.transformer
    with parameters_on_meta():
        module = WanAnimateMotionEncoder(size=tr["motion_encoder_size"], style_dim=tr["motion_style_dim"],
                                         motion_dim=tr["motion_dim"], out_dim=tr["motion_encoder_dim"],
                                         channels=tr.get("motion_encoder_channel_sizes"))
    return materialize_(module, "cpu", dtype, (), seed=4)


def build_graph_module(name: str, spec_component: str, preset: Preset, dtype_name: str, vocab_size: int,
                       layers: int | None):
    """(the graph's module as the build exports it, its parameter count, the VAE's cache layouts or None)."""
    from benchmarks.models import build_image_encoder, build_text_encoder, build_transformer, build_vae, materialize_
    from wan_trt.checkpoints import parameters_on_meta
    from wan_trt.models import graphs
    from wan_trt.models.precision import DTYPES

    dtype = DTYPES[dtype_name]
    caches = None
    if spec_component == "transformer":
        model = build_transformer(preset, device="cpu", dtype=dtype, num_layers=layers)
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("motion_encoder."))
        module = graphs.TransformerGraph(model)
    elif spec_component == "text_encoder":
        from transformers import UMT5Config, UMT5EncoderModel

        with parameters_on_meta():
            model = UMT5EncoderModel(UMT5Config(**{"vocab_size": vocab_size, **preset.text_encoder}))
        if model.encoder.embed_tokens.weight is model.shared.weight:  # tied: one module, so one materialised copy
            model.encoder.embed_tokens = model.shared
        model = materialize_(model, "cpu", dtype, tuple(model._keep_in_fp32_modules or ()), seed=1)
        params = sum(p.numel() for p in model.parameters())
        module = graphs.TextEncoderGraph(model)
    elif spec_component == "image_encoder":
        model = build_image_encoder(preset, device="cpu", dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        module = graphs.ImageEncoderGraph(model)
    elif spec_component == "motion_encoder":
        model = _motion_encoder(preset, dtype)
        params = sum(p.numel() for p in model.parameters())
        module = graphs.MotionEncoderGraph(model)
    else:  # the streamed VAE: fp32 on the host, cache layouts read from it as build_engines does
        vae = build_vae(preset)  # a half dtype, if the precision rule ever gives one, is HalfPrecisionGraph's cast
        caches = (graphs.discover_cache_slots(vae, "encoder")[1], graphs.discover_cache_slots(vae, "decoder")[1])
        classes = {"vae_encoder_first": graphs.VaeEncoderFirst, "vae_encoder_step": graphs.VaeEncoderStep,
                   "vae_decoder_first": graphs.VaeDecoderFirst, "vae_decoder_step": graphs.VaeDecoderStep}
        module = classes[name](vae)
        used = vae.encoder if spec_component == "vae_encoder" else vae.decoder
        extra = vae.quant_conv if spec_component == "vae_encoder" else vae.post_quant_conv
        params = sum(p.numel() for p in used.parameters()) + sum(p.numel() for p in extra.parameters())
    return module.eval(), params, caches


def onnx_initializer_elements(path: Path) -> int:
    """Elements stored as initializers in the ONNX file (the weights actually exported)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        total += count
    return total


def export_one(name: str, preset: Preset, precision: str, graph_dir: Path, layers: int | None = None) -> dict:
    """Build, wrap, export and check graph ``name``; return its measurements (this process's peak RSS)."""
    import torch

    from wan_trt.export.onnx_export import export_graph
    from wan_trt.models.precision import HalfPrecisionGraph, graph_dtypes

    vocab = vocab_size_of(preset)
    specs = graph_specs(preset, [], [], vocab)
    if name not in specs:
        raise BadInputError(f"graph '{name}' is not a graph of preset '{preset.name}': choose one of {', '.join(specs)}")
    dtype = graph_dtypes(precision, list(specs))[name]
    times = {}
    start = time.monotonic()
    module, params, caches = build_graph_module(name, specs[name].component, preset, dtype, vocab, layers)
    if caches is not None:
        specs = graph_specs(preset, caches[0], caches[1], vocab)
    spec: GraphSpec = specs[name]
    if dtype != "fp32":
        module = HalfPrecisionGraph(module, dtype, spec.input_names)
    times["materialise_s"] = time.monotonic() - start
    rss_after_weights = _peak_rss_gib()
    graph_dir.mkdir(parents=True, exist_ok=True)
    path = graph_dir / f"{name}.onnx"
    start = time.monotonic()
    export_graph(spec, module, path)
    times["export_and_check_s"] = time.monotonic() - start
    files = {k: v for k, v in _files(graph_dir).items() if k.startswith(name)}
    hwm = _vm_hwm_gib()
    return {
        "graph": name, "component": spec.component, "dtype": dtype, "status": "ok",
        "parameters": params, "onnx_initializer_elements": onnx_initializer_elements(path),
        "times": times, "peak_rss_gib": round(_peak_rss_gib(), 2), "rss_after_weights_gib": round(rss_after_weights, 2),
        "vm_hwm_gib": None if hwm is None else round(hwm, 2),
        "files_bytes": files, "total_bytes": sum(files.values()),
        "disk_free_after_bytes": shutil.disk_usage(graph_dir).free,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _run_dit(args: argparse.Namespace, preset: Preset) -> None:
    """The DiT in this process, written in the report format of the 5-block measurement."""
    row = export_one("transformer", preset, args.precision, args.out_dir, args.layers)
    result = {
        "what": f"full-size DiT exported as `wan-trt build --precision {args.precision}` does "
                "(random weights, no ORT verify)",
        "preset": preset.name, "layers": args.layers or int(preset.transformer["num_layers"]),
        "parameters": row["parameters"], "times": row["times"],
        "peak_rss_gib": row["peak_rss_gib"], "rss_after_weights_gib": row["rss_after_weights_gib"],
        "files_bytes": row["files_bytes"], "total_bytes": row["total_bytes"],
        "disk_free_after_bytes": row["disk_free_after_bytes"],
        "onnx_initializer_elements": row["onnx_initializer_elements"],
        "env": {**_env(), "cpus": row["torch_threads"], "device": args.device or platform.node()},
    }
    write_json_atomic(args.json, result)
    print(json.dumps({k: result[k] for k in ("parameters", "times", "peak_rss_gib", "total_bytes")}))


def _run_worker(args: argparse.Namespace, preset: Preset) -> None:
    row = export_one(args.worker, preset, args.precision, args.out_dir / args.worker, args.layers)
    write_json_atomic(args.row_json, row)


def _child(name: str, args: argparse.Namespace, row_path: Path, timeout: float) -> dict:
    """Run graph ``name`` in a fresh interpreter; a timed-out child is killed and its partial files recorded."""
    cmd = [sys.executable, "-m", "benchmarks.export_full_size", "--preset", args.preset, "--precision", args.precision,
           "--out-dir", str(args.out_dir), "--json", str(args.json), "--worker", name, "--row-json", str(row_path)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    row_path.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    wall = time.monotonic() - start
    if code == 0 and row_path.is_file():
        row = json.loads(row_path.read_text())
        row_path.unlink()
        row["wall_s"] = round(wall, 1)
        return row
    files = _files(args.out_dir / name)
    return {"graph": name, "status": "timeout" if code is None else f"failed (exit {code})",
            "timeout_s": round(timeout, 1) if code is None else None, "wall_s": round(wall, 1),
            "files_bytes": files, "total_bytes": sum(files.values())}


def _run_graphs(args: argparse.Namespace, preset: Preset, names: list[str]) -> None:
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    result = {
        "what": f"full-size graphs exported as `wan-trt build --precision {args.precision}` does "
                "(random weights, no ORT verify), each graph in a fresh process",
        "preset": preset.name, "precision": args.precision, "components": args.component, "graphs": names,
        "env": {**_env(), "device": args.device or platform.node()}, "rows": [],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    row_path = args.out_dir / ".row.json"
    for name in names:
        left = None if deadline is None else deadline - time.monotonic() - KILL_MARGIN_S
        if left is not None and left < 1.0:
            result["rows"].append({"graph": name, "status": "not run (budget spent)"})
            write_json_atomic(args.json, result)
            continue
        timeout = min(t for t in (args.timeout_s, left, float("inf")) if t is not None)
        log.info("exporting %s (timeout %.0f s)", name, timeout)
        row = _child(name, args, row_path, timeout)
        if args.clean:
            shutil.rmtree(args.out_dir / name, ignore_errors=True)
        result["rows"].append(row)
        write_json_atomic(args.json, result)
        log.info("%s: %s", name, json.dumps({k: row.get(k) for k in ("status", "parameters", "times", "peak_rss_gib",
                                                                      "total_bytes")}))
    print(json.dumps([{k: r.get(k) for k in ("graph", "status", "peak_rss_gib", "total_bytes")}
                      for r in result["rows"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="animate-14b")
    parser.add_argument("--component", nargs="+", default=["transformer"], choices=CHOICES,
                        help="components to export, in this order (all-but-transformer: umT5, CLIP, motion encoder, VAE)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"),
                        help="the build's --precision: each graph gets the type wan_trt.models.precision.graph_dtypes gives it")
    parser.add_argument("--layers", type=int, default=None, help="export only this many DiT blocks (smoke test)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--timeout-s", type=float, default=None, help="kill a graph's export after this long")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting graphs after this long in all")
    parser.add_argument("--clean", action="store_true", help="delete each graph's files once measured")
    parser.add_argument("--device", default=None, help="the machine's name to record (default: the host name)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for name in ("export_full_size", "wan_trt"):  # not onnx_ir's per-initializer INFO lines
        logging.getLogger(name).setLevel(logging.INFO)

    preset = get_preset(args.preset)
    if args.worker:
        _run_worker(args, preset)
    elif args.component == ["transformer"]:
        _run_dit(args, preset)
    else:
        _run_graphs(args, preset, graphs_of(preset, args.component))


if __name__ == "__main__":
    main()
