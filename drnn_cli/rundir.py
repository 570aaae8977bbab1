"""Run directories: where a run lives, which checkpoint stands for it, the latest run, its lock.

Layout (the file names are defined in run_files.py)::

    runs/<name>/
      config.yaml        resolved config of the run
      vocab.json         the vocabulary
      last.safetensors   the newest consistent state (resumable)
      best.safetensors   the best validation perplexity so far (only with a validation split)
      metrics.jsonl      one JSON line per epoch end, evaluation or log line
      perplexity.png     train/validation perplexity against tokens seen
      init_from.txt      the checkpoint a fine-tuned run started from
      stopped.json       why the last training session ended, and at which step
      tensorboard/       event files (train.tensorboard: true)
      kept/              train.keep_every's checkpoints: epoch-0005.safetensors, step-00001200.safetensors
      .drnn-run          marks the directory as drnn's
      train.lock         the OS file lock of the training process that owns the directory
    runs/latest          the path of the most recently started run

``runs/`` is the ``runs_root`` argument of the functions below (relative to the working directory
at call time), never a module global.

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
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock

from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.files import TEMPORARY_SUFFIX, atomic_write_text, require_regular_file
from drnn_cli.run_files import (
    BEST,
    LAST,
    LATEST_MARKER,
    LOCK_NAME,
    RUN_ENTRY_NAMES,
    RUN_MARKER,
    RunFiles,
    is_kept_name,
    is_tensorboard_name,
    sibling_name,
    staging_dir,
)
from drnn_cli.signals import signals_ignored

DEFAULT_RUNS_ROOT = Path("runs")  # relative: resolved against the working directory when used
LOCK_PATIENCE_SECONDS = 0.25  # how long a training waits for a run's lock before it is refused
LOCK_OWNER_BYTES = 512  # what is read of a lock file's "HOST PID" line (a host name is at most 255 bytes)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a trained run (a checkpoint) that a new run would replace: a checkpoint's
    name is there, even as something a checkpoint cannot be (a folder, a pipe, a dangling link), which
    the command that reads it names, rather than a run that seems never to have been."""
    return any(os.path.lexists(run_dir / name) for name in (LAST, BEST))


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``--run`` drnn must not write into, before anything is written."""
    fix = "pass --run with a new or empty directory, e.g. --run runs/NAME"
    if str(run_dir) in {"", "."}:
        raise DrnnError(f"--run is empty or '.' (the current directory); {fix}")
    if any(ord(char) < 32 or ord(char) == 127 for char in str(run_dir)):
        raise DrnnError(f"run directory {str(run_dir)!r} holds a control character (a newline?); {fix}")
    try:  # a byte the file system's encoding cannot read arrives as a lone surrogate (PEP 383)
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(run_dir).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise DrnnError(
            f"run directory {shown} is not valid UTF-8 (runs/latest records it as text); {fix}"
        ) from None
    try:
        resolved = run_dir.resolve()
        if run_dir.is_symlink():
            os.stat(run_dir)  # a loop (Python 3.13's resolve() no longer raises for one), or dangling
    except FileNotFoundError:
        raise DrnnError(
            f"run directory {run_dir} is a symlink to {os.readlink(run_dir)}, which does not exist; "
            f"create that directory, or {fix}"
        ) from None
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
    for parent in resolved.parents:  # a run in another's folder: its --overwrite deletes the inner one
        if os.path.exists(parent / RUN_MARKER):  # (red41: made in kept/, which drnn runs never showed)
            raise DrnnError(
                f"run directory {run_dir} is inside the run {_as_given(parent, run_dir)}; choose a --run "
                "outside it"
            )
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise DrnnError(f"run directory {run_dir} is a file, not a directory; {fix}")
    try:
        entries = sorted(entry.name for entry in run_dir.iterdir() if not _is_bookkeeping(entry.name))
    except OSError as exc:
        raise DrnnError(f"cannot read run directory {run_dir}: {exc.strerror}; {fix}") from None
    if entries and RUN_MARKER not in entries and not holds_run(run_dir):
        shown = _first_names(entries)
        raise DrnnError(
            f"{run_dir} is not a drnn run directory and holds files drnn did not write ({shown}); "
            f"drnn would overwrite config.yaml, vocab.json and metrics.jsonl there; {fix}"
        )


def _as_given(folder: Path, given: Path) -> Path:
    """``folder`` (a resolved path) as the user would write it beside ``given``: relative to the current
    directory where ``given`` is relative and ``folder`` is below that directory, else absolute."""
    with contextlib.suppress(OSError, ValueError):
        if not given.is_absolute():
            return folder.relative_to(Path.cwd().resolve())
    return folder


def refuse_run_file(path: Path, flag: str, example: str) -> None:
    """Refuse an output named like a file drnn keeps in a run directory, inside one: ``--html
    runs/x/last.safetensors`` (a tab completion away from a page's name) would replace the state
    ``--resume`` continues, ``metrics.jsonl`` the run's history; any name in its ``kept/`` folder a
    ``train.keep_every`` checkpoint. ``example``: a name the refusal proposes (``inspect.html``)."""
    folder = path.parent
    in_kept = folder.name == RunFiles(folder.parent).kept.name  # train.keep_every's folder is drnn's alone
    if in_kept:
        folder = folder.parent
    named = in_kept or path.name in RUN_ENTRY_NAMES
    if named and ((folder / RUN_MARKER).exists() or holds_run(folder)):
        # a name in kept/ is refused whether or not such a file is there yet (inspect40: "is a file of
        # the run directory" of a page not written, and a name beside kept/ accepted)
        where = (
            f"is in {path.parent}, the folder of the run's kept checkpoints (train.keep_every), which drnn "
            "keeps to them alone"
            if in_kept
            else f"is a file of the run directory {folder} (drnn's checkpoints, config and history live there)"
        )
        raise DrnnError(f"{flag} {path} {where}; give {flag} a name of its own, e.g. {folder / example}")


def check_replaceable(run_dir: Path) -> None:
    """Refuse to replace (``--overwrite``) a run directory that also holds files drnn did not write:
    the replacement deletes the old directory whole, and a user's notes, analyses, backups or corpus
    kept there would go with it. Inside ``kept/`` and ``tensorboard/`` only drnn's own names are
    drnn's (red41: a backup in kept/, a whole run made there, went without a word); a folder in them
    never is, nor either of them as something other than a folder."""
    try:
        names = sorted(name for name in os.listdir(run_dir) if not _is_bookkeeping(name))
    except OSError as exc:
        raise DrnnError(f"cannot read run directory {run_dir}: {exc.strerror}") from None
    foreign = [name for name in names if name not in RUN_ENTRY_NAMES]
    files = RunFiles(run_dir)
    for folder, drnns in ((files.kept, is_kept_name), (files.tensorboard, is_tensorboard_name)):
        if folder.name in names:
            foreign += _foreign_inside(folder, drnns)
    if foreign:
        shown = _first_names(sorted(foreign))
        raise DrnnError(
            f"--overwrite would delete files drnn did not write in {run_dir} ({shown}); move them out of it, "
            "or train into another directory with --run DIR"
        )


def _foreign_inside(folder: Path, drnns: Callable[[str], bool]) -> list[str]:
    """What in the run's ``folder`` (``kept``, ``tensorboard``) drnn did not write, named from the run
    directory (``kept/NOTES.txt``): every entry whose name ``drnns`` refuses, and every folder."""
    if folder.is_symlink() or not folder.is_dir():  # drnn makes a folder there, never a file or a link
        return [folder.name]
    if os.path.exists(folder / RUN_MARKER):  # another run, made in this one's folder (False where unreadable)
        return [f"{folder.name}: a run of its own"]
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DrnnError(f"cannot read {folder}: {exc.strerror}") from None
    foreign = []
    for entry in entries:
        with contextlib.suppress(OSError):
            if _is_bookkeeping(entry.name) or (drnns(entry.name) and not entry.is_dir(follow_symlinks=False)):
                continue
        foreign.append(f"{folder.name}/{entry.name}")
    return foreign


def _first_names(names: list[str], shown: int = 5) -> str:
    """A message's list of a directory's entries: the first few, and an ellipsis for the rest."""
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")


def _is_bookkeeping(name: str) -> bool:
    """The lock and a killed writer's temporary file: drnn's, but present before a run's files."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX))


def mark_run_dir(run_dir: Path) -> None:
    """Claim ``run_dir`` as drnn's, so later runs may write into it again."""
    atomic_write_text(run_dir / RUN_MARKER, "a drnn run directory; drnn may replace its files\n")


def waiting_replacement_note(run_dir: Path, reader: str = "this command reads") -> str | None:
    """Said by predict, eval, inspect and ``--init-from`` (``reader``) of a run beside which a killed
    ``--overwrite`` left its newer run: they read the older one, which the next ``drnn train --resume``
    replaces."""
    target = run_dir.resolve() if run_dir.is_symlink() else run_dir
    staging = staging_dir(target)
    if not holds_run(staging):
        return None
    return (
        f"{staging} holds a newer run than this one, from a --overwrite session that was killed or is still "
        f"training: {reader} the older run; once no session trains it, drnn train with that session's "
        "settings and --resume puts the newer one in place"
    )


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def swap_in(staging: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by ``staging``: two renames; the old run is deleted only after both. It ends a
    session whose outcome stands, so Ctrl-C and SIGTERM are ignored throughout (a press between the renames
    cut the session's report short; one during the deletion left half of the old run behind), and any
    other exception between the renames puts the old run back: ``run_dir`` is never left missing."""
    retired = run_dir.parent / sibling_name(run_dir.name, ".", f".replaced-{os.getpid()}")
    with signals_ignored():
        try:
            os.replace(run_dir, retired)
            os.replace(staging, run_dir)
        except BaseException as error:
            if retired.exists() and not run_dir.exists():
                os.replace(retired, run_dir)  # put the old run back where it was
            elif retired.exists() and not staging.exists():
                discard(retired)  # the swap was done: the old run is not left behind under its hidden name
            if isinstance(error, OSError):
                raise DrnnError(
                    f"cannot put the new run in place of {run_dir} ({error.strerror}); the new run is in "
                    f"{staging}"
                ) from None
            raise
        discard(retired)


# ---------------------------------------------------------------------------------------------
# The latest run, the checkpoint of a run, the lock


def default_run_dir(config_path: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """``runs/<config stem>``; for a run's own ``config.yaml``, ``runs/<that run's name>`` (every run's
    copy would otherwise train into one ``runs/config``)."""
    if config_path.name == "config.yaml" and (config_path.parent / RUN_MARKER).is_file():
        return runs_root / config_path.resolve().parent.name
    return runs_root / config_path.stem


def mark_latest(run_dir: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> str | None:
    """Record ``run_dir`` as the latest run; why not, when the marker cannot be written (a read-only
    folder, a directory in its place), else None."""
    try:
        atomic_write_text(runs_root / LATEST_MARKER, str(run_dir.resolve()) + "\n")
    except DrnnError as error:
        return str(error)
    return None


def is_latest_marker(path: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> bool:
    """Whether ``path`` names ``runs/latest`` (compared as written: resolving a link loop would raise)."""
    return os.path.normpath(path.absolute()) == os.path.normpath((runs_root / LATEST_MARKER).absolute())


def latest_run(
    runs_root: Path = DEFAULT_RUNS_ROOT, instead: str = "pass --run DIR / --checkpoint FILE"
) -> Path:
    """The run directory the latest-run marker names (``predict``/``eval`` without ``--run``,
    ``--init-from runs/latest``): one policy for what a marker may hold, whoever reads it. ``instead``:
    what the caller's command takes in its place."""
    marker = runs_root / LATEST_MARKER
    # runs/ is found from the working directory, and a preset's name works from any directory
    fix = f"train one first (drnn train --config quick) or {instead}"
    if not marker.exists():
        raise DrnnError(
            f"no run to use: {marker} does not exist in {Path.cwd()}; run from the directory you trained "
            f"in, {fix}"
        )
    try:
        require_regular_file(marker, "the latest-run marker", f"delete it and {fix}")
        if marker.stat().st_size > 4096:
            raise ValueError("too long for a path")
        text = marker.read_text(encoding="utf-8").strip()
        if not text or "\n" in text or "\0" in text:
            raise ValueError("not one path")
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        raise DrnnError(
            f"the latest-run marker {marker} does not hold a run directory path; delete it and {fix}"
        ) from None
    run = Path(text)
    if run.is_file():  # drnn writes a directory there: a file is someone's edit
        raise DrnnError(
            f"the latest-run marker {marker} names {run}, a file, not a run directory; delete it and train, "
            f"or {instead}"
        )
    if not run.exists():  # a run deleted since: the user never named it, so say where it came from
        raise DrnnError(
            f"the latest run, {run} (named by {marker}), no longer exists; {instead}{_runs_hint(runs_root)}"
        )
    return run


def _runs_inside(folder: Path) -> list[str]:
    """The runs directly inside ``folder``, the most recently written first."""
    runs = []
    with contextlib.suppress(OSError):  # a hint: whatever cannot be read is left out
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if path.is_dir() and holds_run(path):
                    runs.append((path.stat().st_mtime, str(path)))
    return [path for _, path in sorted(runs, reverse=True)]


def _runs_hint(folder: Path) -> str:
    """`` (runs in runs: runs/quick, runs/lstm2)``, or nothing where ``folder`` holds none."""
    runs = _runs_inside(folder)
    return f" (runs in {folder}: {_first_names(runs)})" if runs else ""


def run_checkpoint(run_dir: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """The checkpoint that stands for a run: best by validation if there is one, else the last."""
    if run_dir.is_file():
        raise UsageError(
            f"--run takes a run directory, and {run_dir} is a file; a checkpoint goes to --checkpoint"
        )
    if not run_dir.is_dir():
        below = runs_root / run_dir  # --run quick for runs/quick: the name drnn train gave it
        if not run_dir.is_absolute() and holds_run(below):
            raise DrnnError(f"run directory {run_dir} does not exist; did you mean --run {below}?")
        raise DrnnError(
            f"run directory {run_dir} does not exist; pass an existing --run DIR{_runs_hint(runs_root)}"
        )
    for name in (BEST, LAST):
        if os.path.lexists(run_dir / name):  # one that is no file (a pipe, a folder) is named when read
            return run_dir / name
    inside = _runs_inside(run_dir)
    if inside:  # --run runs: the folder of runs, not one of them
        raise DrnnError(
            f"{run_dir} holds runs, not a checkpoint of its own; name one of them: {_first_names(inside)} "
            f"(drnn runs {run_dir} describes each)"
        )
    raise DrnnError(f"run directory {run_dir} holds no checkpoint ({BEST} or {LAST}); train it first")


def resolve_checkpoint(
    run: Path | None, checkpoint: Path | None, runs_root: Path = DEFAULT_RUNS_ROOT
) -> Path:
    """The checkpoint ``--run`` / ``--checkpoint`` name, or the latest run's."""
    if run is not None and checkpoint is not None:
        raise UsageError("pass either --run or --checkpoint, not both")
    if run is not None and is_latest_marker(run, runs_root):
        raise UsageError(
            f"--run {run} is the latest-run marker, not a run; drop --run to use the run it names"
        )
    if checkpoint is not None and is_latest_marker(checkpoint, runs_root):
        raise UsageError(
            f"--checkpoint {checkpoint} is the latest-run marker, not a checkpoint; drop --checkpoint to use "
            "the latest run's"
        )
    if checkpoint is not None:
        if checkpoint.is_dir():
            raise UsageError(
                f"--checkpoint takes a checkpoint file, and {checkpoint} is a directory; a run directory goes to --run"
            )
        return checkpoint
    return run_checkpoint(latest_run(runs_root) if run is None else run, runs_root)


@contextlib.contextmanager
def claimed_run_dir(run_dir: Path) -> Iterator[None]:
    """``run_dir`` held by this training (:class:`RunLock`); a training that fails before writing
    anything there leaves nothing: the folders it created (``runs/`` itself, on a first run) go again."""
    created = next((p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()), None)
    with RunLock(run_dir):
        try:
            yield
        finally:
            # removed while the lock is held: released first, another training could take the lock
            # and then lose its lock file (and the folder) to this removal
            if created is not None and run_dir.is_dir() and not (set(os.listdir(run_dir)) - {LOCK_NAME}):
                _remove_created(run_dir, created)


def _remove_created(run_dir: Path, created: Path) -> None:
    """Remove ``run_dir`` (its lock at most) and its parents up to ``created`` while they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in run_dir.parents:
        if not folder.is_relative_to(created):
            break
        try:
            folder.rmdir()  # only if empty: another run may have appeared there meanwhile
        except OSError:
            break


def _lock_owner(path: Path) -> tuple[str, int | None]:
    """The lock file's "HOST PID" line, as :class:`RunLock` writes it, read from its first bytes alone
    whatever else a file of that name holds: the host and the process id (None where the line names
    none); ("", None) where it is not a regular file (a pipe, which an open would wait on forever) or
    cannot be read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return "", None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return "", None
        line = os.read(descriptor, LOCK_OWNER_BYTES).decode("utf-8", errors="replace").strip()
    except OSError:
        return "", None
    finally:
        os.close(descriptor)
    host, _, pid = line.rpartition(" ")
    if host and pid.isascii() and pid.isdigit():  # isdigit() alone takes "²", which int() refuses
        return host, int(pid)
    return line, None


def training_holder(run_dir: Path) -> str | None:
    """``process 123`` where a training on this host holds ``run_dir``'s lock now, else None (``drnn
    runs``). The lock file names its last holder (:class:`RunLock`); only where a live process of that id
    exists is the lock asked after: Linux's /proc/locks names its holder without taking it; where it names
    none (no /proc, or a holder in another pid namespace), a shared ``flock`` is taken and dropped at once,
    and a training starting in that instant waits it out (:meth:`RunLock.acquire`): a listing is never why
    a training is refused. A holder on another host (a shared filesystem) cannot be asked: None."""
    path = run_dir / LOCK_NAME
    host, pid = _lock_owner(path)
    if host != socket.gethostname() or pid is None or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: whether the process exists, nothing sent
    except ProcessLookupError:
        return None
    except (PermissionError, OverflowError, OSError):
        pass  # it exists (another user's) or the id is not a process's: the lock decides
    # /proc/locks lists only the locks of processes this pid namespace sees (a training in another
    # container sharing the folder and the host name holds one it leaves out): its silence is asked again
    held = _flock_listed(path, pid) or _flock_probed(path)
    return f"process {pid}" if held else None


def _flock_listed(path: Path, pid: int) -> bool:
    """Whether /proc/locks lists a ``flock`` on ``path`` (its inode, on its device or taken by ``pid``:
    btrfs and overlay filesystems list another device than ``stat`` gives); False where it cannot tell."""
    try:
        info = path.stat()
        listed = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in listed.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 2417 fe:00:5308418 0 EOF"; a waiter's line has "->" after the number
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        holder, where = fields[4], fields[5]
        if where == device or (where.rsplit(":", 1)[-1] == str(info.st_ino) and holder == str(pid)):
            return True
    return False


def _flock_probed(path: Path) -> bool:
    """Whether another process holds ``path``'s ``flock``, found by taking a shared one and dropping it."""
    try:
        import fcntl
    except ImportError:  # Windows: a live process of that id is the best sign there is
        return True
    try:
        with path.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


class RunLock:
    """Exclusive ownership of a run directory by one training process.

    An OS file lock (``filelock``: ``flock`` on POSIX) on ``train.lock``: taking it is one atomic
    system call, and the kernel frees it when its process ends, even by SIGKILL, so a crash never
    leaves a run stuck and two processes can never both hold it. The file stays after release and
    names the last holder (``host pid``), for the message a refused training prints.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.held = False
        self._lock = filelock.FileLock(self.path, timeout=0, is_singleton=False, thread_local=False)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # a moment's wait: a listing's probe (where /proc/locks names no holder) holds it that long at most
            self._lock.acquire(timeout=LOCK_PATIENCE_SECONDS, poll_interval=0.02)
        except filelock.Timeout:
            time.sleep(0.05)  # let a holder that has just taken the lock write its name
            host, pid = _lock_owner(self.path)
            owner = (
                f"process {pid} on host {host[:200]}" if pid is not None else host[:200] or "another process"
            )
            raise DrnnError(
                f"run directory {self.path.parent} is in use by another training ({owner}); wait for "
                f"it to finish or choose another --run DIR"
            ) from None
        self.held = True
        with contextlib.suppress(OSError):
            self.path.write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")

    def release(self) -> None:
        if self.held:
            self._lock.release()
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
