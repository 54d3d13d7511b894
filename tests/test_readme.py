"""The README's "Using it" commands run as written, in a fresh folder, with the exit
codes their comments promise."""

from __future__ import annotations

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
