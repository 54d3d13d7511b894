"""The exceptions edgemind raises: one root, a few specific kinds.

Every message says what failed, where (file, tensor, layer, step, key) and how to
fix it, on one line, so the CLI can print it as-is without a traceback.
"""

from __future__ import annotations


class EdgemindError(Exception):
    """Root of every error edgemind raises on purpose."""


class ModelFormatError(EdgemindError):
    """A model directory, manifest or weight file is missing, malformed or inconsistent."""


class ChecksumError(ModelFormatError):
    """A tensor payload does not match the checksum recorded for it."""


class PolicyError(EdgemindError):
    """A policy file, environment override or flag has an unknown key or a bad value."""


class InputError(EdgemindError):
    """A request's input does not match the model's input signature."""


class PlanError(EdgemindError):
    """A plan file is malformed, or was made for another model, policy or input."""


class ConversionError(EdgemindError):
    """A checkpoint cannot be converted (unknown architecture, missing tensor...)."""


class MetricsError(EdgemindError):
    """The metrics exporter cannot start (bad address, port taken...)."""


class MemoryQuotaExceeded(EdgemindError):
    """The request does not fit the arena capacity under the policy.

    Raised before any weight byte is read. ``needed_bytes`` is the smallest capacity
    that would be feasible under the same policy; ``capacity_bytes`` is what there is.
    """

    def __init__(self, message: str, *, needed_bytes: int = 0, capacity_bytes: int = 0):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.capacity_bytes = capacity_bytes
