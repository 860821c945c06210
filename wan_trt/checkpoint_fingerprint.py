"""A cheap fingerprint of a checkpoint folder, so engines built from it notice when it changes.

The weights hash (``ReferenceModels.weights_hash``) proves the weights exactly, but only after every
module is loaded (minutes and tens of GB at full size). The fingerprint is read from file metadata
alone: for every file the loaders read — weights (``.safetensors``, ``.pth``, ``.pt``, ``.bin``,
``.ckpt``) and JSON (configs, shard indexes, ``model_index.json``, ``tokenizer.json``) — its path
relative to the folder, its size and its modification time (ns). Hidden files and folders (``.git``,
``.cache`` of a Hugging Face download) and everything else (README, images) are left out.

A rewritten, added, removed or ``touch``-ed file changes it; a copy of the folder that does not keep
modification times (``cp`` without ``-p``) changes it too, which is refused the same way: rebuild.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FINGERPRINTED_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json")


def checkpoint_fingerprint(root: str | Path) -> dict[str, Any]:
    """``{"files": {relative path: [size, mtime_ns]}}`` of the folder's weight and JSON files."""
    root = Path(root)
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.suffix not in FINGERPRINTED_SUFFIXES:
            continue
        if path.is_file():
            stat = path.stat()
            files[relative.as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return {"files": files}


def fingerprint_change(recorded: dict[str, Any], root: str | Path) -> str | None:
    """What changed in ``root`` since ``recorded`` was taken (one phrase), or None."""
    if not Path(root).is_dir():
        return "the folder no longer exists"
    before, now = recorded.get("files", {}), checkpoint_fingerprint(root)["files"]
    for name in sorted(before.keys() | now.keys()):
        if name not in now:
            return f"{name} was removed"
        if name not in before:
            return f"{name} was added"
        if list(before[name]) != list(now[name]):
            return f"{name} was modified (size or modification time)"
    return None

