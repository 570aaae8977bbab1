"""Where a training session's wall-clock time goes, and the time left that follows from it.

A session's time is its training steps, its validations and its checkpoint writes (and a little else:
samples, the plot). Tokens/s and a log line's seconds count the steps alone, as d2l's figures do;
``train.max_time`` counts all of it. On a large text a validation is minutes and a checkpoint write
seconds, so a time left read from the step pace alone, or from the wall clock divided by the steps done,
is wrong by most of the remaining time: the estimate here adds the steps left at the step pace, the
validations left at the measured validation pace, and the checkpoint writes left at theirs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from drnn_cli.budget import Cadence

# Before a session has validated: a validation predicts each token with a forward pass alone, which
# costs about a third of a training step's forward, backward and update per token.
FORWARD_SHARE = 1 / 3


def cadence_points(cadence: Cadence, after_step: int, to_step: int, steps_per_epoch: float) -> int:
    """How many points of ``cadence`` fall after optimizer step ``after_step``, up to ``to_step``
    included: a step cadence's multiples, or the epoch ends (at multiples of ``steps_per_epoch``)
    whose epoch count is a multiple of an epoch cadence's."""
    if cadence.every == 0 or to_step <= after_step:
        return 0
    if cadence.unit == "steps":
        return to_step // cadence.every - after_step // cadence.every
    epochs_after, epochs_to = int(after_step / steps_per_epoch), int(to_step / steps_per_epoch)
    return epochs_to // cadence.every - epochs_after // cadence.every


UNION_EPOCHS_COUNTED = 10_000  # cadence_union_points: epoch ends it compares with a step cadence one by one


def cadence_union_points(
    first: Cadence, second: Cadence, after_step: int, to_step: int, steps_per_epoch: float
) -> int:
    """How many steps after ``after_step``, up to ``to_step``, are a point of either cadence, a step due
    for both counted once (``last``'s writes by ``train.checkpoint_every`` and ``train.keep_every``:
    a kept point is written once, and ``last`` linked to it). Of one unit, the points of both are the
    multiples of the two periods' least common multiple; of two, the epoch ends (at the step
    :func:`next_cadence_point` puts them) that fall on a step point, counted one by one up to
    :data:`UNION_EPOCHS_COUNTED` of them (past that, counted twice: an estimate's excess)."""
    both = cadence_points(first, after_step, to_step, steps_per_epoch) + cadence_points(
        second, after_step, to_step, steps_per_epoch
    )
    if not (first.every and second.every):
        return both
    if first.unit == second.unit:
        common = Cadence(math.lcm(first.every, second.every), first.unit)
        return both - cadence_points(common, after_step, to_step, steps_per_epoch)
    epochs, steps = (first, second) if first.unit == "epochs" else (second, first)
    point = next_cadence_point(epochs, after_step, steps_per_epoch)
    for _ in range(UNION_EPOCHS_COUNTED):
        if point is None or point > to_step:
            break
        both -= point % steps.every == 0
        point = next_cadence_point(epochs, point, steps_per_epoch)
    return both


def next_cadence_point(cadence: Cadence, after_step: int, steps_per_epoch: float) -> int | None:
    """The first optimizer step after ``after_step`` at which ``cadence`` comes due (an epoch cadence's
    at the end of its epoch, at a multiple of ``steps_per_epoch``); None for a cadence that never does."""
    if cadence.every == 0:
        return None
    if cadence.unit == "steps":
        return (after_step // cadence.every + 1) * cadence.every
    epochs = (int(after_step / steps_per_epoch) // cadence.every + 1) * cadence.every
    return math.ceil(epochs * steps_per_epoch)


@dataclass(frozen=True)
class SessionSeconds:
    """Where a session's wall clock went (``drnn train --json``'s ``"seconds"``): ``session`` from its
    start to its end, what ``train.max_time`` counts but for a validation before the first step (a
    fine-tuning run's of its starting weights, a resume's replayed one); ``training`` its steps alone,
    what tokens/s and the log lines' seconds count; the rest (samples, the plot) is the difference."""

    session: float
    training: float
    validating: float
    checkpoints: float

    def summary(self) -> dict[str, float]:
        return asdict(self)

    @property
    def rest(self) -> float:
        """Samples, the plot, the metrics lines: what no other figure counts."""
        return max(0.0, self.session - self.training - self.validating - self.checkpoints)


@dataclass(frozen=True)
class WorkLeft:
    """What a session still has to do, counted from its cadences and its end."""

    steps: int
    validations: int  # the final one included
    checkpoint_writes: int  # ``last`` by its cadence and at the end, and ``best`` after validations
    tokens_per_validation: int
    tokens_per_step: int  # the job's (the ranks share a step's rows and a validation's alike)


@dataclass(frozen=True)
class PaceOrigin:
    """Where a session's step pace counts from: its clock, validating and writing seconds, and steps then."""

    seconds: float
    validating: float
    writing: float
    steps: int


@dataclass
class SessionTime:
    """A session's wall clock from its start, and the seconds it spent validating and writing
    checkpoints, and how many of each."""

    started: float = field(default_factory=time.monotonic)
    validating: float = 0.0
    validations: int = 0
    validated_tokens: int = 0
    writing: float = 0.0
    writes: int = 0
    # the end of the session's first step, which carries its start-up (the data's first copy, the
    # allocator, DDP's first all-reduce, a GPU's warm-up): paced from the session's start, a 2-process
    # run's first estimates were 3-6 times too long (ddp32); None: from the start
    pace_origin: PaceOrigin | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def validation(self, tokens: int) -> Iterator[None]:
        """Time a validation of ``tokens`` predictions (the job's: the ranks share them)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.validating += time.perf_counter() - began
            self.validations += 1
            self.validated_tokens += tokens

    @contextmanager
    def checkpoint_write(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.writing += time.perf_counter() - began
            self.writes += 1

    def pace_from_here(self, steps: int) -> None:
        """The session's first ``steps`` are done: the step pace counts from now on (once)."""
        if self.pace_origin is None:
            self.pace_origin = PaceOrigin(self.elapsed(), self.validating, self.writing, steps)

    def step_seconds(self, session_seconds: float, steps: int) -> float | None:
        """A training step's seconds: the session's wall clock since the pace's origin, less the
        validations and writes since, a step of the ``steps`` (the session's) since; None before one."""
        origin = self.pace_origin or PaceOrigin(0.0, 0.0, 0.0, 0)
        paced = steps - origin.steps
        if paced <= 0:
            return None
        spent = (
            session_seconds
            - origin.seconds
            - (self.validating - origin.validating)
            - (self.writing - origin.writing)
        )
        return max(0.0, spent) / paced

    def validation_seconds_per_token(self, step_seconds: float, tokens_per_step: int) -> float:
        """Measured where the session has validated; else a forward pass's share of a step's seconds."""
        if self.validated_tokens:
            return self.validating / self.validated_tokens
        return step_seconds / max(1, tokens_per_step) * FORWARD_SHARE

    def seconds_per_write(self) -> float:
        """A checkpoint write's seconds, measured (before any is: free)."""
        return self.writing / self.writes if self.writes else 0.0

    def seconds_to_end(self, work: WorkLeft, step_seconds: float) -> float:
        """The time ``work`` takes at this session's paces."""
        per_token = self.validation_seconds_per_token(step_seconds, work.tokens_per_step)
        return (
            work.steps * step_seconds
            + work.validations * work.tokens_per_validation * per_token
            + work.checkpoint_writes * self.seconds_per_write()
        )
