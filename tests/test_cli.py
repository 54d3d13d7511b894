"""The CLI: exit codes, one-line errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemind.cli import EXIT_EARLY_EXIT, EXIT_ERROR, EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, main
from edgemind.units import MIB


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_help_and_usage(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == EXIT_OK and "inspect" in out and "plan" in out and "run" in out
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == EXIT_USAGE and "invalid choice" in err


def test_python_dash_m_entry_point(toy_model):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edgemind", "inspect", str(toy_model)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "toy-ffn-10" in proc.stdout


def test_inspect(capsys, toy_model):
    code, out, _ = run_cli(capsys, "inspect", toy_model, "--verify")
    assert code == EXIT_OK
    assert "L8" in out and "107.3 MiB" in out and "verified" in out
    code, out, _ = run_cli(capsys, "inspect", toy_model, "--json")
    data = json.loads(out)
    assert data["total_bytes"] == sum(
        t["nbytes"] for layer in data["layers"] for t in layer["tensors"]
    ) + sum(
        t["nbytes"]
        for layer in data["layers"]
        if "exit_head" in layer
        for t in layer["exit_head"]["tensors"]
    )
    assert [lv["level"] for lv in data["levels"]] == [1, 2, 3]


def test_plan_three_verdicts(capsys, toy_model):
    code, out, _ = run_cli(capsys, "plan", toy_model)
    assert code == EXIT_OK and "FEASIBLE" in out and "<- peak" in out
    code, out, _ = run_cli(capsys, "plan", toy_model, "--arena-mb", "24")
    assert code == EXIT_EARLY_EXIT and "EARLY EXIT at level 2 of 3" in out
    code, out, _ = run_cli(capsys, "plan", toy_model, "--arena-mb", "2", "--json")
    assert code == EXIT_INFEASIBLE
    plan = json.loads(out)
    assert plan["status"] == "infeasible" and plan["min_capacity_bytes"] > 2 * MIB
    assert plan["witness"]["missing_bytes"] > 0
    need = plan["min_capacity_bytes"]
    code, _, _ = run_cli(capsys, "plan", toy_model, "--arena-bytes", need)
    assert code == EXIT_OK
    code, _, _ = run_cli(
        capsys,
        "plan",
        toy_model,
        "--arena-bytes",
        need - plan["alignment_bytes"],
        "--on-quota",
        "reject_request",
    )
    assert code == EXIT_INFEASIBLE


def test_plan_json_carries_the_table(capsys, toy_model):
    code, out, _ = run_cli(capsys, "plan", toy_model, "--json", "--batch", "2")
    data = json.loads(out)
    assert code == EXIT_OK
    for key in (
        "steps",
        "buffers",
        "peak_bytes",
        "capacity_bytes",
        "lower_bound_bytes",
        "streamed_bytes",
        "verdict",
        "peak_step",
        "headroom_bytes",
    ):
        assert key in data
    assert data["input_shape"] == [2, 1024]
    assert all("live_bytes" not in s or s["live_bytes"] >= 0 for s in data["steps"])


def test_run_complete_early_and_rejected(capsys, toy_model, tmp_path):
    out_path = tmp_path / "y.npy"
    code, out, _ = run_cli(
        capsys, "run", toy_model, "--random-input", "--batch", "2", "--output", out_path
    )
    assert code == EXIT_OK and "complete" in out
    assert np.load(out_path).shape == (2, 10)
    code, out, _ = run_cli(capsys, "run", toy_model, "--random-input", "--arena-mb", "24", "--json")
    assert code == EXIT_EARLY_EXIT
    assert json.loads(out)["exit_level"] == 2
    code, _, err = run_cli(capsys, "run", toy_model, "--random-input", "--arena-mb", "2")
    assert code == EXIT_INFEASIBLE
    assert_one_line_error(err, "needs", "arena_capacity_mb")


def test_run_with_input_file_and_plan_file(capsys, toy_model, tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 1024)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    plan_path = tmp_path / "plan.msgpack"
    code, _, _ = run_cli(capsys, "plan", toy_model, "--batch", "4", "--out", plan_path)
    assert code == EXIT_OK and plan_path.exists()
    code, out, _ = run_cli(
        capsys,
        "run",
        toy_model,
        "--input",
        tmp_path / "x.npy",
        "--batch",
        "4",
        "--plan",
        plan_path,
        "--repeat",
        "2",
    )
    assert code == EXIT_OK, out
    # the same plan file against another policy is refused
    code, _, err = run_cli(
        capsys,
        "run",
        toy_model,
        "--input",
        tmp_path / "x.npy",
        "--batch",
        "4",
        "--plan",
        plan_path,
        "--arena-mb",
        "60",
    )
    assert code == EXIT_ERROR
    assert_one_line_error(err, "plan")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (("inspect", "{missing}"), ("model directory not found",)),
        (("plan", "{model}", "--policy", "{bad_policy}"), ("unknown key model.size",)),
        (("run", "{model}", "--input", "{missing}"), ("--input",)),
        (("run", "{model}", "--input", "{wrong_shape}"), ("expected shape",)),
        (("run", "{model}", "--input", "{not_zip}"), ("--input",)),
        (("plan", "{model}", "--out", "{tmp}"), ("--out", "writable")),
        (("run", "{model}", "--random-input", "--plan", "{garbage}"), ("plan",)),
    ],
)
def test_bad_input_is_one_line_exit_1(capsys, toy_model, tmp_path, argv, needles):
    (tmp_path / "bad.yaml").write_text("model:\n  size: 3\n")
    np.save(tmp_path / "wrong.npy", np.ones((1, 7), np.float32))
    (tmp_path / "garbage.msgpack").write_bytes(b"not a plan")
    (tmp_path / "not_zip.npz").write_bytes(b"PK\x03\x04 but not a zip archive")
    names = {
        "tmp": tmp_path,
        "not_zip": tmp_path / "not_zip.npz",
        "missing": tmp_path / "missing",
        "model": toy_model,
        "bad_policy": tmp_path / "bad.yaml",
        "wrong_shape": tmp_path / "wrong.npy",
        "garbage": tmp_path / "garbage.msgpack",
    }
    code, _, err = run_cli(capsys, *(a.format(**names) for a in argv))
    assert code == EXIT_ERROR
    assert_one_line_error(err, *needles)


def test_environment_capacity(capsys, toy_model, monkeypatch):
    monkeypatch.setenv("EDGE_MODEL_ARENA_MB", "24")
    code, _, _ = run_cli(capsys, "plan", toy_model)
    assert code == EXIT_EARLY_EXIT
    code, _, _ = run_cli(capsys, "plan", toy_model, "--arena-mb", "50")
    assert code == EXIT_OK
    monkeypatch.setenv("EDGE_MODEL_ARENA_MB", "fifty")
    code, _, err = run_cli(capsys, "plan", toy_model)
    assert code == EXIT_ERROR
    assert_one_line_error(err, "EDGE_MODEL_ARENA_MB")


def test_failed_run_writes_no_output(capsys, toy_model, tmp_path):
    model = shutil.copytree(toy_model, tmp_path / "toy")
    target = tmp_path / "y.npy"
    victim = sorted((model).rglob("*.msgpack"))[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    code, _, err = run_cli(capsys, "run", model, "--random-input", "--output", target)
    assert code == EXIT_ERROR
    assert_one_line_error(err)
    assert not target.exists()
    assert not list(tmp_path.glob(".y.npy*"))


@pytest.mark.parametrize(
    "argv",
    [
        ("plan", "{model}", "--arena-mb", "-3"),
        ("plan", "{model}", "--arena-bytes", "0"),
        ("run", "{model}", "--random-input", "--batch", "0"),
        ("run", "{model}", "--random-input", "--repeat", "0"),
        ("run", "{model}", "--random-input", "--linger", "-1"),
        ("run", "{model}", "--random-input", "--keep-resident", "0"),
        ("run", "{model}"),  # no input source
        ("run", "{model}", "--random-input", "--input", "x.npy"),
    ],
)
def test_bad_usage_exits_2(capsys, toy_model, argv):
    code, out, err = run_cli(capsys, *(a.format(model=toy_model) for a in argv))
    assert code == EXIT_USAGE
    assert "--help" in err and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1, err


def test_inspect_verify_fails_on_a_corrupted_payload(capsys, toy_model, tmp_path):
    model = shutil.copytree(toy_model, tmp_path / "toy")
    victim = model / "layers" / "02_L2.msgpack"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "inspect", model, "--verify")
    assert code == EXIT_ERROR and "verified" not in out
    assert "L2" in err and "Traceback" not in err


@pytest.mark.parametrize("on_quota", ["early_exit", "reject_request"])
def test_json_on_a_rejected_run_is_one_object(capsys, toy_model, on_quota):
    code, out, err = run_cli(
        capsys, "run", toy_model, "--random-input", "--arena-mb", "2", "--json",
        "--on-quota", on_quota,
    )  # fmt: skip
    assert code == EXIT_INFEASIBLE
    data = json.loads(out)
    assert data["verdict"] == "rejected" and data["status"] == "infeasible"
    assert data["capacity_bytes"] == 2 * MIB and data["min_capacity_bytes"] > 2 * MIB
    assert data["peak_bytes"] > 2 * MIB and data["witness"]["missing_bytes"] > 0
    assert data["message"] in err  # stderr keeps its one line
    assert_one_line_error(err, "rejected")


def test_json_on_an_infeasible_plan_carries_the_message(capsys, toy_model):
    code, out, _ = run_cli(capsys, "plan", toy_model, "--arena-mb", "2", "--json")
    assert code == EXIT_INFEASIBLE
    data = json.loads(out)
    assert data["status"] == "infeasible" and "raise model.arena_capacity_mb" in data["message"]
    assert {"capacity_bytes", "min_capacity_bytes", "peak_bytes", "witness"} <= set(data)


@pytest.mark.parametrize("size", ["24", "24MB", "24MiB", "24 mib", "0.0234375GiB"])
def test_arena_mb_takes_a_size_with_or_without_a_unit(capsys, toy_model, size):
    code, out, _ = run_cli(capsys, "plan", toy_model, "--arena-mb", size, "--json")
    assert code == EXIT_EARLY_EXIT and json.loads(out)["capacity_bytes"] == 24 * MIB


def test_repeat_reports_latency_over_all_requests(capsys, toy_model, tmp_path):
    code, out, _ = run_cli(capsys, "run", toy_model, "--random-input", "--repeat", "3")
    assert code == EXIT_OK
    assert "latency over 3 requests: mean " in out and ", p50 " in out and ", p95 " in out
    code, out, _ = run_cli(capsys, "run", toy_model, "--random-input", "--repeat", "3", "--json")
    repeat = json.loads(out)["repeat"]
    assert repeat["requests"] == 3
    assert 0 < repeat["latency_p50_ms"] <= repeat["latency_p95_ms"]


def test_written_files_are_said(capsys, toy_model, tmp_path):
    y, png = tmp_path / "y.npy", tmp_path / "t.png"
    argv = ("run", toy_model, "--random-input", "--output", y, "--plot", png)
    code, out, _ = run_cli(capsys, *argv)
    assert (
        code == EXIT_OK and f"output written to {y}" in out and f"timeline written to {png}" in out
    )
    code, out, _ = run_cli(capsys, *argv, "--json")
    data = json.loads(out)
    assert data["output_path"] == str(y) and data["plot_path"] == str(png)
    code, out, _ = run_cli(capsys, "plan", toy_model, "--plot", png)
    assert f"timeline written to {png}" in out
