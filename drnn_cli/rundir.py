"""Which directories ``drnn train`` may write into, and replacing a run only once its successor exists.

A run directory is new, empty, or one drnn made (it holds the ``.drnn-run`` marker, or a checkpoint
of a run made before the marker existed). Anything else, such as the current directory, ``/``, the
home directory or a folder of the user's own files named by ``--run ""`` or a typo, is refused: drnn
writes ``config.yaml``, ``vocab.json`` and ``metrics.jsonl`` and would replace files of those names.

``--overwrite`` trains into a staging directory beside the old run and swaps it in only when the new
run has a checkpoint, so a failed or interrupted-before-any-checkpoint replacement leaves the old run
as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from drnn_cli.checkpoint import BEST, LAST, LOCK_NAME, TEMPORARY_SUFFIX, atomic_write_text
from drnn_cli.errors import DrnnError

RUN_MARKER = ".drnn-run"


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a trained run (a checkpoint) that a new run would replace."""
    return (run_dir / LAST).is_file() or (run_dir / BEST).is_file()


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``--run`` drnn must not write into, before anything is written."""
    fix = "pass --run with a new or empty directory, e.g. --run runs/NAME"
    if str(run_dir) in {"", "."}:
        raise DrnnError(f"--run is empty or '.' (the current directory); {fix}")
    try:
        resolved = run_dir.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DrnnError(f"run directory {run_dir} cannot be resolved ({exc}); {fix}") from None
    if resolved == Path(resolved.anchor):
        raise DrnnError(f"run directory {run_dir} is the filesystem root; {fix}")
    for name, place in (("your home directory", Path.home()), ("the current directory", Path.cwd())):
        with contextlib.suppress(OSError, RuntimeError):
            if resolved == place.resolve():
                raise DrnnError(f"run directory {run_dir} is {name}; {fix}")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise DrnnError(f"run directory {run_dir} lies under {parent}, which is a file; {fix}")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise DrnnError(f"run directory {run_dir} is a file, not a directory; {fix}")
    try:
        entries = sorted(entry.name for entry in run_dir.iterdir() if not _is_bookkeeping(entry.name))
    except OSError as exc:
        raise DrnnError(f"cannot read run directory {run_dir}: {exc.strerror}; {fix}") from None
    if entries and RUN_MARKER not in entries and not holds_run(run_dir):
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise DrnnError(
            f"{run_dir} is not a drnn run directory and holds files drnn did not write ({shown}); "
            f"drnn would overwrite config.yaml, vocab.json and metrics.jsonl there; {fix}"
        )


def _is_bookkeeping(name: str) -> bool:
    """The lock and a killed writer's temporary file: drnn's, but present before a run's files."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX))


def mark_run_dir(run_dir: Path) -> None:
    """Claim ``run_dir`` as drnn's, so later runs may write into it again."""
    atomic_write_text(run_dir / RUN_MARKER, "a drnn run directory; drnn may replace its files\n")


def staging_dir(run_dir: Path) -> Path:
    """Where ``--overwrite`` builds the new run: beside the old one, on the same filesystem."""
    return run_dir.parent / f".{run_dir.name}.overwrite"


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def swap_in(staging: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by ``staging``: two renames; the old run is deleted only after both."""
    retired = run_dir.parent / f".{run_dir.name}.replaced-{os.getpid()}"
    try:
        os.replace(run_dir, retired)
    except OSError as exc:
        raise DrnnError(
            f"cannot put the new run in place of {run_dir} ({exc.strerror}); the new run is in {staging}"
        ) from None
    try:
        os.replace(staging, run_dir)
    except OSError as exc:
        os.replace(retired, run_dir)  # put the old run back where it was
        raise DrnnError(
            f"cannot put the new run in place of {run_dir} ({exc.strerror}); the new run is in {staging}"
        ) from None
    discard(retired)
