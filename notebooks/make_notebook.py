"""Write ``notebooks/residency_timeline.ipynb`` from the cells below (outputs left empty).

The notebook is generated so that a review reads this file, not JSON:

    .venv/bin/python notebooks/make_notebook.py

``tests/test_viz.py`` executes the notebook headless and checks it draws its figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("residency_timeline.ipynb")

INTRO = """\
# Residency timeline: where every byte of the toy model lives, step by step

edgemind runs a model under a hard memory budget by streaming each layer's weights from
disk into one fixed-size **arena**. Before it reads a single weight, its planner decides
where every buffer goes (an offset in the arena) and for how long (from one step to
another), and proves the peak fits the capacity.

This notebook builds the 10-layer toy model (107 MiB of float32 weights, layers of 4 to
25 MiB), plans it at three capacities, draws each plan as a timeline, then runs one and
overlays what the run actually used. Everything runs offline in a temporary directory."""

SETUP = """\
%matplotlib inline
import sys
import tempfile
from pathlib import Path

# Run from the repository root or from notebooks/: make the repo importable either way.
ROOT = Path.cwd().resolve()
if not (ROOT / "edgemind").is_dir():
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import numpy as np
from matplotlib.figure import Figure

from edgemind import Policy, Runtime, verify_plan
from edgemind.units import MIB, format_bytes
from edgemind.viz import describe_peak, legend_entries, plot_timeline
from examples.toy_model.build import LAYERS, build_toy_model

model_dir = build_toy_model(Path(tempfile.mkdtemp(prefix="edgemind-nb-")) / "toy")
for name, d_in, d_out, _, has_exit in LAYERS:
    size = format_bytes(4 * (d_in * d_out + d_out))
    print(f"{name}: {d_in:5d} -> {d_out:5d}  {size:>9}" + ("  + exit head" if has_exit else ""))"""

PLANS_MD = """\
## Three capacities

* **generous**: 80 MiB with `keep_resident_layers: auto`, so the planner may *pin* layers
  (keep their weights resident across requests, never read again) in the spare room;
* **tight**: 46 MiB, just above what streaming with one prefetch slot needs;
* **early exit**: 24 MiB: the largest layer (L8, 25 MiB) cannot fit at all, so the plan
  stops at the deepest exit head that fits and returns partial output.

Each plan is checked by the independent verifier (`verify_plan` returns no problems)."""

PLANS = """\
BATCH = 4
CASES = {
    "generous (80 MiB, pin auto)": Policy(
        arena_capacity_bytes=80 * MIB, keep_resident_layers="auto"
    ),
    "tight (46 MiB)": Policy(arena_capacity_bytes=46 * MIB),
    "early exit (24 MiB)": Policy(arena_capacity_bytes=24 * MIB),
}
plans = {}
for name, policy in CASES.items():
    with Runtime.open(model_dir, policy) as rt:
        plan = plans[name] = rt.plan(batch=BATCH)
        problems = verify_plan(plan, rt.costs(batch=BATCH))
    print(f"{name:28} {plan.status:10} peak {format_bytes(plan.peak_bytes):>9}  "
          f"headroom {format_bytes(plan.headroom_bytes):>9}  verifier problems: {len(problems)}")
    print(f"{'':28} {describe_peak(plan)}; pinned: {', '.join(plan.pinned_layers) or 'none'}")"""

SIDE_BY_SIDE = """\
fig = Figure(figsize=(19, 8.5), layout="constrained")
axes = fig.subplots(2, 3, height_ratios=[2.6, 1])
for column, (name, plan) in enumerate(plans.items()):
    plot_timeline(plan, ax_timeline=axes[0, column], ax_live=axes[1, column], legend=False,
                  title=f"{name}: {plan.status.replace('_', ' ')}\\n{describe_peak(plan)}")
top = max(ax.get_ylim()[1] for ax in axes.flat)  # one MiB scale for all six panels
for ax in axes.flat:
    ax.set_ylim(0, top)
