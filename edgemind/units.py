"""Byte sizes: parsing human input, printing human output, rounding to alignment.

Inside edgemind every size is an int of bytes. "MB" always means MiB (2**20 bytes),
as in the original EdgeMind design; human-readable sizes appear only at the edges.
"""

from __future__ import annotations

import math
import re

from edgemind.errors import brief

MIB = 1 << 20
KIB = 1 << 10
GIB = 1 << 30
DIRECT_IO_BLOCK = 4096  # O_DIRECT reads want block-aligned addresses, offsets and lengths
# Bounds that keep sizes finite and inside what NumPy and XLA index without overflow
# (XLA aborts the process on an extent product past int64): checked at every boundary.
MAX_ARRAY_BYTES = 1 << 40  # one request's input array, 1 TiB
MAX_CAPACITY_BYTES = 1 << 50  # an arena capacity, 1 PiB (plans for any machine; runs check RAM)

_UNITS = {"": MIB, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB}
_UNITS.update({"g": GIB, "gb": GIB, "gib": GIB})
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def align_up(nbytes: int, alignment: int) -> int:
    """Round ``nbytes`` up to a multiple of ``alignment``.

    >>> align_up(65, 64)
    128
    """
    return -(-nbytes // alignment) * alignment


def mib_to_bytes(mib: float) -> int:
    """Convert a capacity in MiB (decimals allowed) to whole bytes, rounding down."""
    if isinstance(mib, bool) or not isinstance(mib, (int, float)) or not math.isfinite(mib):
        raise ValueError(f"expected a number of MiB, got {brief(mib)}")
    if mib <= 0:
        raise ValueError(f"expected a positive number of MiB, got {brief(mib)}")
    if mib > MAX_CAPACITY_BYTES // MIB:
        raise ValueError(
            f"expected at most {MAX_CAPACITY_BYTES // MIB} MiB (1 PiB), got {brief(mib)}"
        )
    return int(mib * MIB)


def parse_size(text: str, default_unit: str = "MiB") -> int:
    """Parse ``"50"``, ``"50MB"``, ``"1.5 GiB"`` or ``"4096b"`` into bytes.

    A bare number is in ``default_unit``. MB means MiB.

    >>> parse_size("50MB")
    52428800
    """
    match = _SIZE_RE.match(str(text))
    unit = (match.group(2) if match else "") or default_unit
    if match is None or unit.lower() not in _UNITS:
        raise ValueError(f"expected a size such as 50, 50MB or 1.5GiB, got {brief(text)}")
    value = float(match.group(1)) * _UNITS[unit.lower()]
    if not value <= MAX_CAPACITY_BYTES:  # also inf
        raise ValueError(f"expected a size of at most 1 PiB, got {brief(text)}")
    nbytes = int(value)
    if nbytes <= 0:
        raise ValueError(f"expected a positive size, got {brief(text)}")
    return nbytes


def format_bytes(nbytes: int) -> str:
    """Human-readable size, binary units: ``format_bytes(52428800) == '50.0 MiB'``."""
    sign = "-" if nbytes < 0 else ""
    n = abs(nbytes)
    if n < KIB:
        return f"{sign}{n} B"
    if n < MIB:
        return f"{sign}{n / KIB:.1f} KiB"
    if n < GIB:
        return f"{sign}{n / MIB:.1f} MiB"
    return f"{sign}{n / GIB:.2f} GiB"
