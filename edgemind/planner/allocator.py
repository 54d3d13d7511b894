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

Large placements (the planner's long chains) run on NumPy columns: the greedy places,
in rounds, every buffer whose larger lifetime-neighbours are all placed (few rounds on
a chain of varied sizes), then finishes the rest one by one as the plain loop does.
Both give the same offsets; the columns are used only when no byte sum can overflow.

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

import numpy as np

from edgemind.errors import MemoryQuotaExceeded
from edgemind.units import align_up, format_bytes

VECTOR_MIN = 256  # fewer requests: the plain loops beat NumPy's per-call overhead
SAFE_BYTES = 1 << 62  # byte columns summing below this cannot overflow int64
_ROUND_MIN = 96  # a round places at least this many buffers, else the loop finishes
_TAIL_LISTS = 512  # buffers left to the loop above which it converts whole columns


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
        columns = _columns(requests)
        if columns is not None:
            size, first, last, _ = columns
            offsets, extent = greedy_columns(size, first, last)
            return Placement(tuple(offsets.tolist()), extent)
        placed, extent = _greedy(requests, range(len(requests)))
        return Placement(tuple(placed[i] for i in range(len(requests))), extent)


class TwoSided:
    """Greedy-by-size from both ends: group 0 bottom-up, group 1 top-down.

    On a chain where each buffer overlaps only its neighbours, putting alternate units
    on alternate sides (ping-pong) reaches the lower bound, which one-sided greedy does
    not. The extent is the least that keeps the sides apart at every step.
    """

    def place(self, requests: Sequence[Request]) -> Placement:
        if not requests:
            return Placement((), 0)
        columns = _columns(requests)
        if columns is not None:
            offsets, extent = two_sided_columns(*columns)
            return Placement(tuple(offsets.tolist()), extent)
        lo = min(r.first_step for r in requests)
        hi = max(r.last_step for r in requests)
        sides = [[i for i, r in enumerate(requests) if r.group == g] for g in (0, 1)]
        reach = [[0] * (hi - lo + 1), [0] * (hi - lo + 1)]  # per step: highest end per side
        placed: list[dict[int, int]] = []
        for side, ids in enumerate(sides):
            side_offsets, _ = _greedy(requests, ids, lo, hi)
            placed.append(side_offsets)
            for i in ids:
                nbytes, first, last = requests[i][:3]
                end = side_offsets[i] + nbytes
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


def _columns(requests: Sequence[Request]) -> tuple[np.ndarray, ...] | None:
    """(size, first, last, group) as int64 arrays, or None when the loops should run."""
    if len(requests) < VECTOR_MIN or sum(r[0] for r in requests) >= SAFE_BYTES:
        return None
    try:
        columns = tuple(np.array(column, np.int64) for column in zip(*requests, strict=True))
    except (OverflowError, TypeError, ValueError):  # steps past int64, or not ints
        return None
    return columns if vectorizable(*columns[:3]) else None


def vectorizable(size: np.ndarray, first: np.ndarray, last: np.ndarray) -> bool:
    """Whether :func:`greedy_columns` and :func:`two_sided_columns` are worth it here and
    give the loops' offsets: enough requests, int64 sizes >= 0 summing below
    :data:`SAFE_BYTES`, lifetimes in order."""
    return (
        len(size) >= VECTOR_MIN
        and size.dtype == np.int64
        and bool((size >= 0).all() and (first <= last).all())
        and int(size.sum()) < SAFE_BYTES
    )


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``range(s, s + c)`` for each pair, concatenated."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - (ends - counts), counts) + np.arange(total)


def two_sided_columns(
    size: np.ndarray, first: np.ndarray, last: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, int]:
    """:class:`TwoSided` on int64 columns (total size below :data:`SAFE_BYTES`)."""
    lo, hi = int(first.min()), int(last.max())
    sides = [np.flatnonzero(group == g) for g in (0, 1)]
    reach = []
    placed = []
    for ids in sides:
        nbytes, born, dies = size[ids], first[ids], last[ids]
        offsets, _ = greedy_columns(nbytes, born, dies, lo, hi)
        placed.append(offsets)
        # per step, the highest end on this side: whole-span buffers end at most at
        # the stack they form, which every other buffer starts above
        full = (born == lo) & (dies == hi)
        side = np.full(hi - lo + 1, int(nbytes[full].sum()), np.int64)
        rest = np.flatnonzero(~full)
        lives = dies[rest] - born[rest] + 1
        steps = _ranges(born[rest] - lo, lives)
        np.maximum.at(side, steps, np.repeat(offsets[rest] + nbytes[rest], lives))
        reach.append(side)
    extent = int((reach[0] + reach[1]).max())
    result = np.zeros(len(size), np.int64)
    result[sides[0]] = placed[0]
    result[sides[1]] = extent - placed[1] - size[sides[1]]
    return result, extent


def greedy_columns(
    size: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    lo: int | None = None,
    hi: int | None = None,
) -> tuple[np.ndarray, int]:
    """:class:`GreedyBySize` on int64 columns: the same offsets as the loop, ties by
    position; ``lo..hi`` is the whole span (default: the columns' own)."""
    m = len(size)
    if m == 0:
        return np.zeros(0, np.int64), 0
    lo = int(first.min()) if lo is None else lo
    hi = int(last.max()) if hi is None else hi
    by_size = np.lexsort((np.arange(m), -size))
    full = (first == lo) & (last == hi)
    offsets = np.zeros(m, np.int64)
    stacked = by_size[full[by_size]]
    tops = np.cumsum(size[stacked])
    offsets[stacked] = tops - size[stacked]
    base = int(tops[-1]) if len(tops) else 0
    offsets[~full] = base
    queue = by_size[~full[by_size] & (size[by_size] > 0)]  # first fit, in this order
    if len(queue) == 0:
        return offsets, base
    off, end = _first_fit(size[queue], first[queue], last[queue], base)
    offsets[queue] = off
    return offsets, max(base, int(end.max()))


def _first_fit(
    size: np.ndarray, first: np.ndarray, last: np.ndarray, base: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and ends of buffers placed in order, each at the lowest offset from
    ``base`` clear of the earlier ones it shares a step with."""
    n = len(size)
    # the pairs alive at a common step: j starts within i's life, i first by start
    by_first = np.argsort(first, kind="stable")
    count = np.searchsorted(first[by_first], last[by_first], side="right") - np.arange(n) - 1
    a = by_first[np.repeat(np.arange(n), count)]
    b = by_first[_ranges(np.arange(1, n + 1), count)]
    later, earlier = np.maximum(a, b), np.minimum(a, b)
    nbr = earlier[np.argsort(later, kind="stable")]  # each buffer's earlier neighbours
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(later, minlength=n), out=ptr[1:])
    succ = later[np.argsort(earlier, kind="stable")]  # and its later ones
    sptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(earlier, minlength=n), out=sptr[1:])
    pending = ptr[1:] - ptr[:-1]
    off = np.full(n, base, np.int64)
    end = off + size
    done = np.zeros(n, bool)
    ready = np.flatnonzero(pending == 0)
    while len(ready) >= _ROUND_MIN:
        off[ready] = _round(ready, nbr, ptr, off, end, size[ready], base)
        end[ready] = off[ready] + size[ready]
        done[ready] = True
        pending -= np.bincount(
            succ[_ranges(sptr[ready], sptr[ready + 1] - sptr[ready])], minlength=n
        )
        ready = np.flatnonzero((pending == 0) & ~done)
    rest = np.flatnonzero(~done).tolist()
    if len(rest) > _TAIL_LISTS:  # many left: plain lists beat NumPy's per-call cost
        lists = off.tolist(), end.tolist(), size.tolist(), nbr.tolist(), ptr.tolist()
        offl, endl, sizel, nbrl, ptrl = lists
        for i in rest:
            taken = sorted([(offl[j], endl[j]) for j in nbrl[ptrl[i] : ptrl[i + 1]]])
            offl[i] = _lowest_fit(taken, base, sizel[i])
            endl[i] = offl[i] + sizel[i]
        return np.array(offl, np.int64), np.array(endl, np.int64)
    for i in rest:
        j = nbr[ptr[i] : ptr[i + 1]]
        taken = sorted(zip(off[j].tolist(), end[j].tolist(), strict=True))
        off[i] = _lowest_fit(taken, base, int(size[i]))
        end[i] = off[i] + size[i]
    return off, end


def _round(
    ready: np.ndarray,
    nbr: np.ndarray,
    ptr: np.ndarray,
    off: np.ndarray,
    end: np.ndarray,
    size: np.ndarray,
    base: int,
) -> np.ndarray:
    """First-fit offsets of buffers whose earlier neighbours are all placed: the lowest
    of ``base`` and those neighbours' ends that clashes with none of them."""
    start = ptr[ready]
    degree = ptr[ready + 1] - start
    count = degree + 1  # candidates per buffer: base, then each neighbour's end
    owner = np.repeat(np.arange(len(ready)), count)
    within = _ranges(np.zeros(len(ready), np.int64), count)
    candidate = np.full(len(owner), base, np.int64)
    if len(nbr):
        at = np.flatnonzero(within)
        candidate[at] = end[nbr[start[owner[at]] + within[at] - 1]]
    checks = degree[owner]
    which = np.repeat(np.arange(len(owner)), checks)
    j = nbr[_ranges(start[owner], checks)]
    value = candidate[which]
    clash = (value < end[j]) & (off[j] < value + size[owner[which]])
    candidate[which[clash]] = SAFE_BYTES
    return np.minimum.reduceat(candidate, np.cumsum(count) - count)


def _lowest_fit(taken: list[tuple[int, int]], base: int, nbytes: int) -> int:
    """The lowest offset from ``base`` where ``nbytes`` clear ``taken`` (sorted spans)."""
    offset = base
    for start, stop in taken:
        if start - offset >= nbytes:
            break
        if stop > offset:
            offset = stop
    return offset


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
