"""The DiT's blocks streamed from pinned host memory (``infer --max-gpu-memory``): each streamed block's
weights (its quantized Linears, the rest of the block, and the face adapter that follows it) live on the
host and are copied to the GPU on a side stream ``ahead`` blocks before the block runs, so the copies
overlap the blocks computing before them; a block's GPU copy is dropped once the next block starts.
At most ``GROUPS_ON_DEVICE`` streamed blocks are on the GPU at a time (the one running, the one just
finished whose memory the allocator frees when its kernels are done, and those being copied). Where the
memory plan has room, the last blocks stay on the GPU for good and only the first ones stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from wan_trt.errors import EngineError

STREAM_AHEAD = 1  # groups copied ahead of the running one (``infer --max-gpu-memory``)
GROUPS_ON_DEVICE = STREAM_AHEAD + 2  # at most: the running group, the finished one, those being copied


@dataclass
class _Slot:
    """One parameter or buffer of a streamed block: its owner, its name, and where it lies in the group's
    flat buffer (byte offset, shape, dtype)."""

    module: torch.nn.Module
    name: str
    is_parameter: bool
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    def put(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor inside a group's flat uint8 buffer (on the host or the device)."""
        nbytes = self.shape.numel() * self.dtype.itemsize
        return flat[self.offset:self.offset + nbytes].view(self.dtype).view(self.shape)


_ALIGN = 256  # bytes: every tensor of a flat buffer starts aligned (cuBLAS and vectorised kernels want 16)


class _Group:
    """A block group's weights packed into one flat host buffer (pinned on CUDA): one copy per fetch, and
    no rounding of each tensor to a power of two as torch's pinned allocator does."""

    def __init__(self, modules: Sequence[torch.nn.Module], pin: bool) -> None:
        tensors, seen = [], set()
        for module in modules:
            for sub in module.modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                tensors += [(sub, name, True, value.data) for name, value in sub._parameters.items() if value is not None]
                tensors += [(sub, name, False, value) for name, value in sub._buffers.items() if value is not None]
        self.slots, offset = [], 0
        for sub, name, is_parameter, value in tensors:
            self.slots.append(_Slot(sub, name, is_parameter, offset, value.shape, value.dtype))
            offset += -(-value.numel() * value.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8)
        for slot, (_, _, _, value) in zip(self.slots, tensors):
            slot.view(self.host).copy_(value.detach().reshape(slot.shape))
        if pin:
            _pin(self.host)
        for slot in self.slots:  # the modules now point into the host buffer (their old copies are freed)
            slot.put(slot.view(self.host))

    def put(self, flat: torch.Tensor) -> None:
        for slot in self.slots:
            slot.put(slot.view(flat))


def _pin(host: torch.Tensor) -> None:
    """Page-lock ``host`` in place (``cudaHostRegister``: exactly its size), so copies from it are asynchronous.
    It stays registered for the life of the process (the streamer lives as long as the run)."""
    code = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
    if int(code) != 0:
        raise EngineError(f"cudaHostRegister of {host.numel() / 2**30:.2f} GiB failed (CUDA error {int(code)}): "
                           "the host cannot page-lock the streamed blocks; lower --max-gpu-memory's need for them "
                           "or free host memory")


def move_tensors(modules: Iterable[torch.nn.Module], device: torch.device | str) -> None:
    """Move each module's own parameters and buffers (not its children's) to ``device``, in place."""
    for sub in modules:
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
    On CUDA the host waits, before copying a group, until the GPU has finished the block that freed room for
    it, so no more than ``GROUPS_ON_DEVICE`` streamed groups are ever allocated (the host runs ahead of the
    GPU otherwise, and every block would be copied at once). On a CPU ``device`` (tests) the copies are plain
    and synchronous."""

    def __init__(self, groups: Sequence[Sequence[torch.nn.Module]], device: torch.device | str,
                 ahead: int = 1, streamed: int | None = None) -> None:
        if ahead < 1 or ahead + 2 > GROUPS_ON_DEVICE:
            raise ValueError(f"ahead must be between 1 and {GROUPS_ON_DEVICE - 2}, got {ahead}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        streamed = len(groups) if streamed is None else streamed
        if not 0 <= streamed <= len(groups):
            raise ValueError(f"streamed must be between 0 and {len(groups)}, got {streamed}")
        self.groups = [_Group(group, pin=cuda) for group in groups[:streamed]]
        move_tensors((sub for group in groups[streamed:] for module in group for sub in module.modules()), self.device)
        self.ahead = ahead
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # group -> (device copy, event)
        self.finishing: deque[torch.cuda.Event] = deque()  # released groups whose last kernels may still run
        self.most_resident = 0  # the most streamed groups allocated on the device at once (tests, reports)
        self.bytes_copied = 0

    def group_bytes(self, index: int) -> int:
        return self.groups[index].nbytes

    def _fetch(self, index: int) -> None:
        if index in self.resident:
            return
        while self.finishing and len(self.resident) + len(self.finishing) >= GROUPS_ON_DEVICE:
            self.finishing.popleft().synchronize()  # that group's memory is free once its kernels are done
        group, stream = self.groups[index], self.copy_stream
        if stream is None:
            flat, event = group.host.clone(), None
        else:
            with torch.cuda.stream(stream):
                flat = group.host.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        group.put(flat)
        self.resident[index] = (flat, event)
        self.bytes_copied += group.nbytes
        self.most_resident = max(self.most_resident, len(self.resident) + len(self.finishing))

    def acquire(self, index: int) -> None:
        """Group ``index`` on the device for the current stream; the next ``ahead`` groups start copying."""
        if index >= len(self.groups):  # one that stays on the device
            return
        self._fetch(index)
        flat, event = self.resident[index]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            flat.record_stream(current)  # memory from the copy stream, used on this one: freed after it
        for ahead in range(1, self.ahead + 1):
            if index + ahead < len(self.groups):
                self._fetch(index + ahead)

    def acquire_ahead(self, index: int) -> None:
        """Start copying group ``index`` (e.g. the first block, for the next call) without waiting for it."""
        if index < len(self.groups):
            self._fetch(index)

    def release(self, index: int) -> None:
        """Group ``index`` back to its host buffer; its device memory is reused once its kernels are done."""
        if index not in self.resident:
            return
        _, event = self.resident.pop(index)
        self.groups[index].put(self.groups[index].host)
        if event is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.finishing.append(done)
