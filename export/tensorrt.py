"""TensorRT engines from the ONNX files ONNX Runtime has already proven, through Polygraphy's loaders.

Thin on purpose: TensorRT cannot be installed on the machines this project is built and tested on,
so everything that can be decided without it (profiles, which engines to (re)build, the manifest,
compatibility) is plain code with tests, and the TensorRT calls are the few lines of ``build_plan``.
Networks are parsed strongly typed: the precision of every tensor is what the ONNX (Q/DQ nodes,
tensor dtypes) says. On TensorRT <= 10 the matching builder precision flags are passed as well.

Refit: a ``--refittable`` engine whose ONNX changed only in its weights (a LoRA merged or swapped:
same nodes, tensor names, types and shapes — ``structure_sha256``) is refitted from the new ONNX
file (TensorRT's ``OnnxParserRefitter``) instead of rebuilt, which skips the builder's tactic search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from wan_trt.buckets import Bucket, is_bucketed, profile
from wan_trt.errors import EngineError
from wan_trt.runtime.manifest import Manifest, file_sha256
from wan_trt.runtime.tensorrt_engine import TrtEnvironment

log = logging.getLogger(__name__)

TRT_DIR = "tensorrt"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class TrtOptions:
    buckets: tuple[Bucket, ...]
    opt_level: int = 3
    workspace_gb: float | None = None
    refittable: bool = False
    weight_streaming: bool = False

    def key_fields(self) -> dict[str, Any]:
        """What changes an engine (the bucket list does not: each engine has its own bucket)."""
        return {"opt_level": self.opt_level, "workspace_gb": self.workspace_gb, "refittable": self.refittable,
                "weight_streaming": self.weight_streaming}


@dataclass
class PlanEntry:
    graph: str
    bucket: str | None
    file: str
    sha256: str
    onnx_sha256: str
    key: str
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    onnx_structure_sha256: str | None = None  # the graph without its weights (refit needs it unchanged)
    refitted: bool = False  # made by refitting a previous engine with this ONNX file's weights


def engine_key(onnx_sha256: str, bucket: Bucket | None, options: TrtOptions, env: TrtEnvironment) -> str:
    """Identity of one engine: same key, same engine (so an unchanged build is skipped)."""
    data = {"onnx": onnx_sha256, "bucket": bucket.name if bucket else None, "options": options.key_fields(),
            "env": asdict(env)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def structure_sha256(onnx_path: Path) -> str:
    """Hash of an ONNX graph without its weights' values: nodes, names, dtypes and shapes only.

    Two exports of the same architecture with other weights (a LoRA merged) hash alike, so an engine
    built from one can be refitted with the other's weights.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for init in model.graph.initializer:
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(name)
        for entry in init.external_data:
            if entry.key == "checksum":
                entry.value = ""
    # the exporter's annotations (torch.export's range constraints, stack traces) compile to nothing, and
    # their text is not stable across processes (the range constraints' order follows Python's hash seed)
    model.graph.ClearField("metadata_props")
    for node in model.graph.node:
        node.ClearField("metadata_props")
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _refit_key(graph: str, bucket: Bucket | None, structure: str, options: TrtOptions, env: TrtEnvironment) -> str:
    data = {"graph": graph, "bucket": bucket.name if bucket else None, "structure": structure,
            "options": options.key_fields(), "env": asdict(env)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def plan_jobs(manifest: Manifest, options: TrtOptions) -> list[tuple[str, Bucket | None]]:
    """(graph, bucket) for every engine to build: one per bucket for video-shaped graphs, else one."""
    jobs = []
    for name, entry in manifest.graphs.items():
        buckets = options.buckets if is_bucketed(entry.spec) else (None,)
        jobs += [(name, bucket) for bucket in buckets]
    return jobs


def build_tensorrt_engines(directory: Path, manifest: Manifest, options: TrtOptions, env: TrtEnvironment,
                           previous: tuple[Path, dict[str, Any]] | None = None,
                           build: Callable[..., bytes] | None = None,
                           refit: Callable[[Path, Path], bytes] | None = None) -> dict[str, Any]:
    """Build (or reuse, or refit) every engine into ``directory/tensorrt``; return the manifest's section.

    ``previous`` is an existing engines directory and its ``tensorrt`` section: engines whose key is
    unchanged are copied from there instead of rebuilt; with ``options.refittable``, a previous
    refittable engine of the same graph, bucket, options and ONNX structure is refitted with the new
    ONNX file's weights. Every ONNX file is checked against the hash ORT's tests and the build recorded
    before TensorRT sees it.
    """
    build, refit = build or build_plan, refit or refit_plan
    out = directory / TRT_DIR
    out.mkdir(exist_ok=True)
    reusable, refittable = {}, {}
    had_refittable: set[tuple[str, str | None]] = set()  # (graph, bucket) of the previous refittable engines
    if previous is not None:
        old_dir, old_section = previous
        reusable = {e["key"]: old_dir / e["file"] for e in old_section.get("engines", [])}
        old_options = old_section.get("options", {})
        if options.refittable and old_options.get("refittable") and old_section.get("environment") == asdict(env):
            for e in old_section.get("engines", []):
                if e.get("onnx_structure_sha256"):
                    bucket = Bucket.parse(e["bucket"]) if e["bucket"] else None
                    refittable[_refit_key(e["graph"], bucket, e["onnx_structure_sha256"], options, env)] = \
                        old_dir / e["file"]
                    had_refittable.add((e["graph"], e["bucket"]))
    entries = []
    hashes: dict[str, tuple[str, str | None]] = {}  # graph -> (file hash, structure hash): once per graph, not bucket
    jobs = plan_jobs(manifest, options)
    for number, (name, bucket) in enumerate(jobs, start=1):
        graph = manifest.graphs[name]
        onnx_path = directory / graph.file
        if name not in hashes:
            hashes[name] = (file_sha256(onnx_path), structure_sha256(onnx_path) if options.refittable else None)
        onnx_sha, structure = hashes[name]
        if onnx_sha != graph.sha256:
            raise EngineError(f"'{onnx_path}' changed after it was verified (hash mismatch): rebuild the engines")
        key = engine_key(onnx_sha, bucket, options, env)
        file = f"{TRT_DIR}/{name}{'.' + bucket.name if bucket else ''}.plan"
        shapes = profile(graph.spec, bucket)
        old = reusable.get(key)
        source = refittable.get(_refit_key(name, bucket, structure, options, env)) if structure else None
        label = f"{name} {bucket.name if bucket else ''}".strip()
        if old is not None and old.is_file():
            source = None
            if old.resolve() != (directory / file).resolve():
                shutil.copy2(old, directory / file)
            log.info("[%d/%d] %s: unchanged, reused", number, len(jobs), label)
        elif source is not None and source.is_file():
            log.info("[%d/%d] %s: same graph, new weights: refitting the previous engine", number, len(jobs), label)
            _write_atomic(directory / file, refit(source, onnx_path))
        else:
            source = None
            if (name, bucket.name if bucket else None) in had_refittable:
                log.info("[%d/%d] %s: the graph's structure (nodes, names, types or shapes) differs from the "
                         "previous engine's: rebuilding, not refitting", number, len(jobs), label)
            log.info("[%d/%d] building TensorRT engine %s", number, len(jobs), label)
            data = build(onnx_path, shapes, options, manifest.precision, directory / TRT_DIR / TIMING_CACHE)
            _write_atomic(directory / file, data)
        entries.append(PlanEntry(name, bucket.name if bucket else None, file, file_sha256(directory / file),
                                 onnx_sha, key, {k: [list(s) for s in v] for k, v in shapes.items()},
                                 structure, source is not None))
    return {"environment": asdict(env), "options": {**options.key_fields(),
                                                    "buckets": [b.name for b in options.buckets]},
            "timing_cache": f"{TRT_DIR}/{TIMING_CACHE}", "engines": [asdict(e) for e in entries]}


def build_plan(onnx_path: Path, shapes: dict[str, tuple], options: TrtOptions, precision: str,
               timing_cache: Path) -> bytes:
    """One serialized engine, strongly typed, with one optimization profile (Polygraphy's Python API)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    prof = Profile()
    for name, (low, opt, high) in shapes.items():
        prof.add(name, min=low, opt=opt, max=high)
    config_args: dict[str, Any] = {
        "profiles": [prof],
        "builder_optimization_level": options.opt_level,
        "load_timing_cache": str(timing_cache) if timing_cache.is_file() else None,
        "refittable": options.refittable,
        "weight_streaming": options.weight_streaming,
    }
    if options.workspace_gb:
        config_args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * 1024**3)}
    if int(trt.__version__.split(".")[0]) <= 10:  # weakly typed builders still want the precision flags
        config_args.update({"fp8": precision == "fp8", "int8": precision == "int8", "bf16": True, "fp16": True})
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    return EngineBytesFromNetwork(network, CreateConfig(**config_args), save_timing_cache=str(timing_cache))()


def refit_plan(plan_path: Path, onnx_path: Path) -> bytes:
    """A refittable engine's bytes with every weight replaced by ``onnx_path``'s (same graph structure)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not load '{plan_path}' to refit it: rebuild without the previous engines")
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise EngineError(f"TensorRT could not take the weights of '{onnx_path}' for '{plan_path}': rebuild it")
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        raise EngineError(f"refitting '{plan_path}' left {len(missing)} weights unset (e.g. {missing[:1]}): rebuild it")
    return bytes(engine.serialize())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
