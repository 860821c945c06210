"""The atomic write of an engines directory, shared by every build.

The directory is built in a temporary sibling and renamed into place only when complete, so an
interrupted or failed build never leaves a half-written directory, and an existing one stays usable
until the new one replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from wan_trt.errors import BadInputError

log = logging.getLogger(__name__)


def check_out_dir(out_dir: Path) -> None:
    """``--out`` is new, empty or an engines directory (which the build replaces)."""
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise BadInputError(f"--out '{out_dir}' exists and is not an engines directory: choose a new or empty path")


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A staging directory beside ``out_dir``, renamed onto it when the block succeeds, removed if it fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield staging
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(out_dir: Path) -> None:
    """Delete staging directories left by builds that were killed (their process no longer exists)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
        try:
            pid = int(stale.name.split("-")[-2])
            os.kill(pid, 0)  # raises if there is no such process
        except (ValueError, IndexError, ProcessLookupError):
            log.info("removing %s, left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` onto ``target``; an existing target is kept until the new one is in place."""
    if not target.exists():
        staging.rename(target)
        return
    backup = target.with_name(f".{target.name}.old-{int(time.time())}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
