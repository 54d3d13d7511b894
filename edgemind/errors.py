"""The exceptions edgemind raises: one root, a few specific kinds.

Every message says what failed, where (file, tensor, layer, step, key) and how to
fix it, on one line, so the CLI can print it as-is without a traceback.
"""

from __future__ import annotations

import reprlib


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


class MissingExtraError(EdgemindError):
    """An optional dependency is not installed; the message names the extra to install."""


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


class MemoryBoundExceeded(MemoryQuotaExceeded):
    """A running request needed more memory than its plan's bound allows.

    Raised when an allocation fails while a unit runs (XLA's ``RESOURCE_EXHAUSTED``, a
    library kernel's workspace, the arena itself: the process's memory limit is below
    its baseline + the plan's peak), or when ``model.enforce: fail`` finds the observed
    peak above the plan's peak + the allowance. Everything the request held is released;
    the runtime serves the next request.
    """


class MemoryBoundWarning(UserWarning):
    """``model.enforce: warn`` found a request's observed peak above its plan + allowance."""


def brief(value: object, limit: int = 80) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, for quoting user input.

    Values from a hostile file can be huge or deeply nested (a YAML alias bomb expands
    to millions of items), so the repr is built with bounded depth and breadth, never
    whole.

    >>> brief("x" * 100, 12)
    "'xxx...xxxx'"
    >>> brief([[[[[1]]]]]), brief(list(range(100)))
    ('[[[[...]]]]', '[0, 1, 2, 3, 4, 5, ...]')
    """
    short = reprlib.Repr()
    short.maxlevel, short.maxlong = 3, 40
    short.maxtuple = short.maxlist = short.maxdict = short.maxset = 6
    short.maxstring = short.maxother = limit
    text = short.repr(value).replace("\n", " ")
    if len(text) > limit:
        quote = text[0] if text[:1] in "'\"" else ""
        text = text[: max(limit - 3 - len(quote), 1)] + "..." + quote
    return text
