"""Pre-flight checks: refuse, before any heavy work, a run that cannot fit this machine or these engines.

Each check is a plain function of numbers so it can be tested without a full disk or a GPU: the
free space / free device memory are looked up by :func:`free_disk_bytes` / :func:`free_device_bytes`
unless a ``free=`` value is passed (tests pass one, or monkeypatch those two functions).

Estimates (generous on purpose; a refusal names the directory or device, the needed and the free bytes):

* **engines directory** (``build``): for every graph, its parameter count (exact, from the preset's
  modules built on the meta device: no weight memory) × bytes per parameter of the graph's dtype
  (fp32 4, fp16/bf16 2; FP8/INT8 store the policy's quantized Linear weights in 1 byte and keep the
  rest in the ``--high-precision`` type), plus 8 MiB per graph (graph structure, constant tables), the
  prompt-embedding cache and, for fp8/int8, the fp32 DiT that exists while it is rewritten with Q/DQ.
  ``--backend tensorrt|all`` adds one engine per graph, and one per bucket for the VAE graphs and
  the DiT, each the size of the graph's weights; ``--backend torch`` writes no graph files, only the
  prompt-embedding and calibration caches. All × 1.1.
* **output video** (``infer``): frames × width × height × 1.5 bytes (uncompressed yuv420p, which
  x264 at the writer's settings stays far below) + 1 MiB.
* **device memory** (``infer`` on ``cuda``/``tensorrt``): the weights of every graph the run keeps
  resident (ONNX Runtime sessions and TensorRT engines are opened on first use and kept; the text
  encoder only when a prompt is not in the build's cache) — the manifest's file sizes, or for a
  directory without graph files the parameter counts × bytes of each graph's dtype — plus the
  larger of the two activation peaks (they never overlap), plus 1 GiB for the CUDA context and
  workspaces (per GPU: with ``infer --gpus N`` every GPU holds all the weights and 1/N of the DiT's tokens):

  - DiT: ``batch × tokens × (8·dim + ffn_dim) × bytes`` with ``tokens = (latent frames + 1) ×
    H/16 × W/16`` (the residual stream, norm, q/k/v, attention output and modulated copies, plus
    the FFN's hidden layer; attention is assumed fused, no tokens² matrix);
  - with ``infer --fast`` every module counts 2 bytes per parameter (bf16; FP8 Linears are counted as
    bf16 too, which over-estimates an FP8 DiT by about 16 GiB at full size), the text and image encoders
    only one at a time (they wait on the host), and the peak is at least the whole model in bf16 (it is
    loaded on the GPU before the encoders leave; measured on an H100: 45.0 GiB at 832×480), without
    umT5 when every prompt is in the build's cache (``--fast`` then never loads it), plus 1 byte per
    weight of the FP8/INT8 Linears an fp8/int8 manifest's policy quantizes, made beside the bf16 ones
    (measured: 52.6 GiB for fp8 engines, umT5 loaded);
  - with ``infer --fast --max-gpu-memory SIZE``: the estimate above when it fits SIZE; else the DiT's
    blocks stream from pinned host memory, and the GPU holds the rest of the DiT and the VAE in bf16
    plus ``GROUPS_ON_DEVICE`` block groups (a block and its face adapter, quantized Linears at 1 byte),
    while an encoder visits only before the first block arrives; a SIZE that this does not fit is
    refused naming the smallest that does;
  - VAE (streamed, one 4-frame chunk at a time): ``16 × 4 × H × W × base_dim × bytes``, the
    factor 16 fitted to diffusers' measured 720p × 77-frame decode on an H100 (21.5 GB fp32,
    10.8 GB bf16 — the formula gives 22.6 / 11.3 GB).

  Activation bytes are 2 where the manifest says the graph computes in fp16/bf16, else 4. A refusal suggests the largest smaller bucket that fits.
* **host memory** (``infer --device cpu``): every graph's weights + the larger of the DiT's activations (as
  above, in fp32; with ONNX Runtime also its attention's ``batch × heads × tokens²`` score matrix and its
  softmax, which its CPU kernels materialise) and the VAE chunk's, + 2 GiB; against what this process can
  get (MemAvailable, a cgroup limit, ``ulimit -v``). A refusal names the largest size of the same shape
  that fits (``wan-trt preprocess --resolution``) and ``--backend torch`` where that fits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from wan_trt.errors import BadInputError, EngineError
from wan_trt.presets import Component
from wan_trt.registry import (
    GRAPH_NAMES,
    GRAPHS,
    TEXT_ENCODER,
    TRANSFORMER,
    VAE_DECODER_STEP,
    Parameters,
    graph_dtype,
)

log = logging.getLogger(__name__)

KIB, MIB, GIB = 1024, 1024**2, 1024**3

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
QUANTIZED_PRECISIONS = ("fp8", "int8")
GRAPH_OVERHEAD = 8 * MIB  # per ONNX file / engine: graph structure, constant tables
DISK_MARGIN = 1.10
VIDEO_BYTES_PER_PIXEL = 1.5  # uncompressed yuv420p
VIDEO_OVERHEAD = MIB
DIT_ACTIVATION_WIDTHS = 8  # copies of the token stream alive in one DiT block, besides the FFN hidden layer
VAE_ACTIVATION_FACTOR = 16  # fitted to diffusers' measured 720p x 77 decode (docs/memory.md)
VAE_CHUNK_FRAMES = 4
RUNTIME_OVERHEAD = GIB  # CUDA context, cuBLAS/cuDNN workspaces
CAP_MARGIN = 0.92  # --max-gpu-memory plans fill at most this share of SIZE (allocator fragmentation, workspaces)
CACHED_PROMPT_COUNT = 2  # the default prompt and the empty negative prompt (export.directory.CACHED_PROMPTS)
TEXT_TOKENS = 512



# --------------------------------------------------------------------------------------- values


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN (which compares false with both bounds and so passes it)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


SEED = click.IntRange(0, 2**32 - 1)  # --seed: the random weights' streams are seeded with seed * 1000 + offset

_SIZE_UNITS = {"": GIB, "gib": GIB, "g": GIB, "gb": 10**9, "mib": MIB, "m": MIB, "mb": 10**6}


class MemorySize(click.ParamType):
    """A memory size such as ``24GiB``, ``22.5GB``, ``24000MiB`` or ``24`` (GiB) → bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = float("nan")
        if unit not in _SIZE_UNITS or not math.isfinite(amount) or amount <= 0:
            self.fail(f"{value!r} is not a memory size: write e.g. 24GiB, 22.5GB or 24000MiB", param, ctx)
        return int(amount * _SIZE_UNITS[unit])


