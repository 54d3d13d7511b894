"""Residency timeline plots: where each buffer of a plan lives, step by step, against capacity.

The top panel draws a plan's buffers as rectangles, steps (or, given a
:class:`~edgemind.runtime.report.RunReport`, wall-clock seconds) across and arena
offset up, coloured by role; XLA's working set, which lives outside the arena, is a
hatched band stacked on top of the arena extent so the capacity line compares against
the total. The bottom panel draws live bytes per step against the capacity and the
lower bound, with the run's observed arena use overlaid when a report is given.

matplotlib is an optional extra (``pip install 'edgemind-runtime[viz]'``), imported only here,
only when a plot is drawn. Figures are built without pyplot, so nothing global is kept.

>>> import tempfile
>>> from edgemind.planner import CostTable, ExitCost, UnitCost, make_plan
>>> from edgemind.policy import Policy
>>> layers = tuple(UnitCost(f"L{i}", "dense", (("w", 1 << 20),), 4096, 8192) for i in range(4))
>>> costs = CostTable("demo", (1, 1024), 4096, layers, (ExitCost(1, 3, None),))
>>> plan = make_plan(costs, Policy(arena_capacity_bytes=4 << 20))
>>> describe_peak(plan)
'peak 2.0 MiB at step 1: run L0, prefetching L1'
>>> save_timeline(plan, tempfile.mkdtemp() + "/timeline.png").stat().st_size > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgemind.errors import EdgemindError
from edgemind.planner.plan import Buffer, Plan
from edgemind.runtime.report import RunReport
from edgemind.units import MIB, format_bytes

if TYPE_CHECKING:  # pragma: no cover - types only; matplotlib is imported lazily
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TimeAxis = Literal["step", "seconds"]

# role -> (legend label, colour); Okabe-Ito colours stay distinct for colour-blind readers.
ROLE_STYLE: dict[str, tuple[str, str]] = {
    "pinned": ("pinned weights (kept across requests)", "#CC79A7"),
    "weights": ("weights (own load step)", "#0072B2"),
    "prefetch": ("prefetched weights (read during the previous run)", "#E69F00"),
    "activation": ("activations", "#009E73"),
    "accumulator": ("accumulator (output of a tiled unit)", "#56B4E9"),
    "state": ("state (kept across requests: a KV cache)", "#000000"),
    "working_set": ("XLA working set (outside arena)", "#7F7F7F"),
}
CAPACITY_COLOR = "#D55E00"
PEAK_COLOR = "#F0E442"
_LOADING_LABEL = "being read from disk"


def _matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or a one-line error saying how to install it."""
    from edgemind.extras import require

    # Figure without pyplot: no backend, no window, no global figure registry
    return require("matplotlib.figure", "viz", "plotting")


def _mib(nbytes: float) -> float:
    return nbytes / MIB


def step_spans(
    plan: Plan, report: RunReport | None = None, time_axis: TimeAxis = "step"
) -> list[tuple[float, float]]:
    """``(start, end)`` of each plan step along x: step ``i`` is ``[i, i + 1)``, or its seconds."""
    if time_axis == "step":
        return [(float(i), float(i + 1)) for i in range(len(plan.steps))]
    if time_axis != "seconds":
        raise EdgemindError(f"time_axis: expected 'step' or 'seconds', got {time_axis!r}")
    if report is None or not report.step_end_s:
        raise EdgemindError(
            "time_axis='seconds' needs the RunReport of a run of this plan (report.step_end_s)"
        )
    if len(report.step_end_s) != len(plan.steps):
        raise EdgemindError(
            f"the report has {len(report.step_end_s)} step times, the plan has "
            f"{len(plan.steps)} steps; pass the report of a run of this plan"
        )
    ends = [float(t) for t in report.step_end_s]
    return list(zip([0.0, *ends[:-1]], ends, strict=True))


def peak_step(plan: Plan) -> int:
    """The step that sets the peak: the witness step when it does not fit, else the most live."""
    if plan.witness is not None and plan.status == "infeasible":
        return plan.witness.step
    if not plan.steps:
        return 0
    return max(plan.steps, key=lambda s: s.live_bytes).index


