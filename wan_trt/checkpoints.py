"""Real checkpoints: layout detection, strict loading, original → diffusers key conversion.

Two layouts are recognised automatically (``detect_layout``):

* **diffusers** (``Wan-AI/Wan2.2-Animate-14B-Diffusers``): ``transformer/``, ``vae/``,
  ``text_encoder/``, ``image_encoder/``, ``tokenizer/`` (+ ``scheduler/`` … which we do not need).
  The VAE, umT5 and CLIP are read with diffusers/transformers ``from_pretrained(local_files_only=True)``
  and their loading report is checked (any missing, unexpected or mis-shaped weight is an error).
  The transformer is streamed tensor by tensor into a model whose parameters start on the meta
  device, because diffusers 0.42's ``WanAnimateTransformer3DModel.from_pretrained`` refuses to load
  at all without ``accelerate`` (its ``_keep_in_fp32_modules`` need ``low_cpu_mem_usage``); the
  modules diffusers keeps in fp32 are kept in fp32 here too.
* **original** (``Wan-AI/Wan2.2-Animate-14B``): ``diffusion_pytorch_model*.safetensors`` (+ its
  ``.index.json``) and ``config.json``, ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and the tokenizer folder
  ``google/umt5-xxl/``. The transformer and VAE keys are converted with diffusers' own converters
  (``convert_wan_transformer_to_diffusers``, ``convert_wan_vae_to_diffusers``); umT5 and the CLIP
  vision tower with the small tables below.

Every loader is strict: a key the module does not have, a key it has that the files do not
provide, a shape that differs, a truncated file or a missing shard is one ``BadInputError`` that
names the file and the fix. Weights are read one tensor at a time (safetensors and ``.pth`` files
memory-mapped) into modules whose parameters were created on the meta device, so no second copy of
the weights is made: peak memory is the model plus one tensor being converted (measured: loading a
775 MB transformer grew the peak RSS by 4 MB, by ~880 MB once every weight had been read).

LoRA files are read and merged by ``wan_trt.lora``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from wan_trt.errors import BadInputError
from wan_trt.json_files import read_json_object
from wan_trt.presets import Component, Preset

log = logging.getLogger(__name__)

DIFFUSERS = "diffusers"
ORIGINAL = "original"

DIFFUSERS_COMPONENTS = ("transformer", "vae", "text_encoder", "image_encoder", "tokenizer")
ORIGINAL_CONFIG = "config.json"
ORIGINAL_WEIGHTS = "diffusion_pytorch_model.safetensors"
ORIGINAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
ORIGINAL_LORA = "relighting_lora.ckpt"
# diffusers' single-file loader recognises a Wan-Animate transformer by this key
ANIMATE_DETECTION_KEY = "motion_encoder.dec.direction.weight"

_DIFFUSERS_CLASSES = {
    "transformer": "WanAnimateTransformer3DModel",
    "vae": "AutoencoderKLWan",
    "text_encoder": "UMT5EncoderModel",
    "image_encoder": "CLIPVisionModel",
}
_FIX_DOWNLOAD = ("download the complete checkpoint again (Wan-AI/Wan2.2-Animate-14B-Diffusers or "
                 "Wan-AI/Wan2.2-Animate-14B)")


# --------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint directory and which of the two layouts it is in."""

    kind: str  # DIFFUSERS or ORIGINAL
    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / ("tokenizer" if self.kind == DIFFUSERS else ORIGINAL_TOKENIZER)

    @property
    def tokenizer_file(self) -> Path | None:
        """``tokenizer.json`` of the umT5 tokenizer, where the checkpoint has one."""
        path = self.tokenizer_dir / "tokenizer.json"
        return path if path.is_file() else None

    @property
    def relighting_lora(self) -> Path | None:
        """The original repository's relighting LoRA, where present (the Diffusers repo has none)."""
        path = self.root / ORIGINAL_LORA
        return path if path.is_file() else None


