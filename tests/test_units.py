"""Sizes: parsing at the edges, printing at the edges, alignment."""

from __future__ import annotations

import pytest

from edgemind.units import MIB, align_up, format_bytes, mib_to_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("50", 50 * MIB),
        ("50MB", 50 * MIB),
        ("1.5 GiB", 3 * 512 * MIB),
        ("4096b", 4096),
        ("2k", 2048),
        ("0.5", MIB // 2),
    ],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "abc", "-3", "0", "5 parsecs"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_mb_means_mib():
    assert mib_to_bytes(1) == 1 << 20
    assert mib_to_bytes(0.5) == 1 << 19
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError):
            mib_to_bytes(bad)


def test_format_and_align():
    assert format_bytes(50 * MIB) == "50.0 MiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(-2048) == "-2.0 KiB"
    assert [align_up(n, 64) for n in (0, 1, 64, 65)] == [0, 64, 64, 128]
