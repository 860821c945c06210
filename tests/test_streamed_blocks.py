"""The DiT's blocks streamed from the host (``runtime/fast/streaming.py``, ``infer --max-gpu-memory``), on
the CPU: the streamed fast DiT computes what the resident one does, holds at most ``ahead + 1`` blocks
on the device at once, and leaves every block's weights on the host between calls. The copies'
overlap with compute and the GPU peak under a cap are measured on the GPU (benchmarks/README.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fast_torch import TINY_POLICY, _feed, _graph
from wan_trt.calibration.quantize import linear_layers
from wan_trt.metrics import relative_l2
from wan_trt.runtime.fast.linear import fp8_plan
from wan_trt.runtime.fast.streaming import BlockStreamer
from wan_trt.runtime.fast.transformer import FastOptions, FastTransformer


def _fast(graph, fp8: bool) -> FastTransformer:
    plan = fp8_plan(linear_layers(graph), {p: 4.0 for p in TINY_POLICY.quantized_layers(10)}, TINY_POLICY, 10) \
        if fp8 else None
    return FastTransformer(graph, plan, FastOptions(attention="bf16", compile=False, dtype=torch.float32),
                           release_bf16=fp8)


@pytest.mark.parametrize(("fp8", "streamed"), [(False, None), (True, None), (True, 1), (True, 0)],
                         ids=["bf16-linears", "fp8-linears", "fp8-first-block-streamed", "fp8-none-streamed"])
def test_streamed_blocks_compute_what_resident_blocks_do(fp8, streamed):
    graph = _graph()
    resident = _fast(copy.deepcopy(graph), fp8)
    fast = _fast(graph, fp8)
    streamer = fast.stream_blocks("cpu", ahead=1, streamed=streamed)
    blocks = len(fast.block_ops)
    count = blocks if streamed is None else streamed
    assert len(streamer.groups) == count
    if count > 1:
        assert streamer.group_bytes(0) > streamer.group_bytes(1)  # block 0 carries a face adapter
    for seed in (1, 2):  # two calls: the first block of the second is the one prefetched at the end of the first
        feed = _feed(graph, seed=seed)
        want, got = resident(*feed)[0], fast(*feed)[0]
        assert relative_l2(got, want) <= 1e-6
    assert streamer.most_resident == min(count, 2)  # the running block and the next one being copied
    assert list(streamer.resident) == ([0] if count else [])  # between calls: only the next call's first block
    every_block = sum(streamer.group_bytes(i) for i in range(count))
    # each streamed block once per call; block 0 is copied at the end of the call before the one it serves
    assert streamer.bytes_copied == 2 * every_block + (streamer.group_bytes(0) if count else 0)
    for group in streamer.groups[1:]:  # between calls every block but the first reads its host buffer
        start = group.host.data_ptr()
        for slot in group.slots:
            owner = slot.module._parameters if slot.is_parameter else slot.module._buffers
            assert start <= owner[slot.name].data_ptr() < start + group.nbytes


def test_streamer_refuses_a_count_outside_the_blocks():
    with pytest.raises(ValueError, match="streamed must be between 0 and 0"):
        BlockStreamer([], "cpu", streamed=1)


def test_streamer_refuses_nothing_ahead():
    with pytest.raises(ValueError, match="ahead must be between 1 and 1"):
        BlockStreamer([], "cpu", ahead=0)


def test_a_copy_waits_until_the_gpu_has_finished_a_released_block():
    """The host may run ahead of the GPU: before a group is copied it waits for the oldest released group's
    kernels (its event) until at most ``GROUPS_ON_DEVICE`` streamed groups are allocated (the events are
    stand-ins here; on CUDA they are recorded on the compute stream by ``release``)."""
    from wan_trt.runtime.fast.streaming import GROUPS_ON_DEVICE

    class Event:
        def __init__(self) -> None:
            self.waited = False

        def synchronize(self) -> None:
            self.waited = True

    streamer = BlockStreamer([[torch.nn.Linear(4, 4)] for _ in range(6)], "cpu")
    events = [Event() for _ in range(4)]
    streamer.finishing.extend(events)  # four released groups whose kernels may still run
    streamer.acquire(0)  # fetches 0 (and prefetches 1): each needs room first
    assert [e.waited for e in events] == [True, True, True, False]
    assert len(streamer.resident) + len(streamer.finishing) == GROUPS_ON_DEVICE
