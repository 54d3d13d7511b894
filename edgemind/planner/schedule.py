"""The planner: a cost table and a policy in, a residency schedule with offsets out.

A request runs a chain of units: ``layers[0..after_layer(level)]`` then, if the exit
has a head, the head. Buffers and steps (``d`` is the effective prefetch depth):

* Steps. With ``d >= 1``: step 0 loads unit 0 (nothing to overlap), then one ``run``
  step per unit. During the run of unit ``k`` the weights of units ``k+1..k+d`` are
  being read: each streamed unit ``j >= 1`` starts loading at the run of unit
  ``max(0, j - d)`` and is listed in that step's ``loads``. With ``d == 0`` every
  streamed unit gets a ``load`` step then its ``run`` step. Units with zero weight bytes
  (and pinned units) get no load step.
* Weights. A streamed unit's buffer lives from the step its reading starts to the end
  of its run. Role ``"weights"`` if it was loaded by a load step of its own,
  ``"prefetch"`` if it was read during an earlier unit's run. Its ``tensors`` are one
  aligned slot per tensor.
* Pinned units (role ``"pinned"``) are resident across requests: alive at every step,
  never in ``loads``, not counted in ``streamed_bytes``. ``keep_resident_layers = n``
  allows ``n - 1`` pins (the running layer is the n-th), ``"auto"`` as many as fit. Pins
  are chosen largest weights first among the plan's units, only within the capacity the
  streaming plan leaves: they never cause an early exit or a rejection.
* Activations. The chain input (layer ``"input"``) lives from step 0 to the end of unit
  0's run; context inputs (layer ``"context"``, when ``context_bytes > 0``) live the
  whole request. Unit ``k``'s output is born at its run and dies at the end of the run
  that consumes it (the last output at the last step). Zero-byte activations get none.
* Working sets (role ``"working_set"``, offset None) are XLA's, outside the arena, alive
  at their run step only; their nbytes are XLA's figure, unrounded.

Every arena buffer is rounded up to ``Policy.buffer_alignment_bytes`` (the policy's
alignment, or 4 KiB blocks for direct reads) and placed by
:class:`~edgemind.planner.allocator.TwoSided` (buffers born at alternate steps on
alternate ends: exact on depth-1 chains) or, when that misses the arena's live bound,
the better of it and :class:`~edgemind.planner.allocator.GreedyBySize`. Lifetimes are
chain-shaped, so both run in about O(n log n) (on NumPy columns for long chains). A
layout is placed only when its peak is needed: its live bytes bound the peak from below
and often settle a comparison alone. ``arena_bytes`` is the placed extent,
``peak_bytes = arena_bytes + max working set`` (the arena is allocated whole; XLA's pool
comes on top), ``lower_bound_bytes`` the largest ``arena live + working set`` at any step.
A plan is feasible iff ``peak_bytes <= capacity``.

When the complete run does not fit: prefetch depth is reduced (``d, d-1, ..., 0``);
then under ``early_exit`` the deepest exit level that fits is run (again with the
largest depth that fits), status ``"early_exit"``; under ``reject_request``, or when no
level fits, status ``"infeasible"``, carrying the complete run at depth 0. Every plan
carries ``min_capacity_bytes``, the exact smallest capacity at which the complete run is
feasible under the policy (the minimum over depths of the unpinned peak; placement does
not depend on the capacity), and, when the complete run does not fit, a ``witness``
about the complete run at depth 0 (its step and buffer ids): the step with the most
live bytes, what is alive there, and ``missing_bytes = min_capacity - capacity``.

>>> from edgemind.planner.plan import CostTable, ExitCost, UnitCost
>>> from edgemind.policy import Policy
>>> layers = tuple(UnitCost(f"l{i}", "dense", (("w", 4096),), 256, 512) for i in range(3))
>>> costs = CostTable("toy", (1, 64), 256, layers, (ExitCost(1, 2, None),))
>>> plan = make_plan(costs, Policy(arena_capacity_bytes=1 << 20))
>>> plan.status, plan.prefetch_depth, len(plan.steps), plan.peak_bytes
('feasible', 1, 4, 9216)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgemind.errors import PlanError
from edgemind.planner.allocator import (
    SAFE_BYTES,
    GreedyBySize,
    Request,
    TwoSided,
    greedy_columns,
    two_sided_columns,
    vectorizable,
)
from edgemind.planner.plan import (
    ROLES,
    Buffer,
    CostTable,
    Plan,
    Status,
    Step,
    TensorSlot,
    UnitCost,
    Witness,
)
from edgemind.policy import Policy
from edgemind.units import align_up, format_bytes

_PIN_ROUNDS = 8  # re-measure the spare capacity this many times while pinning


Tiles = tuple[tuple[int, int], ...]  # row ranges of a tiled unit's tensor, in order


def run_tensors(unit: UnitCost, tile: tuple[int, int] | None, last: bool) -> list[tuple]:
    """(name, bytes, source offset) of what one run loads: the whole unit, or one tile's
    rows of its tiled tensor (and, with the last tile, its other tensors)."""
    if tile is None or unit.tiling is None:
        return [(name, nbytes, 0) for name, nbytes in unit.tensors]
    t = unit.tiling
    part = [(t.tensor, (tile[1] - tile[0]) * t.row_bytes, tile[0] * t.row_bytes)]
    rest = [(name, nbytes, 0) for name, nbytes in unit.tensors if name != t.tensor]
    return part + (rest if last else [])


def weights_nbytes(unit: UnitCost, alignment: int, tile=None, last: bool = True) -> int:
    """Bytes of a run's weights buffer: each tensor (or tile) in its own aligned slot."""
    end = 0
    for _, nbytes, _ in run_tensors(unit, tile, last):
        end = align_up(end, alignment) + nbytes
    return align_up(end, alignment)


