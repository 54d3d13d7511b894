"""The plan checker: an independent proof that a plan's peak bound holds.

It shares no code with the planner (only the :mod:`edgemind.planner.plan` dataclasses)
and recomputes everything from the buffers: every arena buffer lies in
``[0, arena_bytes)`` and is aligned; no two arena buffers alive at a common step overlap
(a sweep over steps keeps the live buffers sorted by offset, so each new one is checked
against its neighbours: O(n log n) on chain-shaped plans); every run reads weights that
are alive and were loaded at or before its step (or pinned) and activations that are
alive; the recorded per-step live bytes, ``peak_bytes`` and ``lower_bound_bytes`` equal
their recomputation; and, unless the plan is infeasible, every step and the peak fit the
capacity. Given the cost table, it also checks that the units match the exit level and
that every buffer holds at least its unit's bytes.

>>> from edgemind.planner import make_plan, CostTable, ExitCost, UnitCost
>>> from edgemind.policy import Policy
>>> unit = UnitCost("l0", "dense", (("w", 1000),), 100, 0)
>>> costs = CostTable("toy", (1,), 100, (unit,), (ExitCost(1, 0, None),))
>>> verify_plan(make_plan(costs, Policy()), costs)
[]
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Generator, Iterator

from edgemind.errors import PlanError
from edgemind.planner.plan import ROLES, Buffer, CostTable, Plan, Step, UnitCost

_MAX_SHOWN = 5  # violations quoted by check_plan


def verify_plan(plan: Plan, costs: CostTable | None = None) -> list[str]:
    """Every way ``plan`` breaks its own proof (or ``costs``), as sentences; [] if none."""
    problems = list(_structure(plan))
    if problems:  # ids or steps out of range: the other checks would index wrongly
        return problems
    problems += _arena(plan)
    problems += _overlaps(plan)
    problems += _live_bytes(plan)
    problems += _runs(plan)
    problems += _state(plan)
    problems += _verdict(plan)
    if costs is not None:
        problems += _against_costs(plan, costs)
    return problems


def check_plan(plan: Plan, costs: CostTable | None = None) -> None:
    """Raise PlanError quoting the first violations when ``plan`` does not verify."""
    problems = verify_plan(plan, costs)
    if problems:
        shown = "; ".join(problems[:_MAX_SHOWN])
        more = f" (and {len(problems) - _MAX_SHOWN} more)" if len(problems) > _MAX_SHOWN else ""
        raise PlanError(
            f"plan for {plan.model_name!r} fails verification: {shown}{more}; "
            "re-plan with `edgemind plan`"
        )


def _structure(plan: Plan) -> Iterator[str]:
    align = plan.alignment_bytes
    if align < 1 or align & (align - 1):
        yield f"alignment_bytes {align} is not a power of two"
    last = len(plan.steps) - 1
    roles = frozenset(ROLES)
    for index, b in enumerate(plan.buffers):
        if b.id != index:
            yield f"buffer #{index} has id {b.id}; ids must be positions"
        if b.role not in roles:
            yield f"buffer {b.id} has unknown role {b.role!r}"
        if not 0 <= b.first_step <= b.last_step <= last:
            yield f"buffer {b.id} lives steps {b.first_step}..{b.last_step}, outside 0..{last}"
        if b.nbytes < 0:
            yield f"buffer {b.id} has negative size {b.nbytes}"
    num_buffers = len(plan.buffers)
    for index, step in enumerate(plan.steps):
        if step.index != index:
            yield f"step #{index} has index {step.index}"
        refs = (step.weights, step.input, step.output, step.working_set, *step.loads, *step.frees)
        for ref in refs:
            if ref is not None and not 0 <= ref < num_buffers:
                yield f"step {index} refers to buffer {ref}, which does not exist"


def _arena(plan: Plan) -> Iterator[str]:
    align = plan.alignment_bytes
    for b in plan.buffers:
        if b.role == "working_set":
            if b.offset_bytes is not None:
                yield f"working set {b.id} ({b.layer}) has an arena offset"
            continue
        if b.offset_bytes is None:
            yield f"buffer {b.id} ({b.role} of {b.layer}) has no arena offset"
            continue
        if b.offset_bytes < 0 or b.offset_bytes + b.nbytes > plan.arena_bytes:
            yield (
                f"buffer {b.id} ({b.role} of {b.layer}) spans {b.offset_bytes}.."
                f"{b.offset_bytes + b.nbytes}, outside the {plan.arena_bytes}-byte arena"
            )
        if b.offset_bytes % align or b.nbytes % align:
            yield (
                f"buffer {b.id} ({b.role} of {b.layer}): offset {b.offset_bytes} or size "
                f"{b.nbytes} not aligned to {align}"
            )
        for slot in b.tensors:
            if slot.offset_bytes % align or slot.offset_bytes + slot.nbytes > b.nbytes:
                yield f"tensor {slot.name} of buffer {b.id} is misaligned or outside it"


def _overlaps(plan: Plan) -> Iterator[str]:
    """Sweep the steps, keeping live arena buffers sorted by offset; check neighbours."""
    # (first step, last step, offset, end, id) of every placed buffer with bytes
    placed = [
        (b.first_step, b.last_step, b.offset_bytes, b.offset_bytes + b.nbytes, b.id)
        for b in plan.buffers
        if b.offset_bytes is not None and b.nbytes > 0
    ]
    born = sorted(placed, key=operator.itemgetter(0))
    dead = sorted(placed, key=operator.itemgetter(1))
    dead.append((0, len(plan.steps), 0, 0, -1))  # a sentinel: never removed
    live: list[tuple[int, int, int]] = []  # (offset, end, id), disjoint while all is well
    n_dead = 0
    for first, _, offset, end, bid in born:  # by birth step: steps with no births add none
        while dead[n_dead][1] < first:
            _, _, dead_offset, dead_end, dead_id = dead[n_dead]
            live.remove((dead_offset, dead_end, dead_id))
            n_dead += 1
        entry = (offset, end, bid)
        at = bisect.bisect_left(live, entry)
        for other in live[max(0, at - 1) : at + 1]:
            if other[0] < end and offset < other[1]:
                layer = plan.buffers[bid].layer
                yield (
                    f"buffers {other[2]} and {bid} ({layer}) overlap at bytes "
                    f"{max(other[0], offset)}..{min(other[1], end)} "
                    f"while both alive at step {first}"
                )
        live.insert(at, entry)


def _live_bytes(plan: Plan) -> Iterator[str]:
    arena = [0] * (len(plan.steps) + 1)
    working = [0] * (len(plan.steps) + 1)
    ending: list[list[int]] = [[] for _ in plan.steps]  # ids, in id order
    for b in plan.buffers:
        delta = working if b.offset_bytes is None else arena
        delta[b.first_step] += b.nbytes
        delta[b.last_step + 1] -= b.nbytes
        ending[b.last_step].append(b.id)
    arena_live = working_live = 0
    largest = max_ws = 0
    for step in plan.steps:
        arena_live += arena[step.index]
        working_live += working[step.index]
        if arena_live + working_live > largest:
            largest = arena_live + working_live
        if working_live > max_ws:
            max_ws = working_live
        if step.arena_live_bytes != arena_live or step.working_set_bytes != working_live:
            yield (
                f"step {step.index} records {step.arena_live_bytes} arena + "
                f"{step.working_set_bytes} working-set bytes; its buffers hold "
                f"{arena_live} + {working_live}"
            )
        frees = ending[step.index]
        # the same ids in the same order is the common case; any order will do
        if list(step.frees) != frees and set(step.frees) != set(frees):
            yield f"step {step.index} frees {sorted(step.frees)}, but {sorted(frees)} end there"
    if plan.peak_bytes != plan.arena_bytes + max_ws:
        yield (
            f"peak_bytes {plan.peak_bytes} != arena {plan.arena_bytes} + "
            f"largest working set {max_ws}"
        )
    if plan.lower_bound_bytes != largest:
        yield f"lower_bound_bytes {plan.lower_bound_bytes} != largest live total {largest}"


def _alive(b: Buffer, step: int) -> bool:
    return b.first_step <= step <= b.last_step


def _runs(plan: Plan) -> Iterator[str]:
    buffers = plan.buffers
    end = len(plan.steps) - 1
    loaded_at: dict[int, int] = {}
    for step in plan.steps:
        for ref in step.loads:
            b = buffers[ref]
            loaded_at.setdefault(ref, step.index)
            if b.role not in ("weights", "prefetch") or not _alive(b, step.index):
                yield f"step {step.index} loads buffer {ref} ({b.role}), not a live weights buffer"
    runs = [step for step in plan.steps if step.action == "run"]
    groups = _unit_runs(runs)
    units = [group[0].layer for group in groups]
    if tuple(units) != plan.units:
        yield f"the run steps run {units}, but the plan's units are {plan.units}"
    for previous, step in zip([None, *runs], runs, strict=False):
        same_unit = previous is not None and step.tile is not None and _same_unit(previous, step)
        if (
            same_unit
            and previous is not None
            and (previous.input, previous.output)
            != (
                step.input,
                step.output,
            )
        ):
            yield f"step {step.index}: a tile of {step.layer} reads or writes other buffers"
        elif not same_unit and previous is not None and previous.output != step.input:
            yield (
                f"step {step.index} ({step.layer}) reads buffer {step.input}, but the previous "
                f"run wrote {previous.output}"
            )
        yield from _run_buffers(plan, step.index, loaded_at, end, first_tile=not same_unit)
    for group in groups:
        if group[0].tile is not None:  # whole runs have nothing to cover
            yield from _tile_cover(plan, group)


def _same_unit(a: Step, b: Step) -> bool:
    """Whether two consecutive runs are tiles of one unit (the next tile starts where
    the previous one ended)."""
    return (
        a.layer == b.layer and a.tile is not None and b.tile is not None and a.tile[1] == b.tile[0]
    )


def _unit_runs(runs: list[Step]) -> list[list[Step]]:
    """Consecutive runs grouped by unit: one run, or a unit's tiles in order."""
    groups: list[list[Step]] = []
    for step in runs:
        if groups and step.tile is not None and _same_unit(groups[-1][-1], step):
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _tile_cover(plan: Plan, group: list[Step]) -> Iterator[str]:
    """A tiled unit's tiles start at row 0 and cover its tiled tensor's bytes exactly once,
    in order, each holding whole rows of one size. The tiled tensor is the one every
    tile's weights buffer holds a part of."""
    if group[0].tile is None:
        return
    where = f"{group[0].layer}'s tiles"
    buffers = [plan.buffers[s.weights] for s in group if s.weights is not None]
    if len(buffers) != len(group):
        yield f"{where}: a tile reads no weights buffer"
        return
    common = set.intersection(*({slot.name for slot in b.tensors} for b in buffers))
    if len(common) != 1:
        yield f"{where}: expected one tensor split across every tile, found {sorted(common)}"
        return
    (name,) = common
    if group[0].tile[0] != 0:
        yield f"{where} start at row {group[0].tile[0]}, not 0"
    offset, row_bytes = 0, None
    for step, b in zip(group, buffers, strict=True):
        assert step.tile is not None
        rows = step.tile[1] - step.tile[0]
        part = next(slot for slot in b.tensors if slot.name == name)
        if part.source_offset_bytes != offset:
            yield (
                f"{where}: step {step.index} starts at byte {part.source_offset_bytes} of "
                f"{name}, expected {offset} (tiles must cover it once, in order)"
            )
        uneven = rows > 0 and row_bytes is not None and part.nbytes != rows * row_bytes
        if rows <= 0 or part.nbytes % rows or uneven:
            yield f"{where}: step {step.index} holds {part.nbytes} bytes for {rows} rows"
            return
        row_bytes = part.nbytes // rows
        offset = part.source_offset_bytes + part.nbytes


