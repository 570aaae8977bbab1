"""Why a run's last training session ended, kept beside its checkpoints (``stopped.json``).

A checkpoint says how far a run trained, not why it stopped there: a time budget, Ctrl-C and a loss
that became NaN all leave a run ``--resume`` can continue, and only the first two are worth
continuing as they were. Each session removes its predecessor's record as it starts and writes its
own as it ends, so a session killed outright (SIGKILL, the OOM killer) leaves none. The record names
the step its session ended at, so that a reader can also tell whether it speaks of the newest
checkpoint (one copied in from elsewhere may not).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from drnn_cli.files import atomic_write_text, read_own_file
from drnn_cli.run_files import RunFiles

# How a session ends: its own budgets (budget.StopReason), a signal (or a closed stdout), a divergence
StoppedBy = Literal[
    "epochs", "max_steps", "max_time", "patience", "SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "diverged"
]
STOP_RECORD_BYTES = 4096  # a record is one short line; anything longer in its place is not one


@dataclass(frozen=True)
class StopRecord:
    """The end of a run's last training session: why, and at which optimizer step (counted since the
    run began, as checkpoints count them)."""

    stopped_by: StoppedBy
    global_step: int

    def applies_to(self, checkpoint_step: int | None) -> bool:
        """Whether this record is of the session that wrote the checkpoint at ``checkpoint_step``, or of
        one after it that wrote none (a divergence: nothing non-finite is saved): no later session
        has trained past it."""
        return checkpoint_step is not None and self.global_step >= checkpoint_step


def write_stop_record(run_dir: Path, stopped_by: StoppedBy, global_step: int) -> None:
    """Record why the session ends; a run directory that cannot take it is no reason to fail one."""
    text = json.dumps({"stopped_by": stopped_by, "global_step": global_step}) + "\n"
    with contextlib.suppress(OSError):
        atomic_write_text(RunFiles(run_dir).stop_record, text)


def read_stop_record(run_dir: Path) -> StopRecord | None:
    """The run's record, or None where it has none drnn wrote (absent, a pipe, a link, too long,
    tampered: never a reason to fail a listing)."""
    try:
        tree = json.loads(read_own_file(RunFiles(run_dir).stop_record, STOP_RECORD_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(tree, dict):
        return None
    stopped_by, step = tree.get("stopped_by"), tree.get("global_step")
    if stopped_by not in get_args(StoppedBy) or type(step) is not int or step < 0:
        return None
    return StopRecord(cast(StoppedBy, stopped_by), step)
