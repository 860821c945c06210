"""LoRA files for the Wan-Animate DiT: read them in the formats that circulate for Wan 14B, map every
key onto a parameter of diffusers' ``WanAnimateTransformer3DModel``, merge them into its weights.

What a file may hold (sources in docs/cli.md):

* key prefixes ``diffusion_model.``, ``model.diffusion_model.``, ``model.``, ``base_model.model.``,
  ``transformer.`` or none;
* module names in the original Wan layout (``blocks.N.self_attn.q``, ``cross_attn.k_img``, ``ffn.0``,
  ``norm3``, ``head.head``, ``text_embedding.0`` …, renamed by diffusers' own checkpoint converter) or
  in diffusers' (``blocks.N.attn1.to_q`` …);
* low-rank pairs ``lora_down``/``lora_up`` or ``lora_A``/``lora_B`` (an adapter name such as
  ``.default`` may stand before ``.weight``; one adapter per file) with an optional ``.alpha``:
  ``W += scale · alpha/rank · up @ down`` (alpha/rank = 1 without ``.alpha``), on Linear and Conv
  layers (a Conv's up weight is ``[out, rank, 1, …]``);
* direct deltas, each added times ``scale``: ``X.diff`` to ``X.weight`` (e.g. ``cross_attn.norm_k_img``,
  ``head.head``), ``X.diff_b`` to ``X.bias``, ``blocks.N.diff_m`` to the block's modulation table
  (diffusers' ``scale_shift_table``).

diffusers' own Wan LoRA loader drops the ``.diff``/``.diff_b`` of norms and ignores ``diff_m``;
LightX2V and ComfyUI add them, and so does this module.

Every key is applied or reported: a key that maps to no parameter is a ``BadInputError`` listing
the first few and their count (a LoRA for another model must not half-apply) unless the spec says
``unmatched="warn"``; shapes that do not fit, NaN/Inf values, a half pair or two adapters in one
file are errors. Every file is checked before the first weight changes; the deltas of several
LoRAs are summed in float32, in their order, and added to each weight once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from wan_trt.errors import BadInputError
from wan_trt.json_files import read_json_object

log = logging.getLogger(__name__)

UNMATCHED_POLICIES = ("error", "warn")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# stripped from every key, repeatedly (PEFT, ComfyUI/Kijai, LightX2V, diffusers pipelines)
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
SHOWN_KEYS = 5  # unmatched keys named in an error or warning

_PAIR_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
_DELTA_KEY = re.compile(r"^(?P<module>.+)\.(?P<suffix>diff|diff_b|diff_m)$")
_DOWN_PARTS = ("lora_A", "lora_down")
# direct delta suffix → (what it changes, the parameter's leaf name in the original layout, in diffusers')
_DELTA_TARGETS = {"diff": ("weight", "weight", "weight"), "diff_b": ("bias", "bias", "bias"),
                  "diff_m": ("modulation", "modulation", "scale_shift_table")}
_PAIR_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
KINDS = ("pair", "weight", "bias", "modulation")


# ------------------------------------------------------------------------------------ arguments


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); the scale defaults to 1.0."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:SCALE]`` and what to do with its keys that map to no parameter (error, warn)."""

    path: str
    scale: float = 1.0
    unmatched: str = "error"

    @classmethod
    def parse(cls, text: str, unmatched: str = "error") -> LoraSpec:
        path, scale = parse_lora_arg(text)
        return cls(path, scale, unmatched)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LoraSpec:
        """A manifest's record (format 2 wrote ``file`` and ``scale`` only)."""
        return cls(str(record["file"]), float(record.get("scale", 1.0)), str(record.get("unmatched", "error")))

    def to_json(self) -> dict[str, Any]:
        return {"file": str(Path(self.path).resolve()), "scale": self.scale, "unmatched": self.unmatched}


def lora_specs(lora: str | Path | LoraSpec | Sequence[LoraSpec] | None, scale: float = 1.0) -> list[LoraSpec]:
    """``build_reference_models``' ``lora`` argument as specs: one path (with ``scale``), one spec or several."""
    if lora is None:
        return []
    if isinstance(lora, (str, Path)):
        return [LoraSpec(str(lora), scale)]
    if isinstance(lora, LoraSpec):
        return [lora]
    return list(lora)