fig.legend(*legend_entries(*axes.flat, values=False), loc="outside lower center", ncols=6,
           fontsize=9)
fig"""

READING_MD = """\
## What the picture says

Read each top panel left to right: x is the step (a layer's run, or a load with
nothing to overlap), y is the offset in the arena, and each box is one buffer alive
from the step it is reserved to the step it is freed. The dashed line is the capacity;
the hatched grey band on top of the arena extent is XLA's own working memory, which
lives outside the arena but counts against the same budget.

* **Prefetch** shows as the orange boxes whose first step is cross-hatched: layer
  *k + 1*'s weights are read from disk *while layer k runs*, so for that step two
  layers' weights are resident at once. That overlap is what sets the peak in the
  tight plan: the yellow step is where L7 (20 MiB) runs while L8 (25 MiB) is
  prefetched, about 45 MiB, which is why 46 MiB is "tight".
* **Pinning** (generous plan): the pink boxes span the whole request; those layers are
  never read again on the next request. The planner picks what fits in the room that
  streaming leaves, so the peak stays under the capacity and the streamed bytes drop.
* **Early exit**: at 24 MiB even one layer's weights (L8) does not fit, so the plan
  drops prefetch (every layer gets its own blue load step) and stops at the exit head
  after L6. Its peak is a single 16 MiB layer plus its activations, with headroom to
  spare: what the plan cannot do is go deeper.

The bottom panels are the same plans as totals: live bytes per step against the
capacity, and the lower bound no placement can beat. The arrow at the peak step is the
headroom (or, for a plan that does not fit, the shortfall)."""

RUN_MD = """\
## Run the tight plan and overlay what it used

The executor records the arena ledger (bytes reserved during every step) and the
wall-clock time of each step. Given the run's report, the timeline is drawn against
seconds, so long loads and computes take their real width, and the observed arena use
and the process's peak RSS above its baseline are drawn over the planned totals."""

RUN = """\
name = "tight (46 MiB)"
with Runtime.open(model_dir, CASES[name]) as rt:
    x = np.random.default_rng(0).standard_normal((BATCH, 1024), dtype=np.float32)
    result = rt.run(x)
report = result.report
print(f"outcome {report.outcome}, exit level {report.exit_level} of {report.num_levels}, "
      f"latency {report.latency_s * 1e3:.1f} ms, read {format_bytes(report.bytes_read)}")
print(f"planned peak {format_bytes(report.plan_peak_bytes)}, observed peak RSS "
      + (format_bytes(report.observed_peak_bytes) if report.observed_peak_bytes else "not read"))
fig = plot_timeline(plans[name], report, time_axis="seconds",
                    title=f"{name}, as run: {describe_peak(plans[name])}")
fig"""

OBSERVED_MD = """\
The diamonds are the ledger during each step, before the step's frees: they land on
the planned arena bars, because the executor reserves exactly the buffers the plan
says are alive (a reservation the plan did not foresee stops the request). Wall-clock widths show where the time goes: with
prefetch, a step lasts as long as the slower of its layer's compute and the read of
the next layer's weights that it hides. An observed peak RSS well above the planned peak
would be the signal that something outside the plan is allocating. The CLI draws the
same figure with
`edgemind run MODEL --random-input --plot timeline.png`."""


def build() -> nbformat.NotebookNode:
    """The notebook: markdown and code cells, no outputs, a python3 kernel."""
    cells = [
        new_markdown_cell(INTRO),
        new_code_cell(SETUP),
        new_markdown_cell(PLANS_MD),
        new_code_cell(PLANS),
        new_code_cell(SIDE_BY_SIDE),
        new_markdown_cell(READING_MD),
        new_markdown_cell(RUN_MD),
        new_code_cell(RUN),
        new_markdown_cell(OBSERVED_MD),
    ]
    for index, cell in enumerate(cells):
        cell["id"] = f"cell-{index}"  # stable ids: regenerating gives the same file
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return new_notebook(cells=cells, metadata={"kernelspec": kernelspec})


def main() -> int:
    notebook = build()
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
