"""Encode video frames on a thread, so that the mp4's encoding overlaps the work that makes the next frames.

``infer`` gives each decoded chunk's frames to a :class:`BackgroundWriter` as the VAE decodes; libx264 and
the colour conversion release the GIL, so the GPU's decode (and the next segment) go on meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from types import TracebackType
from typing import Self

import numpy as np

from wan_trt.media import VideoWriter

log = logging.getLogger(__name__)
_DONE = object()  # tells the thread that no more frames come


class BackgroundWriter:
    """``writer.write`` on one thread, fed in order; at most ``depth`` chunks wait (then ``write`` blocks).

    An error in the thread is raised again by the next ``write`` or by ``close``; the ``VideoWriter``'s own
    context then discards the temporary file. Leaving the ``with`` block on an exception drops the frames
    still waiting and stops the thread before the writer is aborted. ``waited`` is the seconds the caller
    spent blocked on the thread (a full queue, the last frames' encoding at ``close``).

    >>> with VideoWriter("out.mp4", width=832, height=480, fps=16) as w, BackgroundWriter(w) as b:  # doctest: +SKIP
    ...     for chunk in chunks:
    ...         b.write(chunk)
    """

    def __init__(self, writer: VideoWriter, depth: int = 4) -> None:
        self.writer, self.waited = writer, 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="mp4-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (frames := self._queue.get()) is not _DONE:
            if self._error is None and not self._cancelled:
                try:
                    self.writer.write(frames)
                except BaseException as exc:  # noqa: BLE001  (raised again in the caller's thread)
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, frames: np.ndarray) -> None:
        """Queue ``[T, H, W, 3]`` uint8 frames (kept as given: do not change them afterwards)."""
        self._raise_error()
        start = time.perf_counter()
        self._queue.put(frames)
        self.waited += time.perf_counter() - start

    def close(self) -> None:
        """Wait until every queued frame is written; raise the thread's error, if any."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self._queue.put(_DONE)
            self._thread.join()
            self.waited += time.perf_counter() - start
        self._raise_error()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        self._cancelled = True  # the caller failed: drop what waits, stop the thread, let its exception through
        self._queue.put(_DONE)
        interrupted = None
        while self._thread.is_alive():  # the writer is aborted next: never while the thread is still in it
            try:
                self._thread.join()
            except KeyboardInterrupt as again:  # a second Ctrl-C: finish the join, then raise it
                interrupted = again
        if self._error is not None:
            log.warning("the mp4 writer had failed too: %s", self._error)
        if interrupted is not None:
            raise interrupted