def detect_layout(checkpoint: str | Path) -> CheckpointLayout:
    """Recognise the layout of ``checkpoint`` and check that every file the loaders need is there."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise BadInputError(f"--checkpoint {root}: not a directory; pass the folder that holds the downloaded model")
    if (root / "model_index.json").is_file() or (root / "transformer").is_dir():
        _check_model_index(root)
        missing = [name for name in DIFFUSERS_COMPONENTS if not (root / name).is_dir()]
        if missing:
            raise BadInputError(
                f"--checkpoint {root}: Diffusers-layout checkpoint without "
                f"{', '.join(str(root / m) + '/' for m in missing)}: {_FIX_DOWNLOAD}")
        return CheckpointLayout(DIFFUSERS, root)
    if list(root.glob("diffusion_pytorch_model*.safetensors*")):
        needed = [ORIGINAL_CONFIG, ORIGINAL_VAE, ORIGINAL_T5, ORIGINAL_CLIP]
        missing = [str(root / n) for n in needed if not (root / n).is_file()]
        if not (root / ORIGINAL_TOKENIZER).is_dir():
            missing.append(str(root / ORIGINAL_TOKENIZER) + "/")
        if missing:
            raise BadInputError(f"--checkpoint {root}: original-layout checkpoint without {', '.join(missing)}: "
                                f"{_FIX_DOWNLOAD}")
        return CheckpointLayout(ORIGINAL, root)
    found = sorted(p.name for p in root.iterdir())[:8]
    raise BadInputError(
        f"--checkpoint {root}: not a Wan2.2-Animate-14B checkpoint: expected a Diffusers layout (transformer/, vae/, "
        f"text_encoder/, image_encoder/, tokenizer/) or the original layout (diffusion_pytorch_model*.safetensors, "
        f"{ORIGINAL_VAE}, …); found {found or 'an empty folder'}")


def _check_model_index(root: Path) -> None:
    path = root / "model_index.json"
    if path.is_file():
        name = _read_json(path).get("_class_name")
        if name and name != "WanAnimatePipeline":
            raise BadInputError(f"{path}: this is a checkpoint of '{name}', not Wan-Animate (WanAnimatePipeline): "
                                f"download Wan-AI/Wan2.2-Animate-14B-Diffusers")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, str(path), _FIX_DOWNLOAD)


# ------------------------------------------------------------------------------------ file readers


def check_safetensors_file(path: str | Path) -> dict[str, Any]:
    """Validate a ``.safetensors`` file's header and length; return the header (key → dtype, shape, offsets)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: file is missing: {_FIX_DOWNLOAD}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, 1 << 28):
            raise BadInputError(f"{path}: not a safetensors file or truncated ({size} bytes): {_FIX_DOWNLOAD}")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise BadInputError(f"{path}: corrupt safetensors header: {_FIX_DOWNLOAD}") from None
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise BadInputError(f"{path}: corrupt safetensors header: {_FIX_DOWNLOAD}") from None
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise BadInputError(f"{path}: truncated: {size} bytes, its header needs {needed}: {_FIX_DOWNLOAD}")
    return header


def _safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The files of a (possibly sharded) safetensors checkpoint ``stem.safetensors`` in ``folder``, validated."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError(f"{index}: no weight_map: {_FIX_DOWNLOAD}")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise BadInputError(f"{file}: shard listed in {index.name} is missing: {_FIX_DOWNLOAD}")
        headers = {file: check_safetensors_file(file) for file in files}
        for key, name in weight_map.items():
            if key not in headers[folder / name]:
                raise BadInputError(f"{folder / name}: lacks '{key}' which {index.name} places there: {_FIX_DOWNLOAD}")
        return files
    if single.is_file():
        check_safetensors_file(single)
        return [single]
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        raise BadInputError(f"{folder}: sharded weights without {index.name}: {_FIX_DOWNLOAD}")
    raise BadInputError(f"{single}: file is missing: {_FIX_DOWNLOAD}")


def _iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(key, tensor, file) for every tensor of ``files``, read one at a time.

    safetensors memory-maps the file (copy-on-write): a tensor kept as a parameter stays backed by
    the file until it is written to, so no second copy of the weights is ever made.
    """
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key), file
        except BadInputError:
            raise
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise BadInputError(f"{file}: cannot read ({error}): {_FIX_DOWNLOAD}") from None


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict (memory-mapped where the file format allows); ``{"state_dict": …}`` is unwrapped."""
    if not path.is_file():
        raise BadInputError(f"{path}: file is missing: {_FIX_DOWNLOAD}")
    data = None
    for mmap in (True, False):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as error:  # noqa: PERF203 - a legacy (non-zip) file cannot be memory-mapped
            message = str(error)
    if data is None:
        raise BadInputError(f"{path}: not a readable torch checkpoint ({message.splitlines()[0][:200]}): "
                            f"{_FIX_DOWNLOAD}")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BadInputError(f"{path}: expected a state dict of tensors: {_FIX_DOWNLOAD}")
    return data