def _run_buffers(
    plan: Plan, index: int, loaded_at: dict[int, int], end: int, *, first_tile: bool = True
) -> Iterator[str]:
    step = plan.steps[index]
    where = f"step {index} ({step.layer})"
    if step.weights is not None:
        w = plan.buffers[step.weights]
        if w.role not in ("weights", "prefetch", "pinned"):
            yield f"{where} reads weights from buffer {w.id}, a {w.role} buffer"
        elif w.layer != step.layer:
            yield f"{where} reads buffer {w.id}, which holds the weights of {w.layer}"
        elif not w.first_step <= index <= w.last_step:
            yield f"{where} reads weights buffer {w.id}, alive {w.first_step}..{w.last_step}"
        elif w.role == "pinned":
            if (w.first_step, w.last_step) != (0, end) or w.id in loaded_at:
                yield f"{where}: pinned buffer {w.id} must live the whole request, never loaded"
        elif loaded_at.get(w.id, index + 1) > index:
            yield f"{where} reads weights buffer {w.id} before any step loads it"
    for name, ref, roles in (
        ("input", step.input, ("activation", "accumulator")),
        ("output", step.output, ("activation", "accumulator")),
        ("working set", step.working_set, ("working_set",)),
    ):
        if ref is None:
            continue
        b = plan.buffers[ref]
        if b.role not in roles or not b.first_step <= index <= b.last_step:
            yield f"{where}: its {name} buffer {ref} is a {b.role} buffer or not alive then"
        elif name == "output" and first_tile and b.first_step != index:
            yield f"{where}: its output buffer {ref} is born at step {b.first_step}, not here"
        elif name == "output" and (b.role == "accumulator") != (step.tile is not None):
            yield f"{where}: a tiled run writes an accumulator, a whole run an activation"


