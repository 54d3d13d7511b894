"""Text and JSON renderings of manifests, plans and results, for the CLI to print.

Pure functions from data to strings and dicts; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from edgemind.planner.plan import Plan
from edgemind.policy import Policy
from edgemind.units import format_bytes
from edgemind.weights.manifest import Manifest, TensorSpec


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        cells = [
            c.rjust(w) if c.lstrip("-")[:1].isdigit() else c.ljust(w)  # numbers right
            for c, w in zip(row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------- manifests


def manifest_dict(manifest: Manifest, *, verified: bool = False) -> dict[str, Any]:
    """The manifest plus per-layer and total byte counts."""
    out = manifest.to_json()
    out["total_bytes"] = manifest.nbytes
    out["levels"] = [
        {"level": lv, "after_layer": manifest.layers[i].name} for lv, i in manifest.exit_levels()
    ]
    out["checksums_verified"] = verified
    return out


def format_manifest(manifest: Manifest, *, verified: bool = False) -> str:
    """A table of layers (tensors, bytes, exit heads) and the totals."""
    rows = []
    levels = {i: lv for lv, i in manifest.exit_levels()}
    for i, layer in enumerate(manifest.layers):
        tensors = ", ".join(_tensor_label(t) for t in layer.tensors)
        exit_note = f"exit {levels[i]}" if i in levels else ""
        rows.append(
            (str(i), layer.name, layer.kind, format_bytes(layer.nbytes), exit_note, tensors)
        )
        if layer.exit_head is not None:
            head = layer.exit_head
            rows.append(
                (
                    "",
                    f"  {head.name}",
                    head.kind,
                    format_bytes(head.nbytes),
                    "head",
                    ", ".join(_tensor_label(t) for t in head.tensors),
                )
            )
    inputs = ", ".join(f"{i.name} {i.dtype}{list(i.shape)}" for i in manifest.inputs)
    lines = [
        f"model {manifest.model_name} (format version {manifest.format_version}, "
        f"payloads aligned to {manifest.alignment_bytes} bytes)",
        f"inputs: {inputs}",
        "",
        _table(rows, ("#", "layer", "kind", "bytes", "exit", "tensors")),
        "",
        f"total: {len(manifest.layers)} layers, {manifest.num_levels} exit levels, "
        f"{format_bytes(manifest.nbytes)} ({manifest.nbytes} bytes)",
    ]
    if verified:
        lines.append("checksums: all payloads verified")
    return "\n".join(lines)


def _tensor_label(t: TensorSpec) -> str:
    """``name[shape] storage bytes``: what the tensor is and what it costs to read."""
    return f"{t.name}{list(t.shape)} {t.storage} {format_bytes(t.nbytes)}"


# ---------------------------------------------------------------------------- plans


def plan_dict(plan: Plan) -> dict[str, Any]:
    """Everything the plan table shows, and more, as JSON-able values."""
    out = dataclasses.asdict(plan)
    peak_step = max(plan.steps, key=lambda s: s.live_bytes, default=None)
    out["peak_step"] = None if peak_step is None else peak_step.index
    out["headroom_bytes"] = plan.headroom_bytes
    out["verdict"] = verdict_line(plan)
    return out


FAILURE_FIGURES = ("status", "capacity_bytes", "min_capacity_bytes", "peak_bytes", "witness")


def failure_dict(verdict: str, message: str, plan: Plan | None) -> dict[str, Any]:
    """A rejected (or out-of-memory) request as one JSON-able object: the verdict, the
    message stderr prints, and the plan's figures when there is a plan."""
    out: dict[str, Any] = {"verdict": verdict, "message": message}
    if plan is not None:
        figures = dataclasses.asdict(plan)
        out.update({key: figures[key] for key in FAILURE_FIGURES})
        out["model_name"] = plan.model_name
        out["input_shape"] = list(plan.input_shape)
        out["plan_verdict"] = verdict_line(plan)
    return out


