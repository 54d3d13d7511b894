"""Files a user names: read only when regular and up to a bound, written atomically.

A FIFO named where a file is expected blocks a read forever, a device such as
``/dev/zero`` never ends, and a huge file exhausts memory. Every file edgemind reads
because a user named it (manifest, policy, plan, inputs, texts, weight files) is
opened here: without blocking, checked to be a regular file, and read up to a limit.
Every file edgemind writes for a user (outputs, plots, metrics textfiles) goes through
:func:`atomic_write`: whole or not at all, fsynced, with the mode the umask gives.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from edgemind.errors import EdgemindError
from edgemind.units import format_bytes

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _not_regular(mode: int) -> OSError | None:
    if stat.S_ISREG(mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
    return OSError(0, f"{kind}, not a regular file")


def open_regular(path: str | os.PathLike[str]) -> io.FileIO:
    """Open ``path`` for reading if it is a regular file; an ``OSError`` otherwise.

    The error's ``strerror`` says what the path is ("a FIFO, not a regular file"), so
    callers' existing ``({exc.strerror})`` messages read well. The path is checked with
    ``stat`` before opening and the open file with ``fstat`` after (a FIFO opened
    ``O_NONBLOCK`` does not wait for a writer), so a swap in between is caught too.

    >>> open_regular("/dev/null")
    Traceback (most recent call last):
    ...
    OSError: [Errno 0] a character device, not a regular file
    """
    error = _not_regular(os.stat(path).st_mode)
    if error is not None:
        raise error
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        error = _not_regular(os.fstat(fd).st_mode)
        if error is not None:
            raise error
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return io.FileIO(fd, "r", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_bounded(
    path: str | os.PathLike[str],
    limit_bytes: int,
    *,
    what: str,
    error: type[EdgemindError],
    where: str | None = None,
) -> bytes:
    """The bytes of regular file ``path``, refusing one longer than ``limit_bytes``.

    Raises ``error`` (an :class:`EdgemindError` subclass) with a one-line message that
    starts with ``where`` (default: the path) and names ``what`` the file is for.
    """
    path_text = str(path) if where is None else where
    try:
        with open_regular(path) as f:
            data = f.read(limit_bytes + 1) or b""
    except OSError as exc:
        raise error(f"{path_text}: cannot read {what} ({exc.strerror})") from None
    if len(data) > limit_bytes:
        raise error(
            f"{path_text}: {what} is larger than the {format_bytes(limit_bytes)} edgemind reads; "
            "check that the path names the right file"
        )
    return data


def _umask() -> int:
    umask = os.umask(0)  # the only portable way to read it: set it and put it back
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask.

    ``mkstemp`` creates files 0600; outputs renamed into place from one get this mode
    instead, so they are as readable as any other file the user writes.
    """
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory (``mkdtemp`` gives 0700)."""
    return 0o777 & ~_umask()


def check_writable(path: str | os.PathLike[str], *, flag: str, error: type[EdgemindError]) -> None:
    """Fail now, before any work, when ``path`` cannot become a file written there.

    The parent directory must exist and be writable and ``path`` must not be a
    directory; an existing file is replaced (by rename), so its own mode does not matter.
    """
    target = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise error(f"{flag} {target}: is a directory; give a writable file path")
    if not os.path.isdir(parent):
        raise error(f"{flag} {target}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {target}: directory {parent} is not writable; choose another path")


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    flag: str,
    error: type[EdgemindError],
) -> Path:
    """Write a file whole or not at all: ``write(f)`` fills a temporary file beside
    ``path``, which is flushed, fsynced, given the umask's mode and renamed into place.

    Readers see the old file or the new one, never a part; a failure (disk full, file
    size limit, permission) removes the temporary file and raises ``error`` in one line
    that starts with ``flag`` (the option or role naming the file).

    >>> import tempfile
    >>> out = atomic_write(tempfile.mkdtemp() + "/a.txt", lambda f: f.write(b"hi"),
    ...                    flag="--out", error=EdgemindError)
    >>> out.read_bytes()
    b'hi'
    """
    target = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), new_file_mode())
        os.replace(tmp, target)
        tmp = None
        fsync_dir(target.parent)
    except OSError as exc:
        raise error(f"{flag} {target}: cannot write ({write_failure(exc)})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def write_failure(exc: OSError) -> str:
    """Why a write failed and what to do, for a message: ``"no space left on device; ..."``."""
    hints = {
        errno.ENOSPC: "no space left on the device; free some or write elsewhere",
        errno.EDQUOT: "disk quota exceeded; free some or write elsewhere",
        errno.EFBIG: "file larger than the process's file size limit; raise `ulimit -f`",
        errno.EACCES: "permission denied; choose a writable directory",
        errno.EPERM: "operation not permitted; choose a writable directory",
        errno.EROFS: "read-only file system; choose a writable directory",
    }
    return hints.get(exc.errno or 0, exc.strerror or str(exc))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