def describe_peak(plan: Plan) -> str:
    """One line naming the step and layer at the peak, and what it is loading."""
    if not plan.steps:
        return "empty plan"
    step = plan.steps[peak_step(plan)]
    loading = sorted({plan.buffer(b).layer for b in step.loads} - {step.layer})
    text = f"peak {format_bytes(step.live_bytes)} at step {step.index}: {step.action} {step.layer}"
    return text + (f", prefetching {', '.join(loading)}" if loading else "")


def _verdict(plan: Plan) -> str:
    """What happens to the request, and why, in a few words."""
    need = format_bytes(plan.min_capacity_bytes) if plan.min_capacity_bytes else "more"
    if plan.status == "infeasible":
        return f"REJECTED: the complete run needs {need}"
    if plan.status == "early_exit":
        level = f"{plan.exit_level} of {plan.num_levels}"
        return f"EARLY EXIT at level {level} (the complete run needs {need})"
    return "complete run"


def _default_title(plan: Plan) -> str:
    shape = "×".join(str(d) for d in plan.input_shape)
    cap = format_bytes(plan.capacity_bytes)
    if plan.status == "infeasible":
        figures = f"capacity {cap}: no exit level fits"
    else:
        figures = f"capacity {cap}, plan peak {format_bytes(plan.peak_bytes)}, "
        figures += f"headroom {format_bytes(plan.headroom_bytes)}"
    return f"{plan.model_name}, input {shape}: {_verdict(plan)}\n{figures}"


def _y_top(plan: Plan) -> float:
    tallest = max([plan.capacity_bytes, plan.peak_bytes, plan.min_capacity_bytes or 0])
    return _mib(tallest) * 1.16