def _state(plan: Plan) -> Iterator[str]:
    """State lives at every step, packed from offset 0 in order, below everything else:
    so plans for other shapes of one model put each state buffer at the same offset, and
    a session's state never moves when its plan changes."""
    end = len(plan.steps) - 1
    state = [b for b in plan.buffers if b.role == "state"]
    top = 0
    for b in state:
        where = f"state buffer {b.id} ({b.layer})"
        if (b.first_step, b.last_step) != (0, end):
            yield f"{where} lives {b.first_step}..{b.last_step}, not 0..{end}"
        if b.offset_bytes != top:
            yield f"{where} is at {b.offset_bytes}, expected {top} (packed from 0)"
        top += b.nbytes
    for b in plan.buffers:
        below = b.offset_bytes is not None and b.offset_bytes < top
        if b.role not in ("state", "working_set") and below:
            yield f"buffer {b.id} ({b.role} of {b.layer}) lies in the state region 0..{top}"


def _verdict(plan: Plan) -> Iterator[str]:
    if plan.status not in ("feasible", "early_exit", "infeasible"):
        yield f"unknown status {plan.status!r}"
    level = plan.exit_level
    expected = {
        "feasible": level == plan.num_levels,
        "early_exit": level is not None and 1 <= level < plan.num_levels,
        "infeasible": level is None,
    }
    if not expected.get(plan.status, True):
        yield f"status {plan.status} with exit_level {level} of {plan.num_levels} levels"
    if (plan.status == "feasible") != (plan.witness is None):
        yield f"status {plan.status} but witness is {plan.witness}"
    if plan.status == "infeasible":
        return
    capacity = plan.capacity_bytes
    if plan.peak_bytes > capacity:
        yield f"peak {plan.peak_bytes} bytes exceeds the capacity {capacity} (status {plan.status})"
    for step in plan.steps:
        if step.live_bytes > capacity:
            yield f"step {step.index} ({step.layer}) holds {step.live_bytes} > {capacity} bytes"


