"""Precision policy: which layers of the DiT are quantized; everything else stays in high precision.

A small JSON file (``default_policy.json`` ships with the package). Layers are named by their module
path inside the exported transformer graph, e.g. ``transformer.blocks.4.attn1.to_q``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wan_trt.errors import BadInputError

DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.json")
BLOCK_PREFIX = "transformer.blocks"


@dataclass(frozen=True)
class PrecisionPolicy:
    keep_first_blocks: int
    keep_last_blocks: int
    block_layers: tuple[str, ...]
    source: str = "default"

    def quantized_blocks(self, num_blocks: int) -> range:
        return range(self.keep_first_blocks, max(self.keep_first_blocks, num_blocks - self.keep_last_blocks))

    def quantized_layers(self, num_blocks: int) -> list[str]:
        """Module paths of every layer to quantize, in block order."""
        return [f"{BLOCK_PREFIX}.{b}.{layer}" for b in self.quantized_blocks(num_blocks) for layer in self.block_layers]

    def to_json(self) -> dict:
        return {"keep_first_blocks": self.keep_first_blocks, "keep_last_blocks": self.keep_last_blocks,
                "block_layers": list(self.block_layers), "source": self.source}


def load_policy(path: str | Path | None = None) -> PrecisionPolicy:
    """Read a policy file (the shipped default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_POLICY_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        policy = PrecisionPolicy(
            keep_first_blocks=int(data["keep_first_blocks"]),
            keep_last_blocks=int(data["keep_last_blocks"]),
            block_layers=tuple(str(x) for x in data["block_layers"]),
            source="default" if path is None else str(file),
        )
    except FileNotFoundError:
        raise BadInputError(f"--policy '{file}' does not exist: pass a policy JSON file (see {DEFAULT_POLICY_FILE})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"--policy '{file}' is not a valid policy ({error}): start from {DEFAULT_POLICY_FILE}") from None
    if policy.keep_first_blocks < 0 or policy.keep_last_blocks < 0 or not policy.block_layers:
        raise BadInputError(f"--policy '{file}': block counts must be >= 0 and block_layers non-empty")
    return policy
