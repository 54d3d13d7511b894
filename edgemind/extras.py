"""Optional dependencies: imported on first use, or a one-line error naming the extra.

The core needs JAX, NumPy, msgpack, PyYAML and prometheus-client. Converting
checkpoints and embedding text need the ``hf`` extra, GGUF files the ``gguf`` extra,
plots the ``viz`` extra; without them edgemind says which to install instead of
raising ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgemind.errors import MissingExtraError

DISTRIBUTION = "edgemind-runtime"


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``: ``pip install 'edgemind-runtime[hf]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming ``extra``.

    >>> require("json", "hf", "reading JSON").__name__
    'json'
    >>> require("no_such_module_xyz", "hf", "converting a checkpoint")
    Traceback (most recent call last):
    ...
    edgemind.errors.MissingExtraError: converting a checkpoint needs no_such_module_xyz, which \
is not installed: pip install 'edgemind-runtime[hf]'
    """
    try:
        importlib.import_module(module.partition(".")[0])  # a blocked parent blocks the rest
        return importlib.import_module(module)
    except ImportError:  # also a module set to None in sys.modules (blocked)
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed: {install_hint(extra)}"
        ) from None
