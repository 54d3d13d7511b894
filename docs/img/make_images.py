"""Regenerate the README's timeline pictures from the toy model.

.venv/bin/python docs/img/make_images.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout, for examples/

from edgemind.runtime import Runtime  # noqa: E402
from edgemind.units import MIB  # noqa: E402
from edgemind.viz import save_timeline  # noqa: E402
from examples.toy_model.build import build_toy_model  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_toy_model(Path(tmp) / "toy")
        x = np.random.default_rng(0).standard_normal((4, 1024), dtype=np.float32)
        with Runtime.open(model) as rt:
            save_timeline(rt.plan(batch=4), HERE / "timeline_feasible.png")
        with Runtime.open(model, arena_capacity_bytes=24 * MIB) as rt:
            result = rt.run(x)
            assert rt.last_plan is not None
            save_timeline(rt.last_plan, HERE / "timeline_early_exit.png", result.report)
    print(f"wrote {HERE / 'timeline_feasible.png'} and {HERE / 'timeline_early_exit.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
