"""What the CLI checks before any work: ignored flags, output paths, the plot extra.

(Checkpoints given as MODEL_DIR are tested in test_convert.py, beside the checkpoints.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemind.cli import EXIT_ERROR, EXIT_USAGE, main


def one_line(capsys: pytest.CaptureFixture[str], argv: list, code: int) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--batch", "2"], "--batch"),
        (["--batch", "1"], "--batch"),  # given, even at the default: refused, not ignored
        (["--seq", "16"], "--seq"),
        (["--seed", "3"], "--seed"),
    ],
)
@pytest.mark.parametrize("source", [["--text", "hi"], ["--text-file", "t.txt"]])
def test_flags_the_texts_make_moot_are_refused(source, extra, flag, toy_model, capsys):
    line = one_line(capsys, ["run", toy_model, *source, *extra], EXIT_USAGE)
    assert f"{flag} does not apply to --text/--text-file" in line and "drop it" in line


def test_seed_goes_with_random_input_only(toy_model, tmp_path, capsys):
    line = one_line(capsys, ["run", toy_model, "--input", tmp_path / "x.npy", "--seed", "1"], 2)
    assert "--seed applies to --random-input only" in line


@pytest.fixture
def no_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is opened: the checks must come first."""
    from edgemind.runtime import Runtime

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was opened before the output paths were checked")

    monkeypatch.setattr(Runtime, "open", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "{m}", "--random-input", "--output", "{d}/no/y.npy"], "--output {d}/no/y.npy:"),
        (["run", "{m}", "--random-input", "--plot", "{d}/no/t.png"], "does not exist"),
        (["run", "{m}", "--random-input", "--plot", "{d}/t.xyz"], "unknown image format 'xyz'"),
        (["run", "{m}", "--random-input", "--output", "{d}"], "is a directory"),
        (["plan", "{m}", "--out", "{d}/no/p.msgpack"], "--out {d}/no/p.msgpack:"),
        (["plan", "{m}", "--plot", "{d}/no/p.png"], "--plot {d}/no/p.png:"),
    ],
)
def test_bad_output_paths_fail_before_the_model_is_opened(
    argv, message, toy_model, tmp_path, capsys, no_runtime
):
    names = {"m": toy_model, "d": tmp_path}
    line = one_line(capsys, [a.format(**names) for a in argv], EXIT_ERROR)
    assert message.format(**names) in line


def test_a_read_only_directory_is_refused_before_the_run(toy_model, tmp_path, capsys, no_runtime):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    tmp_path.chmod(0o555)
    try:
        line = one_line(capsys, ["plan", toy_model, "--out", tmp_path / "p.msgpack"], 1)
    finally:
        tmp_path.chmod(0o755)
    assert "is not writable" in line


def test_plot_without_matplotlib_fails_before_the_run(
    toy_model: Path, tmp_path: Path, capsys, monkeypatch, no_runtime
):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = one_line(capsys, ["plan", toy_model, "--plot", tmp_path / "p.png"], EXIT_ERROR)
    assert "pip install 'edgemind-runtime[viz]'" in line


def test_batch_must_agree_with_the_input_file(toy_model, tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "x.npy", np.ones((2, 1024), np.float32))
    line = one_line(capsys, ["run", toy_model, "--input", tmp_path / "x.npy", "--batch", "4"], 1)
    assert "--batch 4 disagrees with --input" in line and "whose batch is 2" in line
    assert main(["run", str(toy_model), "--input", str(tmp_path / "x.npy"), "--batch", "2"]) == 0
