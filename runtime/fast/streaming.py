"""The DiT's blocks streamed from pinned host memory (``infer --max-gpu-memory``): each streamed block's
weights (its quantized Linears, the rest of the block, and the face adapter that follows it) live on the
host and are copied to the GPU on a side stream ``ahead`` blocks before the block runs, so the copies
overlap the blocks computing before them; a block's GPU copy is dropped once the next block starts.
At most ``GROUPS_ON_DEVICE`` streamed blocks are on the GPU at a time (the one running, the one just
finished whose memory the allocator frees when its kernels are done, and those being copied). Where the
memory plan has room, the last blocks stay on the GPU for good and only the first ones stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

STREAM_AHEAD = 1  # groups copied ahead of the running one (``infer --max-gpu-memory``)
GROUPS_ON_DEVICE = STREAM_AHEAD + 2  # at most: the running group, the finished one, those being copied


@dataclass
class _Slot:
    """One parameter or buffer of a streamed block: its owner, name and the pinned host copy."""

    module: torch.nn.Module
    name: str
    is_parameter: bool
    host: torch.Tensor

    def put(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def get(self) -> torch.Tensor:
        owner = self.module._parameters if self.is_parameter else self.module._buffers
        return owner[self.name]


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.detach().to("cpu")
    return host.pin_memory() if pin else host


def _slots(modules: Sequence[torch.nn.Module], pin: bool) -> list[_Slot]:
    slots, seen = [], set()
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for name, value in sub._parameters.items():
                if value is not None:
                    slots.append(_Slot(sub, name, True, _host_copy(value, pin)))
            for name, value in sub._buffers.items():
                if value is not None:
                    slots.append(_Slot(sub, name, False, _host_copy(value, pin)))
    for slot in slots:  # the modules now point at the host copies (the device copies, if any, are freed)
        slot.put(slot.host)
    return slots


def _to_device(modules: Sequence[torch.nn.Module], device: torch.device) -> None:
    for module in modules:
        for sub in module.modules():
            for value in sub._parameters.values():
                if value is not None:
                    value.data = value.data.to(device)
            for name, value in sub._buffers.items():
                if value is not None:
                    sub._buffers[name] = value.to(device)


class BlockStreamer:
    """Brings block groups to ``device`` on demand: :meth:`acquire` before a block runs (and prefetches the
    next ``ahead``), :meth:`release` once it is done. ``groups[i]``: the modules whose weights block ``i``
    uses; the first ``streamed`` groups stream (default: all), the others move to ``device`` now and stay.
    On a CPU ``device`` (tests) the copies are plain and synchronous."""

    def __init__(self, groups: Sequence[Sequence[torch.nn.Module]], device: torch.device | str,
                 ahead: int = 1, streamed: int | None = None) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, got {ahead}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        streamed = len(groups) if streamed is None else streamed
        if not 0 <= streamed <= len(groups):
            raise ValueError(f"streamed must be between 0 and {len(groups)}, got {streamed}")
        self.groups = [_slots(group, pin=cuda) for group in groups[:streamed]]
        for group in groups[streamed:]:
            _to_device(group, self.device)
        self.ahead = ahead
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident: dict[int, torch.cuda.Event | None] = {}  # group -> its copy's event (None on the CPU)
        self.most_resident = 0  # the largest number of groups on the device at once (tests, reports)
        self.bytes_copied = 0

    def group_bytes(self, index: int) -> int:
        return sum(slot.host.numel() * slot.host.element_size() for slot in self.groups[index])

    def _fetch(self, index: int) -> None:
        if index in self.resident:
            return
        stream = self.copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for slot in self.groups[index]:
                slot.put(slot.host.to(self.device, non_blocking=True) if stream is not None else slot.host.clone())
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.resident[index] = event
        self.bytes_copied += self.group_bytes(index)
        self.most_resident = max(self.most_resident, len(self.resident))

    def acquire(self, index: int) -> None:
        """Group ``index`` on the device for the current stream; the next ``ahead`` groups start copying."""
        if index >= len(self.groups):  # one that stays on the device
            return
        self._fetch(index)
        event = self.resident[index]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for slot in self.groups[index]:  # memory from the copy stream, used on this one: freed after it
                slot.get().record_stream(current)
        for ahead in range(1, self.ahead + 1):
            if index + ahead < len(self.groups):
                self._fetch(index + ahead)

    def acquire_ahead(self, index: int) -> None:
        """Start copying group ``index`` (e.g. the first block, for the next call) without waiting for it."""
        if index < len(self.groups):
            self._fetch(index)

    def release(self, index: int) -> None:
        """Group ``index`` back to its host copies (its device memory is reused once its kernels are done)."""
        if self.resident.pop(index, False) is False:
            return
        for slot in self.groups[index]:
            slot.put(slot.host)

    def release_all(self) -> None:
        for index in list(self.resident):
            self.release(index)