def _against_costs(plan: Plan, costs: CostTable) -> Iterator[str]:
    if plan.num_levels != costs.num_levels or not costs.exits:
        yield f"plan has {plan.num_levels} exit levels, the cost table {costs.num_levels}"
        return
    level = plan.exit_level or costs.num_levels
    if not 1 <= level <= costs.num_levels:
        return  # reported by _verdict
    exit_ = costs.exits[level - 1]
    units: list[UnitCost] = list(costs.layers[: exit_.after_layer + 1])
    units += [exit_.head] if exit_.head is not None else []
    if tuple(u.name for u in units) != plan.units:
        yield f"plan runs {plan.units}, exit level {level} runs {tuple(u.name for u in units)}"
        return
    groups = _unit_runs([step for step in plan.steps if step.action == "run"])
    runs = [group[0] for group in groups]
    streamed = 0
    tile_ws = {(unit, rows): nbytes for unit, rows, nbytes in costs.tile_working_sets}
    weights = [unit.weight_bytes for unit in units]
    for unit, unit_weights, group in zip(units, weights, groups, strict=True):
        indices = [step.index for step in group]
        streamed += yield from _unit_buffers(plan, unit, unit_weights, indices, tile_ws)
    if streamed != plan.streamed_bytes:
        yield f"streamed_bytes {plan.streamed_bytes} != {streamed} read by unpinned runs"
    if plan.unpinned_streamed_bytes != sum(weights):
        yield f"unpinned_streamed_bytes {plan.unpinned_streamed_bytes} != the units' weights"
    first = runs[0].input if runs else None
    if costs.input_bytes > 0 and (first is None or plan.buffers[first].nbytes < costs.input_bytes):
        yield f"the first run's input buffer {first} is smaller than {costs.input_bytes} bytes"
    if costs.context_bytes > 0 and not any(
        b.layer == "context" and b.nbytes >= costs.context_bytes and b.first_step == 0
        for b in plan.buffers
        if b.role == "activation" and b.last_step == len(plan.steps) - 1
    ):
        yield f"no context buffer of {costs.context_bytes} bytes lives the whole request"