def tensor_slots(
    unit: UnitCost, alignment: int, tile: tuple[int, int] | None = None, last: bool = True
) -> tuple[TensorSlot, ...]:
    """Where each of a run's tensors (or tiles of one) lies inside its weights buffer."""
    slots = []
    end = 0
    for name, nbytes, source in run_tensors(unit, tile, last):
        offset = align_up(end, alignment)
        slots.append(TensorSlot(name, offset, nbytes, source))
        end = offset + nbytes
    return tuple(slots)


_ROLE_CODE = {role: code for code, role in enumerate(ROLES)}
_STATE, _WEIGHTS, _PREFETCH, _PINNED, _ACTIVATION, _ACCUMULATOR, _WORKING_SET = (
    _ROLE_CODE[r]
    for r in ("state", "weights", "prefetch", "pinned", "activation", "accumulator", "working_set")
)


@dataclasses.dataclass(frozen=True)
class _Units:
    """Per-unit figures of a chain, computed once per plan and shared by its layouts."""

    units: Sequence[UnitCost]
    weights: list[int]  # bytes of the whole unit's weights buffer
    output: list[int]  # aligned output bytes, 0 when none
    working_set: list[int]
    weight_bytes: list[int]  # UnitCost.weight_bytes
    total_bytes: int  # every figure above summed: bounds any layout's byte sums


