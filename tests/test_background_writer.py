"""The mp4 encoded on a thread (wan_trt/background_writer.py): the same file as writing in the caller's thread,
frames in order, errors raised in the caller, and nothing left behind when either side fails."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from wan_trt.background_writer import BackgroundWriter
from wan_trt.inference import DETERMINISTIC_X264
from wan_trt.media import VideoWriter, read_video

HEIGHT, WIDTH = 48, 64


def _frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_chunks_written_on_the_thread_make_the_same_file(tmp_path):
    frames = _frames(13)
    with VideoWriter(tmp_path / "direct.mp4", WIDTH, HEIGHT, 16, options=DETERMINISTIC_X264) as writer:
        writer.write(frames)
    with VideoWriter(tmp_path / "thread.mp4", WIDTH, HEIGHT, 16, options=DETERMINISTIC_X264) as writer, \
            BackgroundWriter(writer, depth=1) as background:
        for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13)]:
            background.write(frames[start:stop])
    assert (tmp_path / "thread.mp4").read_bytes() == (tmp_path / "direct.mp4").read_bytes()
    assert len(read_video(tmp_path / "thread.mp4").frames) == 13


class SlowWriter:
    """Records what it is given, slowly, and on which thread."""

    def __init__(self) -> None:
        self.chunks, self.threads = [], set()

    def write(self, frames: np.ndarray) -> None:
        time.sleep(0.05)
        self.chunks.append(frames)
        self.threads.add(threading.current_thread().name)


def test_frames_arrive_in_order_on_one_thread_and_a_full_queue_makes_the_caller_wait():
    writer = SlowWriter()
    with BackgroundWriter(writer, depth=1) as background:
        for index in range(6):
            background.write(np.full((1, 2, 2, 3), index, dtype=np.uint8))
    assert [int(chunk[0, 0, 0, 0]) for chunk in writer.chunks] == list(range(6))
    assert writer.threads == {"mp4-writer"}
    assert background.waited > 0.1  # six chunks of 50 ms through a queue of one


def test_an_error_on_the_thread_reaches_the_caller_and_no_file_is_left(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="expects frames"), VideoWriter(out, WIDTH, HEIGHT, 16) as writer, \
            BackgroundWriter(writer) as background:
        background.write(_frames(2))
        background.write(np.zeros((2, HEIGHT + 2, WIDTH, 3), dtype=np.uint8))  # the wrong size
        for _ in range(20):  # raised by a later write, or by the close at the end of the block
            background.write(_frames(1))
    assert list(tmp_path.iterdir()) == []


def test_a_failure_in_the_caller_stops_the_thread_and_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="the decoder failed"), VideoWriter(out, WIDTH, HEIGHT, 16) as writer, \
            BackgroundWriter(writer) as background:
        background.write(_frames(3))
        raise RuntimeError("the decoder failed")
    assert not background._thread.is_alive()
    assert list(tmp_path.iterdir()) == []
