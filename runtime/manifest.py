"""The engines directory's ``manifest.json``: what was built, from what, and how to check it.

Written by ``wan-trt build``, read (and checked) by ``wan-trt infer`` before any heavy work. It
records the preset (full configuration), the weights' seed/hash (and the checkpoint folder's
fingerprint), each graph's I/O declaration and, where the directory holds ONNX files, its file, size
and SHA-256, the precision, the backends the directory serves and the versions of the tools that built it.

Format 2 added ``backends`` (a ``--backend torch`` build has no graph files and serves only the torch
backend; tensorrt is served where the ``tensorrt`` section lists engines) and ``checkpoint_fingerprint``; format 1 manifests still read (every format-1 directory
holds ONNX files, so it serves onnxruntime and torch, and tensorrt where it lists TensorRT engines).
``loras`` lists every LoRA merged into the DiT, in order (file, scale, unmatched-keys policy and counts of
what it changed); a manifest written before several LoRAs were possible holds one ``lora`` record
(file, scale) instead, read as a list of one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_trt.components import GraphSpec
from wan_trt.errors import EngineError
from wan_trt.json_files import write_json_atomic
from wan_trt.presets import Preset, preset_from_json

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
ONNX_BACKENDS = ("onnxruntime", "torch")  # an ONNX directory: its files, and the modules they were exported from
TORCH_BACKENDS = ("torch",)  # wan-trt build --backend torch: no graph files
HASH_CHECK_LIMIT = 512 * 1024**2  # hash files up to this size on load; larger ones are checked by size


@dataclass
class GraphEntry:
    spec: GraphSpec
    file: str | None = None  # the ONNX file; None in a torch-backend directory (no graph files)
    size: int = 0
    sha256: str | None = None
    dtype: str = "fp32"  # the float type the graph computes in (its I/O stays float32): fp32, fp16 or bf16

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256, "dtype": self.dtype,
                "spec": self.spec.to_json()}


@dataclass
class Manifest:
    preset: Preset
    seed: int
    weights_hash: str
    precision: str
    tokenizer_file: str
    graphs: dict[str, GraphEntry]
    versions: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None
    quantization: dict[str, Any] | None = None  # precision, policy, calibration file, SmoothQuant alpha
    tensorrt: dict[str, Any] | None = None  # environment, options, engines (graph, bucket, file, hashes, profile)
    prompt_cache_file: str | None = None  # text embeddings of the default prompts (npz)
    loras: list[dict[str, Any]] = field(default_factory=list)  # LoRAs merged into the DiT, in order (wan_trt.lora)
    backends: tuple[str, ...] | None = None  # ONNX_BACKENDS or TORCH_BACKENDS; None: ONNX_BACKENDS (format 1)
    checkpoint_fingerprint: dict[str, Any] | None = None  # wan_trt.checkpoint_fingerprint, for --checkpoint builds

    def served_backends(self) -> tuple[str, ...]:
        """The `infer --backend`s it serves: its build's, and tensorrt where it lists TensorRT engines (the
        ``tensorrt`` section is the one record of those; the JSON's list repeats it for readers)."""
        built = tuple(b for b in (self.backends or ONNX_BACKENDS) if b != "tensorrt")
        return built + (("tensorrt",) if self.tensorrt else ())

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "preset": self.preset.to_json(),
            "seed": self.seed,
            "checkpoint": self.checkpoint,
            "weights_hash": self.weights_hash,
            "precision": self.precision,
            "tokenizer_file": self.tokenizer_file,
            "versions": self.versions,
            "quantization": self.quantization,
            "tensorrt": self.tensorrt,
            "prompt_cache_file": self.prompt_cache_file,
            "loras": self.loras,
            "backends": list(self.served_backends()),
            "checkpoint_fingerprint": self.checkpoint_fingerprint,
            "graphs": {name: entry.to_json() for name, entry in self.graphs.items()},
        }


