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
chain-shaped, so both run in about O(n log n). ``arena_bytes`` is the placed extent,
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
from collections.abc import Callable, Mapping, Sequence

from edgemind.errors import PlanError
from edgemind.planner.allocator import GreedyBySize, NaiveSlots, Request, TwoSided
from edgemind.planner.plan import (
    Buffer,
    CostTable,
    Plan,
    Role,
    Status,
    Step,
    TensorSlot,
    UnitCost,
    Witness,
)
from edgemind.policy import Policy
from edgemind.units import align_up, format_bytes

_WEIGHT_ROLES = ("weights", "prefetch", "pinned")
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


@dataclasses.dataclass
class _Layout:
    """The schedule of one chain at one depth with one pin set, as flat lists.

    A *run* is a unit's run, or one tile of a tiled unit: ``runs[r] = (unit, tile)``.
    """

    units: Sequence[UnitCost]
    depth: int
    pinned: frozenset[int]
    tiles: Mapping[int, Tiles]
    runs: list[tuple[int, tuple[int, int] | None]]
    steps: list[tuple[str, int]]  # (action, run index)
    role: list[Role]
    label: list[str]
    unit_of: list[int]  # the unit a buffer belongs to; -1 for the input and context
    run_of: list[int]  # the run a weights buffer belongs to; -1 for others
    nbytes: list[int]
    first: list[int]
    last: list[int]
    weights: list[int | None]  # per run
    output: list[int | None]
    inputs: list[int | None]
    working: list[int | None]
    offsets: list[int | None] = dataclasses.field(default_factory=list)
    arena_bytes: int = 0
    max_ws_bytes: int = 0
    arena_live: list[int] = dataclasses.field(default_factory=list)
    ws_live: list[int] = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.arena_bytes + self.max_ws_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return max(a + w for a, w in zip(self.arena_live, self.ws_live, strict=True))

    def add(
        self, role: Role, label: str, nbytes: int, first: int, last: int, unit: int, run: int = -1
    ) -> int:
        self.role.append(role)
        self.label.append(label)
        self.nbytes.append(nbytes)
        self.first.append(first)
        self.last.append(last)
        self.unit_of.append(unit)
        self.run_of.append(run)
        return len(self.role) - 1


def _runs(units: Sequence[UnitCost], tiles: Mapping[int, Tiles]) -> list[tuple]:
    return [
        (k, tile)
        for k in range(len(units))
        for tile in tiles.get(k, (None,))  # type: ignore[arg-type]
    ]