# ------------------------------------------------------------------------------- strict loading


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter registered inside the block on the meta device (buffers stay real).

    Constructors then allocate no weight memory and their random initialisation is free; the
    non-persistent buffers (RoPE tables, blur kernels) are computed as usual.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class StrictLoader:
    """Assign tensors to a module's parameters and persistent buffers, each exactly once, shapes checked.

    Tied parameters (one tensor under several names) are filled once under any of their names.
    ``finish()`` raises if any parameter or persistent buffer was not provided.
    """

    def __init__(self, module: torch.nn.Module, *, dtype: torch.dtype = torch.float32,
                 keep_in_fp32: Iterable[str] = (), what: str = "checkpoint", device: torch.device | str = "cpu"):
        self.module, self.dtype, self.what, self.device = module, dtype, what, device
        self.keep_in_fp32 = tuple(keep_in_fp32)
        self.slots: dict[str, list[tuple[torch.nn.Module, str, bool]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.alias: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for attr, param in sub._parameters.items():
                if param is None:
                    continue
                canonical = by_id.setdefault(id(param), dot + attr)
                self._add(canonical, dot + attr, sub, attr, True, param)
            for attr, buffer in sub._buffers.items():
                if buffer is None or attr in sub._non_persistent_buffers_set:
                    continue
                canonical = by_id.setdefault(id(buffer), dot + attr)
                self._add(canonical, dot + attr, sub, attr, False, buffer)
        self.loaded: set[str] = set()

    def _add(self, canonical: str, name: str, owner: torch.nn.Module, attr: str, is_param: bool,
             tensor: torch.Tensor) -> None:
        self.alias[name] = canonical
        self.slots.setdefault(canonical, []).append((owner, attr, is_param))
        self.shapes[canonical] = tuple(tensor.shape)

    @property
    def expected(self) -> list[str]:
        return list(self.slots)

    def knows(self, key: str) -> bool:
        return key in self.alias

    def _target_dtype(self, key: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        if self.dtype != torch.float32 and any(m in key.split(".") for m in self.keep_in_fp32):
            return torch.float32
        return self.dtype

    def put(self, key: str, tensor: torch.Tensor, source: Path | str, original_key: str | None = None) -> None:
        named = f"'{original_key}' (→ '{key}')" if original_key and original_key != key else f"'{key}'"
        canonical = self.alias.get(key)
        if canonical is None:
            raise BadInputError(f"{source}: {named} is not a weight of {self.what}: the file is from another model "
                                f"or another version; {_FIX_DOWNLOAD}")
        if canonical in self.loaded:
            raise BadInputError(f"{source}: {named} is provided twice: {_FIX_DOWNLOAD}")
        if tuple(tensor.shape) != self.shapes[canonical]:
            raise BadInputError(f"{source}: {named} has shape {tuple(tensor.shape)}, {self.what} needs "
                                f"{self.shapes[canonical]}: the checkpoint does not fit this preset")
        # a meta tensor (a key/shape dry run) has no data to move; it stays on meta
        device = tensor.device if tensor.is_meta else self.device
        value = tensor.to(device=device, dtype=self._target_dtype(canonical, tensor)).contiguous()
        param = None
        for owner, attr, is_param in self.slots[canonical]:
            if is_param:
                param = param if param is not None else torch.nn.Parameter(value, requires_grad=False)
                owner._parameters[attr] = param
            else:
                owner._buffers[attr] = value
        self.loaded.add(canonical)

    def finish(self, source: Path | str) -> None:
        missing = [key for key in self.slots if key not in self.loaded]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise BadInputError(f"{source}: {len(missing)} weight(s) of {self.what} missing ({shown}): {_FIX_DOWNLOAD}")


def _finalise(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------- model shells


def transformer_config(preset: Preset) -> dict[str, Any]:
    config = dict(preset.transformer)
    config["patch_size"] = tuple(config["patch_size"])
    return config


def empty_transformer(preset: Preset) -> torch.nn.Module:
    """``WanAnimateTransformer3DModel`` of ``preset`` with its parameters on the meta device."""
    from diffusers import WanAnimateTransformer3DModel

    with parameters_on_meta():
        return WanAnimateTransformer3DModel(**transformer_config(preset))


def empty_component(name: str, preset: Preset, vocab_size: int) -> torch.nn.Module:
    """The checkpoint component ``name`` of ``preset`` with its parameters on the meta device."""
    if name == Component.TEXT_ENCODER:
        return empty_text_encoder(preset, vocab_size)
    return {Component.TRANSFORMER: empty_transformer, Component.VAE: empty_vae,
            Component.IMAGE_ENCODER: empty_image_encoder}[name](preset)


def empty_vae(preset: Preset) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    with parameters_on_meta():
        return AutoencoderKLWan(**preset.vae)


def empty_text_encoder(preset: Preset, vocab_size: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    with parameters_on_meta():
        return UMT5EncoderModel(UMT5Config(**{"vocab_size": vocab_size, **preset.text_encoder}))


def empty_image_encoder(preset: Preset) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with parameters_on_meta():
        return CLIPVisionModel(CLIPVisionConfig(**preset.image_encoder))


def _keep_in_fp32(model: torch.nn.Module) -> list[str]:
    return list(getattr(type(model), "_keep_in_fp32_modules", None) or [])


# --------------------------------------------------------------------------- transformer keys


def _is_blur_kernel(key: str) -> bool:
    return key.startswith("motion_encoder.enc.net_app.convs.") and key.endswith(".kernel")


def _blur_buffer_name(key: str) -> str:
    """``motion_encoder.enc.net_app.convs.{i}.{conv2|skip}.0.kernel`` → the diffusers blur buffer name."""
    match = re.fullmatch(r"motion_encoder\.enc\.net_app\.convs\.(\d+)\.(conv2|skip)\.0\.kernel", key)
    if not match:
        return ""
    part = "conv2" if match.group(2) == "conv2" else "conv_skip"
    return f"motion_encoder.res_blocks.{int(match.group(1)) - 1}.{part}.blur_kernel"


_REAL_MOTION_RES_BLOCKS = 7  # 512² → 4² face crops; diffusers' converter hard-codes this depth


def convert_original_transformer_tensor(key: str, tensor: torch.Tensor,
                                        motion_res_blocks: int = _REAL_MOTION_RES_BLOCKS) -> dict[str, torch.Tensor]:
    """One original ``WanAnimateModel`` tensor → its diffusers name(s), by diffusers' own converter.

    The converter renames (``norm3`` → ``norm2``, ``self_attn.q`` → ``attn1.to_q``, ``head.modulation``
    → ``scale_shift_table`` …), reshapes the motion encoder's ``[1, C, 1, 1]`` biases to ``[C]`` and
    splits the face adapter's fused ``linear1_kv`` into ``to_k`` (first half) and ``to_v``. It works
    key by key, so the checkpoint never has to be in memory at once. The converter assumes the real
    motion encoder's 7 residual blocks (its last conv is ``convs.8``); for a shallower one (the tiny
    preset) the last conv's index is renumbered to 8 first.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if motion_res_blocks > _REAL_MOTION_RES_BLOCKS:
        raise BadInputError(f"motion encoder with {motion_res_blocks} residual blocks: at most "
                            f"{_REAL_MOTION_RES_BLOCKS} (the real model) can be converted")
    last = f"motion_encoder.enc.net_app.convs.{motion_res_blocks + 1}.weight"
    if motion_res_blocks != _REAL_MOTION_RES_BLOCKS and key == last:
        key = f"motion_encoder.enc.net_app.convs.{_REAL_MOTION_RES_BLOCKS + 1}.weight"
    # The converter switches its face-adapter/face-encoder and motion-encoder renames on when the
    # checkpoint it is given has such keys; a Wan-Animate checkpoint always has both, so converting
    # one key at a time, we give it that context with two marker entries and drop them again.
    marker = torch.empty(0)
    converted = convert_wan_transformer_to_diffusers(
        {key: tensor, "face_adapter.wan_trt_marker": marker, "motion_encoder.wan_trt_marker": marker})
    return {k: v for k, v in converted.items() if v is not marker}


def load_original_transformer_tensors(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor, Path]],
                                      *, dtype: torch.dtype = torch.float32, source: Path | str,
                                      device: torch.device | str = "cpu") -> torch.nn.Module:
    """Stream original-layout tensors into ``model`` (a ``WanAnimateTransformer3DModel``), strictly.

    The 14 blur ``.kernel`` buffers of the motion encoder are constants: they are compared with the
    model's own (a different kernel is an error) and not loaded.
    """
    loader = StrictLoader(model, dtype=dtype, keep_in_fp32=_keep_in_fp32(model), what="WanAnimateTransformer3DModel",
                          device=device)
    buffers = dict(model.named_buffers())
    motion_res_blocks = len(model.motion_encoder.res_blocks)
    for key, tensor, file in tensors:
        key = key.removeprefix("model.diffusion_model.")
        if _is_blur_kernel(key):
            want = buffers.get(_blur_buffer_name(key))
            if want is None:
                raise BadInputError(f"{file}: '{key}' is not a blur kernel of this motion encoder: {_FIX_DOWNLOAD}")
            if tensor.device.type != "meta" and (tensor.shape != want.shape or not torch.allclose(
                    tensor.to(torch.float32), want.to(torch.float32), rtol=1e-3, atol=1e-6)):
                raise BadInputError(f"{file}: blur kernel '{key}' differs from the fixed [1,3,3,1] kernel: "
                                    f"the file is not a Wan-Animate checkpoint")
            continue
        try:
            converted = convert_original_transformer_tensor(key, tensor, motion_res_blocks)
        except (IndexError, RuntimeError, ValueError) as error:
            raise BadInputError(f"{file}: '{key}' with shape {tuple(tensor.shape)} cannot be converted ({error}): "
                                f"{_FIX_DOWNLOAD}") from None
        for new_key, value in converted.items():
            loader.put(new_key, value, file, original_key=key)
    loader.finish(source)
    return _finalise(model)


def _safetensors_keys(files: list[Path]) -> set[str]:
    keys: set[str] = set()
    for file in files:
        keys.update(k for k in check_safetensors_file(file) if k != "__metadata__")
    return keys


def load_original_transformer(root: Path, preset: Preset, *, dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> torch.nn.Module:
    _check_original_config(root / ORIGINAL_CONFIG, preset)
    files = _safetensors_files(root, "diffusion_pytorch_model")
    keys = {k.removeprefix("model.diffusion_model.") for k in _safetensors_keys(files)}
    if ANIMATE_DETECTION_KEY not in keys:
        shown = ", ".join(sorted(keys)[:3])
        raise BadInputError(f"{files[0]}: not a Wan-Animate transformer (no '{ANIMATE_DETECTION_KEY}'; it holds "
                            f"{len(keys)} tensors such as {shown}): pass the Wan2.2-Animate-14B folder")
    model = empty_transformer(preset)
    return load_original_transformer_tensors(model, _iter_safetensors(files), dtype=dtype, source=root, device=device)


_ORIGINAL_CONFIG_FIELDS = {  # original WanAnimateModel config field → value derived from the diffusers config
    "dim": lambda c: c["num_attention_heads"] * c["attention_head_dim"],
    "ffn_dim": lambda c: c["ffn_dim"],
    "num_heads": lambda c: c["num_attention_heads"],
    "num_layers": lambda c: c["num_layers"],
    "in_dim": lambda c: c["in_channels"],
    "out_dim": lambda c: c["out_channels"],
    "text_dim": lambda c: c["text_dim"],
    "freq_dim": lambda c: c["freq_dim"],
    "patch_size": lambda c: list(c["patch_size"]),
}


def _check_original_config(path: Path, preset: Preset) -> None:
    config = _read_json(path)
    name = config.get("_class_name")
    if name and name != "WanAnimateModel":
        raise BadInputError(f"{path}: this is a checkpoint of '{name}', not Wan-Animate (WanAnimateModel): "
                            f"download Wan-AI/Wan2.2-Animate-14B")
    for field, derive in _ORIGINAL_CONFIG_FIELDS.items():
        if field in config:
            want = derive(preset.transformer)
            got = list(config[field]) if isinstance(config[field], (list, tuple)) else config[field]
            if got != want:
                raise BadInputError(f"{path}: {field} = {got!r}, preset '{preset.name}' expects {want!r}: "
                                    f"choose the preset that matches this checkpoint")


# ----------------------------------------------------------------------------------- VAE keys


def _renumber_original_vae_decoder(key: str, num_res_blocks: int) -> str:
    """Original decoder ``upsamples.{i}`` indices → the ``num_res_blocks = 2`` numbering diffusers' converter assumes.

    The original decoder is one flat list: per stage ``num_res_blocks + 1`` residual blocks and
    (except the last stage) one resampler. diffusers' converter hard-codes the real model's 3 + 1
    per stage; renumbering first lets the same converter read any depth up to that.
    """
    match = re.match(r"decoder\.upsamples\.(\d+)\.", key)
    if not match or num_res_blocks == 2:
        return key
    per_stage = num_res_blocks + 2
    stage, position = divmod(int(match.group(1)), per_stage)
    new_index = 4 * stage + (position if position <= num_res_blocks else 3)
    return f"decoder.upsamples.{new_index}." + key[match.end():]


def convert_original_vae_state_dict(state_dict: dict[str, torch.Tensor],
                                    num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """``Wan2.1_VAE.pth`` keys → ``AutoencoderKLWan`` keys, with diffusers' ``convert_wan_vae_to_diffusers``."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    if num_res_blocks > 2:
        raise BadInputError(f"VAE with num_res_blocks={num_res_blocks}: only up to 2 (the Wan2.1 VAE) can be converted")
    renumbered = {_renumber_original_vae_decoder(k, num_res_blocks): v for k, v in state_dict.items()}
    return convert_wan_vae_to_diffusers(renumbered)


def load_original_vae(path: Path, preset: Preset, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    state_dict = _load_torch_file(path)
    if "decoder.middle.0.residual.0.gamma" not in state_dict:  # diffusers' own detection key for the Wan VAE
        raise BadInputError(f"{path}: not a Wan2.1 VAE (no 'decoder.middle.0.residual.0.gamma'): {_FIX_DOWNLOAD}")
    model = empty_vae(preset)
    loader = StrictLoader(model, dtype=dtype, what="AutoencoderKLWan")
    converted = convert_original_vae_state_dict(state_dict, int(preset.vae.get("num_res_blocks", 2)))
    for key, value in converted.items():
        loader.put(key, value, path)
    loader.finish(path)
    return _finalise(model)


# ---------------------------------------------------------------------------------- umT5 keys

_UMT5_BLOCK_KEYS = {  # original wan/modules/t5.py T5SelfAttention names → transformers UMT5 names
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_UMT5_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


def umt5_original_to_transformers(key: str) -> str | None:
    """An original umT5 encoder key (``models_t5_umt5-xxl-enc-bf16.pth``) → ``UMT5EncoderModel`` key, or None."""
    if key in _UMT5_TOP_KEYS:
        return _UMT5_TOP_KEYS[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match and match.group(2) in _UMT5_BLOCK_KEYS:
        return f"encoder.block.{match.group(1)}.{_UMT5_BLOCK_KEYS[match.group(2)]}"
    return None


def load_original_text_encoder(path: Path, preset: Preset, vocab_size: int, *,
                               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    state_dict = _load_torch_file(path)
    model = empty_text_encoder(preset, vocab_size)
    loader = StrictLoader(model, dtype=dtype, what="UMT5EncoderModel")
    for key, value in state_dict.items():
        new_key = umt5_original_to_transformers(key)
        if new_key is None:
            raise BadInputError(f"{path}: '{key}' is not an umT5 encoder weight: the file is from another model; "
                                f"{_FIX_DOWNLOAD}")
        loader.put(new_key, value, path, original_key=key)
    loader.finish(path)
    return _finalise(model)


# ---------------------------------------------------------------------------------- CLIP keys

_CLIP_PREFIX = ""  # transformers 5 CLIPVisionModel; 4.x nests it under "vision_model." (added on load)
_CLIP_LAYER_KEYS = {  # wan/modules/animate/clip.py AttentionBlock names → transformers CLIPEncoderLayer names
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}
_OPEN_CLIP_LAYER_KEYS = {  # open_clip's own names, for a vision tower saved by open_clip
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
# Parts of the original file the vision tower we deploy does not use (the XLM-R text tower, the
# contrastive head and temperature): ignored on purpose.
_CLIP_UNUSED = re.compile(r"^(textual\..*|log_scale|logit_scale|visual\.head|visual\.proj|text_projection|"
                          r"positional_embedding|token_embedding\..*|ln_final\..*|transformer\..*|attn_mask)$")


def clip_original_to_transformers(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One key of Wan's CLIP checkpoint (or an open_clip ViT) → ``CLIPVisionModel`` key(s).

    ``{}``: a part the vision tower does not use; None: not a key of this model.
    """
    if _CLIP_UNUSED.match(key):
        return {}
    emb = _CLIP_PREFIX + "embeddings."
    simple = {
        "visual.patch_embedding.weight": emb + "patch_embedding.weight",
        "visual.conv1.weight": emb + "patch_embedding.weight",
        "visual.pre_norm.weight": _CLIP_PREFIX + "pre_layrnorm.weight",
        "visual.pre_norm.bias": _CLIP_PREFIX + "pre_layrnorm.bias",
        "visual.ln_pre.weight": _CLIP_PREFIX + "pre_layrnorm.weight",
        "visual.ln_pre.bias": _CLIP_PREFIX + "pre_layrnorm.bias",
        "visual.post_norm.weight": _CLIP_PREFIX + "post_layernorm.weight",
        "visual.post_norm.bias": _CLIP_PREFIX + "post_layernorm.bias",
        "visual.ln_post.weight": _CLIP_PREFIX + "post_layernorm.weight",
        "visual.ln_post.bias": _CLIP_PREFIX + "post_layernorm.bias",
    }
    if key in simple:
        return {simple[key]: tensor}
    if key in ("visual.cls_embedding", "visual.class_embedding"):  # [1, 1, D] (Wan) or [D] (open_clip)
        return {emb + "class_embedding": tensor.reshape(-1)}
    if key in ("visual.pos_embedding", "visual.positional_embedding"):  # [1, N, D] (Wan) or [N, D]
        return {emb + "position_embedding.weight": tensor.reshape(tensor.shape[-2], tensor.shape[-1])}
    match = (re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", key)
             or re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key))
    if match:
        layer, name, kind = match.groups()
        prefix = f"{_CLIP_PREFIX}encoder.layers.{layer}."
        if name in _CLIP_LAYER_KEYS or name in _OPEN_CLIP_LAYER_KEYS:
            return {prefix + (_CLIP_LAYER_KEYS.get(name) or _OPEN_CLIP_LAYER_KEYS[name]) + "." + kind: tensor}
        if name == "attn.to_qkv":  # fused [3D, D]: q, k, v in that order
            q, k, v = tensor.chunk(3, dim=0)
            return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))}
    match = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if match:
        prefix = f"{_CLIP_PREFIX}encoder.layers.{match.group(1)}.self_attn."
        q, k, v = tensor.chunk(3, dim=0)
        return {f"{prefix}{p}_proj.{match.group(2)}": t for p, t in zip("qkv", (q, k, v))}
    return None


def load_original_image_encoder(path: Path, preset: Preset, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    state_dict = _load_torch_file(path)
    model = empty_image_encoder(preset)
    loader = StrictLoader(model, dtype=dtype, what="CLIPVisionModel")
    nested = "vision_model." if any(k.startswith("vision_model.") for k in loader.expected) else ""
    for key, value in state_dict.items():
        converted = clip_original_to_transformers(key, value)
        if converted is None:
            raise BadInputError(f"{path}: '{key}' is not a weight of the CLIP ViT-H/14 checkpoint: the file is from "
                                f"another model; {_FIX_DOWNLOAD}")
        for new_key, tensor in converted.items():
            loader.put(nested + new_key, tensor, path, original_key=key)
    loader.finish(path)
    return _finalise(model)


# ------------------------------------------------------------------------------ diffusers layout


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


def _check_config(path: Path, config: dict[str, Any], want: dict[str, Any], preset: Preset,
                  class_name: str | None = None) -> None:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if class_name and name and name != class_name:
        raise BadInputError(f"{path}: holds a '{name}', Wan-Animate needs a '{class_name}': {_FIX_DOWNLOAD}")
    for key, value in want.items():
        if key in config and config[key] is not None and _normalise(config[key]) != _normalise(value):
            raise BadInputError(f"{path}: {key} = {config[key]!r}, preset '{preset.name}' expects {value!r}: "
                                f"choose the preset that matches this checkpoint")


def _check_component_files(folder: Path, stem: str) -> None:
    """Validate the component's safetensors file(s) before a library reads them (clear errors for bad files)."""
    if not (folder / "config.json").is_file():
        raise BadInputError(f"{folder / 'config.json'}: file is missing: {_FIX_DOWNLOAD}")
    _safetensors_files(folder, stem)


def _check_loading_info(folder: Path, info: dict[str, Any], what: str, ignorable: Iterable[str] = ()) -> None:
    unexpected = [k for k in info.get("unexpected_keys") or () if k not in set(ignorable)]
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {sorted(info['missing_keys'])[:5]}")
    if unexpected:
        problems.append(f"not part of {what}: {sorted(unexpected)[:5]}")
    if info.get("mismatched_keys"):
        problems.append(f"wrong shape: {sorted(str(m) for m in info['mismatched_keys'])[:3]}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(e) for e in info["error_msgs"])[:300])
    if problems:
        raise BadInputError(f"{folder}: {what} weights do not match ({'; '.join(problems)}): {_FIX_DOWNLOAD}")


def _from_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    except BadInputError:
        raise
    except Exception as error:  # OSError, ValueError, safetensors errors … from the library
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{folder}: cannot load {what} ({first}): {_FIX_DOWNLOAD}") from None


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def load_diffusers_transformer(folder: Path, preset: Preset, *, dtype: torch.dtype = torch.float32,
                               device: torch.device | str = "cpu") -> torch.nn.Module:
    """``transformer/`` of the Diffusers layout, streamed strictly into a meta-initialised model.

    (diffusers 0.42's ``from_pretrained`` for this class needs ``accelerate``, which is not a dependency.)
    """
    _check_component_files(folder, "diffusion_pytorch_model")
    _check_config(folder / "config.json", _read_json(folder / "config.json"), preset.transformer, preset,
                  _DIFFUSERS_CLASSES[Component.TRANSFORMER])
    files = _safetensors_files(folder, "diffusion_pytorch_model")
    model = empty_transformer(preset)
    loader = StrictLoader(model, dtype=dtype, keep_in_fp32=_keep_in_fp32(model), what="WanAnimateTransformer3DModel",
                          device=device)
    ignored = set(type(model)._keys_to_ignore_on_load_unexpected or ())
    for key, tensor, file in _iter_safetensors(files):
        if not loader.knows(key) and any(re.search(p, key) for p in ignored):
            continue
        loader.put(key, tensor, file)
    loader.finish(folder)
    return _finalise(model)


def load_diffusers_vae(folder: Path, preset: Preset, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    _check_component_files(folder, "diffusion_pytorch_model")
    _check_config(folder / "config.json", _read_json(folder / "config.json"), preset.vae, preset,
                  _DIFFUSERS_CLASSES["vae"])
    model, info = _from_pretrained(AutoencoderKLWan, folder, "AutoencoderKLWan", torch_dtype=dtype,
                                   low_cpu_mem_usage=_accelerate_available())
    _check_loading_info(folder, info, "AutoencoderKLWan")
    return _finalise(model)


def load_diffusers_text_encoder(folder: Path, preset: Preset, vocab_size: int, *,
                                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import UMT5EncoderModel

    _check_component_files(folder, "model")
    want = {"vocab_size": vocab_size, **preset.text_encoder}
    _check_config(folder / "config.json", _read_json(folder / "config.json"), want, preset)
    model, info = _from_pretrained(UMT5EncoderModel, folder, "UMT5EncoderModel", dtype=dtype)
    _check_loading_info(folder, info, "UMT5EncoderModel")
    return _finalise(model)


def load_diffusers_image_encoder(folder: Path, preset: Preset, *,
                                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import CLIPVisionModel

    _check_component_files(folder, "model")
    config = _read_json(folder / "config.json")
    vision = config.get("vision_config", config) if config.get("model_type") == "clip" else config
    _check_config(folder / "config.json", vision, preset.image_encoder, preset)
    model, info = _from_pretrained(CLIPVisionModel, folder, "CLIPVisionModel", dtype=dtype)
    # a CLIPVisionModelWithProjection checkpoint also carries the (unused) projection
    _check_loading_info(folder, info, "CLIPVisionModel", ignorable=("visual_projection.weight",))
    return _finalise(model)


# ------------------------------------------------------------------------------------ top level


def load_checkpoint(preset: Preset, checkpoint: str | Path, *, vocab_size: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    components: Iterable[str] | None = None) -> dict[str, torch.nn.Module]:
    """Load the four reference modules of ``preset`` from ``checkpoint`` (either layout), strictly; with
    ``components``, only those (the others are their structure, parameters on the meta device).

    Returns ``{"text_encoder", "image_encoder", "vae", "transformer"}`` modules in eval mode, without
    gradients, in ``dtype`` (diffusers' fp32-kept transformer modules stay fp32), on ``device``: the
    transformer is streamed there tensor by tensor; the other three (at most umT5's 5.7 B parameters)
    are loaded on the host in ``dtype`` and moved, one at a time.
    """
    layout = detect_layout(checkpoint)
    root = layout.root
    log.info("loading %s-layout checkpoint %s (%s, %s)", layout.kind, root, str(dtype).removeprefix("torch."), device)
    if layout.kind == DIFFUSERS:
        loaders = {
            "transformer": lambda: load_diffusers_transformer(root / "transformer", preset, dtype=dtype, device=device),
            "vae": lambda: load_diffusers_vae(root / "vae", preset, dtype=dtype),
            "text_encoder": lambda: load_diffusers_text_encoder(root / "text_encoder", preset, vocab_size, dtype=dtype),
            "image_encoder": lambda: load_diffusers_image_encoder(root / "image_encoder", preset, dtype=dtype),
        }
    else:
        loaders = {
            "transformer": lambda: load_original_transformer(root, preset, dtype=dtype, device=device),
            "vae": lambda: load_original_vae(root / ORIGINAL_VAE, preset, dtype=dtype),
            "text_encoder": lambda: load_original_text_encoder(root / ORIGINAL_T5, preset, vocab_size, dtype=dtype),
            "image_encoder": lambda: load_original_image_encoder(root / ORIGINAL_CLIP, preset, dtype=dtype),
        }
    wanted = set(loaders) if components is None else set(components)
    return {name: load().to(device) if name in wanted else empty_component(name, preset, vocab_size).eval()
            .requires_grad_(False) for name, load in loaders.items()}
