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
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from drnn_cli.budget import Budget, Cadence

# Before a session has validated: a validation predicts each token with a forward pass alone, which
# costs about a third of a training step's forward, backward and update per token.
FORWARD_SHARE = 1 / 3
# shown_pace: the steps of a session's pace a time budget is judged by, and the share of max_time gone
# by (start-up's slow steps weigh less)
PACE_SHOWN_STEPS = 20
PACE_SHOWN_SHARE = 0.05


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


# The step pace a time left counts at: that of the last PACE_WINDOW_S of the session, read from marks
# taken at most every PACE_MARK_S, so that a machine that gets busier (or freer) shows in minutes, not
# in the session's mean (own40); a session younger than the window counts from its pace origin
PACE_WINDOW_S = 300.0
PACE_MARK_S = 30.0
PACE_MARKS = 32  # kept: 16 minutes of marks at PACE_MARK_S, more than the window needs

# SlowdownWatch: metrics lines this many times slower than the session's fastest, so many in a row
SLOWDOWN_FACTOR = 4.0
SLOWDOWN_LINES = 3


@dataclass
class SlowdownWatch:
    """Says once a session when a CPU run with several threads slows to a fraction of its own earlier
    pace and stays there: an OpenMP team waits at every step for its slowest thread, so other work on
    one core can stall a small model 8-30 times over, where one thread would barely notice (a learner's
    quickstart took 15 minutes instead of 2, at 3,190-5,400 tokens/s after 44,000, on a shared
    machine: learner39). The pace is each metrics line's own window, from the tokens and training
    seconds between two lines of this session: a line's tokens/s counts its epoch so far, a resumed
    epoch's earlier session with it (rev39b). ``tokens_seen`` and ``elapsed``: the run's counts as the
    session begins; ``resume_advice``: how to continue the run once stopped."""

    threads: int
    resume_advice: str
    tokens_seen: int
    elapsed: float
    fastest: float = 0.0
    slow_lines: int = 0
    said: bool = False

    def observe(self, tokens_seen: int, elapsed: float) -> str | None:
        """The note, at the SLOWDOWN_LINES-th window in a row below the fastest ÷ SLOWDOWN_FACTOR;
        ``tokens_seen`` and ``elapsed``: the run's, at a metrics line."""
        tokens, seconds = tokens_seen - self.tokens_seen, elapsed - self.elapsed
        self.tokens_seen, self.elapsed = tokens_seen, elapsed
        if self.said or self.threads < 2 or tokens <= 0 or not seconds > 0:
            return None
        pace = tokens / seconds
        if pace * SLOWDOWN_FACTOR >= self.fastest:
            self.fastest, self.slow_lines = max(self.fastest, pace), 0
            return None
        self.slow_lines += 1
        if self.slow_lines < SLOWDOWN_LINES:
            return None
        self.said = True
        return (
            f"training runs {self.fastest / pace:.0f} times slower than earlier in this session "
            f"({pace:,.0f} tokens/s, down from {self.fastest:,.0f}): other work on this machine's cores is "
            f"probably stalling drnn's {self.threads} threads, which wait for each other at every step. "
            "On a busy machine one thread is often faster: stop it (Ctrl-C) and continue it with "
            f"OMP_NUM_THREADS=1 set, by {self.resume_advice}"
        )


