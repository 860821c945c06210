"""Precision policy: which layers of the DiT are quantized; everything else stays in high precision.

A small JSON file (``default_policy.json`` ships with the package). Layers are named by their module
path inside the exported transformer graph, e.g. ``transformer.blocks.4.attn1.to_q``.
``fp8_self_attention`` (FP8 builds only) also quantizes the two attention matmuls of the self-attention
(``attn1``) of every quantized block: q·kᵀ and softmax·v, with FP8 q, k, v and softmax output — the
inputs of TensorRT's fused FP8 attention. INT8 builds keep attention in high precision.
``vae_decoder_convs`` also quantizes the streamed VAE decoder's convolutions (``conv_quant.py``'s
selection: between ``conv_in`` and ``conv_out``, channel counts multiples of 16), in FP8 or INT8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wan_trt.errors import BadInputError

DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.json")
# --policy NAME: the default; its layers in every block (the fastest FP8 build); all 12 Linears of every block
# (the smallest file)
SHIPPED_POLICIES = {"default": DEFAULT_POLICY_FILE, "every-block": Path(__file__).with_name("every_block_policy.json"),
                    "all-layers": Path(__file__).with_name("all_blocks_policy.json")}
BLOCK_PREFIX = "transformer.blocks"


@dataclass(frozen=True)
class PrecisionPolicy:
    keep_first_blocks: int
    keep_last_blocks: int
    block_layers: tuple[str, ...]
    source: str = "default"
    fp8_self_attention: bool = False
    vae_decoder_convs: bool = False

    @staticmethod
    def from_json(data: dict) -> "PrecisionPolicy":
        """The policy as ``to_json`` wrote it (e.g. into a manifest)."""
        return PrecisionPolicy(int(data["keep_first_blocks"]), int(data["keep_last_blocks"]),
                               tuple(str(x) for x in data["block_layers"]), str(data.get("source", "manifest")),
                               bool(data.get("fp8_self_attention", False)), bool(data.get("vae_decoder_convs", False)))

    def quantized_blocks(self, num_blocks: int) -> range:
        return range(self.keep_first_blocks, max(self.keep_first_blocks, num_blocks - self.keep_last_blocks))

    def quantized_layers(self, num_blocks: int) -> list[str]:
        """Module paths of every layer to quantize, in block order."""
        return [f"{BLOCK_PREFIX}.{b}.{layer}" for b in self.quantized_blocks(num_blocks) for layer in self.block_layers]

    def attention_blocks(self, num_blocks: int, precision: str) -> range:
        """Blocks whose self-attention matmuls are quantized (FP8 only)."""
        return self.quantized_blocks(num_blocks) if self.fp8_self_attention and precision == "fp8" else range(0)

    def to_json(self) -> dict:
        return {"keep_first_blocks": self.keep_first_blocks, "keep_last_blocks": self.keep_last_blocks,
                "block_layers": list(self.block_layers), "source": self.source,
                "fp8_self_attention": self.fp8_self_attention, "vae_decoder_convs": self.vae_decoder_convs}


def load_policy(path: str | Path | None = None) -> PrecisionPolicy:
    """Read a policy file, or a shipped policy by name (``SHIPPED_POLICIES``; None: the default)."""
    if path is None or str(path) in SHIPPED_POLICIES:
        name = "default" if path is None else str(path)
        file = SHIPPED_POLICIES[name]
    else:
        name, file = str(path), Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        for flag in ("fp8_self_attention", "vae_decoder_convs"):
            if not isinstance(data.get(flag, False), bool):
                raise ValueError(f"{flag} must be true or false")
        policy = PrecisionPolicy.from_json({**data, "source": name})
    except FileNotFoundError:
        raise BadInputError(f"--policy '{file}' does not exist: pass a policy JSON file (see {DEFAULT_POLICY_FILE}) "
                            f"or a shipped policy name ({', '.join(SHIPPED_POLICIES)})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInputError(f"--policy '{file}' is not a valid policy ({error}): start from {DEFAULT_POLICY_FILE}") from None
    if policy.keep_first_blocks < 0 or policy.keep_last_blocks < 0 or not policy.block_layers:
        raise BadInputError(f"--policy '{file}': block counts must be >= 0 and block_layers non-empty")
    return policy