def _lora_records(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``loras``, or an older manifest's single ``lora`` record as a list of one; each needs file and scale."""
    records = data.get("loras")
    if records is None:
        records = [data["lora"]] if data.get("lora") else []
    if not isinstance(records, list) or not all(isinstance(r, dict) and "file" in r and "scale" in r for r in records):
        raise ValueError("'loras' must be a list of records with 'file' and 'scale'")
    return records


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write atomically (temp file in the same directory, then rename)."""
    return write_json_atomic(directory / MANIFEST_NAME, manifest.to_json(), indent=2)


def read_manifest(directory: str | Path, *, check_files: bool = True) -> Manifest:
    """Load and check an engines directory; any problem is one EngineError naming the fix."""
    directory = Path(directory)
    rebuild = f"rebuild it with: wan-trt build --out {directory}"
    if not directory.is_dir():
        raise EngineError(f"engines directory '{directory}' does not exist: build it with: wan-trt build --out {directory}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"'{directory}' has no {MANIFEST_NAME}, so it is not an engines directory: {rebuild}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format_version") not in READABLE_FORMATS:
            raise EngineError(
                f"'{path}' has format version {data.get('format_version')!r}, this wan-trt reads "
                f"{' and '.join(map(str, READABLE_FORMATS))}: {rebuild}"
            )
        graphs = {
            name: GraphEntry(GraphSpec.from_json(entry["spec"]), entry.get("file"), int(entry.get("size", 0)),
                             entry.get("sha256"), entry.get("dtype", "fp32"))
            for name, entry in data["graphs"].items()
        }
        manifest = Manifest(
            preset=preset_from_json(data["preset"]),
            seed=int(data["seed"]),
            weights_hash=str(data["weights_hash"]),
            precision=str(data["precision"]),
            tokenizer_file=str(data["tokenizer_file"]),
            graphs=graphs,
            versions=dict(data.get("versions", {})),
            checkpoint=data.get("checkpoint"),
            quantization=data.get("quantization"),
            tensorrt=data.get("tensorrt"),
            prompt_cache_file=data.get("prompt_cache_file"),
            loras=_lora_records(data),
            backends=tuple(str(b) for b in data["backends"]) if data.get("backends") is not None else None,
            checkpoint_fingerprint=data.get("checkpoint_fingerprint"),
        )
        unfiled = sorted(name for name, entry in graphs.items() if entry.file is None)
        if unfiled and set(manifest.served_backends()) != set(TORCH_BACKENDS):
            raise ValueError(f"graphs {', '.join(unfiled)} have no file, yet it serves {manifest.served_backends()}")
    except EngineError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise EngineError(f"'{path}' is corrupt ({type(error).__name__}: {error}): {rebuild}") from None
    if check_files:
        check_manifest_files(directory, manifest)
    return manifest


def check_manifest_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file exists with the recorded size (and hash, for files small enough to hash quickly)."""
    rebuild = f"rebuild with: wan-trt build --out {directory}"
    for extra in (manifest.tokenizer_file, manifest.prompt_cache_file):
        if extra and not (directory / extra).is_file():
            raise EngineError(f"'{directory / extra}' listed in the manifest is missing: {rebuild}")
    listed = [(name, entry.file, entry.size, entry.sha256) for name, entry in manifest.graphs.items() if entry.file]
    listed += [(e["graph"], e["file"], None, e["sha256"]) for e in (manifest.tensorrt or {}).get("engines", [])]
    for name, relative, expected_size, sha256 in listed:
        file = directory / relative
        if not file.is_file():
            raise EngineError(f"engine file '{file}' ({name}) listed in the manifest is missing: {rebuild}")
        size = file.stat().st_size
        if expected_size is not None and size != expected_size:
            raise EngineError(f"engine file '{file}' has {size} bytes, the manifest says {expected_size}: {rebuild}")
        if size <= HASH_CHECK_LIMIT and file_sha256(file) != sha256:
            raise EngineError(f"engine file '{file}' does not match its SHA-256 in the manifest: {rebuild}")


def build_command(manifest: Manifest, directory: Path, backend: str, out: str) -> str:
    """The ``wan-trt build`` command line that makes ``backend``'s engines of the weights, precision and
    quantization (the directory's calibration cache, the policy's name or file) of ``directory``."""
    parts = ["wan-trt build", f"--preset {manifest.preset.name}"]
    if manifest.checkpoint:
        parts.append(f"--checkpoint {manifest.checkpoint}")
    elif manifest.preset.needs_checkpoint:
        parts.append("--random-weights")
    if manifest.seed and not manifest.checkpoint:
        parts.append(f"--seed {manifest.seed}")
    parts += [f"--lora {record['file']}:{record['scale']:g}" for record in manifest.loras]
    if any(record.get("unmatched") == "warn" for record in manifest.loras):
        parts.append("--lora-unmatched warn")
    if manifest.precision != "fp32":
        parts.append(f"--precision {manifest.precision}")
    q = manifest.quantization
    if q:
        parts.append(f"--calibration {directory / q['calibration_file']} --policy {q['policy'].get('source', 'default')}")
        if q.get("high_precision", "fp32") != "fp32":
            parts.append(f"--high-precision {q['high_precision']}")
    return " ".join([*parts, f"--backend {backend}", f"--out {out}"])


def built_with(manifest: Manifest) -> str:
    """The ``--backend`` of the build that wrote this directory."""
    served = set(manifest.served_backends())
    return "torch" if served == set(TORCH_BACKENDS) else "tensorrt" if "tensorrt" in served else "onnxruntime"


def require_backend(directory: Path, manifest: Manifest, backend: str) -> None:
    """EngineError (one line naming the build command) when the directory does not serve ``backend``."""
    served = manifest.served_backends()
    if backend in served:
        return
    if set(served) == set(TORCH_BACKENDS):
        raise EngineError(f"'{directory}' holds torch-backend engines (wan-trt build --backend torch: no ONNX files): "
                          f"run it with --backend torch, or build {backend} engines with: "
                          f"{build_command(manifest, directory, backend, f'{directory}-{backend}')}")
    if backend == "tensorrt":
        raise EngineError(f"'{directory}' has no TensorRT engines: build them with: "
                          f"wan-trt build --backend tensorrt --out {directory}")
    raise EngineError(f"'{directory}' serves {', '.join(served)}, not {backend}: build {backend} engines with: "
                      f"{build_command(manifest, directory, backend, f'{directory}-{backend}')}")