def verdict_line(plan: Plan) -> str:
    """One line: fits, exits early, or does not fit (and what would)."""
    need = plan.min_capacity_bytes
    if plan.status == "feasible":
        return (
            f"FEASIBLE: peak {format_bytes(plan.peak_bytes)} within "
            f"{format_bytes(plan.capacity_bytes)} "
            f"(headroom {format_bytes(plan.headroom_bytes)})"
        )
    needs = f"; the complete run needs {format_bytes(need)} ({need} bytes)" if need else ""
    if plan.status == "early_exit":
        return (
            f"EARLY EXIT at level {plan.exit_level} of {plan.num_levels}: peak "
            f"{format_bytes(plan.peak_bytes)} within {format_bytes(plan.capacity_bytes)}"
            f"{needs}"
        )
    w = plan.witness
    short = f" short by {format_bytes(w.missing_bytes)} at step {w.step} ({w.layer})" if w else ""
    return f"INFEASIBLE:{short} in {format_bytes(plan.capacity_bytes)}{needs}"


def _rows(tile: tuple[int, int]) -> str:
    return f"{tile[0]}:{tile[1]}"


def _buffer_label(plan: Plan, buffer_id: int) -> str:
    """A weights buffer's unit, with the rows it holds when it is a tile's."""
    buf = plan.buffers[buffer_id]
    tile = next((s.tile for s in plan.steps if s.weights == buffer_id and s.tile), None)
    return buf.layer if tile is None else f"{buf.layer}[{_rows(tile)}]"


def format_plan(plan: Plan, policy: Policy | None = None, *, buffers: bool = False) -> str:
    """The step table, the peak against capacity and lower bound, and the verdict."""
    peak_step = max(plan.steps, key=lambda s: s.live_bytes, default=None)
    rows = []
    for step in plan.steps:
        loads = ", ".join(_buffer_label(plan, b) for b in step.loads) or "-"
        rows.append(
            (
                str(step.index),
                step.action,
                step.layer if step.tile is None else f"{step.layer} rows {_rows(step.tile)}",
                loads,
                format_bytes(step.arena_live_bytes),
                format_bytes(step.working_set_bytes),
                format_bytes(plan.capacity_bytes - step.live_bytes),
                "<- peak" if step is peak_step else "",
            )
        )
    cap = plan.capacity_bytes
    lines = [
        f"plan for {plan.model_name}, input {list(plan.input_shape)}, arena capacity "
        f"{format_bytes(cap)} ({cap} bytes)",
    ]
    if policy is not None:
        lines.append(f"policy: {policy.describe()}")
    lines += [
        "",
        _table(
            rows, ("step", "action", "layer", "reads", "arena live", "working set", "headroom", "")
        ),
        "",
        f"peak        {format_bytes(plan.peak_bytes):>12}  (arena {format_bytes(plan.arena_bytes)}"
        f" + largest XLA working set {format_bytes(plan.peak_bytes - plan.arena_bytes)})",
        f"lower bound {format_bytes(plan.lower_bound_bytes):>12}  (peak is "
        f"{_ratio(plan.peak_bytes, plan.lower_bound_bytes)} of it)",
        f"naive       {format_bytes(plan.naive_bytes):>12}  (one slot per buffer; planning "
        f"saves {format_bytes(max(0, plan.naive_bytes - plan.peak_bytes))})",
        f"streamed    {format_bytes(plan.streamed_bytes):>12}  per request"
        + (
            f" ({format_bytes(plan.unpinned_streamed_bytes)} without pinning "
            f"{len(plan.pinned_layers)} layers)"
            if plan.pinned_layers
            else ""
        ),
        f"prefetch depth {plan.prefetch_depth}; levels run: {plan.exit_level or '-'} of "
        f"{plan.num_levels}",
    ]
    if peak_step is not None:
        lines.append(
            f"the peak is at step {peak_step.index} ({peak_step.action} {peak_step.layer})"
        )
    state = [b for b in plan.buffers if b.role == "state"]
    if state:
        held = sum(b.nbytes for b in state)
        lines.append(
            f"state       {format_bytes(held):>12}  kept across requests at offsets 0.."
            f"{held} ({len(state)} units: {', '.join(b.layer for b in state[:4])}"
            f"{', ...' if len(state) > 4 else ''})"
        )
    lines += [f"note: {n}" for n in plan.notes]
    if buffers:
        brows = [
            (
                str(b.id),
                b.role,
                b.layer,
                format_bytes(b.nbytes),
                "-" if b.offset_bytes is None else str(b.offset_bytes),
                f"{b.first_step}..{b.last_step}",
            )
            for b in plan.buffers
        ]
        lines += ["", _table(brows, ("id", "role", "layer", "bytes", "offset", "steps"))]
    lines += ["", verdict_line(plan)]
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "n/a"
