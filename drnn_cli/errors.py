"""The one exception type the CLI turns into a single line on stderr, what a stopped training reports,
and the one line for a library's failure the user can fix all the same (a torchrun peer gone, memory
run out)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drnn_cli.shown_text import terminal_safe

if TYPE_CHECKING:
    from drnn_cli.session_time import SessionSeconds

# Line breaks and the spaces around them: what a one-line message replaces by one space. Runs of
# plain spaces stay, since they may be part of what the message quotes (a prefix, a path).
_BREAKS = re.compile(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")


MAX_MESSAGE_CHARS = 2000  # a one-line error quotes its input (a path, a value), never megabytes of it


class DrnnError(Exception):
    """A problem the user can fix: the message names it and says how.

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``; nothing else in drnn
    prints errors or calls ``sys.exit``.
    """

    exit_code: int = 1
    heading = "error: "  # what the CLI's line says after "drnn: "

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        # other controls (a tab, an escape, a bidi override) are shown escaped: a path holding a tab
        # must not read as one holding a space, nor an escape sequence in a file name reach the terminal
        text = _BREAKS.sub(" ", message).strip()
        if len(text) > MAX_MESSAGE_CHARS:  # the middle goes: the problem comes first, the fix last
            half = MAX_MESSAGE_CHARS // 2
            text = f"{text[:half]} … {text[-half:]}"  # cut before escaping: no escape is cut in two
        super().__init__(terminal_safe(text, keep=""))
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(DrnnError):
    exit_code = 2


class UsageError(DrnnError):
    """An option given a value it cannot take, or options that exclude each other: exit 2, as for
    the option errors the command-line parser finds itself (``--split foo``)."""

    exit_code = 2


@dataclass(frozen=True)
class StoppedRun:
    """Where a signal stopped a training, with its checkpoint written: ``drnn train --json``'s object
    then (README "Commands"), its keys those of ``report.TrainResult`` that mean the same. Carried by
    :class:`TrainingInterrupted`, which is raised where the trainer stops, and by a second Ctrl-C's
    ``Signalled``, of the run's last checkpoint on disk (the stop's was not written)."""

    run_dir: Path
    signal: str  # "SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE": the object's stop_reason
    epochs: float  # done at the stop, fractional inside an epoch
    start_epoch: float
    steps: int
    start_step: int
    checkpoint: Path | None  # None: nothing was written (an --overwrite stopped before its first step)
    validation_pending: bool  # a validation the signal cut short, which --resume runs first
    seconds: SessionSeconds | None = None  # where the session's wall clock went (None: it trained nothing)

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir.absolute()),
            "stop_reason": self.signal,
            "epochs": self.epochs,
            "start_epoch": self.start_epoch,
            "steps": self.steps,
            "start_step": self.start_step,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint.absolute()),
            "validation_pending": self.validation_pending,
            "seconds": None if self.seconds is None else self.seconds.summary(),
        }


class TrainingInterrupted(DrnnError):
    """SIGINT/SIGTERM/SIGHUP arrived; a resumable checkpoint was written before raising. Asked for and
    recoverable, it is no error: ``drnn: training stopped by SIGINT ...``, exit 130 (143 for SIGTERM,
    129 for SIGHUP).
    ``stopped`` says where, for ``drnn train --json``."""

    heading = ""

    def __init__(self, message: str, exit_code: int, stopped: StoppedRun) -> None:
        super().__init__(message, exit_code)
        self.stopped = stopped


class TrainingDiverged(DrnnError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


# How gloo and NCCL report a peer that is gone (killed, or ended by its own error) ...
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
)
# ... and a collective that timed out, which is a hang (ranks that called different collectives: a bug)
_TIMED_OUT = ("Watchdog caught collective operation timeout", "timed out", "Timeout")


class PeerGone(Exception):
    """A collective that failed because another process of the job ended, as the training session
    raises it: the library's words, and what the run directory holds (``after``), which the line the
    CLI says adds (red42: the survivor's line said nothing of the checkpoint --resume would need)."""

    def __init__(self, error: BaseException, after: str) -> None:
        super().__init__(str(error))
        self.after = after


def peer_gone_message(error: BaseException, in_process_group: bool) -> str | None:
    """The one line for a collective that failed because another process of a torchrun job ended (it
    printed "internal error", which README "What happens when" keeps for drnn's own bugs), else None."""
    text = str(error)
    if not in_process_group or not any(words in text for words in _PEER_GONE):
        return None
    if any(words in text for words in _TIMED_OUT):
        return None
    quoted = textwrap.shorten(first_line(error, 1000), 160, placeholder=" …")
    return (
        f"another process of this torchrun job is gone ({quoted}); its own line says why (an error, or a "
        "kill): fix that and run the command again (with --resume where a checkpoint was written)"
    )


# What PyTorch's allocators say when an allocation fails (its CPU allocator raises a RuntimeError).
_ALLOCATION_FAILED = ("can't allocate memory", "not enough memory", "out of memory")


def out_of_memory_message(error: BaseException) -> str | None:
    """The one line for an allocation that failed (a model, batch or ``--rows`` larger than the
    machine's memory: the settings decide it, so it is the user's to fix), else None."""
    allocation = isinstance(error, RuntimeError) and any(words in str(error) for words in _ALLOCATION_FAILED)
    if not (allocation or isinstance(error, MemoryError)):  # torch.OutOfMemoryError is a RuntimeError
        return None
    return (
        f"out of memory ({first_line(error, 200)}); lower model.hidden_size, model.num_layers, "
        "data.batch_size or data.num_steps (drnn eval: --rows), or run where there is more memory"
    )


def first_line(error: BaseException, limit: int = 160) -> str:
    """What a one-line error quotes of a library's exception: its first non-empty line, or its type.

    Wrappers that put the real error on a later line are unwrapped first: dynamo's
    ``BackendCompilerFailed`` ("backend='inductor' raised:" then the cause) keeps the cause in
    ``inner_exception``.
    """
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, BaseException):
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__
