"""edgemind.files: the atomic-write helper (whole or nothing, umask mode) and path checks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edgemind.errors import EdgemindError, PlanError
from edgemind.files import atomic_write, check_writable, new_file_mode


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_written_file_gets_the_umask_mode_not_mkstemps(tmp_path: Path, umask_027) -> None:
    out = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"), flag="--out", error=PlanError)
    assert out.read_bytes() == b"x"
    assert out.stat().st_mode & 0o777 == 0o640 == new_file_mode()


@pytest.mark.parametrize(
    ("code", "hint"), [(errno.ENOSPC, "no space left"), (errno.EFBIG, "ulimit -f")]
)
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, code: int, hint: str
) -> None:
    target = tmp_path / "y.npy"
    target.write_bytes(b"old")

    def fail(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(code, os.strerror(code))

    with pytest.raises(EdgemindError, match=rf"^--output {target}: cannot write \(.*{hint}"):
        atomic_write(target, fail, flag="--output", error=EdgemindError)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["y.npy"]


def test_an_error_that_is_not_oserror_removes_the_temporary_too(tmp_path: Path) -> None:
    def fail(f: object) -> None:
        raise ValueError("bad format")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "p.png", fail, flag="--plot", error=EdgemindError)
    assert os.listdir(tmp_path) == []


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "new.npy", flag="--output", error=EdgemindError)
    with pytest.raises(EdgemindError, match="is a directory"):
        check_writable(tmp_path, flag="--output", error=EdgemindError)
    with pytest.raises(EdgemindError, match="does not exist; create it first"):
        check_writable(tmp_path / "no" / "x", flag="--output", error=EdgemindError)


def test_cli_outputs_get_the_umask_mode(toy_model: Path, tmp_path: Path, umask_027) -> None:
    from edgemind.cli import main

    plan, out = tmp_path / "p.msgpack", tmp_path / "y.npy"
    assert main(["plan", str(toy_model), "--out", str(plan)]) == 0
    assert main(["run", str(toy_model), "--random-input", "--output", str(out)]) == 0
    assert plan.stat().st_mode & 0o777 == out.stat().st_mode & 0o777 == 0o640
