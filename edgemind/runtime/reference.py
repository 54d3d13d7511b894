"""The all-in-memory reference path: every weight loaded once, no arena, no plan.

Tests and benchmarks compare the streaming executor against it: with the same
jitted functions the outputs must be bit-identical; with ``numpy=True`` it runs
each kind's independent NumPy reference instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgemind.errors import InputError
from edgemind.layers.cost import gathered_tensors
from edgemind.layers.registry import get_kind, jitted
from edgemind.weights.manifest import LayerSpec, Manifest, load_manifest
from edgemind.weights.reader import load_layer_arrays


class InMemoryModel:
    """A model held wholly in memory.

    >>> import tempfile
    >>> from edgemind.examples.toy import build_toy_model
    >>> model = InMemoryModel(build_toy_model(tempfile.mkdtemp() + "/toy"))
    >>> model.run(np.ones((2, 1024), np.float32)).shape
    (2, 10)
    """

    def __init__(self, model_dir: str | os.PathLike[str], manifest: Manifest | None = None):
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(model_dir)
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        for layer in self.manifest.layers:
            self.weights[layer.name] = load_layer_arrays(self.model_dir, layer)
            if layer.exit_head is not None:
                head = layer.exit_head
                self.weights[head.name] = load_layer_arrays(self.model_dir, head)

    def _params(self, spec: LayerSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
        params = dict(self.weights[spec.name])
        for name in gathered_tensors(spec):
            params[name] = params[name][ids.ravel()]
        return params

    def run(
        self, x: np.ndarray, *context: np.ndarray, level: int | None = None, numpy: bool = False
    ) -> np.ndarray:
        """The output at exit ``level`` (default: the final level)."""
        levels = dict(self.manifest.exit_levels())
        level = level or max(levels)
        if level not in levels:
            raise InputError(f"exit level {level} does not exist; levels are {sorted(levels)}")
        ctx = {s.name: a for s, a in zip(self.manifest.inputs[1:], context, strict=True)}
        ids = x
        act = x
        for spec in self.manifest.layers[: levels[level] + 1]:
            act = self._apply(spec, act, ctx, ids, numpy)
        head = self.manifest.layers[levels[level]].exit_head
        if head is not None:
            act = self._apply(head, act, ctx, ids, numpy)
        return np.asarray(act)

    def _apply(self, spec: LayerSpec, act, ctx, ids, numpy: bool):
        params = self._params(spec, ids)
        if numpy:
            return get_kind(spec.kind).reference(params, np.asarray(act), ctx, **spec.config)
        return jitted(spec.kind, spec.config)(params, act, ctx)