@dataclass(frozen=True)
class LoraReport:
    """What one LoRA file changes (the build log and the manifest record it)."""

    spec: LoraSpec
    pairs: int
    weight_deltas: int
    bias_deltas: int
    modulation_deltas: int
    ignored: tuple[str, ...]  # keys that map to no parameter, skipped because the spec said "warn"
    targets: tuple[str, ...]  # the transformer parameters it changes

    def to_json(self) -> dict[str, Any]:
        return {**self.spec.to_json(), "pairs": self.pairs, "weight_deltas": self.weight_deltas,
                "bias_deltas": self.bias_deltas, "modulation_deltas": self.modulation_deltas,
                "ignored_keys": len(self.ignored)}

    def summary(self) -> str:
        text = (f"{self.pairs} low-rank pairs, {self.weight_deltas} weight deltas, {self.bias_deltas} bias deltas, "
                f"{self.modulation_deltas} modulation deltas")
        return text + (f", {len(self.ignored)} keys ignored" if self.ignored else "")


# ------------------------------------------------------------------------------------- reading


def load_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA's tensors from ``.safetensors``, a torch ``.ckpt``/``.pt`` (``{"state_dict": …}`` or flat)
    or a PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``).

    For a PEFT folder, ``adapter_config.json``'s ``lora_alpha`` becomes one ``<module>.alpha`` entry per
    adapted module (the convention the merge reads).
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()),
                       None)
        if weights is None:
            raise BadInputError(f"--lora {path}: a folder without adapter_model.safetensors: pass the LoRA file")
        state = load_lora_file(weights)
        config_path = path / "adapter_config.json"
        if config_path.is_file():
            config = _read_adapter_config(config_path)
            if config.get("rank_pattern") or config.get("alpha_pattern"):
                raise BadInputError(f"--lora {config_path}: per-module rank/alpha patterns are not supported: "
                                    "merge the adapter with PEFT and pass the merged LoRA file")
            alpha = config.get("lora_alpha")
            if alpha is not None:
                modules = {m.group("module") for m in map(_PAIR_KEY.match, state) if m}
                state.update({f"{m}.alpha": torch.tensor(float(alpha)) for m in modules})
        return state
    if not path.is_file():
        raise BadInputError(f"--lora {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise BadInputError(f"--lora {path}: not a readable safetensors file ({_first_line(error)}): "
                                "download the LoRA again") from None
    if path.suffix in LORA_SUFFIXES:
        return _load_torch_lora(path)
    raise BadInputError(f"--lora {path}: unknown LoRA file type '{path.suffix}': use .safetensors or a torch .ckpt")


