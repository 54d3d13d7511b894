"""The edgemind demo: build the toy model, plan it, and run it three ways.

    python examples/toy_model/demo.py [--model models/toy]

1. at the default 50 MiB arena the complete run fits;
2. at 24 MiB the deepest exit that fits is level 2: partial output, early exit;
3. at 2 MiB not even the first layer fits: the request is rejected before any read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from edgemind.cli import main as edgemind
from examples.toy_model.build import build_toy_model


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n$ {text}\n{'=' * 78}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/toy", help="model directory")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "manifest.json").exists():
        print(f"building the toy model into {model} ...", flush=True)
        build_toy_model(model)
    expected = {
        ("inspect", str(model)): 0,
        ("plan", str(model)): 0,
        ("run", str(model), "--random-input", "--batch", "4"): 0,
        ("plan", str(model), "--arena-mb", "24"): 3,
        ("run", str(model), "--random-input", "--batch", "4", "--arena-mb", "24"): 3,
        ("plan", str(model), "--arena-mb", "2"): 4,
        ("run", str(model), "--random-input", "--arena-mb", "2"): 4,
    }
    failures = 0
    for argv_, want in expected.items():
        _banner("edgemind " + " ".join(argv_))
        code = edgemind(list(argv_))
        print(f"[exit code {code}]", flush=True)
        failures += code != want
    print(
        "\ndemo finished: complete run, early exit and rejection shown."
        if not failures
        else f"\ndemo: {failures} command(s) ended with an unexpected exit code"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
