"""Which pooling head a sentence-transformers checkpoint asks for, read from its files.

sentence-transformers describes a model as modules in ``modules.json``: the
``Transformer``, then ``Pooling`` (its mode in ``<path>/config.json``), then optionally
``Normalize``. :func:`pooling_head` turns that into the edgemind exit-head kind and
config; anything edgemind cannot run the same way (a ``Dense`` module, weighted-mean or
last-token pooling, several modes concatenated) is refused in one line rather than
converted into a model that embeds differently. A checkpoint without ``modules.json``
(a plain Hugging Face BERT) gets mean pooling + L2, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemind.errors import ConversionError, brief
from edgemind.layers.bert import POOL_EPS

MODULES_FILE = "modules.json"
_PACKAGE = "sentence_transformers."  # types: ...models.Pooling, ...modules.pooling.Pooling
_SUPPORTED = {"Transformer", "Pooling", "Normalize"}
# sentence-transformers' pooling modes (its config's `pooling_mode`, or the legacy
# `pooling_mode_*` booleans) -> edgemind's mode; None: a mode edgemind refuses
_MODES: dict[str, str | None] = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": None,
    "lasttoken": None,
}
_LEGACY = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
DEFAULT_HEAD = ("mean_pool_l2", {"eps": POOL_EPS})


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({str(exc)[:80]})") from None


def _modules(src: Path) -> list[tuple[str, str]]:
    """``(short type, path)`` of each module in ``modules.json``, checked."""
    path = src / MODULES_FILE
    data = _json(path)
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise ConversionError(f"{path}: expected a list of module objects")
    out = []
    for module in data:
        kind = str(module.get("type", ""))
        short = kind.rsplit(".", 1)[-1] if kind.startswith(_PACKAGE) else ""
        if short not in _SUPPORTED:
            raise ConversionError(
                f"{path}: module {brief(module.get('name'))} of type {brief(kind)} is not "
                "supported; edgemind converts Transformer, Pooling and Normalize modules"
            )
        out.append((short, str(module.get("path", ""))))
    return out


def _pooling_mode(config_path: Path) -> str:
    cfg = _json(config_path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{config_path}: expected a JSON object")
    chosen = cfg.get(
        "pooling_mode", [mode for key, mode in _LEGACY.items() if cfg.get(key) is True]
    )
    chosen = [chosen] if isinstance(chosen, str) else chosen
    supported = ", ".join(k for k, v in _MODES.items() if v)
    if not isinstance(chosen, list) or len(chosen) != 1 or chosen[0] not in _MODES:
        raise ConversionError(
            f"{config_path}: pooling mode {brief(chosen)}; edgemind converts exactly one of "
            f"{supported}"
        )
    mode = _MODES[chosen[0]]
    if mode is None:
        raise ConversionError(
            f"{config_path}: pooling mode {chosen[0]!r} is not supported; edgemind converts "
            f"one of {supported}"
        )
    if cfg.get("include_prompt", True) is not True:
        raise ConversionError(f"{config_path}: include_prompt false is not supported")
    return mode


def pooling_head(src: Path) -> tuple[str, dict[str, Any]]:
    """The exit-head ``(kind, config)`` the checkpoint at ``src`` pools with.

    >>> pooling_head(Path("no/such/checkpoint"))
    ('mean_pool_l2', {'eps': 1e-12})
    """
    if not (src / MODULES_FILE).is_file():
        return DEFAULT_HEAD
    modules = _modules(src)
    kinds = [short for short, _ in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ConversionError(
            f"{src / MODULES_FILE}: modules {kinds}; edgemind converts Transformer, Pooling "
            "and an optional Normalize, in that order"
        )
    folder = modules[1][1]
    if not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise ConversionError(
            f"{src / MODULES_FILE}: Pooling path {brief(folder)} must be a folder in {src}"
        )
    mode = _pooling_mode(src / folder / "config.json")
    normalize = kinds[-1] == "Normalize"
    if mode == "mean" and normalize:
        return DEFAULT_HEAD  # the kind every earlier model was converted with
    return "bert_pool", {"mode": mode, "normalize": normalize, "eps": POOL_EPS}
