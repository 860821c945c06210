"""Synthetic LoRA files for Wan 14B in the formats that circulate, with the real key names.

A LoRA's content is a list of ``LoraItem``s (which module, what kind of change, its tensors), written
from the published facts (Kijai's repacks, LightX2V, PEFT; docs/cli.md) and independent of
``wan_trt.lora``: each item names its module in the original Wan layout *and* in diffusers'
``WanAnimateTransformer3DModel``, so a test can check where the merge put it. ``render`` writes the
same content in any format; ``expected_changes`` is what a merge must add to each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Every layer an I2V-layout LoRA for Wan 14B touches: (original name, diffusers name). Animate's 40
# blocks have the Wan2.1-I2V layout; its face adapter, motion encoder and pose embedding are not adapted.
BLOCK_LINEARS = [
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
]
BLOCK_NORMS = [  # weight deltas (.diff); norm3 (diffusers norm2, the affine cross-attention norm) has a bias too
    ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"), ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"), ("cross_attn.norm_k_img", "attn2.norm_added_k"), ("norm3", "norm2"),
]
TOP_LINEARS = [
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
]
TOP_NORMS = [("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
             ("img_emb.proj.4", "condition_embedder.image_embedder.norm2")]


@dataclass(frozen=True)
class LoraItem:
    """One change: a low-rank pair on a layer, or a weight / bias / modulation delta."""

    original: str  # module name in the original Wan layout
    diffusers: str  # the same module in diffusers' naming
    kind: str  # "pair", "weight", "bias" or "modulation"
    tensors: tuple[torch.Tensor, ...]  # pair: (down, up); a delta: (delta,)
    alpha: float | None = None  # pairs only

    @property
    def target(self) -> str:
        """The diffusers parameter it changes."""
        leaf = {"pair": "weight", "weight": "weight", "bias": "bias", "modulation": "scale_shift_table"}[self.kind]
        return f"{self.diffusers}.{leaf}" if self.diffusers else leaf  # the head's modulation: top level


def lora_items(transformer: torch.nn.Module, *, rank: int = 4, seed: int = 0, alpha: bool = True,
               norms: bool = True, modulation: bool = True, convs: bool = True, head: bool = True,
               top_alpha: bool = True, device: str = "cpu", magnitude: float = 0.3) -> list[LoraItem]:
    """A Kijai-style I2V LoRA's content for ``transformer`` (its shapes; tensors on ``device``, random
    values where real): per block every Linear (pair + bias delta), the norms' weight deltas, norm3's
    bias delta and the modulation delta; the embeddings' Linears; ``patch_embedding`` (a Conv3d pair);
    the head (weight and bias deltas) and its modulation. ``alpha``: pairs carry alpha = 2·rank (block
    pairs) / rank/2 (top-level pairs; none when not ``top_alpha``)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(transformer.named_parameters())

    def tensor(*shape: int) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator) * magnitude

    def pair(original: str, diffusers: str, pair_alpha: float | None) -> list[LoraItem]:
        weight = params[f"{diffusers}.weight"]
        out_features, rest = weight.shape[0], tuple(weight.shape[1:])
        down = tensor(rank, *rest)
        up = tensor(out_features, rank, *([1] * (len(rest) - 1)))
        items = [LoraItem(original, diffusers, "pair", (down, up), pair_alpha)]
        if f"{diffusers}.bias" in params:
            items.append(LoraItem(original, diffusers, "bias", (tensor(*params[f"{diffusers}.bias"].shape),)))
        return items

    def norm(original: str, diffusers: str) -> list[LoraItem]:
        items = [LoraItem(original, diffusers, "weight", (tensor(*params[f"{diffusers}.weight"].shape),))]
        if f"{diffusers}.bias" in params:
            items.append(LoraItem(original, diffusers, "bias", (tensor(*params[f"{diffusers}.bias"].shape),)))
        return items

    items: list[LoraItem] = []
    for i in range(len(transformer.blocks)):
        for original, diffusers in BLOCK_LINEARS:
            items += pair(f"blocks.{i}.{original}", f"blocks.{i}.{diffusers}", 2.0 * rank if alpha else None)
        if norms:
            for original, diffusers in BLOCK_NORMS:
                items += norm(f"blocks.{i}.{original}", f"blocks.{i}.{diffusers}")
        if modulation:
            items.append(LoraItem(f"blocks.{i}", f"blocks.{i}", "modulation",
                                  (tensor(*params[f"blocks.{i}.scale_shift_table"].shape),)))
    for original, diffusers in TOP_LINEARS:
        items += pair(original, diffusers, rank / 2 if alpha and top_alpha else None)
    if norms:
        for original, diffusers in TOP_NORMS:
            items += norm(original, diffusers)
    if convs:
        items += pair("patch_embedding", "patch_embedding", rank / 2 if alpha and top_alpha else None)
    if head:  # LightX2V's distillation LoRAs change the head by plain deltas
        items += norm("head.head", "proj_out")
        if modulation:
            items.append(LoraItem("head", "", "modulation", (tensor(*params["scale_shift_table"].shape),)))
    return items


def render(items: list[LoraItem], *, naming: str = "original", prefix: str = "", pair_names=("lora_down", "lora_up"),
           adapter: str | None = None) -> dict[str, torch.Tensor]:
    """``items`` as a LoRA state dict: module names in ``naming`` ("original" or "diffusers") after
    ``prefix``; pairs as ``pair_names`` (``lora_down``/``lora_up`` or ``lora_A``/``lora_B``) with an
    optional ``adapter`` infix and ``.alpha``; deltas as ``.diff``, ``.diff_b`` and ``.diff_m``."""
    state: dict[str, torch.Tensor] = {}
    infix = f".{adapter}" if adapter else ""
    for item in items:
        name = prefix + (item.original if naming == "original" or item.kind == "modulation" else item.diffusers)
        if item.kind == "pair":
            state[f"{name}.{pair_names[0]}{infix}.weight"], state[f"{name}.{pair_names[1]}{infix}.weight"] = item.tensors
            if item.alpha is not None:
                state[f"{name}.alpha"] = torch.tensor(item.alpha)
        else:
            state[name + {"weight": ".diff", "bias": ".diff_b", "modulation": ".diff_m"}[item.kind]] = item.tensors[0]
    return state


def expected_changes(items: list[LoraItem], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers parameter → what merging ``items`` at ``scale`` adds to it (float32)."""
    changes: dict[str, torch.Tensor] = {}
    for item in items:
        if item.kind == "pair":
            down, up = (t.to(torch.float32) for t in item.tensors)
            factor = (item.alpha / down.shape[0]) if item.alpha is not None else 1.0
            change = factor * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
            change = change.reshape(up.shape[0], *down.shape[1:])
        else:
            change = item.tensors[0].to(torch.float32)
        changes[item.target] = changes.get(item.target, 0) + scale * change
    return changes
