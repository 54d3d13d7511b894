"""What the CLI checks before any work: flag combinations, the model path, output paths.

Each check fails in one line before a weight is read: a flag that would be ignored is a
usage error, a Hugging Face checkpoint or GGUF file given where an edgemind model
directory belongs gets the exact ``edgemind convert`` command, and an output path that
cannot be written is refused before the run rather than after it.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from edgemind.errors import EdgemindError, ModelFormatError, PlanError

MANIFEST_NAME = "manifest.json"
_CHECKPOINT_MARKERS = ("model.safetensors", "model.safetensors.index.json")
_TEXT_IGNORES = {  # dest -> (flag, why the texts make it moot)
    "batch": ("--batch", "the batch is the number of texts"),
    "seq": ("--seq", "the length is the longest text's, up to the model's limit"),
    "seed": ("--seed", "it seeds --random-input only"),
}


def ignored_flags(args: argparse.Namespace) -> str | None:
    """A usage error for flags ``edgemind run`` would ignore, or None.

    With ``--text``/``--text-file`` the texts set the shape, so ``--batch``, ``--seq``
    and ``--seed`` are refused; ``--seed`` goes with ``--random-input`` only.
    """
    if args.command == "generate":
        for flag in ("batch", "seq"):
            if getattr(args, flag) is not None:
                return f"--{flag} does not apply to generate (the prompts set the batch); drop it"
        return None
    if args.command != "run":
        return None
    if args.text is not None or args.text_file is not None:
        for dest, (flag, why) in _TEXT_IGNORES.items():
            if getattr(args, dest) is not None:
                return f"{flag} does not apply to --text/--text-file ({why}); drop it"
    if args.seed is not None and not args.random_input:
        return "--seed applies to --random-input only; drop it"
    return None


def convert_command(src: Path) -> str:
    """The ``edgemind convert`` command line for checkpoint ``src``."""
    stem = src.stem if src.suffix.lower() == ".gguf" else src.resolve().name
    out = Path("models") / (stem or "model")
    return f"edgemind convert {shlex.quote(str(src))} {shlex.quote(str(out))}"


def check_model_dir(path: str) -> None:
    """Refuse a checkpoint (Hugging Face folder, GGUF file) named where a model belongs.

    Only paths without a ``manifest.json`` are looked at; everything else is left to
    :func:`edgemind.weights.manifest.load_manifest` and its own messages.
    """
    src = Path(path)
    if src.is_file() and src.suffix.lower() == ".gguf":
        raise ModelFormatError(
            f"{path}: a GGUF file, not an edgemind model directory; convert it first: "
            f"{convert_command(src)}"
        )
    if not src.is_dir() or (src / MANIFEST_NAME).exists():
        return
    has_weights = any((src / name).is_file() for name in _CHECKPOINT_MARKERS) or any(
        src.glob("*.safetensors")
    )
    if (src / "config.json").is_file() and has_weights:
        raise ModelFormatError(
            f"{path}: a Hugging Face checkpoint (config.json + safetensors), not an edgemind "
            f"model directory; convert it first: {convert_command(src)}"
        )


def check_outputs(args: argparse.Namespace) -> None:
    """Check every file the command will write (and the plot extra) before any work."""
    from edgemind.files import check_writable

    flags = (("out", "--out", PlanError), ("output", "--output", EdgemindError))
    for dest, flag, error in flags:
        path = getattr(args, dest, None)
        if path:
            check_writable(path, flag=flag, error=error)
    if getattr(args, "plot", None):
        from edgemind.extras import require

        check_writable(args.plot, flag="--plot", error=EdgemindError)
        backends = require("matplotlib.backend_bases", "viz", "--plot")
        formats = backends.FigureCanvasBase.get_supported_filetypes()
        fmt = Path(args.plot).suffix.lstrip(".").lower() or "png"
        if fmt not in formats:
            raise EdgemindError(
                f"--plot {args.plot}: unknown image format {fmt!r}; end the name in one of "
                f"{', '.join('.' + f for f in sorted(formats))}"
            )