def lora_digest(spec: LoraSpec) -> str:
    """The sha256 of the file ``spec`` names (of a PEFT folder: its weights and config files)."""
    path = Path(spec.path)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise BadInputError(f"--lora {path}: file not found")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _load_torch_lora(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        raise BadInputError(f"--lora {path}: not a readable torch checkpoint ({_first_line(error)}): "
                            "download the LoRA again") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BadInputError(f"--lora {path}: expected a state dict of tensors: pass a LoRA file")
    return dict(data)


def _read_adapter_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, f"--lora {path}", "download the LoRA again")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class LoraChange:
    """One change to one parameter: a low-rank pair (``down``, ``up``, ``factor`` = alpha/rank) or a direct delta."""

    key: str  # the file's key (a pair's up weight)
    target: str  # the transformer's parameter
    kind: str  # one of KINDS
    delta: torch.Tensor  # the direct delta, or the pair's down weight [rank, in, *kernel]
    up: torch.Tensor | None = None  # the pair's up weight [out, rank, 1, …]
    factor: float = 1.0

    def value(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The float32 change at scale 1, shaped as the parameter."""
        if self.up is None:
            return self.delta.to(device=device, dtype=torch.float32).reshape(shape)
        up = self.up.to(device=device, dtype=torch.float32).reshape(self.up.shape[0], -1)
        down = self.delta.to(device=device, dtype=torch.float32).reshape(self.delta.shape[0], -1)
        return (self.factor * (up @ down)).reshape(shape)


@dataclass
class LoraPlan:
    """A LoRA file mapped onto a transformer and checked; ``apply_plans`` carries it out."""

    spec: LoraSpec
    changes: list[LoraChange]
    ignored: list[str] = field(default_factory=list)

    def report(self) -> LoraReport:
        counts = {kind: sum(c.kind == kind for c in self.changes) for kind in KINDS}
        return LoraReport(self.spec, counts["pair"], counts["weight"], counts["bias"], counts["modulation"],
                          tuple(self.ignored), tuple(dict.fromkeys(c.target for c in self.changes)))


class _Parameters:
    """The transformer's parameters, found from a module name in diffusers' or the original Wan naming."""

    def __init__(self, transformer: torch.nn.Module):
        self.placeholder = torch.empty((1, 1, 1, 1), device="meta")  # survives the converter's bias reshape
        self.params = dict(transformer.named_parameters())
        self.modules = dict(transformer.named_modules())
        encoder = getattr(transformer, "motion_encoder", None)
        self.motion_res_blocks = len(encoder.res_blocks) if encoder is not None else 7

    def find(self, module: str, original_leaf: str, diffusers_leaf: str) -> tuple[str, str | None] | None:
        """(parameter name, the original-layout name it was converted from, or None if given in diffusers
        naming), or None when ``module`` has no such parameter in either naming."""
        direct = f"{module}.{diffusers_leaf}"
        if direct in self.params:
            return direct, None
        from wan_trt.checkpoints import convert_original_transformer_tensor

        original = f"{module}.{original_leaf}"
        try:
            converted = convert_original_transformer_tensor(original, self.placeholder, self.motion_res_blocks)
        except (BadInputError, IndexError, KeyError, RuntimeError, ValueError):
            return None
        names = [name for name in converted if name in self.params]
        return (names[0], original) if len(converted) == 1 and names else None

    def pair_layer(self, module: str) -> str | None:
        """The parameter a low-rank pair on ``module`` changes: the weight of a Linear or Conv layer."""
        found = self.find(module, "weight", "weight")
        if found is None:
            return None
        owner = self.modules.get(found[0].removesuffix(".weight"))
        return found[0] if isinstance(owner, _PAIR_LAYERS) else None


def strip_prefixes(key: str) -> str:
    """``key`` without the trainers' and loaders' prefixes (``diffusion_model.``, ``base_model.model.`` …)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
                break
    return key


def plan_lora(transformer: torch.nn.Module, spec: LoraSpec,
              state: dict[str, torch.Tensor] | None = None) -> LoraPlan:
    """Map every key of ``spec``'s file (or ``state``) onto ``transformer``'s parameters and check it.

    Changes nothing, so it also runs on a transformer whose parameters are on the meta device (the
    pre-flight check: names and shapes only). Every problem is one ``BadInputError``.
    """
    source = f"--lora {spec.path}"
    if not math.isfinite(spec.scale):
        raise BadInputError(f"{source}: scale {spec.scale} is not a finite number, e.g. {spec.path}:1.0")
    if spec.unmatched not in UNMATCHED_POLICIES:
        raise BadInputError(f"{source}: unmatched keys policy '{spec.unmatched}': choose "
                            f"{' or '.join(UNMATCHED_POLICIES)}")
    state = load_lora_file(spec.path) if state is None else state
    if not state:
        raise BadInputError(f"{source}: holds no tensors: download the LoRA again")
    adapters = {m.group("adapter") for m in (_PAIR_KEY.match(strip_prefixes(key)) for key in state) if m}
    if len(adapters) > 1:
        shown = ", ".join(sorted(a or "(unnamed)" for a in adapters))
        raise BadInputError(f"{source}: holds {len(adapters)} adapters ({shown}) in one file: save each adapter to "
                            f"its own file and pass --lora once per file")
    params = _Parameters(transformer)
    pairs, alphas, deltas, ignored = _sort_keys(source, state)
    changes: list[LoraChange] = []
    for module, parts in pairs.items():
        target = params.pair_layer(module)
        if target is None:
            ignored += list(parts.values()) + ([alphas.pop(module)] if module in alphas else [])
            continue
        if len(parts) != 2:
            (present,) = parts.values()
            raise BadInputError(f"{source}: '{present}' has no {'up' if 'down' in parts else 'down'} weight: the file "
                                f"is incomplete; download the LoRA again")
        down, up = state[parts["down"]], state[parts["up"]]
        rank = down.shape[0] if down.ndim else 1
        factor = _alpha(source, alphas.pop(module), state) / rank if module in alphas else 1.0
        changes.append(LoraChange(parts["up"], target, "pair", down, up, factor))
    ignored += alphas.values()  # an alpha whose pair is not in the file adapts nothing
    for key, module, suffix in deltas:
        kind, original_leaf, diffusers_leaf = _DELTA_TARGETS[suffix]
        found = params.find(module, original_leaf, diffusers_leaf)
        if found is None:
            ignored.append(key)
            continue
        target, original = found
        tensor = state[key]
        if original is not None:  # as the checkpoint loader converts it (motion-encoder biases [1, C, 1, 1] → [C])
            tensor = _converted(source, key, original, tensor, target, params.motion_res_blocks)
        changes.append(LoraChange(key, target, kind, tensor))

    if ignored and spec.unmatched == "error":
        shown = ", ".join(f"'{k}'" for k in ignored[:SHOWN_KEYS]) + (", …" if len(ignored) > SHOWN_KEYS else "")
        raise BadInputError(f"{source}: {len(ignored)} of its {len(state)} keys map to no parameter of the Wan-Animate "
                            f"transformer ({shown}): a LoRA for another model is refused rather than half-applied; "
                            f"pass --lora-unmatched warn to merge the rest anyway")
    _check_changes(source, changes, params)
    return LoraPlan(spec, changes, ignored)


def _sort_keys(source: str, state: dict[str, torch.Tensor]
               ) -> tuple[dict[str, dict[str, str]], dict[str, str], list[tuple[str, str, str]], list[str]]:
    """The file's keys by what they are, under their module names without prefixes: pairs (module →
    {"down": key, "up": key}), alphas (module → key), deltas (key, module, suffix) and the rest. The
    same weight twice is an error."""
    pairs: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    deltas: list[tuple[str, str, str]] = []
    unknown: list[str] = []
    for key in state:
        name = strip_prefixes(key)
        pair, alpha, delta = _PAIR_KEY.match(name), _ALPHA_KEY.match(name), _DELTA_KEY.match(name)
        if pair:
            part = "down" if pair.group("part") in _DOWN_PARTS else "up"
            earlier = pairs.setdefault(pair.group("module"), {}).setdefault(part, key)
            if earlier != key:
                raise BadInputError(f"{source}: '{earlier}' and '{key}' are both the {part} weight of "
                                    f"'{pair.group('module')}': one adapter per file, each layer once")
        elif alpha:
            alphas[alpha.group("module")] = key
        elif delta:
            deltas.append((key, delta.group("module"), delta.group("suffix")))
        else:
            unknown.append(key)
    return pairs, alphas, deltas, unknown


def _alpha(source: str, key: str, state: dict[str, torch.Tensor]) -> float:
    tensor = state[key]
    if tensor.numel() != 1 or tensor.device.type == "meta":
        raise BadInputError(f"{source}: '{key}' is not one number: the file is broken; download the LoRA again")
    value = float(tensor.reshape(-1)[0])
    if not math.isfinite(value):
        raise BadInputError(f"{source}: '{key}' = {value}: the file is corrupt; download the LoRA again")
    return value


def _converted(source: str, key: str, original: str, tensor: torch.Tensor, target: str,
               motion_res_blocks: int) -> torch.Tensor:
    from wan_trt.checkpoints import convert_original_transformer_tensor

    try:
        return convert_original_transformer_tensor(original, tensor, motion_res_blocks)[target]
    except (BadInputError, IndexError, KeyError, RuntimeError, ValueError):
        raise BadInputError(f"{source}: '{key}' {tuple(tensor.shape)} does not fit '{target}': the LoRA is for "
                            f"another model") from None


def _check_changes(source: str, changes: list[LoraChange], params: _Parameters) -> None:
    """Shapes fit, each parameter gets at most one change of each kind, every value is finite."""
    seen: dict[tuple[str, str], str] = {}
    for change in changes:
        earlier = seen.setdefault((change.target, change.kind), change.key)
        if earlier != change.key:
            raise BadInputError(f"{source}: '{earlier}' and '{change.key}' both change '{change.target}' (the same "
                                f"layer under two names): keep one of them")
        shape = tuple(params.params[change.target].shape)
        if change.up is None:
            if tuple(change.delta.shape) != shape:
                raise BadInputError(f"{source}: '{change.key}' has shape {tuple(change.delta.shape)}, "
                                    f"'{change.target}' is {shape}: the LoRA is for another model or model size")
        else:
            down, up = change.delta, change.up
            fits = (down.ndim == up.ndim == len(shape) and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
                    and tuple(down.shape[1:]) == shape[1:] and all(d == 1 for d in up.shape[2:]))
            if not fits:
                raise BadInputError(f"{source}: '{change.key}' {tuple(up.shape)} with its down weight "
                                    f"{tuple(down.shape)} does not fit '{change.target}' {shape}: the LoRA is for "
                                    f"another model or model size")
        for tensor in (change.delta, change.up):
            if tensor is None or tensor.device.type == "meta":
                continue
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise BadInputError(f"{source}: '{change.key}' holds NaN, infinite or non-float values: the file is "
                                    f"corrupt; download the LoRA again")


# ------------------------------------------------------------------------------------- merging


def apply_plans(transformer: torch.nn.Module, plans: Sequence[LoraPlan]) -> None:
    """Add every plan's changes times its scale to ``transformer``'s parameters in place: per parameter,
    the changes are summed in float32 in plan order and added once (one rounding to its dtype)."""
    params = dict(transformer.named_parameters())
    by_target: dict[str, list[tuple[float, LoraChange]]] = {}
    for plan in plans:
        if plan.spec.scale != 0.0:
            for change in plan.changes:
                by_target.setdefault(change.target, []).append((plan.spec.scale, change))
    with torch.no_grad():
        for target, changes in by_target.items():
            param = params[target]
            total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            for scale, change in changes:
                total += scale * change.value(param.shape, param.device)
            param.copy_((param.to(torch.float32) + total).to(param.dtype))


def merge_loras(transformer: torch.nn.Module, specs: Sequence[LoraSpec]) -> list[LoraReport]:
    """Merge ``specs`` into ``transformer`` in order (every file checked before any weight changes); the
    log says what each applied."""
    plans = [plan_lora(transformer, spec) for spec in specs]
    apply_plans(transformer, plans)
    reports = [plan.report() for plan in plans]
    for report in reports:
        _log(report)
    return reports


def _log(report: LoraReport) -> None:
    log.info("merged LoRA %s (scale %g): %s", report.spec.path, report.spec.scale, report.summary())
    if report.ignored:
        shown = ", ".join(report.ignored[:SHOWN_KEYS]) + (", …" if len(report.ignored) > SHOWN_KEYS else "")
        log.warning("LoRA %s: %d keys map to no parameter of the DiT and were ignored (--lora-unmatched warn): %s",
                    report.spec.path, len(report.ignored), shown)


def merge_lora(transformer: torch.nn.Module, lora: str | Path | dict[str, torch.Tensor], scale: float = 1.0, *,
               unmatched: str = "error") -> LoraReport:
    """Merge one LoRA (a file, PEFT folder or state dict) into ``transformer`` in place; see ``plan_lora``."""
    if isinstance(lora, dict):
        plan = plan_lora(transformer, LoraSpec("LoRA state dict", scale, unmatched), lora)
        apply_plans(transformer, [plan])
        _log(plan.report())
        return plan.report()
    (report,) = merge_loras(transformer, [LoraSpec(str(lora), scale, unmatched)])
    return report


def check_loras(transformer: torch.nn.Module, specs: Sequence[LoraSpec]) -> list[LoraReport]:
    """Pre-flight: every file of ``specs`` maps onto ``transformer`` (parameters may be on meta) and is sound."""
    return [plan_lora(transformer, spec).report() for spec in specs]