@dataclass
class EpochClock:
    """An epoch's training seconds: the clock's reading at its start (less the seconds trained before a
    resumed checkpoint), moved on past each pause, since a boundary's validation and checkpoint are not
    training time. Read live by a second Ctrl-C, which ends a run between boundaries: the seconds kept at
    the last boundary left the session's training short by all the steps since (minutes, on a long run)."""

    started: float
    paused_at: float | None = None

    @classmethod
    def stopped(cls, seconds: float) -> EpochClock:
        """A clock at ``seconds`` that no longer runs: a stopped epoch's, whose seconds its checkpoint holds."""
        return cls(started=0.0, paused_at=seconds)

    def seconds(self, now: float) -> float:
        """The epoch's training seconds at ``now`` (those up to its pause, while paused)."""
        return (now if self.paused_at is None else self.paused_at) - self.started

    def pause(self, now: float) -> float:
        """Stops the clock at ``now``; returns the epoch's training seconds so far."""
        self.paused_at = now
        return now - self.started

    def resume(self, now: float) -> None:
        """Runs on from ``now``: the seconds since the pause are not the epoch's."""
        if self.paused_at is not None:
            self.started += now - self.paused_at
            self.paused_at = None


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
    # where the pace stood at recent readings (PACE_MARK_S apart), the last window's origin among them
    pace_marks: deque[PaceOrigin] = field(default_factory=lambda: deque(maxlen=PACE_MARKS))

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
        """A training step's seconds: the wall clock over the last :data:`PACE_WINDOW_S` of the session
        (since the pace's origin, in a younger one), less the validations and writes in it, a step of
        the ``steps`` (the session's) in it; None before one. Each reading may leave a mark (at
        ``session_seconds``) for later ones to count from."""
        origin = self._window_origin(session_seconds, steps)
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

    def _window_origin(self, now: float, steps: int) -> PaceOrigin:
        """The newest mark at least :data:`PACE_WINDOW_S` old, else the pace's origin; marks ``now``
        where the last mark is :data:`PACE_MARK_S` old (once the pace has an origin)."""
        origin = self.pace_origin or PaceOrigin(0.0, 0.0, 0.0, 0)
        if self.pace_origin is None:
            return origin
        if not self.pace_marks or now - self.pace_marks[-1].seconds >= PACE_MARK_S:
            self.pace_marks.append(PaceOrigin(now, self.validating, self.writing, steps))
        windows = [
            mark for mark in self.pace_marks if now - mark.seconds >= PACE_WINDOW_S and mark.steps < steps
        ]
        return windows[-1] if windows else origin

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


# A validation in progress, as the time left reads it: (tokens done, of total, its start on
# ``time.perf_counter``).
Validating = tuple[int, int, float]


@dataclass(frozen=True)
class RunPlan:
    """What a session's time left counts to: the run's planned end (its last epoch or ``max_steps``),
    the cadences that validate and write on the way, and what a validation and a step read."""

    steps: int
    steps_per_epoch: float  # the mean's (``PlannedLength``), as the run's other figures count epochs
    eval: Cadence
    checkpoint: Cadence
    keep: Cadence
    validates: bool  # a validation split: validations, and a best checkpoint after each
    tokens_per_validation: int
    tokens_per_step: int  # the job's (the ranks share a step's rows and a validation's alike)

    def work_left(self, now: int) -> WorkLeft:
        """The steps, validations and checkpoint writes between optimizer step ``now`` and the run's
        end, by the cadences; a validation or write in progress is not counted."""
        end, per_epoch, validates = self.steps, self.steps_per_epoch, self.validates
        validations = cadence_points(self.eval, now, end, per_epoch) if validates else 0
        writes = self.checkpoint, self.keep  # a kept point writes last (linked) too
        lasts = cadence_union_points(*writes, now, end, per_epoch)
        if now < end:  # the end validates and writes last, on a cadence or not
            validations += int(validates and not cadence_points(self.eval, end - 1, end, per_epoch))
            lasts += int(not cadence_union_points(*writes, end - 1, end, per_epoch))
        return WorkLeft(
            steps=max(0, end - now),
            validations=validations,
            checkpoint_writes=lasts + validations,  # best after each validation, at most
            tokens_per_validation=self.tokens_per_validation,
            tokens_per_step=self.tokens_per_step,
        )


