"""JSON files: read one object with a one-line error; write atomically (a temp file beside it, then a rename:
nothing half-written on failure)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from wan_trt.errors import BadInputError


def read_json_object(path: Path, source: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ``BadInputError`` naming ``source`` and ``fix`` when unreadable or not
    an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{source}: unreadable JSON ({first}): {fix}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: expected a JSON object: {fix}")
    return data


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=indent, ensure_ascii=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