MEMORY_SIZE = MemorySize()


def check_segment_frames(frames: int | None, option: str = "--segment-frames") -> None:
    if frames is not None and (frames < 5 or (frames - 1) % 4):
        raise BadInputError(f"{option} {frames}: must be 4n+1 and at least 5 (e.g. 77)")


def check_lora(path: str, scale: float) -> None:
    """``--lora PATH[:SCALE]``: the file or PEFT folder exists and the scale is a finite number (what the
    file holds is checked against the preset's DiT by ``check_build``)."""
    if not math.isfinite(scale):
        raise BadInputError(f"--lora '{path}:{scale}': the scale must be a finite number, e.g. {path}:1.0")
    if not Path(path).exists():
        raise BadInputError(f"--lora '{path}' does not exist: pass PATH[:SCALE], PATH a LoRA file (.ckpt, "
                            ".safetensors) or PEFT folder and SCALE a number")


def check_backends(names: Iterable[str], known: Iterable[str], option: str = "--backends") -> None:
    known = tuple(known)
    for name in names:
        if name not in known:
            raise BadInputError(f"{option}: unknown backend '{name}': choose from {', '.join(known)}")


# ------------------------------------------------------------------------------------ file system


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a new file or folder would be made)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, option: str) -> None:
    """The folder ``path`` (made if missing) can receive files: its closest existing ancestor is a
    folder and a probe file can be created there (as root, permission bits alone would not tell)."""
    base = nearest_existing(path)
    if not base.is_dir():
        raise BadInputError(f"{option}: '{base}' is a file, not a folder: choose an output path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".wan-trt-probe-", dir=base)
    except OSError as error:
        raise BadInputError(f"{option}: folder '{base}' is not writable ({error.strerror or error}): "
                            "choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that would hold ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB ({int(n)} bytes)" if n >= GIB else f"{n / MIB:.1f} MiB ({int(n)} bytes)"


def check_disk(directory: Path, needed: int, what: str, free: int | None = None) -> None:
    """BadInputError when the estimate ``needed`` does not fit the free space of ``directory``'s file system."""
    where = nearest_existing(directory)
    free = free_disk_bytes(where) if free is None else free
    if needed > free:
        raise BadInputError(f"not enough free disk in '{where}' for {what}: about {_size(needed)} needed, "
                            f"{_size(free)} free: free some space or choose another --out")
    log.debug("disk: %s needs about %s, %s free in %s", what, _size(needed), _size(free), where)


# ------------------------------------------------------------------------------------------ build


def meta_modules(preset, vocab_size: int) -> dict[str, Any]:
    """The preset's four reference modules with every parameter on the meta device (no weight memory)."""
    import torch

    from wan_trt.checkpoints import empty_component

    with torch.device("meta"):
        return {name: empty_component(name, preset, vocab_size) for name in (
            Component.TRANSFORMER, Component.VAE, Component.TEXT_ENCODER, Component.IMAGE_ENCODER)}


def _numel(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def graph_parameter_counts(modules: dict[str, Any]) -> dict[str, int]:
    """Parameters in each graph (``wan_trt.registry.Graph.parameters``) of the components' ``modules``: the
    VAE's first/step graphs each hold the encoder's (decoder's) weights."""
    def count(share: Parameters) -> int:
        component = modules[share.component]
        held = _numel(*(getattr(component, part) for part in share.parts)) if share.parts else _numel(component)
        return held - _numel(*(getattr(component, part) for part in share.excluding))

    return {name: count(graph.parameters) for name, graph in GRAPHS.items()}


_COUNTS: dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]] = {}


def parameter_counts(preset, vocab_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters per module and per graph (``graph_parameter_counts``) of ``preset``'s reference modules,
    built on the meta device once per preset and vocabulary (several seconds at full size)."""
    key = (json.dumps(preset.to_json(), sort_keys=True), vocab_size)
    if key not in _COUNTS:
        modules = meta_modules(preset, vocab_size)
        _COUNTS[key] = ({name: _numel(module) for name, module in modules.items()}, graph_parameter_counts(modules))
    return _COUNTS[key]


def quantized_parameter_count(transformer, policy, option: str = "--policy") -> int:
    """Weights of the Linear layers the policy quantizes; a layer the DiT does not have is one BadInputError."""
    linears = {f"transformer.{name}": m for name, m in transformer.named_modules()}
    total = 0
    for path in policy.quantized_layers(len(transformer.blocks)):
        module = linears.get(path)
        if module is None or not hasattr(module, "weight"):
            raise BadInputError(f"{option} '{policy.source}' names layer '{path}', which this DiT does not have: "
                                "block_layers are paths inside a block such as attn1.to_q")
        total += module.weight.numel()
    return total


def graph_bytes_per_param(name: str, precision: str) -> int:
    """Bytes per (unquantized) weight of one graph at a float build precision."""
    return BYTES_PER_PARAM[graph_dtype(name, precision)]


def estimate_engines_bytes(counts: dict[str, int], precision: str, *, high_precision: str = "fp32", quantized: int = 0,
                           trt_buckets: int = 0, text_dim: int = 0, graph_files: bool = True,
                           calibration_bytes: int = 0) -> int:
    """Disk an engines directory needs at its peak while being built (see the module docstring).

    ``high_precision``: with fp8/int8, the float type of everything the policy leaves unquantized.
    ``graph_files`` False: a ``--backend torch`` directory, which holds no graph files."""
    floats = high_precision if precision in QUANTIZED_PRECISIONS else precision
    total = CACHED_PROMPT_COUNT * TEXT_TOKENS * text_dim * 4 + calibration_bytes  # prompt_embeds.npz, calibration
    for name, params in (counts.items() if graph_files else ()):
        weights = params * graph_bytes_per_param(name, floats)
        if name == TRANSFORMER and precision in QUANTIZED_PRECISIONS:
            total += weights  # the float export exists while it is rewritten with Q/DQ
            weights = (params - quantized) * graph_bytes_per_param(name, floats) + quantized * BYTES_PER_PARAM[precision]
        total += weights + GRAPH_OVERHEAD
        if trt_buckets:
            total += (trt_buckets if GRAPHS[name].bucketed else 1) * (weights + GRAPH_OVERHEAD)
    return int(total * DISK_MARGIN)


def check_build(preset, out_dir: Path, *, precision: str = "fp32", policy: str | None = None,
                calibration: str | None = None, loras: Sequence[Any] = (), trt_buckets: int = 0,
                checkpoint: str | None = None, random_weights: bool = False, high_precision: str = "fp32",
                graph_files: bool = True, free: int | None = None) -> int:
    """Everything ``build`` can check before loading weights or exporting; returns the disk estimate.

    ``graph_files`` False: ``build --backend torch`` (no ONNX files: the disk is the prompt and
    calibration caches')."""
    if checkpoint is None and preset.needs_checkpoint and not random_weights:
        raise BadInputError(f"preset '{preset.name}' needs real weights: pass --checkpoint DIR, or --random-weights "
                            "for speed/memory work")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise BadInputError(f"--checkpoint '{checkpoint}' is not a folder: pass the folder that holds the downloaded "
                            "model")
    for spec in loras:  # wan_trt.lora.LoraSpec
        check_lora(spec.path, spec.scale)
    check_writable_dir(out_dir.parent, "--out")
    quantized_policy = None
    if precision in QUANTIZED_PRECISIONS:
        from wan_trt.calibration.cache import load_cache
        from wan_trt.calibration.policy import load_policy

        quantized_policy = load_policy(policy)
        if calibration is not None:
            load_cache(calibration)  # exists and parses; its weights hash is checked once the weights are loaded
    vocab = int(preset.text_encoder.get("vocab_size", 0)) or _tiny_vocab()
    modules = meta_modules(preset, vocab)
    if loras:  # every key maps onto the DiT, shapes fit, values are finite: before loading any weights
        from wan_trt.lora import check_loras

        check_loras(modules[Component.TRANSFORMER], loras)
    counts = graph_parameter_counts(modules)
    quantized = quantized_parameter_count(modules[Component.TRANSFORMER], quantized_policy) if quantized_policy else 0
    needed = estimate_engines_bytes(counts, precision, high_precision=high_precision, quantized=quantized,
                                    trt_buckets=trt_buckets, text_dim=int(preset.text_encoder["d_model"]),
                                    graph_files=graph_files,
                                    calibration_bytes=_file_size(calibration))
    kind = "TensorRT" if trt_buckets else "ONNX" if graph_files else "torch"
    what = f"the {kind} engines of preset '{preset.name}' ({precision})"
    check_disk(out_dir.parent, needed, what, free)
    return needed


def _file_size(path: str | None) -> int:
    return Path(path).stat().st_size if path and Path(path).is_file() else 0


def _tiny_vocab() -> int:
    from wan_trt.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer().get_vocab_size()


# ------------------------------------------------------------------------------------------ infer


def estimate_video_bytes(frames: int, width: int, height: int) -> int:
    return int(frames * width * height * VIDEO_BYTES_PER_PIXEL) + VIDEO_OVERHEAD


@dataclass(frozen=True)
class DeviceEstimate:
    weights: int
    dit_activations: int
    vae_activations: int
    overhead: int = RUNTIME_OVERHEAD
    loading: int = 0  # a peak while loading, before the run (``--fast``: the whole model in bf16)

    @property
    def total(self) -> int:
        return max(self.weights + max(self.dit_activations, self.vae_activations), self.loading) + self.overhead


def graph_file_bytes(directory: Path, entry) -> int:
    """A graph's bytes on disk: the manifest's size of the .onnx plus its external data file, if any."""
    data = directory / f"{entry.file}.data"
    return int(entry.size) + (data.stat().st_size if data.is_file() else 0)


def graph_weight_bytes(manifest, directory: Path) -> dict[str, int]:
    """Each graph's weight bytes: its files' size, or for a directory without graph files (``build
    --backend torch``) its parameter count (meta modules) × bytes per parameter of its dtype."""
    unfiled = [name for name, entry in manifest.graphs.items() if not entry.file]
    counts = {}
    if unfiled:
        vocab = int(manifest.graphs[TEXT_ENCODER].spec.vocab_size)
        counts = parameter_counts(manifest.preset, vocab)[1]
    return {name: (graph_file_bytes(directory, entry) if entry.file else counts[name] * BYTES_PER_PARAM[entry.dtype])
            for name, entry in manifest.graphs.items()}


def _quantized_copies(manifest, vocab: int) -> int:
    """Bytes of the quantized Linears ``--fast`` makes from a quantized manifest's policy (1 byte per weight)."""
    if manifest.precision not in QUANTIZED_PRECISIONS or not manifest.quantization:
        return 0
    from wan_trt.calibration.policy import PrecisionPolicy

    policy = PrecisionPolicy.from_json(manifest.quantization["policy"])
    return quantized_parameter_count(meta_modules(manifest.preset, vocab)[Component.TRANSFORMER], policy)


_GROUPS: dict[str, tuple[tuple[int, int], ...]] = {}


def block_groups(manifest) -> tuple[tuple[int, int], ...]:
    """(parameters, bytes on the GPU) of each block group of the DiT, in order (``FastTransformer.block_groups``:
    a block and the face adapter that follows it), its quantized Linears (the manifest's policy) at 1 byte
    per weight, everything else at 2 (bf16): what ``--max-gpu-memory`` streams."""
    import torch

    from wan_trt.checkpoints import empty_component

    quantization = manifest.quantization if manifest.precision in QUANTIZED_PRECISIONS else None
    key = json.dumps([manifest.preset.to_json(), quantization], sort_keys=True, default=str)
    if key not in _GROUPS:
        vocab = int(manifest.graphs[TEXT_ENCODER].spec.vocab_size)
        with torch.device("meta"):
            transformer = empty_component(Component.TRANSFORMER, manifest.preset, vocab)
        quantized: set[str] = set()
        if quantization:
            from wan_trt.calibration.policy import PrecisionPolicy

            quantized = set(PrecisionPolicy.from_json(quantization["policy"]).quantized_layers(len(transformer.blocks)))
        modules = dict(transformer.named_modules())
        every = transformer.config.inject_face_latents_blocks
        groups = []
        for index, block in enumerate(transformer.blocks):
            prefix = f"transformer.blocks.{index}."
            one_byte = sum(modules[p.removeprefix("transformer.")].weight.numel() for p in quantized if p.startswith(prefix))
            params = _numel(block) + (_numel(transformer.face_adapter[index // every]) if index % every == 0 else 0)
            groups.append((params, 2 * params - one_byte))
        _GROUPS[key] = tuple(groups)
    return _GROUPS[key]


def estimate_device_bytes(manifest, directory: Path, width: int, height: int, segment_frames: int, *,
                          batch: int = 1, text_encoder: bool = True, gpus: int = 1, fast: bool = False,
                          streamed: int | None = None) -> DeviceEstimate:
    """Peak device memory of one run at ``width`` × ``height`` (see the module docstring for the formula), per
    GPU: with ``gpus`` > 1 (sequence parallel) every GPU holds all weights and 1/``gpus`` of the DiT's tokens.
    ``fast`` (``infer --fast``): every module in bf16; the whole model is on the GPU while it loads, then the
    text and image encoders wait on the host and visit the GPU one at a time. ``streamed`` (with ``fast``,
    ``--max-gpu-memory``'s plan): the model is loaded on the host, the DiT's first ``streamed`` block groups
    wait there (``GROUPS_ON_DEVICE`` of them on the GPU at a time) and the others stay on the GPU."""
    if fast:
        vocab = int(manifest.graphs[TEXT_ENCODER].spec.vocab_size)
        counts = parameter_counts(manifest.preset, vocab)[0]
        visiting = max(counts[Component.IMAGE_ENCODER], counts[Component.TEXT_ENCODER] if text_encoder else 0)
        weights = 2 * (counts[Component.TRANSFORMER] + counts[Component.VAE] + visiting)
        loading = 2 * (sum(counts.values()) - (0 if text_encoder else counts[Component.TEXT_ENCODER]))
        loading += _quantized_copies(manifest, vocab)  # FP8/INT8 Linears are made beside their bf16 weights
        if streamed is not None:  # loaded and quantized on the host; an encoder visits before the blocks come
            from wan_trt.runtime.fast.streaming import GROUPS_ON_DEVICE

            groups = block_groups(manifest)
            resident = 2 * (counts[Component.TRANSFORMER] - sum(p for p, _ in groups) + counts[Component.VAE])
            resident += sum(b for _, b in groups[streamed:])  # the blocks that stay on the GPU
            # streaming 1 to GROUPS_ON_DEVICE - 1 blocks saves nothing over 0: they are all on the GPU at once
            weights = resident + min(GROUPS_ON_DEVICE, streamed) * max([b for _, b in groups[:streamed]], default=0)
            loading = resident + 2 * visiting
    else:
        sizes = graph_weight_bytes(manifest, directory)
        weights = sum(size for name, size in sizes.items() if text_encoder or name != TEXT_ENCODER)
        loading = 0

    def act_bytes(graph: str) -> int:  # the manifest records the float type each graph computes in
        if fast:
            return 2
        return 2 if getattr(manifest.graphs.get(graph), "dtype", "fp32") in ("fp16", "bf16") else 4

    config = manifest.preset.transformer
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    tokens = _dit_tokens(width, height, segment_frames)
    dit = batch * -(-tokens // gpus) * (DIT_ACTIVATION_WIDTHS * dim + int(config["ffn_dim"])) * act_bytes(TRANSFORMER)
    vae = (VAE_ACTIVATION_FACTOR * VAE_CHUNK_FRAMES * height * width * int(manifest.preset.vae["base_dim"])
           * act_bytes(VAE_DECODER_STEP))
    return DeviceEstimate(weights, dit, vae, loading=loading)


def free_device_bytes(device: str) -> int | None:
    """Free memory of the current CUDA device, or None where there is no CUDA device to ask."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def check_device_memory(manifest, directory: Path, width: int, height: int, segment_frames: int, *,
                        device: str, batch: int = 1, text_encoder: bool = True, gpus: int = 1,
                        buckets: Iterable[tuple[int, int]] = (), free: int | None = None,
                        fast: bool = False) -> DeviceEstimate:
    """EngineError (exit 3) when the run's estimated peak exceeds the device's free memory, naming the
    largest smaller bucket that would fit."""
    def estimate(w: int, h: int) -> DeviceEstimate:
        return estimate_device_bytes(manifest, directory, w, h, segment_frames, batch=batch,
                                     text_encoder=text_encoder, gpus=gpus, fast=fast)

    need = estimate(width, height)
    free = free_device_bytes(device) if free is None else free
    if free is None:
        log.debug("no CUDA device to ask for free memory; the %s backend checks the device itself", device)
        return need
    if need.total <= free:
        log.debug("device memory: about %s needed, %s free", _size(need.total), _size(free))
        return need
    smaller = sorted({(w, h) for w, h in buckets if w * h < width * height},  # largest first, same orientation first
                     key=lambda s: (s[0] * s[1], (s[0] >= s[1]) == (width >= height)), reverse=True)
    fitting = [(w, h) for w, h in smaller if estimate(w, h).total <= free]
    if fitting:
        w, h = fitting[0]
        advice = (f"preprocess the driving video at the smaller bucket {w}x{h} (about {_size(estimate(w, h).total)}), "
                  "or free device memory")
    else:
        advice = ("no smaller bucket fits either: use a GPU with more memory or lower-precision engines "
                  "(wan-trt build --precision fp8)")
    raise EngineError(
        f"{device} device memory: {width}x{height} x {segment_frames} frames needs about {_size(need.total)} "
        f"(weights {_size(need.weights)}, activations {_size(max(need.dit_activations, need.vae_activations))}), "
        f"{_size(free)} free: {advice}")


def warm_up_buckets(directory: Path, buckets, free: int | None = None) -> list:
    """The buckets of ``build``'s warm-up (``runtime.fast.warm_up.kernel_buckets``) whose ``infer --fast`` run
    fits the GPU's free memory (the estimate ``infer`` checks, prompts cached); each other one is a warning."""
    from wan_trt.runtime.fast.warm_up import kernel_buckets
    from wan_trt.runtime.manifest import read_manifest

    manifest = read_manifest(directory)
    free = free_device_bytes("cuda") if free is None else free
    fitting = []
    for bucket in kernel_buckets(buckets):
        need = estimate_device_bytes(manifest, directory, bucket.width, bucket.height, bucket.frames,
                                     text_encoder=False, fast=True).total
        if free is not None and need > free:
            log.warning("not compiling --fast's kernels for %s: about %s of GPU memory needed, %s free (the first "
                        "infer at that size compiles them)", bucket.name, _size(need), _size(free))
        else:
            fitting.append(bucket)
    return fitting


def total_device_bytes(device: str) -> int | None:
    """All memory of the current CUDA device, or None where there is none."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def plan_gpu_memory(manifest, directory: Path, width: int, height: int, segment_frames: int, cap: int, *,
                    device: str = "cuda", batch: int = 1, text_encoder: bool = True, free: int | None = None,
                    total: int | None = None) -> int | None:
    """``--max-gpu-memory cap``'s plan: None when the run fits under ``cap`` (and the free memory) as it is;
    else the fewest DiT blocks that must stream from the host (0: the model is loaded on the host and
    then fits whole). Plans fill at most ``CAP_MARGIN`` of ``cap``. Otherwise one error naming the smallest SIZE that works for this video size
    (exit 3), or, for a ``cap`` above what the GPU has, exit 2."""
    total = total_device_bytes(device) if total is None else total
    if total is not None and cap > total:
        raise BadInputError(f"--max-gpu-memory {_size(cap)} is more than this GPU has ({_size(total)}): give at most "
                            f"{total // GIB}GiB, or drop the option to use all of it")
    free = free_device_bytes(device) if free is None else free
    budget = int(CAP_MARGIN * (cap if free is None else min(cap, free)))

    def estimate(streamed: int | None) -> DeviceEstimate:
        return estimate_device_bytes(manifest, directory, width, height, segment_frames, batch=batch,
                                     text_encoder=text_encoder, fast=True, streamed=streamed)

    if estimate(None).total <= budget:
        log.info("--max-gpu-memory %s: the run fits as it is (about %s)", _size(cap), _size(estimate(None).total))
        return None
    blocks = len(block_groups(manifest))
    for streamed in range(blocks + 1):  # the fastest plan that fits: as few streamed blocks as possible
        need = estimate(streamed)
        if need.total <= budget:
            _check_host_for_host_loading(manifest, text_encoder)
            log.info("--max-gpu-memory %s: loaded on the host; %d of %d DiT blocks stream from it, the rest stay "
                     "on the GPU (about %s)", _size(cap), streamed, blocks, _size(need.total))
            return streamed
    smallest = math.ceil(need.total / CAP_MARGIN / GIB) * GIB  # the SIZE whose plan fits
    if free is not None and free < cap and smallest <= cap:  # the GPU's free memory is what is short
        advice = f"only {_size(free)} of this GPU is free: free GPU memory, or preprocess the driving video smaller"
    elif total is not None and smallest > total:
        advice = f"no SIZE fits this GPU ({_size(total)}): preprocess the driving video at a smaller size"
    else:
        advice = f"give --max-gpu-memory {smallest // GIB}GiB or more, or preprocess the driving video smaller"
    raise EngineError(
        f"--max-gpu-memory {_size(cap)}: {width}x{height} x {segment_frames} frames needs about {_size(need.total)} "
        f"on the GPU even with every DiT block streamed from the host (weights {_size(need.weights)}, activations "
        f"{_size(max(need.dit_activations, need.vae_activations))}): {advice}")


def _check_host_for_host_loading(manifest, text_encoder: bool) -> None:
    """The host plans of ``--max-gpu-memory`` load the model there in bf16 first (the DiT's quantized Linears
    then give way to their FP8/INT8 copies block by block): refused when that does not fit the host."""
    counts = parameter_counts(manifest.preset, int(manifest.graphs[TEXT_ENCODER].spec.vocab_size))[0]
    need = 2 * (sum(counts.values()) - (0 if text_encoder else counts[Component.TEXT_ENCODER])) + HOST_OVERHEAD
    available = available_host_bytes()
    if available is not None and need > available:
        raise EngineError(f"--max-gpu-memory: this plan loads the model on the host first, about {_size(need)}, and "
                          f"{_size(available)} of host memory is available: free host memory, or use a GPU that "
                          "holds the model without the option")


def check_engines_for_request(manifest, directory: Path, backend: str, width: int, height: int,
                              segment_frames: int) -> None:
    """The engines have every graph the pipeline calls and, for TensorRT, an engine for this size."""
    rebuild = f"wan-trt build --out {directory}"
    missing = [name for name in GRAPH_NAMES if name not in manifest.graphs]
    if missing:
        raise EngineError(f"the manifest of '{directory}' lists no {', '.join(missing)}: rebuild with: {rebuild}")
    from wan_trt.runtime.manifest import require_backend

    require_backend(directory, manifest, backend)
    if backend != "tensorrt":
        return
    from wan_trt.buckets import Bucket, select_bucket

    built = sorted({Bucket.parse(e["bucket"]) for e in manifest.tensorrt.get("engines", [])
                    if e.get("graph") == TRANSFORMER and e.get("bucket")})
    select_bucket(built, width, height, segment_frames, f"wan-trt build --backend tensorrt --out {directory}")


def _cached_prompts(directory: Path, manifest) -> set[str]:
    import numpy as np

    if not manifest.prompt_cache_file:
        return set()
    with np.load(directory / manifest.prompt_cache_file) as data:
        return {str(p) for p in data["prompts"]}


def check_infer(options, manifest, width: int, height: int, frames: int, segment_frames: int, *,
                free_disk: int | None = None, free_device: int | None = None) -> int | None:
    """``infer``'s pre-flight, once the manifest is read and the driving inputs' size and length are known.
    ``--max-gpu-memory``'s plan: how many DiT blocks stream from the host (None: the run as it is)."""
    from wan_trt.presets import DEFAULT_PROMPT
    from wan_trt.tokenizer import clean_prompt

    directory = Path(options.engines_dir)
    runtime = options.runtime  # wan_trt.runtime.options.RuntimeOptions
    check_engines_for_request(manifest, directory, runtime.backend, width, height, segment_frames)
    check_writable_dir(Path(options.out_path).parent, "--out")
    check_disk(Path(options.out_path).parent, estimate_video_bytes(frames, width, height),
               f"a {frames}-frame {width}x{height} video", free_disk)
    device = runtime.engine_device
    if device == "cpu":
        check_host_memory(manifest, directory, width, height, segment_frames, backend=runtime.backend,
                          batch=2 if options.guidance_scale > 1 else 1)
        return None
    prompts = [options.prompt if options.prompt is not None else DEFAULT_PROMPT]
    if options.guidance_scale > 1:
        prompts.append(options.negative_prompt)
    cached = _cached_prompts(directory, manifest)
    buckets = list(manifest.preset.buckets)
    if runtime.backend == "tensorrt":
        buckets = [(int(w), int(h)) for w, h, _ in (e["bucket"].split("x") for e in manifest.tensorrt["engines"]
                                                     if e.get("graph") == TRANSFORMER and e.get("bucket"))]
    text_encoder = any(clean_prompt(p) not in cached for p in prompts)
    batch = 2 if options.guidance_scale > 1 else 1
    if runtime.max_gpu_memory is not None:
        return plan_gpu_memory(manifest, directory, width, height, segment_frames, runtime.max_gpu_memory,
                               device=device, batch=batch, text_encoder=text_encoder, free=free_device)
    check_device_memory(manifest, directory, width, height, segment_frames, device=device, batch=batch,
                        text_encoder=text_encoder, gpus=runtime.gpus, buckets=buckets, free=free_device,
                        fast=runtime.fast)
    return None


# -------------------------------------------------------------------------------------- calibrate


def check_calibrate(manifest, directory: Path, out_path: Path, segment_frames: int | None) -> None:
    """``calibrate`` needs unquantized engines (the weights, not a fake-quant model) and a writable cache file path."""
    check_segment_frames(segment_frames)
    if out_path.is_dir():
        raise BadInputError(f"--out '{out_path}' is a directory: give the calibration cache's file name (.json)")
    check_writable_dir(out_path.parent, "--out")
    if manifest.precision in QUANTIZED_PRECISIONS:
        raise EngineError(f"--engines '{directory}' holds {manifest.precision} engines: calibrate needs unquantized "
                          "engines of the same weights (wan-trt build --precision fp32)")


# ------------------------------------------------------------------------------- host memory (CPU runs)

#: ONNX Runtime's CPU attention is the exported MatMul → Softmax → MatMul: it holds the whole
#: ``batch × heads × tokens × tokens`` score matrix and its softmax at once (measured: the tiny preset's
#: DiT at 1280x720 x 77 frames asks ORT for one 45,722,880,000-byte buffer = 2 heads × 75,600² × 4 bytes).
#: The torch backend's CPU attention (``scaled_dot_product_attention``'s flash kernel) holds no such matrix.
ORT_SCORE_COPIES = 2
HOST_OVERHEAD = 2 * GIB  # the interpreter, torch, ONNX Runtime, decoded driving video
SMALLEST_SIDE = 256  # the smallest pixel side suggested when a run does not fit


@dataclass(frozen=True)
class HostEstimate:
    weights: int
    dit_activations: int  # attention scores included
    attention_scores: int
    vae_activations: int
    overhead: int = HOST_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + max(self.dit_activations, self.vae_activations) + self.overhead


def available_host_bytes() -> int | None:
    """Host memory this process can still get: the kernel's MemAvailable, capped by a cgroup (v2) memory limit
    and by this process's address-space limit (``ulimit -v``); None where none of them can be read."""
    import resource

    limits = []
    meminfo = _read_text("/proc/meminfo")
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            limits.append(int(line.split()[1]) * KIB)
    cgroup_max, cgroup_used = _read_text("/sys/fs/cgroup/memory.max").strip(), _read_text(
        "/sys/fs/cgroup/memory.current").strip()
    if cgroup_max.isdigit() and cgroup_used.isdigit():
        limits.append(int(cgroup_max) - int(cgroup_used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        status = _read_text("/proc/self/status")
        used = next((int(line.split()[1]) * KIB for line in status.splitlines() if line.startswith("VmSize:")), 0)
        limits.append(soft - used)
    return max(0, min(limits)) if limits else None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def estimate_host_bytes(manifest, directory: Path, width: int, height: int, segment_frames: int, *, backend: str,
                        batch: int = 1) -> HostEstimate:
    """Peak host memory of a CPU run: every graph's weights (both backends keep all of them), plus the larger of
    the DiT's activations (the device formula's, and with ONNX Runtime its attention score matrices) and the
    VAE's streamed chunk, plus ``HOST_OVERHEAD``."""
    weights = sum(graph_weight_bytes(manifest, directory).values())
    device = estimate_device_bytes(manifest, directory, width, height, segment_frames, batch=batch)
    scores = 0
    if backend == "onnxruntime":
        config = manifest.preset.transformer
        scores = ORT_SCORE_COPIES * batch * int(config["num_attention_heads"]) * _dit_tokens(
            width, height, segment_frames) ** 2 * 4  # ORT's CPU kernels compute in fp32
    return HostEstimate(weights, device.dit_activations + scores, scores, device.vae_activations)


def _dit_tokens(width: int, height: int, segment_frames: int) -> int:
    return ((segment_frames - 1) // 4 + 2) * (height // 16) * (width // 16)  # latent frames + reference slot


def check_host_memory(manifest, directory: Path, width: int, height: int, segment_frames: int, *, backend: str,
                      batch: int = 1, available: int | None = None) -> HostEstimate:
    """EngineError (exit 3) when a CPU run's estimated peak exceeds the host memory this process can get, naming
    the largest size of the same shape that fits (the ``wan-trt preprocess --resolution`` to use)."""
    def estimate(w: int, h: int, on: str = backend) -> HostEstimate:
        return estimate_host_bytes(manifest, directory, w, h, segment_frames, backend=on, batch=batch)

    need = estimate(width, height)
    available = available_host_bytes() if available is None else available
    if available is None:
        log.debug("host memory: cannot read what is available here; not checked")
        return need
    if need.total <= available:
        log.debug("host memory: about %s needed, %s available", _size(need.total), _size(available))
        return need
    scores = (f", of which ONNX Runtime's attention score matrices {_size(need.attention_scores)}"
              if need.attention_scores else "")
    fitting = _largest_fitting(width, height, lambda w, h: estimate(w, h).total <= available)
    if fitting:
        w, h = fitting
        advice = (f"preprocess the driving video smaller (wan-trt preprocess --resolution {w}x{h}: about "
                  f"{_size(estimate(w, h).total)})")
    else:
        advice = "no smaller size fits either: free memory"
    if backend == "onnxruntime" and estimate(width, height, "torch").total <= available:
        advice += ", or run with --backend torch (its CPU attention holds no score matrix)"
    raise EngineError(
        f"host memory: a CPU run ({backend}) of {width}x{height} x {segment_frames}-frame segments needs about "
        f"{_size(need.total)} (weights {_size(need.weights)}, activations "
        f"{_size(max(need.dit_activations, need.vae_activations))}{scores}), {_size(available)} available: "
        f"{advice}, or run on a GPU (--device cuda)")


def _largest_fitting(width: int, height: int, fits) -> tuple[int, int] | None:
    """The largest ``w`` × ``h`` below ``width`` × ``height`` with the same aspect (sides multiples of 16, the
    shorter at least ``SMALLEST_SIDE``) for which ``fits(w, h)``; None if even the smallest does not."""
    short = min(width, height)
    for side in range(short - 16 - short % 16, SMALLEST_SIDE - 1, -16):
        w, h = (round(width * side / short / 16) * 16, side) if width >= height else (
            side, round(height * side / short / 16) * 16)
        if fits(w, h):
            return w, h
    return None
