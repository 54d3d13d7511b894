"""The static planner: layer costs and a policy in, a residency plan with its proof out.

Pure: imports no jax and does no I/O, except :mod:`edgemind.planner.planfile`, which
reads and writes plan files. :func:`make_plan` plans, :func:`verify_plan` checks a plan
without sharing code with the planner.
"""

from __future__ import annotations

from edgemind.planner.allocator import (
    FirstFitArena,
    GreedyBySize,
    NaiveSlots,
    Placement,
    Request,
    SweepFirstFit,
    TwoSided,
)
from edgemind.planner.plan import (
    Buffer,
    CostTable,
    ExitCost,
    Plan,
    Step,
    TensorSlot,
    UnitCost,
    Witness,
)
from edgemind.planner.planfile import check_plan_matches, load_plan, save_plan
from edgemind.planner.schedule import (
    chain_units,
    level_min_capacity,
    make_plan,
    validate_costs,
)
from edgemind.planner.verify import check_plan, verify_plan

__all__ = [
    "Buffer",
    "CostTable",
    "ExitCost",
    "FirstFitArena",
    "GreedyBySize",
    "NaiveSlots",
    "Placement",
    "Plan",
    "Request",
    "Step",
    "SweepFirstFit",
    "TensorSlot",
    "TwoSided",
    "UnitCost",
    "Witness",
    "chain_units",
    "check_plan",
    "check_plan_matches",
    "level_min_capacity",
    "load_plan",
    "make_plan",
    "save_plan",
    "validate_costs",
    "verify_plan",
]
