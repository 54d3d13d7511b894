"""The original design's promise under forced memory pressure: no global OOM.

A scaled-down stress run (bench/stress.py's quick model, 200 MiB of weights) in child
processes under a real ``RLIMIT_AS`` of the warmed-up address space plus 128 MiB:
streaming completes with the right output, the all-in-memory path fails under the same
limit (so the limit is real), and rejection and early exit end with their exit codes.
"""

from __future__ import annotations

import sys

import pytest

from bench.stress import QUICK, stress

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS"),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    assert QUICK.budget_bytes < QUICK.model_bytes  # the model cannot fit under the limit
    return {r["scenario"]: r for r in stress(QUICK, root=tmp_path_factory.mktemp("stress"))}


def test_streaming_completes_under_the_limit_with_the_right_output(rows):
    row = rows["stream"]
    assert row["returncode"] == 0, row.get("stderr")
    assert row["complete"]
    assert row["rel_error"] < 1e-4
    assert row["limit_bytes"] - row["baseline_vm_bytes"] == QUICK.budget_bytes


def test_all_in_memory_fails_under_the_same_limit(rows):
    row = rows["in_memory"]
    assert row["returncode"] != 0
    assert row["returncode"] < 0 or row["outcome"].startswith("MemoryError")


@pytest.mark.parametrize(("scenario", "code"), [("reject", 4), ("early", 3)])
def test_rejection_and_early_exit_end_cleanly(rows, scenario, code):
    assert rows[scenario]["returncode"] == code, rows[scenario].get("stderr")