def seconds_left(
    plan: RunPlan,
    clock: SessionTime,
    budget: Budget,
    *,
    global_step: int,
    first_step: int,
    validation: Validating | None = None,
) -> float | None:
    """Time to the run's end: its steps left (to the last epoch or ``max_steps``) at this session's
    step pace, its validations and checkpoint writes left at theirs (README "Long runs", Progress), or
    ``max_time``'s clock and the stop's validation and write, whichever comes first. ``global_step``:
    the run's optimizer steps, of which ``first_step`` came before this session."""
    validating_for = 0.0 if validation is None else time.perf_counter() - validation[2]
    # the validation in progress is not step time
    step_seconds = clock.step_seconds(clock.elapsed() - validating_for, global_step - first_step)
    work = plan.work_left(global_step)
    if step_seconds is None:  # nothing trained yet to take a pace from
        if validation is None:
            return budget.seconds_left()
        tokens_done, tokens, _ = validation
        if not (budget.max_time and tokens_done):
            return None
        # a validation before the first step (a fine-tuning run's of its start, a resume's replayed
        # one): max_time starts after it, and its stop validates again, at this validation's pace;
        # after the first step (which gives no pace alone) max_time's clock runs already (review rev32)
        per_token = validating_for / tokens_done
        budget_left = budget.max_time if global_step == first_step else budget.seconds_left()
        return (tokens - tokens_done + work.tokens_per_validation) * per_token + (budget_left or 0.0)
    in_flight = 0.0
    if validation is not None:
        tokens_done, tokens, _ = validation
        per_token = (
            validating_for / tokens_done
            if tokens_done
            else clock.validation_seconds_per_token(step_seconds, work.tokens_per_step)
        )
        in_flight = (tokens - tokens_done) * per_token
    left = in_flight + clock.seconds_to_end(work, step_seconds)
    by_time = budget.seconds_left()
    if by_time is not None:
        stop = _seconds_to_budget_stop(
            plan, clock, global_step, by_time, work, step_seconds, in_flight, validation
        )
        left = min(left, stop)
    return left


def _seconds_to_budget_stop(
    plan: RunPlan,
    clock: SessionTime,
    global_step: int,
    by_time: float,
    work: WorkLeft,
    step_seconds: float,
    in_flight: float,
    validation: Validating | None,
) -> float:
    """max_time's end: its clock, then the stop's validation and its two writes (last and best); or,
    where the clock runs out in a validation (the one in progress, or the next on the cadence), that
    validation's end and the writes: it ends the run (the trainer's step boundary and epoch end)."""
    writes = (2 if plan.validates else 1) * clock.seconds_per_write()  # last, and best after its validation
    per_token = clock.validation_seconds_per_token(step_seconds, work.tokens_per_step)
    one_validation = work.tokens_per_validation * per_token if plan.validates else 0.0
    if validation is not None:
        return in_flight + writes if in_flight >= by_time else by_time + one_validation + writes
    due = next_cadence_point(plan.eval, global_step, plan.steps_per_epoch)
    if plan.validates and due is not None and due <= plan.steps:
        to_due = (due - global_step) * step_seconds
        if to_due < by_time <= to_due + one_validation:
            return to_due + one_validation + writes
    return by_time + one_validation + writes


def shown_pace(clock: SessionTime, steps: int, max_time: float) -> float | None:
    """A training step's seconds once the session's pace shows against ``max_time``: after
    :data:`PACE_SHOWN_STEPS` of its ``steps`` and :data:`PACE_SHOWN_SHARE` of the time (start-up's slow
    steps then weigh less); None before."""
    step_seconds = clock.step_seconds(clock.elapsed(), steps)
    paced = clock.elapsed() >= PACE_SHOWN_SHARE * max_time
    if steps < PACE_SHOWN_STEPS or not paced or not step_seconds:
        return None
    return step_seconds


def reach_by_time(
    plan: RunPlan, clock: SessionTime, *, global_step: int, by_time: float, step_seconds: float
) -> int | None:
    """The optimizer step at which ``by_time`` seconds left end the run at this session's paces: a
    step's share of the time to the end, the validations and writes on the way included; None where
    no step is left."""
    work = plan.work_left(global_step)
    if not work.steps:
        return None
    return global_step + round(by_time * work.steps / clock.seconds_to_end(work, step_seconds))