def _unit_buffers(
    plan: Plan,
    unit: UnitCost,
    weight_bytes: int,
    indices: list[int],
    tile_ws: dict[tuple[str, int], int],
) -> Generator[str, None, int]:
    """Check a unit's runs (one, or its tiles) against its costs; return the bytes read."""
    index = indices[0]
    step = plan.steps[index]
    streamed = 0
    if weight_bytes > 0:
        held: dict[str, int] = {}
        for i in indices:
            ref = plan.steps[i].weights
            if ref is None:
                yield f"step {i} ({unit.name}) has weights but reads no weights buffer"
                continue
            w = plan.buffers[ref]
            for slot in w.tensors:
                held[slot.name] = held.get(slot.name, 0) + slot.nbytes
                streamed += 0 if w.role == "pinned" else slot.nbytes
        for name, nbytes in unit.tensors:
            if held.get(name, -1) < nbytes:
                yield f"its weights buffers lack a {nbytes}-byte slot for {unit.name}.{name}"
    if unit.output_bytes > 0 and (
        step.output is None or plan.buffers[step.output].nbytes < unit.output_bytes
    ):
        yield f"step {index} ({unit.name}): output buffer {step.output} is too small"
    for i in indices:
        run = plan.steps[i]
        need = unit.working_set_bytes
        if run.tile is not None:
            need = tile_ws.get((unit.name, run.tile[1] - run.tile[0]), need)
        ref = run.working_set
        if need > 0 and (ref is None or plan.buffers[ref].nbytes < need):
            yield f"step {i} ({unit.name}): working set {ref} holds less than {need} bytes"
    return streamed
