"""The data the planner consumes and produces: cost tables in, a ``Plan`` out.

A plan is the proof: every buffer with its arena offset and lifetime, every step with
the live bytes after it, the peak against the capacity, and the verdict. Plans are
plain frozen values; :mod:`edgemind.planner.planfile` writes them to disk.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# Buffer roles. "working_set" buffers are allocated by XLA, not placed in the arena:
# their offset is None, but they count against the capacity while alive.
# "accumulator": the output of a unit run in tiles, alive from its first tile to its reader.
# "state": what a unit keeps across steps and the requests of a session (a KV cache):
# placed first, from offset 0, alive at every step, the same offsets in every plan.
Role = Literal["state", "weights", "prefetch", "pinned", "activation", "accumulator", "working_set"]
ROLES: tuple[str, ...] = (
    "state",
    "weights",
    "prefetch",
    "pinned",
    "activation",
    "accumulator",
    "working_set",
)
TileMode = Literal["accumulate", "concat"]
Status = Literal["feasible", "early_exit", "infeasible"]
# How working sets were obtained: XLA's memory_analysis() alone, or the larger of it and
# the RSS growth of a measured call (edgemind.runtime.workset).
WorkingSetSource = Literal["measured", "analysis"]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a unit can run in tiles: row ranges of one tensor, one slot each, in turn.

    ``accumulate``: each tile adds its rows' contribution to the output (a dense layer's
    input rows); ``concat``: each tile writes its rows' part of the output (an LM head's
    vocabulary rows). Rows are whole quantization blocks' worth of bytes.
    """

    tensor: str  # the tensor split by rows (its first axis)
    rows: int
    row_bytes: int
    mode: TileMode = "accumulate"


@dataclasses.dataclass(frozen=True)
class UnitCost:
    """What one layer or exit head costs for one concrete request shape."""

    name: str
    kind: str
    tensors: tuple[tuple[str, int], ...]  # (tensor name, bytes this request loads)
    output_bytes: int  # the output activation the unit produces
    working_set_bytes: int  # what XLA allocates for one call: outputs, temporaries, scratch
    pinnable: bool = True  # False when its weights depend on the request (gathered rows)
    working_set_source: WorkingSetSource = "analysis"
    tiling: Tiling | None = None  # None: the unit's weights are loaded whole
    state_bytes: int = 0  # kept across steps and requests of a session (a KV cache)

    @property
    def weight_bytes(self) -> int:
        return sum(n for _, n in self.tensors)


@dataclasses.dataclass(frozen=True)
class ExitCost:
    """One exit level: after which layer, and the head run there (None: the layer's output)."""

    level: int  # 1-based, deepest last; the last one is the complete run
    after_layer: int  # index into CostTable.layers
    head: UnitCost | None


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Per-unit costs of a model for one input shape: the planner's only model input."""

    model_name: str
    input_shape: tuple[int, ...]
    input_bytes: int  # the chain's input activation (the model's first input)
    layers: tuple[UnitCost, ...]
    exits: tuple[ExitCost, ...]
    context_bytes: int = 0  # the other inputs (an attention mask...), alive all request
    # measured working sets of tiles: (unit name, rows per tile, bytes); a tile without an
    # entry is costed at its unit's whole working set
    tile_working_sets: tuple[tuple[str, int, int], ...] = ()

    @property
    def num_levels(self) -> int:
        return len(self.exits)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor lies inside its weights buffer."""

    name: str
    offset_bytes: int  # from the buffer's start, aligned
    nbytes: int
    source_offset_bytes: int = 0  # where in the tensor's payload these bytes start (tiles)


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """One reservation: in the arena (offset set) or in XLA's pool (offset None)."""

    id: int
    role: Role
    layer: str  # the unit whose weights/output/working set this is ("input" for the input)
    nbytes: int  # rounded up to the alignment
    offset_bytes: int | None
    first_step: int  # alive from the start of this step...
    last_step: int  # ...to the end of this one, inclusive
    tensors: tuple[TensorSlot, ...] = ()

    @property
    def end_bytes(self) -> int:
        return (self.offset_bytes or 0) + self.nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One step of a request: a load with nothing to overlap, or a unit's run."""

    index: int
    action: Literal["load", "run"]
    layer: str
    loads: tuple[int, ...]  # weight buffers whose reading starts at this step
    weights: int | None  # buffer the run reads its weights from
    input: int | None  # activation buffer the run reads
    output: int | None  # activation buffer the run's result is copied into
    working_set: int | None  # the XLA buffer of this run
    frees: tuple[int, ...]  # buffers whose life ends with this step
    arena_live_bytes: int  # arena bytes alive during the step
    working_set_bytes: int  # XLA bytes alive during the step
    tile: tuple[int, int] | None = None  # (first row, end row) of the tiled tensor, for tiles

    @property
    def live_bytes(self) -> int:
        return self.arena_live_bytes + self.working_set_bytes


@dataclasses.dataclass(frozen=True)
class Witness:
    """Why a plan does not fit: the step that overflows and what is alive there."""

    step: int
    layer: str
    buffers: tuple[int, ...]
    missing_bytes: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A residency schedule for one request shape, and its verdict against the capacity."""

    model_name: str
    input_shape: tuple[int, ...]
    capacity_bytes: int
    alignment_bytes: int
    status: Status
    exit_level: int | None  # the level this plan runs to; None when infeasible
    num_levels: int
    units: tuple[str, ...]  # the units run, in order
    buffers: tuple[Buffer, ...]
    steps: tuple[Step, ...]
    arena_bytes: int  # extent of the placed buffers: the arena allocated
    peak_bytes: int  # arena_bytes + the largest working set: the bound on model memory
    lower_bound_bytes: int  # largest live total at any step: no placement does better
    naive_bytes: int  # one slot per buffer, no reuse, + largest working set
    streamed_bytes: int  # weight bytes read from disk per request (pinned excluded)
    unpinned_streamed_bytes: int  # the same with nothing pinned
    pinned_layers: tuple[str, ...]
    prefetch_depth: int  # effective, after any reduction
    min_capacity_bytes: int | None  # smallest feasible capacity for the complete run
    witness: Witness | None  # why the complete run does not fit, when it does not
    notes: tuple[str, ...] = ()
    manifest_digest: str = ""
    policy_digest: str = ""
    working_set_source: WorkingSetSource = "analysis"  # "measured" when every unit's was

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def complete(self) -> bool:
        return self.status == "feasible"

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.peak_bytes

    def buffer(self, buffer_id: int) -> Buffer:
        return self.buffers[buffer_id]
