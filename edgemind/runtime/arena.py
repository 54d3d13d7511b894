"""The arena: one aligned allocation of the plan's extent, and its ledger.

Every reservation the executor makes is recorded in the ledger and checked against
the plan when it is made: a reservation the plan did not foresee (outside the
arena, overlapping a live one, a size the plan does not know) stops the request.
"""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np

from edgemind.errors import MemoryQuotaExceeded
from edgemind.planner.plan import Buffer
from edgemind.units import format_bytes

ARENA_ALIGNMENT = 4096  # page-aligned base: zero-copy for JAX (needs 64) and O_DIRECT-friendly


def aligned_buffer(nbytes: int, alignment: int = ARENA_ALIGNMENT) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose address is a multiple of ``alignment``.

    NumPy only promises 16-byte alignment, so allocate with slack and slice.

    >>> aligned_buffer(100, 64).ctypes.data % 64
    0
    """
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    skip = (-raw.ctypes.data) % alignment
    return raw[skip : skip + nbytes]


@dataclasses.dataclass(frozen=True)
class Reservation:
    buffer_id: int
    offset_bytes: int
    nbytes: int


class Arena:
    """A fixed-size aligned buffer with a ledger of live reservations.

    >>> arena = Arena(8192)
    >>> arena.nbytes, arena.live_bytes
    (8192, 0)
    """

    def __init__(self, nbytes: int, alignment: int = ARENA_ALIGNMENT):
        self.nbytes = nbytes
        self._memory: np.ndarray | None = aligned_buffer(max(nbytes, 1), alignment)
        self._live: dict[int, Reservation] = {}
        self.live_bytes = 0
        self.peak_live_bytes = 0

    @property
    def memory(self) -> np.ndarray:
        if self._memory is None:
            raise RuntimeError("the arena has been released")
        return self._memory

    def touch(self) -> None:
        """Write every page once, so the whole arena is resident from now on: requests
        then take no page faults in it (the first read into fresh pages was 7x slower),
        and RSS moves during a request only by what XLA allocates."""
        self.memory[:: resource_page_size()] = 0

    def reserve(self, buffer: Buffer, step: int) -> Reservation:
        """Record ``buffer`` as live; refuse anything the plan could not have made."""
        offset = buffer.offset_bytes
        if offset is None or offset < 0 or offset + buffer.nbytes > self.nbytes:
            raise MemoryQuotaExceeded(
                f"step {step}: buffer {buffer.id} ({buffer.role} of {buffer.layer}, "
                f"{format_bytes(buffer.nbytes)} at offset {offset}) lies outside the "
                f"{format_bytes(self.nbytes)} arena; the plan does not match this model, "
                "plan again",
                needed_bytes=(offset or 0) + buffer.nbytes,
                capacity_bytes=self.nbytes,
            )
        for other in self._live.values():
            if offset < other.offset_bytes + other.nbytes and other.offset_bytes < offset + (
                buffer.nbytes
            ):
                raise MemoryQuotaExceeded(
                    f"step {step}: buffer {buffer.id} ({buffer.role} of {buffer.layer}) would "
                    f"overlap live buffer {other.buffer_id}; the plan does not match this run, "
                    "plan again"
                )
        res = Reservation(buffer.id, offset, buffer.nbytes)
        self._live[buffer.id] = res
        self.live_bytes += buffer.nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        return res

    def release(self, buffer_id: int) -> None:
        res = self._live.pop(buffer_id)
        self.live_bytes -= res.nbytes

    def is_live(self, buffer_id: int) -> bool:
        return buffer_id in self._live

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """The uint8 bytes ``[offset, offset + nbytes)`` of the arena (a view, no copy)."""
        if offset < 0 or offset + nbytes > self.nbytes:
            raise MemoryQuotaExceeded(
                f"view [{offset}, {offset + nbytes}) is outside the {self.nbytes}-byte arena"
            )
        return self.memory[offset : offset + nbytes]

    def reset_peak(self) -> None:
        self.peak_live_bytes = self.live_bytes

    def close(self) -> None:
        """Drop every reservation and the memory itself."""
        self._live.clear()
        self.live_bytes = 0
        self._memory = None


def resource_page_size() -> int:
    """The machine's memory page size (4 KiB here; larger on some ARM kernels)."""
    return mmap.PAGESIZE