def _layout(
    units: Sequence[UnitCost],
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
    """
    tiles, tile_ws = tiles or {}, tile_ws or {}
    runs = _runs(units, tiles)
    n = len(runs)
    last_of = {k: r for r, (k, _) in enumerate(runs)}  # the last run of each unit
    first_of = {k: r for r, (k, _) in reversed(list(enumerate(runs)))}
    sizes = [
        weights_nbytes(units[k], align, tile, last_of[k] == r) for r, (k, tile) in enumerate(runs)
    ]
    streamed = [sizes[r] > 0 and k not in pinned for r, (k, _) in enumerate(runs)]
    steps: list[tuple[str, int]] = []
    run_step = [0] * n
    for r in range(n):
        if streamed[r] and (depth == 0 or r == 0):
            steps.append(("load", r))
        run_step[r] = len(steps)
        steps.append(("run", r))
    end = len(steps) - 1
    lay = _Layout(
        units, depth, pinned, tiles, runs, steps, [], [], [], [], [], [], [], [], [], [], []
    )
    # Lifetimes are derived from references (as tinygrad's memory planner does): each
    # step lists the buffers it touches, and a buffer lives from its first reference to
    # its last. Buffers of the session (state, context, pins) are referenced throughout;
    # a read's weights from the step that starts reading them; the final output at the end.
    refs: list[list[int]] = [[] for _ in steps]

    def add(role: Role, label: str, nbytes: int, unit: int, run: int, *at: int) -> int:
        buffer = lay.add(role, label, nbytes, -1, -1, unit, run)
        for step in at:
            refs[step].append(buffer)
        return buffer

    for name, nbytes in state:  # every unit's, whatever level runs: offsets never move
        add("state", name, align_up(nbytes, align), -1, -1, 0, end)
    if context_bytes > 0:
        add("activation", "context", align_up(context_bytes, align), -1, -1, 0, end)
    pin_buffer = {
        k: add("pinned", units[k].name, sizes[first_of[k]], k, first_of[k], 0, end)
        for k in sorted(pinned)
    }
    previous = None
    if input_bytes > 0:
        previous = add("activation", "input", align_up(input_bytes, align), -1, -1, 0)
    output = None
    for r, (k, tile) in enumerate(runs):
        unit, here = units[k], run_step[r]
        weights = pin_buffer.get(k)
        if streamed[r]:
            role: Role = "weights" if depth == 0 or r == 0 else "prefetch"
            start = here - 1 if role == "weights" else run_step[max(0, r - depth)]
            weights = add(role, unit.name, sizes[r], k, r, start, here)
        elif weights is not None:
            refs[here].append(weights)
        if r == first_of[k]:
            output = None
            if unit.output_bytes > 0:
                role = "activation" if tile is None else "accumulator"
                output = add(role, unit.name, align_up(unit.output_bytes, align), k, -1)
        for buffer in (previous, output):  # read, and written, by every run (tile) of k
            if buffer is not None:
                refs[here].append(buffer)
        lay.weights.append(weights)
        lay.inputs.append(previous)
        lay.output.append(output)
        if r == last_of[k]:
            previous = output
        ws_bytes = unit.working_set_bytes
        if tile is not None:
            ws_bytes = tile_ws.get((unit.name, tile[1] - tile[0]), ws_bytes)
        ws = add("working_set", unit.name, ws_bytes, k, -1, here) if ws_bytes > 0 else None
        lay.working.append(ws)
    if previous is not None:
        refs[end].append(previous)  # the result is the request's: alive to the end
    for step, buffers in enumerate(refs):
        for buffer in buffers:
            if lay.first[buffer] < 0:
                lay.first[buffer] = step
            lay.last[buffer] = step
    _place(lay)
    return lay


def _place(lay: _Layout) -> None:
    """State first, from offset 0 in unit order (so every plan of a model puts it at the
    same offsets); the rest above it by the better of two strategies; then the live
    bytes of every step."""
    base = 0
    lay.offsets = [None] * len(lay.role)
    for i, role in enumerate(lay.role):
        if role == "state":
            lay.offsets[i] = base
            base += lay.nbytes[i]
    arena = [i for i, role in enumerate(lay.role) if role not in ("working_set", "state")]
    first, last, nbytes = lay.first, lay.last, lay.nbytes
    # Buffers born at alternate steps go on alternate sides (ping-pong): on a chain whose
    # buffers overlap only their neighbours (prefetch depth 1) that reaches the bound.
    requests = [Request(nbytes[i], first[i], last[i], first[i] % 2) for i in arena]
    placement = TwoSided().place(requests)
    _sweep_live(lay)
    if base + placement.extent_bytes > max(lay.arena_live, default=0):
        placement = min(placement, GreedyBySize().place(requests), key=lambda p: p.extent_bytes)
    for i, offset in zip(arena, placement.offsets, strict=True):
        lay.offsets[i] = base + offset
    lay.arena_bytes = base + placement.extent_bytes


def _sweep_live(lay: _Layout) -> None:
    """Arena and working-set bytes alive at every step, by a difference-array sweep."""
    delta = [0] * (len(lay.steps) + 1)
    lay.ws_live = [0] * len(lay.steps)
    for i, role in enumerate(lay.role):
        if role == "working_set":
            for step in range(lay.first[i], lay.last[i] + 1):
                lay.ws_live[step] += lay.nbytes[i]
        else:
            delta[lay.first[i]] += lay.nbytes[i]
            delta[lay.last[i] + 1] -= lay.nbytes[i]
    live = 0
    lay.arena_live = []
    for step in range(len(lay.steps)):
        live += delta[step]
        lay.arena_live.append(live)
    lay.max_ws_bytes = max(lay.ws_live, default=0)


def validate_costs(costs: CostTable) -> None:
    """Raise PlanError when a cost table is malformed (negative sizes, exits out of order)."""
    where = f"cost table of {costs.model_name!r}"
    if not costs.layers:
        raise PlanError(f"{where}: no layers")
    for field in ("input_bytes", "context_bytes"):
        _check_size(where, field, getattr(costs, field))
    heads = [e.head for e in costs.exits if e.head is not None]
    for unit in (*costs.layers, *heads):
        for field in ("output_bytes", "working_set_bytes", "state_bytes"):
            _check_size(f"{where}, unit {unit.name!r}", field, getattr(unit, field))
        for name, nbytes in unit.tensors:
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

    def build(
        units: Sequence[UnitCost],
        depth: int,
        pinned: frozenset[int],
        tiles: Mapping[int, Tiles] | None = None,
    ) -> _Layout:
        return _layout(
            units,
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
    min_capacity = min(lay.peak_bytes for lay in candidates)
    chosen = next((lay for lay in candidates if lay.peak_bytes <= capacity), None)
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
            if lay.peak_bytes <= capacity:
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
    heavy = [
        k
        for k, unit in enumerate(units)
        if unit.weight_bytes > 0 and unit.pinnable and k not in lay.tiles  # tiles stream
    ]
    asked = policy.keep_resident_layers
    limit = len(heavy) if asked == "auto" else min(asked - 1, len(heavy))
    if asked != "auto" and asked <= 1:
        return lay
    order = sorted(heavy, key=lambda k: (-weights_nbytes(units[k], align), k))
    pinned: list[int] = []
    for _ in range(_PIN_ROUNDS):
        # Conservative: a pin adds its bytes and may or may not shrink the streamed part;
        # the real plan is re-measured after each round, so later rounds use any gain.
        slack = policy.arena_capacity_bytes - lay.peak_bytes
        taken = set(pinned)
        added: list[int] = []
        for k in order:
            size = weights_nbytes(units[k], align)
            if len(pinned) + len(added) < limit and k not in taken and size <= slack:
                added.append(k)
                slack -= size
        if not added:
            break
        trial = build(units, lay.depth, frozenset(pinned + added), lay.tiles)
        if trial.peak_bytes <= policy.arena_capacity_bytes:
            pinned, lay = pinned + added, trial
            continue
        # Greedy placement is not monotone: keep the longest prefix of this round that fits.
        lo, hi = 0, len(added)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = build(units, lay.depth, frozenset(pinned + added[:mid]), lay.tiles)
            if trial.peak_bytes <= policy.arena_capacity_bytes:
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
            if depth < len(row) and row[len(row) - 1 - depth].peak_bytes <= capacity:
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
        if trial.peak_bytes <= capacity:
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
    live = [a + w for a, w in zip(lay.arena_live, lay.ws_live, strict=True)]
    step = live.index(max(live))
    alive = tuple(i for i in range(len(lay.role)) if lay.first[i] <= step <= lay.last[i])
    unit = lay.units[lay.runs[lay.steps[step][1]][0]]
    return Witness(step, unit.name, alive, min_capacity - capacity)


def _slots(lay: _Layout, buffer: int, align: int) -> tuple[TensorSlot, ...]:
    """The tensor slots of a weights buffer: its run's tensors, or its tile's rows."""
    k = lay.unit_of[buffer]
    r = lay.run_of[buffer]
    tile = lay.runs[r][1] if r >= 0 else None
    last = r < 0 or r + 1 == len(lay.runs) or lay.runs[r + 1][0] != k
    return tensor_slots(lay.units[k], align, tile, last)


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
    buffers = tuple(
        Buffer(
            i,
            lay.role[i],
            lay.label[i],
            lay.nbytes[i],
            lay.offsets[i],
            lay.first[i],
            lay.last[i],
            _slots(lay, i, align) if lay.role[i] in _WEIGHT_ROLES else (),
        )
        for i in range(len(lay.role))
    )
    loads: list[list[int]] = [[] for _ in lay.steps]
    frees: list[list[int]] = [[] for _ in lay.steps]
    for b in buffers:
        frees[b.last_step].append(b.id)
        if b.role in ("weights", "prefetch"):
            loads[b.first_step].append(b.id)
    steps = []
    for index, (action, r) in enumerate(lay.steps):
        run = action == "run"
        k, tile = lay.runs[r]
        steps.append(
            Step(
                index,
                "run" if run else "load",
                units[k].name,
                tuple(loads[index]),
                lay.weights[r] if run else None,
                lay.inputs[r] if run else None,
                lay.output[r] if run else None,
                lay.working[r] if run else None,
                tuple(frees[index]),
                lay.arena_live[index],
                lay.ws_live[index],
                tile if run else None,
            )
        )
    arena = [
        Request(b.nbytes, b.first_step, b.last_step) for b in buffers if b.offset_bytes is not None
    ]
    return Plan(
        model_name=costs.model_name,
        input_shape=tuple(costs.input_shape),
        capacity_bytes=policy.arena_capacity_bytes,
        alignment_bytes=align,
        status=status,
        exit_level=level,
        num_levels=costs.num_levels,
        units=tuple(u.name for u in units),
        buffers=buffers,
        steps=tuple(steps),
        arena_bytes=lay.arena_bytes,
        peak_bytes=lay.peak_bytes,
        lower_bound_bytes=lay.lower_bound_bytes,
        naive_bytes=NaiveSlots().place(arena).extent_bytes + lay.max_ws_bytes,
        streamed_bytes=sum(u.weight_bytes for k, u in enumerate(units) if k not in lay.pinned),
        unpinned_streamed_bytes=sum(u.weight_bytes for u in units),
        pinned_layers=tuple(units[k].name for k in sorted(lay.pinned)),
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
