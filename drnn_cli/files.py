"""Opening user-named input files: only regular files, with one-line errors that say what is wrong.

A FIFO, ``/dev/zero`` or a directory given where a file is expected would block, grow without end or
fail with an unrelated message; they are refused by what they are before a byte is read.
"""

from __future__ import annotations

import stat
from pathlib import Path

from drnn_cli.errors import DrnnError


def require_regular_file(path: Path, what: str, fix: str) -> int:
    """``path``'s size if it is a readable regular file; otherwise a DrnnError naming what it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DrnnError(f"{what} {path} does not exist; {fix}") from None
    except OSError as exc:
        raise DrnnError(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DrnnError(f"{what} {path} is a directory, not a file; {fix}")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or special file"
        raise DrnnError(f"{what} {path} is {kind}, not a regular file; {fix}")
    return info.st_size
