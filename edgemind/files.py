"""Files a user names: opened only when they are regular files, read only up to a bound.

A FIFO named where a file is expected blocks a read forever, a device such as
``/dev/zero`` never ends, and a huge file exhausts memory. Every file edgemind reads
because a user named it (manifest, policy, plan, inputs, texts, weight files) is
opened here: without blocking, checked to be a regular file, and read up to a limit.
"""

from __future__ import annotations

import io
import os
import stat

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
