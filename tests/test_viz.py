"""Residency timeline plots: every kind of plan draws, says where its peak is, and saves;
the notebook runs top to bottom headless and draws its figures."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemind import Policy, Runtime, viz
from edgemind.errors import EdgemindError
from edgemind.planner.plan import Plan
from edgemind.runtime.report import RunReport
from edgemind.units import MIB

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "residency_timeline.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH = 4

# case -> policy: the toy model complete (with prefetch), exiting early, rejected, pinning
POLICIES = {
    "feasible": Policy(arena_capacity_bytes=50 * MIB),
    "early_exit": Policy(arena_capacity_bytes=24 * MIB),
    "infeasible": Policy(arena_capacity_bytes=2 * MIB),
    "pinned": Policy(arena_capacity_bytes=80 * MIB, keep_resident_layers="auto"),
}
ROLE_LABELS = {role: label for role, (label, _) in viz.ROLE_STYLE.items()}


@pytest.fixture(scope="module")
def plans(toy_model: Path) -> dict[str, Plan]:
    out = {}
    for case, policy in POLICIES.items():
        with Runtime.open(toy_model, policy) as rt:
            out[case] = rt.plan(batch=BATCH)
    return out


@pytest.fixture(scope="module")
def run_report(toy_model: Path, plans: dict[str, Plan]) -> RunReport:
    with Runtime.open(toy_model, POLICIES["feasible"]) as rt:
        result = rt.run(np.ones((BATCH, 1024), np.float32))
    assert result.complete
    return result.report


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, "panel has no legend"
    return [text.get_text() for text in legend.get_texts()]


def all_texts(ax) -> str:
    return "\n".join(text.get_text() for text in ax.texts)


def test_the_cases_are_what_they_claim(plans: dict[str, Plan]) -> None:
    assert plans["feasible"].status == "feasible" and plans["feasible"].prefetch_depth == 1
    assert plans["early_exit"].status == "early_exit"
    assert plans["infeasible"].status == "infeasible"
    assert plans["pinned"].pinned_layers


@pytest.mark.parametrize("case", list(POLICIES))
def test_every_plan_saves_a_png(plans: dict[str, Plan], case: str, tmp_path: Path) -> None:
    path = viz.save_timeline(plans[case], tmp_path / f"{case}.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000  # a drawn figure, not an empty canvas


@pytest.mark.parametrize("case", list(POLICIES))
def test_legends_name_roles_capacity_and_bounds(plans: dict[str, Plan], case: str) -> None:
    plan = plans[case]
    fig = viz.plot_timeline(plan)
    timeline, live = fig.axes[:2]
    labels = legend_texts(timeline)
    roles = {buf.role for buf in plan.buffers}
    for role in roles:
        assert any(label.startswith(ROLE_LABELS[role]) for label in labels), (role, labels)
    assert "capacity" in labels and "peak step" in labels
    assert "capacity" in legend_texts(live)
    assert any(label.startswith("lower bound") for label in legend_texts(live))
    assert timeline.get_ylabel() == "arena offset (MiB)"
    assert live.get_ylabel() == "live bytes (MiB)" and live.get_xlabel() == "step"


@pytest.mark.parametrize("case", list(POLICIES))
def test_capacity_line_and_peak_are_drawn(plans: dict[str, Plan], case: str) -> None:
    plan = plans[case]
    timeline = viz.plot_timeline(plan).axes[0]
    capacity = [line for line in timeline.get_lines() if line.get_label() == "capacity"]
    assert len(capacity) == 1
    assert capacity[0].get_ydata()[0] == pytest.approx(plan.capacity_bytes / MIB)
    low, high = timeline.get_ylim()
    assert low == 0 and high > max(plan.capacity_bytes, plan.peak_bytes) / MIB


def test_peak_annotation_names_the_peak_layer(plans: dict[str, Plan]) -> None:
    plan = plans["feasible"]
    peak = max(plan.steps, key=lambda step: step.live_bytes)
    text = all_texts(viz.plot_timeline(plan).axes[0])
    assert f"step {peak.index}: run {peak.layer}" in text
    # the toy model's peak: L7 (20 MiB) runs while L8 (25 MiB) is prefetched
    assert "run L7, prefetching L8" in text
    assert "headroom" in text


def test_infeasible_plan_marks_the_witness_and_shortfall(plans: dict[str, Plan]) -> None:
    plan = plans["infeasible"]
    assert plan.witness is not None
    assert viz.peak_step(plan) == plan.witness.step
    timeline = viz.plot_timeline(plan).axes[0]
    text = all_texts(timeline)
    assert f"run {plan.witness.layer}" in text and "short by" in text
    assert "REJECTED" in timeline.get_title()
    assert any(
        label.startswith("capacity the complete run needs") for label in legend_texts(timeline)
    )


def test_early_exit_title_says_level(plans: dict[str, Plan]) -> None:
    plan = plans["early_exit"]
    title = viz.plot_timeline(plan).axes[0].get_title()
    assert f"EARLY EXIT at level {plan.exit_level} of {plan.num_levels}" in title


def test_seconds_axis_with_a_run_report(
    plans: dict[str, Plan], run_report: RunReport, tmp_path: Path
) -> None:
    plan = plans["feasible"]
    fig = viz.plot_timeline(plan, run_report)  # seconds by default when given a report
    timeline, live = fig.axes[:2]
    assert live.get_xlabel().endswith("(s)")
    assert timeline.get_xlim()[1] == pytest.approx(run_report.step_end_s[-1])
    labels = legend_texts(live)
    assert "observed arena use during the step (ledger)" in labels
    observed = [line for line in live.get_lines() if line.get_label().startswith("observed arena")]
    assert len(observed[0].get_xdata()) == len(plan.steps)
    stepwise = viz.plot_timeline(plan, run_report, time_axis="step")
    assert stepwise.axes[1].get_xlabel() == "step"
    png = viz.save_timeline(plan, tmp_path / "run.png", run_report).read_bytes()
    assert png.startswith(PNG_MAGIC)


def test_bad_time_axis_and_mismatched_reports_are_clear_errors(
    plans: dict[str, Plan], run_report: RunReport
) -> None:
    with pytest.raises(EdgemindError, match="needs the RunReport"):
        viz.plot_timeline(plans["feasible"], time_axis="seconds")
    with pytest.raises(EdgemindError, match="expected 'step' or 'seconds'"):
        viz.plot_timeline(plans["feasible"], time_axis="minutes")  # type: ignore[arg-type]
    with pytest.raises(EdgemindError, match="the plan has 16 steps"):
        viz.plot_timeline(plans["early_exit"], run_report, time_axis="seconds")


def test_draws_into_the_axes_it_is_given(plans: dict[str, Plan]) -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    assert viz.plot_timeline(plans["pinned"], ax_timeline=ax, legend=False) is fig
    assert fig.axes == [ax]  # no live panel made behind the caller's back
    assert ax.get_legend() is None and ax.patches
    handles, labels = viz.legend_entries(ax, values=False)
    assert len(handles) == len(labels) and ROLE_LABELS["pinned"] in labels
    assert all(": " not in label for label in labels)


def test_unwritable_path_is_an_edgemind_error(plans: dict[str, Plan], tmp_path: Path) -> None:
    with pytest.raises(EdgemindError, match=r"t\.png: cannot write \(No such file"):
        viz.save_timeline(plans["feasible"], tmp_path / "no-such-dir" / "t.png")


def test_missing_matplotlib_says_how_to_install(
    plans: dict[str, Plan], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(EdgemindError, match=r"pip install 'edgemind-runtime\[viz\]'"):
        viz.plot_timeline(plans["feasible"])


def test_notebook_is_generated_from_make_notebook() -> None:
    sys.path.insert(0, str(NOTEBOOK.parent))
    try:
        import make_notebook
    finally:
        sys.path.remove(str(NOTEBOOK.parent))
    nbformat = pytest.importorskip("nbformat")
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    expected = make_notebook.build()
    assert [c.source for c in on_disk.cells] == [c.source for c in expected.cells], (
        "notebooks/residency_timeline.ipynb is stale: run python notebooks/make_notebook.py"
    )
    assert all(not c.get("outputs") for c in on_disk.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_headless_and_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel spec of our own, first on JUPYTER_PATH, so the kernel is this interpreter
    # whatever other "python3" kernels the machine has; nothing is installed.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "edgemind test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # silence jupyter_core's migration notice
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [
        base64.b64decode(out.data["image/png"])
        for out in outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 2, "expected the side-by-side timelines and the observed-usage figure"
    assert all(image.startswith(PNG_MAGIC) and len(image) > 50_000 for image in images)
    text = "".join(out.get("text", "") for out in outputs)
    assert "verifier problems: 0" in text and "outcome complete" in text
