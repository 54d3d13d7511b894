"""Arena allocators: where each buffer lies, given its size and lifetime.

Mechanism only: the planner decides sizes and lifetimes (in steps), these decide
offsets. Three strategies share one small interface:

* :class:`FirstFitArena` is the online allocator, ``alloc(nbytes) -> offset`` /
  ``free(offset)``: lowest-address first fit over a coalescing free list.
* :class:`GreedyBySize` is the offline planner (TFLite's and tinygrad's static
  allocator): buffers largest first, each at the lowest offset that does not overlap
  an already placed buffer alive at a common step. Buffers alive for the whole span
  overlap everything, so they are stacked at the bottom first (that is optimal: in any
  placement their ranges can be cut out, leaving a placement of the rest). The others
  are found per step, so chain-shaped lifetimes cost about O(n log n), not O(n^2).
* :class:`NaiveSlots` is the baseline: one slot per buffer, no reuse.

Offsets are sums of sizes, so sizes rounded to an alignment give aligned offsets.

>>> GreedyBySize().place([Request(128, 0, 1), Request(64, 1, 2), Request(128, 2, 3)])
Placement(offsets=(0, 128, 0), extent_bytes=192)
>>> NaiveSlots().place([Request(128, 0, 1), Request(64, 1, 2)]).extent_bytes
192
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from edgemind.errors import MemoryQuotaExceeded
from edgemind.units import align_up, format_bytes


class Request(NamedTuple):
    """A buffer to place: its size and the steps it is alive (inclusive)."""

    nbytes: int
    first_step: int
    last_step: int
    group: int = 0  # the side TwoSided puts it on; other strategies ignore it


class Placement(NamedTuple):
    """Offsets, one per request in order, and the extent of the arena they need."""

    offsets: tuple[int, ...]
    extent_bytes: int


class Strategy(Protocol):
    """An offline placement strategy."""

    def place(self, requests: Sequence[Request]) -> Placement: ...


class FirstFitArena:
    """Online first-fit allocator over an arena of ``capacity_bytes`` (None: unbounded).

    >>> arena = FirstFitArena(alignment_bytes=64)
    >>> a, b = arena.alloc(100), arena.alloc(64)
    >>> (a, b), arena.free(a), arena.alloc(64), arena.high_water_bytes
    ((0, 128), None, 0, 192)
    """

    def __init__(self, capacity_bytes: int | None = None, alignment_bytes: int = 1) -> None:
        self.capacity_bytes = capacity_bytes
        self.alignment_bytes = alignment_bytes
        self.top_bytes = 0  # everything at or above is free
        self.high_water_bytes = 0
        self._gaps: list[tuple[int, int]] = []  # (offset, nbytes) free below the top, sorted
        self._used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (rounded to the alignment) at the lowest offset that fits."""
        if nbytes <= 0:
            raise ValueError(f"alloc: expected a positive size, got {nbytes}")
        size = align_up(nbytes, self.alignment_bytes)
        for index, (offset, gap) in enumerate(self._gaps):
            if gap >= size:
                if gap == size:
                    del self._gaps[index]
                else:
                    self._gaps[index] = (offset + size, gap - size)
                self._used[offset] = size
                return offset
        offset = self.top_bytes
        if self.capacity_bytes is not None and offset + size > self.capacity_bytes:
            raise MemoryQuotaExceeded(
                f"arena full: {format_bytes(size)} at offset {offset} exceeds the "
                f"{format_bytes(self.capacity_bytes)} arena",
                needed_bytes=offset + size,
                capacity_bytes=self.capacity_bytes,
            )
        self.top_bytes = offset + size
        self.high_water_bytes = max(self.high_water_bytes, self.top_bytes)
        self._used[offset] = size
        return offset

    def free(self, offset: int) -> None:
        """Release the reservation starting at ``offset``; neighbouring gaps merge."""
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"free: nothing is allocated at offset {offset}")
        index = bisect.bisect_left(self._gaps, (offset, 0))
        start, end = offset, offset + size
        if index < len(self._gaps) and self._gaps[index][0] == end:
            end += self._gaps.pop(index)[1]
        if index > 0 and sum(self._gaps[index - 1]) == start:
            index -= 1
            start = self._gaps.pop(index)[0]
        if end == self.top_bytes:
            self.top_bytes = start
        else:
            self._gaps.insert(index, (start, end - start))

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())