def _buffer_span(buf: Buffer, spans: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return spans[buf.first_step][0], spans[buf.last_step][1]


def _px_per_unit(ax: Axes) -> tuple[float, float]:
    """Display pixels per x unit and per MiB, to decide which labels fit (approximate)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    bbox = ax.get_window_extent()
    # constrained layout shrinks the axes for the legend later; stay conservative
    return 0.8 * bbox.width / (x1 - x0), 0.9 * bbox.height / (y1 - y0)


def _box(ax: Axes, x: tuple[float, float], y: float, h: float, **style: Any) -> None:
    """One rectangle from ``x[0]`` to ``x[1]`` and ``y`` to ``y + h`` (MiB)."""
    ax.bar(x[0], h, x[1] - x[0], y, align="edge", **style)


def _label_buffer(
    ax: Axes, buf: Buffer, x: tuple[float, float], px: tuple[float, float], color: str
) -> None:
    """Write the buffer's layer (and size, where it fits) in its middle."""
    width_px, height_px = (x[1] - x[0]) * px[0], _mib(buf.nbytes) * px[1]
    y = _mib(buf.offset_bytes or 0) + _mib(buf.nbytes) / 2
    for text, need_px in ((f"{buf.layer}\n{format_bytes(buf.nbytes)}", 26), (buf.layer, 11)):
        longest = max(len(line) for line in text.splitlines())
        if height_px >= need_px and width_px >= 6.2 * longest + 4:
            ax.text(sum(x) / 2, y, text, ha="center", va="center", fontsize=8, color=color)
            return


def _draw_arena_buffers(ax: Axes, plan: Plan, spans: Sequence[tuple[float, float]]) -> None:
    """One box per arena buffer over its lifetime; the step its read overlaps is hatched."""
    px = _px_per_unit(ax)
    loading = {b: step.index for step in plan.steps for b in step.loads}
    for buf in plan.buffers:
        if buf.offset_bytes is None:
            continue
        x = _buffer_span(buf, spans)
        label, color = ROLE_STYLE[buf.role]
        y, h = _mib(buf.offset_bytes), _mib(buf.nbytes)
        _box(ax, x, y, h, color=color, edgecolor="white", lw=0.6, label=label)
        if h * px[1] < 2.5:  # too thin to see (a small activation): draw it as a line
            ax.hlines(y + h / 2, *x, color=color, lw=2.5)
        if buf.id in loading:
            read = spans[loading[buf.id]]
            _box(ax, read, y, h, fill=False, hatch="xx", lw=0, ec="white", label=_LOADING_LABEL)
            if read[1] < x[1]:  # label the part where it is used, away from the hatching
                x = (read[1], x[1])
        text_color = "black" if buf.role in ("prefetch", "pinned") else "white"
        _label_buffer(ax, buf, x, px, text_color)


def _draw_working_set(ax: Axes, plan: Plan, spans: Sequence[tuple[float, float]]) -> None:
    """The band XLA's pool may use on top of the arena extent: what ``peak_bytes`` adds."""
    base = _mib(plan.arena_bytes)
    visible = 0.006 * _y_top(plan)  # a few pixels, so a band of kilobytes still shows
    band = max(_mib(plan.peak_bytes - plan.arena_bytes), visible)
    color = ROLE_STYLE["working_set"][1]
    ws = format_bytes(plan.peak_bytes - plan.arena_bytes)
    label = f"XLA working set (outside arena): up to {ws}"
    x_all = (spans[0][0], spans[-1][1])
    _box(ax, x_all, base, band, color=color, alpha=0.25, hatch="////", ec=color, lw=0, label=label)
    for buf in plan.buffers:
        if buf.offset_bytes is None and buf.nbytes:
            h = max(_mib(buf.nbytes), visible)
            _box(ax, _buffer_span(buf, spans), base, h, color=color, hatch="////", lw=0)
    ax.axhline(base, color="black", lw=0.8, label=f"arena extent: {format_bytes(plan.arena_bytes)}")


def _draw_capacity(ax: Axes, plan: Plan, x_right: float) -> None:
    cap = _mib(plan.capacity_bytes)
    # up to "infinity": the y limits are fixed already, and a caller may raise them later
    ax.axhspan(cap, cap + 1e6, color=CAPACITY_COLOR, alpha=0.06, lw=0, label="over capacity")
    ax.axhline(cap, color=CAPACITY_COLOR, lw=2, ls="--", label="capacity")
    ax.text(
        x_right,
        cap,
        f"capacity {format_bytes(plan.capacity_bytes)} ",
        color=CAPACITY_COLOR,
        ha="right",
        va="bottom",
        fontsize=9,
        fontweight="bold",
        zorder=6,
        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
    )
    if plan.status == "infeasible" and plan.min_capacity_bytes:
        need = format_bytes(plan.min_capacity_bytes)
        label = f"capacity the complete run needs: {need}"
        ax.axhline(_mib(plan.min_capacity_bytes), color="black", lw=1, ls=":", label=label)


def _mark_peak(ax: Axes, plan: Plan, spans: Sequence[tuple[float, float]]) -> None:
    """Shade the peak step, name its layer, and draw the headroom (or shortfall) arrow."""
    index = peak_step(plan)
    x0, x1 = spans[index]
    ax.axvspan(x0, x1, color=PEAK_COLOR, alpha=0.35, lw=0, zorder=0, label="peak step")
    # a plan that fits is bounded by peak_bytes; one that does not, by its worst step
    top_bytes = plan.peak_bytes if plan.feasible else plan.steps[index].live_bytes
    top, cap = _mib(top_bytes), _mib(plan.capacity_bytes)
    xm = (x0 + x1) / 2
    if abs(cap - top) * _px_per_unit(ax)[1] > 12:  # an arrow shorter than its heads is noise
        ax.annotate("", (xm, cap), (xm, top), arrowprops={"arrowstyle": "<->", "lw": 1.5})
    gap = plan.capacity_bytes - top_bytes
    what = f"headroom {format_bytes(gap)}" if gap >= 0 else f"short by {format_bytes(-gap)}"
    y_text = max(top, cap) + 0.04 * _y_top(plan)
    right = xm < (spans[0][0] + spans[-1][1]) / 2
    ax.text(
        xm,
        y_text,
        f"{describe_peak(plan)}\n{what}",
        ha="left" if right else "right",
        va="bottom",
        fontsize=9,
        fontweight="bold",
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.5", "alpha": 0.9},
    )


def _layer_ticks(ax: Axes, plan: Plan, spans: Sequence[tuple[float, float]]) -> None:
    """Name each step's layer along the top, where the name fits."""
    top = ax.secondary_xaxis("top")
    px = _px_per_unit(ax)[0]
    ticks, labels = [], []
    for step, (x0, x1) in zip(plan.steps, spans, strict=True):
        text = step.layer if step.action == "run" else f"load\n{step.layer}"
        if (x1 - x0) * px >= 6 * max(len(line) for line in text.splitlines()):
            ticks.append((x0 + x1) / 2)
            labels.append(text)
    top.set_xticks(ticks, labels, fontsize=7)
    top.tick_params(length=0)
    top.set_xlabel("what each step does: run a layer, or load its weights", fontsize=8)


def _set_x(ax: Axes, spans: Sequence[tuple[float, float]], time_axis: TimeAxis) -> None:
    ax.set_xlim(spans[0][0], spans[-1][1])
    if time_axis == "step":
        step_ticks = range(0, len(spans), max(1, len(spans) // 25))
        ax.set_xticks([i + 0.5 for i in step_ticks], [str(i) for i in step_ticks])
        ax.set_xlabel("step")
    else:
        ax.set_xlabel("wall-clock time since the request began (s)")


def draw_timeline(
    ax: Axes, plan: Plan, spans: Sequence[tuple[float, float]], *, legend: bool = True
) -> None:
    """The residency panel: one rectangle per buffer at its arena offset, across its lifetime."""
    ax.set_xlim(spans[0][0], spans[-1][1])
    ax.set_ylim(0, _y_top(plan))
    _draw_arena_buffers(ax, plan, spans)
    _draw_working_set(ax, plan, spans)
    _draw_capacity(ax, plan, spans[-1][1])
    _mark_peak(ax, plan, spans)
    _layer_ticks(ax, plan, spans)
    ax.set_ylabel("arena offset (MiB)")
    if legend:
        _legend(ax)


# legend entries in reading order: limits first, then roles in ROLE_STYLE order
_LEGEND_ORDER = (
    "capacity",
    "over capacity",
    "peak step",
    *(ROLE_STYLE[role][0] for role in ("pinned", "weights", "prefetch")),
    _LOADING_LABEL,
    ROLE_STYLE["activation"][0],
    ROLE_STYLE["accumulator"][0],
    ROLE_STYLE["state"][0],
    "XLA",
    "arena",
    "lower bound",
    "observed",
)


def legend_entries(*axes: Axes, values: bool = True) -> tuple[list[Any], list[str]]:
    """The unique legend handles and labels of ``axes``, in reading order.

    With ``values=False`` labels drop their ``": 45.1 MiB"`` suffix, so panels of several
    plans can share one legend: ``fig.legend(*legend_entries(*axes, values=False))``.
    """
    from matplotlib.patches import Patch

    unique: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            unique.setdefault(label if values else label.split(": ")[0], handle)
    if _LOADING_LABEL in unique:  # the overlay is white hatching: show it on grey
        unique[_LOADING_LABEL] = Patch(fc="#9A9A9A", hatch="xx", ec="white", lw=0)

    def rank(label: str) -> int:
        return next((i for i, p in enumerate(_LEGEND_ORDER) if label.startswith(p)), 99)

    labels = sorted(unique, key=rank)
    return [unique[label] for label in labels], labels


def _legend(ax: Axes) -> None:
    ax.legend(*legend_entries(ax), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _draw_observed(ax: Axes, spans: Sequence[tuple[float, float]], report: RunReport) -> None:
    """The run's ledger at each step's end, and its peak RSS above the baseline."""
    used = report.arena_used_bytes_per_step
    if used:
        ends = [end for _, end in spans][: len(used)]
        label = "observed arena use during the step (ledger)"
        ax.plot(ends, [_mib(u) for u in used], "kD", ms=4, label=label)
    if report.observed_peak_bytes is not None:
        label = f"observed peak RSS: {format_bytes(report.observed_peak_bytes)}"
        ax.axhline(_mib(report.observed_peak_bytes), color="#8E44AD", lw=1.2, ls="-.", label=label)


def draw_live(
    ax: Axes,
    plan: Plan,
    spans: Sequence[tuple[float, float]],
    report: RunReport | None = None,
    *,
    legend: bool = True,
) -> None:
    """The live-bytes panel: arena + working set per step, capacity, bound, observed use."""
    x0s = [a for a, _ in spans]
    widths = [b - a for a, b in spans]
    arena = [_mib(s.arena_live_bytes) for s in plan.steps]
    ws = [_mib(s.working_set_bytes) for s in plan.steps]
    color = ROLE_STYLE["working_set"][1]
    ax.bar(x0s, arena, widths, align="edge", color="#56B4E9", ec="white", label="arena live")
    ax.bar(
        x0s,
        ws,
        widths,
        bottom=arena,
        align="edge",
        color=color,
        hatch="////",
        lw=0,
        label="XLA working set",
    )
    ax.axhline(_mib(plan.capacity_bytes), color=CAPACITY_COLOR, lw=2, ls="--", label="capacity")
    ax.axhline(
        _mib(plan.lower_bound_bytes),
        color="black",
        lw=1,
        ls=":",
        label=f"lower bound: {format_bytes(plan.lower_bound_bytes)}",
    )
    ax.axvspan(*spans[peak_step(plan)], color=PEAK_COLOR, alpha=0.35, lw=0, zorder=0)
    if report is not None:
        _draw_observed(ax, spans, report)
    ax.set_ylim(0, _y_top(plan))
    ax.set_ylabel("live bytes (MiB)")
    if legend:
        _legend(ax)


def plot_timeline(
    plan: Plan,
    report: RunReport | None = None,
    *,
    ax_timeline: Axes | None = None,
    ax_live: Axes | None = None,
    time_axis: TimeAxis | None = None,
    title: str | None = None,
    legend: bool = True,
) -> Figure:
    """Draw the residency timeline and live-bytes panels of ``plan``; return the figure.

    With neither axes given, a new two-panel figure is made; given one or both, only those
    panels are drawn into them. ``time_axis`` is ``"step"`` or ``"seconds"`` (wall clock,
    from ``report``); by default seconds when a report with step times is given.
    """
    figure = _matplotlib()
    if not plan.steps:
        raise EdgemindError(f"plan for {plan.model_name} has no steps: nothing to draw")
    if time_axis is None:
        time_axis = "seconds" if report is not None and report.step_end_s else "step"
    spans = step_spans(plan, report, time_axis)
    if ax_timeline is None and ax_live is None:
        fig = figure.Figure(figsize=(12, 7.5), layout="constrained")
        ax_timeline, ax_live = fig.subplots(2, 1, sharex=True, height_ratios=[2.6, 1])
    fig = (ax_timeline or ax_live).figure  # type: ignore[union-attr]
    if ax_timeline is not None:
        draw_timeline(ax_timeline, plan, spans, legend=legend)
        ax_timeline.set_title(title if title is not None else _default_title(plan), fontsize=11)
        _set_x(ax_timeline, spans, time_axis)
        if ax_live is not None:  # the live panel below carries the x label
            ax_timeline.set_xlabel("")
    if ax_live is not None:
        draw_live(ax_live, plan, spans, report, legend=legend)
        _set_x(ax_live, spans, time_axis)
        if ax_timeline is None:
            ax_live.set_title(title if title is not None else _default_title(plan), fontsize=11)
    return fig  # type: ignore[return-value]


def save_timeline(
    plan: Plan,
    path: str | os.PathLike[str],
    report: RunReport | None = None,
    *,
    time_axis: TimeAxis | None = None,
    dpi: int = 100,
) -> Path:
    """Write the two-panel timeline of ``plan`` (and ``report``) to ``path`` (PNG, SVG, PDF...)."""
    from edgemind.files import atomic_write

    fig = plot_timeline(plan, report, time_axis=time_axis)
    out = Path(path)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise EdgemindError(
            f"cannot write the timeline plot to {out}: unknown format {fmt!r}; use one of "
            f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}"
        )
    atomic_write(
        out, lambda f: fig.savefig(f, dpi=dpi, format=fmt), flag="--plot", error=EdgemindError
    )
    return out


__all__ = [
    "ROLE_STYLE",
    "describe_peak",
    "draw_live",
    "draw_timeline",
    "legend_entries",
    "peak_step",
    "plot_timeline",
    "save_timeline",
    "step_spans",
]
