"""The README's "Using it" commands run as written, in a fresh folder, with the exit
codes their comments promise."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edgemind.cli import main
from edgemind.examples import toy

README = Path(__file__).resolve().parent.parent / "README.md"


def using_it_commands() -> list[str]:
    """The ``$ ...`` lines of the first console block under "## Using it"."""
    text = README.read_text()
    section = text.split("## Using it", 1)[1]
    block = re.search(r"```console\n(.*?)```", section, re.S)
    assert block is not None, "README: no console block under 'Using it'"
    return [line[2:] for line in block.group(1).splitlines() if line.startswith("$ ")]


def expected_exit(comment: str) -> int:
    found = re.search(r"exit(?: code)? (\d)", comment)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
def test_every_using_it_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = using_it_commands()
    assert len(commands) >= 8
    for line in commands:
        command, _, comment = line.partition("  #")
        argv = shlex.split(command)
        want = expected_exit(comment)
        if argv[:3] == ["python", "-m", "edgemind.examples.toy"]:
            code = toy.main(argv[3:])
        elif argv[:2] == ["python", "-c"]:
            code = subprocess.run([sys.executable, "-c", argv[2]], check=False).returncode
        else:
            assert argv[0] == "edgemind", line
            code = main(argv[1:])
        err = capsys.readouterr().err
        assert code == want, f"{line!r} exited {code}, the README says {want}: {err}"
    assert (tmp_path / "y.npy").is_file() and (tmp_path / "plan.msgpack").is_file()


def console_blocks() -> list[list[str]]:
    """Every console block's ``$ ...`` lines, in README order."""
    blocks = re.findall(r"```console\n(.*?)```", README.read_text(), re.S)
    return [[line[2:] for line in b.splitlines() if line.startswith("$ ")] for b in blocks]


@pytest.mark.slow
def test_every_readme_command_runs_as_written_in_a_shell(tmp_path):
    """Each line through bash as a user types it (command substitution included), with the
    project's venv first on PATH; `make` lines are the Makefile's, run by CI itself."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = 0
    for block in console_blocks():
        for line in block:
            command, _, comment = line.partition("  #")
            if command.startswith("make "):
                continue
            proc = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=600, check=False,
            )  # fmt: skip
            want = expected_exit(comment)
            assert proc.returncode == want, f"{command!r}: exit {proc.returncode}: {proc.stderr}"
            ran += 1
    assert ran >= 15
    assert (tmp_path / "models" / "gemma3-270m" / "manifest.json").is_file()