class GreedyBySize:
    """Offline greedy-by-size first fit over lifetime-overlapping buffers."""

    def place(self, requests: Sequence[Request]) -> Placement:
        if not requests:
            return Placement((), 0)
        offsets, extent = _greedy(requests, range(len(requests)))
        return Placement(tuple(offsets[i] for i in range(len(requests))), extent)


class TwoSided:
    """Greedy-by-size from both ends: group 0 bottom-up, group 1 top-down.

    On a chain where each buffer overlaps only its neighbours, putting alternate units
    on alternate sides (ping-pong) reaches the lower bound, which one-sided greedy does
    not. The extent is the least that keeps the sides apart at every step.
    """

    def place(self, requests: Sequence[Request]) -> Placement:
        if not requests:
            return Placement((), 0)
        lo = min(r.first_step for r in requests)
        hi = max(r.last_step for r in requests)
        sides = [[i for i, r in enumerate(requests) if r.group == g] for g in (0, 1)]
        reach = [[0] * (hi - lo + 1), [0] * (hi - lo + 1)]  # per step: highest end per side
        placed: list[dict[int, int]] = []
        for side, ids in enumerate(sides):
            offsets, _ = _greedy(requests, ids, lo, hi)
            placed.append(offsets)
            for i in ids:
                nbytes, first, last = requests[i][:3]
                end = offsets[i] + nbytes
                for step in range(first - lo, last - lo + 1):
                    reach[side][step] = max(reach[side][step], end)
        extent = max(b + t for b, t in zip(reach[0], reach[1], strict=True))
        result = [0] * len(requests)
        for i in sides[0]:
            result[i] = placed[0][i]
        for i in sides[1]:
            result[i] = extent - placed[1][i] - requests[i].nbytes
        return Placement(tuple(result), extent)


def _greedy(
    requests: Sequence[Request], ids: Iterable[int], lo: int | None = None, hi: int | None = None
) -> tuple[dict[int, int], int]:
    """Greedy-by-size offsets of ``requests[ids]``; ``lo..hi`` is the whole span."""
    size = [r[0] for r in requests]
    first = [r[1] for r in requests]
    last = [r[2] for r in requests]
    ids = sorted(ids, key=lambda i: (-size[i], i))
    if lo is None or hi is None:
        lo = min((first[i] for i in ids), default=0)
        hi = max((last[i] for i in ids), default=0)
    offsets: dict[int, int] = {}
    ends: dict[int, int] = {}
    base = 0
    rest: list[int] = []
    for i in ids:
        if first[i] == lo and last[i] == hi:
            offsets[i] = base
            base += size[i]
        else:
            rest.append(i)
    extent = base
    placed_at: list[list[int]] = [[] for _ in range(hi - lo + 1)]  # step -> placed ids
    for i in rest:
        nbytes = size[i]
        offset = base
        if nbytes > 0:
            steps = range(first[i] - lo, last[i] - lo + 1)
            # Lifetimes are short on a chain: the buffers met are few, duplicates harmless.
            taken = sorted((offsets[j], ends[j]) for step in steps for j in placed_at[step])
            for start, end in taken:
                if start - offset >= nbytes:
                    break
                if end > offset:
                    offset = end
            for step in steps:
                placed_at[step].append(i)
        offsets[i] = offset
        ends[i] = offset + nbytes
        extent = max(extent, offset + nbytes)
    return offsets, extent


class SweepFirstFit:
    """Online first fit replayed in step order: what a runtime without a plan would get."""

    def place(self, requests: Sequence[Request]) -> Placement:
        arena = FirstFitArena()
        offsets = [0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (requests[i].first_step, i))
        alive: list[tuple[int, int]] = []  # heap of (last_step, id)
        for i in order:
            nbytes, first, last = requests[i][:3]
            while alive and alive[0][0] < first:
                arena.free(offsets[heapq.heappop(alive)[1]])
            if nbytes > 0:
                offsets[i] = arena.alloc(nbytes)
                heapq.heappush(alive, (last, i))
        extent = max((o + r.nbytes for o, r in zip(offsets, requests, strict=True)), default=0)
        return Placement(tuple(offsets), extent)


class NaiveSlots:
    """The baseline: every buffer its own slot, nothing reused."""

    def place(self, requests: Sequence[Request]) -> Placement:
        offsets = []
        top = 0
        for r in requests:
            offsets.append(top)
            top += r.nbytes
        return Placement(tuple(offsets), top)