def _unit_table(units: Sequence[UnitCost], align: int) -> _Units:
    weights, output, working, raw = [], [], [], []
    for unit in units:  # weights_nbytes and align_up inlined: chains have thousands
        end = total = 0
        for _, nbytes in unit.tensors:
            end = -(-end // align) * align + nbytes
            total += nbytes
        weights.append(-(-end // align) * align)
        output.append(-(-unit.output_bytes // align) * align)
        working.append(unit.working_set_bytes)
        raw.append(total)
    total = sum(weights) + sum(output) + sum(working)
    return _Units(units, weights, output, working, raw, total)


@dataclasses.dataclass
class _Layout:
    """The schedule of one chain at one depth with one pin set, as NumPy columns.

    A *run* is a unit's run, or one tile of a tiled unit: ``run(r) = (unit, tile)``.
    Buffer columns are indexed by buffer id; run columns by run, -1 for none.
    """

    table: _Units
    depth: int
    pinned: frozenset[int]
    tiles: Mapping[int, Tiles]
    run_unit: np.ndarray  # (runs,) the unit each run belongs to
    run_tiles: list[tuple[int, int] | None] | None  # per run; None when nothing is tiled
    step_run: np.ndarray  # (steps,) the run each step belongs to
    step_loads: np.ndarray  # (steps,) True for a load step
    role: np.ndarray  # (buffers,) index into ROLES
    labels: dict[int, str]  # buffers not named for their unit: state, context, input
    unit_of: np.ndarray  # (buffers,) -1 for the input and context
    run_of: np.ndarray  # (buffers,) the run a weights buffer belongs to; -1 for others
    nbytes: np.ndarray  # (buffers,) int64, or Python ints (object) when sums could overflow
    first: np.ndarray  # (buffers,)
    last: np.ndarray  # (buffers,)
    weights: np.ndarray  # (runs,)
    output: np.ndarray  # (runs,)
    inputs: np.ndarray  # (runs,)
    working: np.ndarray  # (runs,)
    max_ws_bytes: int = 0
    arena_live: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    ws_live: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    # placed on first use: many layouts are only compared, and their live bytes often
    # settle the comparison (see fits and _least_peak)
    placement: tuple[np.ndarray, int] | None = None  # (offsets, arena_bytes)

    @property
    def units(self) -> Sequence[UnitCost]:
        return self.table.units

    def run(self, r: int) -> tuple[int, tuple[int, int] | None]:
        return int(self.run_unit[r]), None if self.run_tiles is None else self.run_tiles[r]

    @property
    def offsets(self) -> np.ndarray:
        return self.placed()[0]

    @property
    def arena_bytes(self) -> int:
        return self.placed()[1]

    def placed(self) -> tuple[np.ndarray, int]:
        if self.placement is None:
            self.placement = _place(self)
        return self.placement

    @property
    def peak_bytes(self) -> int:
        return self.arena_bytes + self.max_ws_bytes

    @property
    def floor_bytes(self) -> int:
        """A lower bound on ``peak_bytes`` from the live bytes alone (no placement)."""
        return int(self.arena_live.max()) + self.max_ws_bytes

    def fits(self, capacity: int) -> bool:
        """``peak_bytes <= capacity``, placing only when the live bytes leave room."""
        return self.floor_bytes <= capacity and self.peak_bytes <= capacity

    @property
    def lower_bound_bytes(self) -> int:
        return int((self.arena_live + self.ws_live).max())


def _runs(units: Sequence[UnitCost], tiles: Mapping[int, Tiles]) -> list[tuple]:
    return [
        (k, tile)
        for k in range(len(units))
        for tile in tiles.get(k, (None,))  # type: ignore[arg-type]
    ]


def _run_columns(
    table: _Units, align: int, tiles: Mapping[int, Tiles], tile_ws: Mapping[tuple[str, int], int]
) -> tuple[list[tuple[int, int] | None] | None, np.ndarray, list[int], list[int]]:
    """Each run's tile (None: none is tiled), unit, weights bytes and working-set bytes."""
    units = table.units
    n = len(units)
    if not tiles:
        return None, np.arange(n), table.weights, table.working_set
    runs = _runs(units, tiles)
    sizes, working = [], []
    for r, (k, tile) in enumerate(runs):
        if tile is None:
            sizes.append(table.weights[k])
            working.append(table.working_set[k])
            continue
        last = r + 1 == len(runs) or runs[r + 1][0] != k
        sizes.append(weights_nbytes(units[k], align, tile, last))
        unit = units[k]
        working.append(tile_ws.get((unit.name, tile[1] - tile[0]), unit.working_set_bytes))
    return [tile for _, tile in runs], np.array([k for k, _ in runs]), sizes, working


@dataclasses.dataclass
class _Head:
    """The buffers before the runs' (all alive from step 0), as they are added."""

    role: list[int] = dataclasses.field(default_factory=list)
    nbytes: list[int] = dataclasses.field(default_factory=list)
    last: list[int] = dataclasses.field(default_factory=list)
    unit: list[int] = dataclasses.field(default_factory=list)
    run: list[int] = dataclasses.field(default_factory=list)
    labels: dict[int, str] = dataclasses.field(default_factory=dict)

    def add(
        self,
        role: int,
        nbytes: int,
        last: int,
        unit: int = -1,
        run: int = -1,
        label: str | None = None,
    ) -> int:
        for column, value in zip(
            (self.role, self.nbytes, self.last, self.unit, self.run),
            (role, nbytes, last, unit, run),
            strict=True,
        ):
            column.append(value)
        if label is not None:
            self.labels[len(self.role) - 1] = label
        return len(self.role) - 1


def _layout(
    table: _Units,
    input_bytes: int,
    context_bytes: int,
    depth: int,
    pinned: frozenset[int],
    align: int,
    tiles: Mapping[int, Tiles] | None = None,
    tile_ws: Mapping[tuple[str, int], int] | None = None,
    state: Sequence[tuple[str, int]] = (),
) -> _Layout:
    """Buffers and steps of a chain; ``tiles`` splits units into row ranges.

    A tiled unit's input lives until its last tile, and its output (an accumulator) from
    its first tile until the last run that reads it. ``tile_ws`` gives a tile's working
    set by (unit, rows); a tile without one is costed at its unit's whole working set.
    Lifetimes are those of references (as tinygrad's memory planner derives them): a
    buffer lives from the first step that touches it to the last.
    """
    tiles, tile_ws = tiles or {}, tile_ws or {}
    units = table.units
    n = len(units)
    run_tiles, run_unit, size_list, ws_list = _run_columns(table, align, tiles, tile_ws)
    extra = sum(align_up(b, align) for _, b in state) + context_bytes + input_bytes
    # int64 when no byte sum can overflow; else exact Python ints (slow, never in practice)
    dtype: type = np.int64 if 4 * (table.total_bytes + extra) + (1 << 40) < SAFE_BYTES else object
    num_runs = len(run_unit)
    index = np.arange(num_runs)
    run_size: np.ndarray = np.array(size_list, dtype)
    run_ws: np.ndarray = np.array(ws_list, dtype)
    first_of = np.searchsorted(run_unit, np.arange(n))  # runs are in unit order
    last_of = np.searchsorted(run_unit, np.arange(n), side="right") - 1
    is_pinned = np.zeros(n, bool)
    is_pinned[sorted(pinned)] = True
    streamed = (run_size > 0) & ~is_pinned[run_unit]
    loads = streamed if depth == 0 else streamed & (index == 0)
    run_step = index + np.cumsum(loads)
    num_steps = num_runs + int(loads.sum())
    end = num_steps - 1
    step_run = np.repeat(index, 1 + loads)
    step_loads = np.zeros(num_steps, bool)
    step_loads[run_step[loads] - 1] = True

    # the session's buffers (state, context, pins) and the chain input come first
    head = _Head()
    for name, state_bytes in state:  # every unit's, whatever level runs: offsets never move
        head.add(_STATE, align_up(state_bytes, align), end, label=name)
    if context_bytes > 0:
        head.add(_ACTIVATION, align_up(context_bytes, align), end, label="context")
    pin_id = np.full(n, -1)
    for k in sorted(pinned):
        pin_id[k] = head.add(_PINNED, size_list[first_of[k]], end, k, int(first_of[k]))
    input_id = -1
    if input_bytes > 0:
        last_read = int(run_step[last_of[0]])
        input_id = head.add(_ACTIVATION, align_up(input_bytes, align), last_read, label="input")
    num_head = len(head.role)

    # then per run: its streamed weights, its unit's output (first run), its working set
    out_bytes = np.array(table.output, dtype)[run_unit]
    outs = (index == first_of[run_unit]) & (out_bytes > 0)
    wss = run_ws > 0
    count = streamed.astype(np.int64) + outs + wss
    w_id = num_head + np.cumsum(count) - count
    out_id = w_id + streamed
    ws_id = out_id + outs
    total = num_head + int(count.sum())
    role = np.zeros(total, np.int8)
    unit_of = np.full(total, -1)
    run_of = np.full(total, -1)
    nbytes: np.ndarray = np.zeros(total, dtype)
    first = np.zeros(total, np.int64)
    last = np.zeros(total, np.int64)
    role[:num_head] = head.role
    unit_of[:num_head] = head.unit
    run_of[:num_head] = head.run
    nbytes[:num_head] = np.array(head.nbytes, dtype)
    last[:num_head] = head.last

    at = w_id[streamed]
    role[at] = np.where(loads, _WEIGHTS, _PREFETCH)[streamed]
    unit_of[at] = run_unit[streamed]
    run_of[at] = index[streamed]
    nbytes[at] = run_size[streamed]
    start = np.where(loads, run_step - 1, run_step[np.maximum(index - depth, 0)])
    first[at] = start[streamed]
    last[at] = run_step[streamed]

    at = out_id[outs]
    tiled = np.zeros(num_runs, bool)
    if run_tiles is not None:
        tiled[:] = [tile is not None for tile in run_tiles]
    role[at] = np.where(tiled, _ACCUMULATOR, _ACTIVATION)[outs]
    unit_of[at] = run_unit[outs]
    nbytes[at] = out_bytes[outs]
    first[at] = run_step[outs]
    read_until = np.append(run_step[last_of[1:]], end)  # per unit: its reader's last run
    last[at] = read_until[run_unit[outs]]

    at = ws_id[wss]
    role[at] = _WORKING_SET
    unit_of[at] = run_unit[wss]
    nbytes[at] = run_ws[wss]
    first[at] = last[at] = run_step[wss]

    unit_out = np.full(n, -1)
    unit_out[run_unit[outs]] = out_id[outs]
    unit_in = np.append(input_id, unit_out[:-1])
    lay = _Layout(
        table,
        depth,
        pinned,
        tiles,
        run_unit,
        run_tiles,
        step_run,
        step_loads,
        role,
        head.labels,
        unit_of,
        run_of,
        nbytes,
        first,
        last,
        weights=np.where(streamed, w_id, pin_id[run_unit]),
        output=unit_out[run_unit],
        inputs=unit_in[run_unit],
        working=np.where(wss, ws_id, -1),
    )
    _sweep_live(lay)
    return lay


def _place(lay: _Layout) -> tuple[np.ndarray, int]:
    """State first, from offset 0 in unit order (so every plan of a model puts it at the
    same offsets); the rest above it by the better of two strategies."""
    state = np.flatnonzero(lay.role == _STATE)
    offsets = np.zeros(len(lay.role), lay.nbytes.dtype)
    tops = np.cumsum(lay.nbytes[state])
    offsets[state] = tops - lay.nbytes[state]
    base = tops[-1] if len(tops) else 0
    arena = np.flatnonzero((lay.role != _WORKING_SET) & (lay.role != _STATE))
    size, first, last = lay.nbytes[arena], lay.first[arena], lay.last[arena]
    # Buffers born at alternate steps go on alternate sides (ping-pong): on a chain whose
    # buffers overlap only their neighbours (prefetch depth 1) that reaches the bound.
    group = first % 2
    if len(arena) == 0:
        placed, extent = offsets[arena], 0
    elif vectorizable(size, first, last):
        placed, extent = two_sided_columns(size, first, last, group)
        if base + extent > lay.arena_live.max():
            greedy, greedy_extent = greedy_columns(size, first, last)
            if greedy_extent < extent:
                placed, extent = greedy, greedy_extent
    else:
        columns = (size.tolist(), first.tolist(), last.tolist(), group.tolist())
        requests = [Request(*r) for r in zip(*columns, strict=True)]
        placement = TwoSided().place(requests)
        if base + placement.extent_bytes > lay.arena_live.max():
            placement = min(placement, GreedyBySize().place(requests), key=lambda p: p.extent_bytes)
        placed, extent = np.array(placement.offsets, lay.nbytes.dtype), placement.extent_bytes
    offsets[arena] = base + placed
    return offsets, int(base + extent)


def _sweep_live(lay: _Layout) -> None:
    """Arena and working-set bytes alive at every step, by a difference-array sweep."""
    num_steps = len(lay.step_run)
    lives = []
    for mask in (lay.role != _WORKING_SET, lay.role == _WORKING_SET):
        delta = np.zeros(num_steps + 1, lay.nbytes.dtype)
        np.add.at(delta, lay.first[mask], lay.nbytes[mask])
        np.subtract.at(delta, lay.last[mask] + 1, lay.nbytes[mask])
        lives.append(np.cumsum(delta[:num_steps]))
    lay.arena_live, lay.ws_live = lives
    lay.max_ws_bytes = int(lay.ws_live.max())


def validate_costs(costs: CostTable) -> None:
    """Raise PlanError when a cost table is malformed (negative sizes, exits out of order)."""
    where = f"cost table of {costs.model_name!r}"
    if not costs.layers:
        raise PlanError(f"{where}: no layers")
    for field in ("input_bytes", "context_bytes"):
        _check_size(where, field, getattr(costs, field))
    heads = [e.head for e in costs.exits if e.head is not None]
    for unit in (*costs.layers, *heads):
        sizes = (unit.output_bytes, unit.working_set_bytes, unit.state_bytes)
        # the common case at a glance (plain non-negative ints); the rest says what is wrong
        if any(type(n) is not int or n < 0 for n in sizes):
            for field in ("output_bytes", "working_set_bytes", "state_bytes"):
                _check_size(f"{where}, unit {unit.name!r}", field, getattr(unit, field))
        for name, nbytes in unit.tensors:
            if type(nbytes) is not int or nbytes < 0:
                _check_size(f"{where}, unit {unit.name!r}", f"tensor {name!r}", nbytes)
    if not costs.exits:
        raise PlanError(f"{where}: no exits; the last exit must follow the last layer")
    previous = -1
    for index, exit_ in enumerate(costs.exits):
        if exit_.level != index + 1:
            raise PlanError(f"{where}: exit #{index} has level {exit_.level}, expected {index + 1}")
        if not previous < exit_.after_layer < len(costs.layers):
            raise PlanError(
                f"{where}: exit level {exit_.level} follows layer {exit_.after_layer}; exits "
                f"must follow layers in increasing order within 0..{len(costs.layers) - 1}"
            )
        previous = exit_.after_layer
    if previous != len(costs.layers) - 1:
        raise PlanError(
            f"{where}: the last exit follows layer {previous}, but the complete run ends "
            f"at layer {len(costs.layers) - 1}"
        )


def _check_size(where: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PlanError(f"{where}: {field} must be a whole number of bytes >= 0, got {value!r}")


def chain_units(costs: CostTable, level: int) -> tuple[UnitCost, ...]:
    """The units a request run to exit ``level`` (1-based) executes, in order."""
    exit_ = costs.exits[level - 1]
    head = (exit_.head,) if exit_.head is not None else ()
    return (*costs.layers[: exit_.after_layer + 1], *head)


def make_plan(
    costs: CostTable, policy: Policy, *, manifest_digest: str = "", policy_digest: str = ""
) -> Plan:
    """Plan a request: the complete run if it fits, else as the policy says (pure)."""
    validate_costs(costs)
    capacity = policy.arena_capacity_bytes
    notes: list[str] = []

    tile_ws = {(unit, rows): nbytes for unit, rows, nbytes in costs.tile_working_sets}
    heads = [e.head for e in costs.exits if e.head is not None]
    state = [(u.name, u.state_bytes) for u in (*costs.layers, *heads) if u.state_bytes > 0]

    tables: dict[int, _Units] = {}  # by id(units): the chains planned share their figures

    def build(
        units: Sequence[UnitCost],
        depth: int,
        pinned: frozenset[int],
        tiles: Mapping[int, Tiles] | None = None,
    ) -> _Layout:
        table = tables.get(id(units))
        if table is None or table.units is not units:
            table = tables[id(units)] = _unit_table(units, policy.buffer_alignment_bytes)
        return _layout(
            table,
            costs.input_bytes,
            costs.context_bytes,
            depth,
            pinned,
            policy.buffer_alignment_bytes,
            tiles,
            tile_ws,
            state,
        )

    complete = chain_units(costs, costs.num_levels)
    top = _effective_depth(policy.prefetch_depth, len(complete), notes)
    candidates = [build(complete, d, frozenset()) for d in range(top, -1, -1)]
    min_capacity = _least_peak(candidates)
    chosen = next((lay for lay in candidates if lay.fits(capacity)), None)
    deepest = candidates[0]  # the chosen chain at the depth asked for
    if policy.tiling == "auto" and any(u.tiling is not None for u in complete):
        # Tiles when the whole units do not fit; they always count towards the smallest
        # capacity (and then give the witness: the least of the finest tiling's layouts).
        tiled = _tilings(complete, policy, build)
        finest = min(tiled, key=lambda row: min(lay.peak_bytes for lay in row))
        if min(lay.peak_bytes for lay in finest) < min_capacity:
            min_capacity = min(lay.peak_bytes for lay in finest)
            candidates = sorted(finest, key=lambda lay: -lay.peak_bytes)
        fit = _first_tiled_fit(tiled, capacity) if chosen is None else None
        if fit is not None:
            chosen, deepest = _untile(fit[0], capacity, build), fit[1]
            # the whole units' depth cap does not bind tiles, which are runs of their own
            notes[:] = [n for n in notes if not n.startswith("prefetch_depth ")]
            notes.append(_tiles_note(chosen))
    status: Status = "feasible"
    level: int | None = costs.num_levels
    witness = None
    if chosen is None:
        witness = _witness(candidates[-1], capacity, min_capacity)
        notes.append(
            f"the complete run needs {format_bytes(min_capacity)}, the arena has "
            f"{format_bytes(capacity)}; raise model.arena_capacity_mb to run it whole"
        )
        if policy.on_memory_quota_exceeded == "early_exit":
            found = _deepest_exit(costs, policy, build)
            if found is not None:
                level, chosen, deepest = found
        status = "infeasible" if chosen is None else "early_exit"
        if chosen is None:
            level = None
            notes.append(_no_exit_note(costs, policy))
    if chosen is not None:
        if chosen.depth < deepest.depth:
            notes.append(
                f"prefetch reduced from {deepest.depth} to {chosen.depth}: depth "
                f"{deepest.depth} needs {format_bytes(deepest.peak_bytes)}, the arena has "
                f"{format_bytes(capacity)}"
            )
        chosen = _pin(chosen, policy, build, notes)
    return _materialize(
        chosen or candidates[-1],
        costs,
        policy,
        status=status,
        level=level,
        min_capacity=min_capacity,
        witness=witness,
        notes=tuple(notes),
        digests=(manifest_digest, policy_digest),
    )


_Build = Callable[..., _Layout]


def _least_peak(layouts: Sequence[_Layout]) -> int:
    """The least ``peak_bytes``, placing only the layouts whose live bytes could beat it."""
    best: int | None = None
    for lay in sorted(layouts, key=lambda lay: lay.floor_bytes):
        if best is not None and lay.floor_bytes >= best:
            break
        best = lay.peak_bytes if best is None else min(best, lay.peak_bytes)
    assert best is not None, "a chain has at least one layout"
    return best


def _effective_depth(requested: int, num_units: int, notes: list[str] | None = None) -> int:
    """Depths past the chain's end overlap nothing more: cap them at ``units - 1``."""
    depth = min(requested, num_units - 1)
    if notes is not None and depth < requested:
        notes.append(
            f"prefetch_depth {requested} is more than a {num_units}-unit run can overlap; "
            f"using {depth}"
        )
    return depth


def _floors(costs: CostTable, align: int) -> tuple[list[int], dict[int, int]]:
    """A lower bound on any plan's peak from each run step alone: prefix maxima over layers,
    and each head's own bound (exact pruning of exit levels that cannot fit)."""

    def floor(unit: UnitCost, input_bytes: int) -> int:
        return (
            align_up(costs.context_bytes, align)
            + align_up(input_bytes, align)
            + weights_nbytes(unit, align)
            + align_up(unit.output_bytes, align)
            + unit.working_set_bytes
        )

    prefix: list[int] = []
    input_bytes = costs.input_bytes
    for unit in costs.layers:
        prefix.append(max(prefix[-1] if prefix else 0, floor(unit, input_bytes)))
        input_bytes = unit.output_bytes
    heads = {
        e.level: floor(e.head, costs.layers[e.after_layer].output_bytes)
        for e in costs.exits
        if e.head is not None
    }
    return prefix, heads


def _deepest_exit(
    costs: CostTable, policy: Policy, build: _Build
) -> tuple[int, _Layout, _Layout] | None:
    """The deepest partial exit that fits, at the largest depth that fits."""
    prefix, heads = _floors(costs, policy.buffer_alignment_bytes)
    capacity = policy.arena_capacity_bytes
    for level in range(costs.num_levels - 1, 0, -1):
        floor = max(prefix[costs.exits[level - 1].after_layer], heads.get(level, 0))
        if floor > capacity:
            continue
        units = chain_units(costs, level)
        top = _effective_depth(policy.prefetch_depth, len(units))
        deepest = build(units, top, frozenset())
        for depth in range(top, -1, -1):
            lay = deepest if depth == top else build(units, depth, frozenset())
            if lay.fits(capacity):
                return level, lay, deepest
    return None


def _no_exit_note(costs: CostTable, policy: Policy) -> str:
    if policy.on_memory_quota_exceeded == "reject_request":
        return "rejected: on_memory_quota_exceeded is reject_request"
    if costs.num_levels == 1:
        return "rejected: the model has no early exit"
    return "rejected: no exit level fits the arena"


def _pin(lay: _Layout, policy: Policy, build: _Build, notes: list[str]) -> _Layout:
    """Pin the heaviest units, largest first, in the capacity the streaming plan leaves."""
    units = lay.units
    align = policy.buffer_alignment_bytes
    # A unit whose weights are the request's own rows (an embedding gather) cannot be
    # kept for the next request: it is read every time.
    asked = policy.keep_resident_layers
    if asked != "auto" and asked <= 1:
        return lay
    heavy = [
        k
        for k, unit in enumerate(units)
        if unit.weight_bytes > 0 and unit.pinnable and k not in lay.tiles  # tiles stream
    ]
    limit = len(heavy) if asked == "auto" else min(asked - 1, len(heavy))
    size = {k: weights_nbytes(units[k], align) for k in heavy}
    order = sorted(heavy, key=lambda k: (-size[k], k))
    pinned: list[int] = []
    for _ in range(_PIN_ROUNDS):
        # Conservative: a pin adds its bytes and may or may not shrink the streamed part;
        # the real plan is re-measured after each round, so later rounds use any gain.
        slack = policy.arena_capacity_bytes - lay.peak_bytes
        taken = set(pinned)
        added: list[int] = []
        for k in order:
            if len(pinned) + len(added) < limit and k not in taken and size[k] <= slack:
                added.append(k)
                slack -= size[k]
        if not added:
            break
        trial = build(units, lay.depth, frozenset(pinned + added), lay.tiles)
        if trial.fits(policy.arena_capacity_bytes):
            pinned, lay = pinned + added, trial
            continue
        # Greedy placement is not monotone: keep the longest prefix of this round that fits.
        lo, hi = 0, len(added)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = build(units, lay.depth, frozenset(pinned + added[:mid]), lay.tiles)
            if trial.fits(policy.arena_capacity_bytes):
                lo, lay = mid, trial
            else:
                hi = mid
        pinned += added[:lo]
        break
    saved = sum(units[k].weight_bytes for k in pinned)
    wanted = (
        "as many layers resident as fit"
        if asked == "auto"
        else f"up to {asked} layers resident at once ({asked - 1} pinned + the running one)"
    )
    notes.append(
        f"keep_resident_layers={asked}: {wanted}; pinned {len(pinned)} of {len(heavy)} units "
        f"with weights, saving {format_bytes(saved)} of reading per request"
    )
    return lay


MAX_TILES = 256  # tiles per unit at the finest: bounds the steps a plan can have


def tile_ladder(units: Sequence[UnitCost]) -> list[dict[int, Tiles]]:
    """Tilings to try, coarsest first: every tileable unit whose tiled tensor exceeds a
    tile budget is split into equal row ranges (the last may be shorter); the budget
    halves from half the largest tiled tensor down to :data:`MAX_TILES` tiles of it."""
    tileable = {k: u.tiling for k, u in enumerate(units) if u.tiling is not None}
    largest = max(t.rows * t.row_bytes for t in tileable.values())
    ladder: list[dict[int, Tiles]] = []
    budget = largest // 2
    while True:
        tiles: dict[int, Tiles] = {}
        finest = True
        for k, t in tileable.items():
            floor = -(-t.rows // MAX_TILES)  # fewest rows per tile allowed
            per = max(floor, budget // t.row_bytes if t.row_bytes else t.rows, 1)
            finest = finest and per <= floor
            if per < t.rows:
                count = -(-t.rows // per)
                per = -(-t.rows // count)  # as even as whole rows allow
                tiles[k] = tuple((s, min(s + per, t.rows)) for s in range(0, t.rows, per))
        if tiles and (not ladder or tiles != ladder[-1]):
            ladder.append(tiles)
        if finest or budget <= 1:
            return ladder
        budget //= 2


def _tilings(units: Sequence[UnitCost], policy: Policy, build: _Build) -> list[list[_Layout]]:
    """Per tiling of the ladder (coarsest first), its layouts from its deepest useful
    prefetch down to none."""
    return [
        [
            build(units, d, frozenset(), tiles)
            for d in range(_tiled_depth(policy, units, tiles), -1, -1)
        ]
        for tiles in tile_ladder(units)
    ]


def _first_tiled_fit(tiled: list[list[_Layout]], capacity: int) -> tuple[_Layout, _Layout] | None:
    """The tiled layout to run, and its tiling's deepest: the deepest prefetch that fits
    with any tiling (streaming in tiles is fast only when reads overlap compute), then the
    largest tiles at that depth."""
    for depth in range(max(len(row) for row in tiled) - 1, -1, -1):
        for row in tiled:
            if depth < len(row) and row[len(row) - 1 - depth].fits(capacity):
                return row[len(row) - 1 - depth], row[0]
    return None


def _tiled_depth(policy: Policy, units: Sequence[UnitCost], tiles: Mapping[int, Tiles]) -> int:
    """The deepest useful prefetch with these tiles: tiles are runs of their own, so even
    a one-unit model (an LM head) reads its next tile while one runs."""
    runs = len(units) - len(tiles) + sum(len(ranges) for ranges in tiles.values())
    return min(policy.prefetch_depth, runs - 1)


def _untile(lay: _Layout, capacity: int, build: _Build) -> _Layout:
    """Load whole again the tiled units that fit whole beside the rest, smallest first
    (the ladder's budget tiles every unit above it; fewer tiles, fewer steps)."""
    order = sorted(lay.tiles, key=lambda k: (lay.units[k].weight_bytes, k))
    for k in order:
        tiles = {j: ranges for j, ranges in lay.tiles.items() if j != k}
        trial = build(lay.units, lay.depth, lay.pinned, tiles)
        if trial.fits(capacity):
            lay = trial
    return lay


def _tiles_note(lay: _Layout) -> str:
    parts = []
    for k, ranges in sorted(lay.tiles.items()):
        unit = lay.units[k]
        rows = ranges[0][1] - ranges[0][0]
        parts.append(f"{unit.name} in {len(ranges)} tiles of {rows} rows")
    return "tiled: " + ", ".join(parts) + " (the whole units do not fit the arena)"


def _witness(lay: _Layout, capacity: int, min_capacity: int) -> Witness:
    step = int(np.argmax(lay.arena_live + lay.ws_live))  # the first of the largest
    alive = tuple(np.flatnonzero((lay.first <= step) & (lay.last >= step)).tolist())
    unit = lay.units[lay.run(int(lay.step_run[step]))[0]]
    return Witness(step, unit.name, alive, min_capacity - capacity)


def _slots(lay: _Layout, k: int, r: int, align: int) -> tuple[TensorSlot, ...]:
    """The tensor slots of a weights buffer: its run's tensors, or its tile's rows."""
    tile = lay.run_tiles[r] if r >= 0 and lay.run_tiles is not None else None
    if tile is None:  # tensor_slots of the whole unit, inlined: plans have thousands
        slots = []
        end = 0
        for name, nbytes in lay.units[k].tensors:
            offset = -(-end // align) * align
            slots.append(TensorSlot(name, offset, nbytes))
            end = offset + nbytes
        return tuple(slots)
    last = r + 1 == len(lay.run_unit) or lay.run_unit[r + 1] != k
    return tensor_slots(lay.units[k], align, tile, last)


def _by_step(ids: np.ndarray, steps: np.ndarray, num_steps: int) -> list[tuple[int, ...]]:
    """Per step, the ``ids`` whose ``steps`` entry is that step, in id order."""
    order = np.argsort(steps, kind="stable")
    bounds = np.searchsorted(steps[order], np.arange(num_steps + 1)).tolist()
    sorted_ids = ids[order].tolist()
    return [tuple(sorted_ids[a:b]) for a, b in itertools.pairwise(bounds)]


def _or_none(column: np.ndarray) -> list[int | None]:
    return [None if x < 0 else x for x in column.tolist()]


def _materialize(
    lay: _Layout,
    costs: CostTable,
    policy: Policy,
    *,
    status: Status,
    level: int | None,
    min_capacity: int,
    witness: Witness | None,
    notes: tuple[str, ...],
    digests: tuple[str, str],
) -> Plan:
    align = policy.buffer_alignment_bytes
    units = lay.units
    names = [u.name for u in units]
    num_buffers, num_steps = len(lay.role), len(lay.step_run)
    ids = np.arange(num_buffers)
    roles = [ROLES[code] for code in lay.role.tolist()]
    units_of = lay.unit_of.tolist()
    labels = [lay.labels[i] if k < 0 else names[k] for i, k in enumerate(units_of)]
    in_xla = lay.role == _WORKING_SET
    offsets: list[int | None] = lay.offsets.tolist()
    for i in np.flatnonzero(in_xla).tolist():
        offsets[i] = None
    tensors: list[tuple[TensorSlot, ...]] = [()] * num_buffers
    weight_roles = np.isin(lay.role, (_WEIGHTS, _PREFETCH, _PINNED))
    runs_of = lay.run_of.tolist()
    for i in np.flatnonzero(weight_roles).tolist():
        tensors[i] = _slots(lay, units_of[i], runs_of[i], align)
    buffers = tuple(
        map(
            Buffer,
            ids.tolist(),
            roles,
            labels,
            lay.nbytes.tolist(),
            offsets,
            lay.first.tolist(),
            lay.last.tolist(),
            tensors,
        )
    )
    streaming = np.isin(lay.role, (_WEIGHTS, _PREFETCH))
    loads = _by_step(ids[streaming], lay.first[streaming], num_steps)
    frees = _by_step(ids, lay.last, num_steps)
    weights, inputs, outputs, working = (
        _or_none(c) for c in (lay.weights, lay.inputs, lay.output, lay.working)
    )
    arena_live, ws_live = lay.arena_live.tolist(), lay.ws_live.tolist()
    run_units = lay.run_unit.tolist()
    steps = []
    for index, (is_load, r) in enumerate(
        zip(lay.step_loads.tolist(), lay.step_run.tolist(), strict=True)
    ):
        name, live = names[run_units[r]], (arena_live[index], ws_live[index])
        if is_load:
            step = Step(
                index, "load", name, loads[index], None, None, None, None, frees[index], *live
            )
        else:
            tile = None if lay.run_tiles is None else lay.run_tiles[r]
            step = Step(
                index,
                "run",
                name,
                loads[index],
                weights[r],
                inputs[r],
                outputs[r],
                working[r],
                frees[index],
                *live,
                tile,
            )
        steps.append(step)
    weight_bytes = lay.table.weight_bytes
    return Plan(
        model_name=costs.model_name,
        input_shape=tuple(costs.input_shape),
        capacity_bytes=policy.arena_capacity_bytes,
        alignment_bytes=align,
        status=status,
        exit_level=level,
        num_levels=costs.num_levels,
        units=tuple(names),
        buffers=buffers,
        steps=tuple(steps),
        arena_bytes=lay.arena_bytes,
        peak_bytes=lay.peak_bytes,
        lower_bound_bytes=lay.lower_bound_bytes,
        naive_bytes=int(lay.nbytes[~in_xla].sum()) + lay.max_ws_bytes,
        streamed_bytes=sum(b for k, b in enumerate(weight_bytes) if k not in lay.pinned),
        unpinned_streamed_bytes=sum(weight_bytes),
        pinned_layers=tuple(names[k] for k in sorted(lay.pinned)),
        prefetch_depth=lay.depth,
        min_capacity_bytes=min_capacity,
        witness=witness,
        notes=notes,
        manifest_digest=digests[0],
        policy_digest=digests[1],
        working_set_source=(
            "measured" if all(u.working_set_source == "measured" for u in units) else "analysis"
        ),
    )


def level_min_capacity(costs: CostTable, policy: Policy, level: int) -> int | None:
    """The smallest capacity at which exit ``level`` (its prefix and head) runs.

    >>> from edgemind.planner.plan import CostTable, ExitCost, UnitCost
    >>> sizes = (("a", 4096), ("b", 65536))
    >>> units = tuple(UnitCost(n, "dense", (("w", b),), 64, 64) for n, b in sizes)
    >>> costs = CostTable("m", (1,), 64, units, (ExitCost(1, 0, None), ExitCost(2, 1, None)))
    >>> level_min_capacity(costs, Policy(), 1) < level_min_capacity(costs, Policy(), 2)
    True
    """
    exit_ = costs.exits[level - 1]
    prefix = dataclasses.replace(
        costs, layers=costs.layers[: exit_.after_layer + 1], exits=costs.exits[:level]
    )
    return make_plan(prefix, policy).min_capacity_bytes
