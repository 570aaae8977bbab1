"""Under torchrun, the ranks' votes on stopping: a signal reaches one rank and each rank reads its own
clock, yet every rank must stop after the same step (else the next all-reduce would hang). A vote is a
collective and a host read, so the ranks vote every few steps, and more often only where that is late."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from drnn_cli.budget import Budget, StopReason
from drnn_cli.evaluate import EvaluationAbandoned
from drnn_cli.report import Reporter
from drnn_cli.runtime import DistContext, vote_max
from drnn_cli.signals import StopRequests

# Under torchrun, steps between the ranks' votes on a pending signal or a spent max_time: a vote is
# a collective and a host read.
STOP_VOTE_EVERY = 8
# ... fewer where 8 steps take longer than this: torchrun kills its workers 30 s after passing a signal
# on, and the stop's checkpoint comes after the next vote
STOP_VOTE_SECONDS = 5.0


class StopVotes:
    """Whether a signal or ``train.max_time`` stops the run; without torchrun, this process's own answer."""

    def __init__(
        self, dist: DistContext, device: torch.device, stops: StopRequests, reporter: Reporter
    ) -> None:
        self.dist = dist
        self.device = device
        self.stops = stops
        self.reporter = reporter
        self._time_vote_every = STOP_VOTE_EVERY  # under torchrun, steps between votes on train.max_time
        self._steps_to_stop_vote = STOP_VOTE_EVERY  # … and until the next vote on a signal
        # when the last vote on a signal was, and after which step: the pace since (restart_pace resets it)
        self._last_stop_vote = (time.monotonic(), 0)

    def restart_pace(self, global_step: int) -> None:
        """Training starts (after a fine-tuning run's validation of its starting weights): the pace of the
        steps before the next vote on a signal counts from here."""
        self._last_stop_vote = (time.monotonic(), global_step)

    def stop_requested(self, after_step: int | None = None) -> bool:
        """Whether a signal asks to stop: under torchrun, whether one reached any rank (voted on every
        STOP_VOTE_EVERY steps inside an epoch, or every step the slowest rank takes STOP_VOTE_SECONDS
        for where that is fewer, and at each epoch's end). ``after_step``: asked after this optimizer step
        inside an epoch, which counts down to the next vote; None votes now."""
        if not self.dist.enabled:
            return self.stops.pending
        if after_step is not None:
            self._steps_to_stop_vote -= 1
            if self._steps_to_stop_vote > 0:
                return False
        if self.stops.note_launcher_gone():
            self.reporter.note("torchrun is gone (killed): this process stops as on its SIGTERM")
        vote = int(vote_max(float(self.stops.signum or 0), self.dist, self.device))
        if vote and not self.stops.pending:
            self.stops.signum = vote  # another rank's signal: reported and exited with as its own
        if after_step is not None:
            # the next vote: after 8 steps, or as many as the slowest rank takes in 5 s
            now, (since, at_step) = time.monotonic(), self._last_stop_vote
            steps = after_step - at_step
            pace = vote_max((now - since) / steps if steps > 0 else 0.0, self.dist, self.device)
            self._last_stop_vote = (now, after_step)
            fits = int(STOP_VOTE_SECONDS / pace) if pace else STOP_VOTE_EVERY
            self._steps_to_stop_vote = max(1, min(STOP_VOTE_EVERY, fits))
        return bool(vote)

    def budget_reached(
        self, budget: Budget, global_step: int, first_step: int, vote_now: bool = False
    ) -> StopReason | None:
        """Which budget ends the run after ``global_step`` (``first_step``: where this session began)."""
        reason = budget.reached(global_step)
        if not self.dist.enabled or reason == "max_steps" or not budget.max_time:
            return reason  # step counts are the same on every rank
        if not vote_now and global_step % self._time_vote_every:
            return None
        # Clocks differ between ranks: they vote, so all of them stop after the same step. A rank whose
        # budget would run out before the next vote says so (1), and from then on all of them vote after
        # every step: voting every 8 overran a 12 s budget by 26 s at 3-4 s a step (practitioner trial).
        done = global_step - first_step
        pace = budget.elapsed() / done if done > 0 else 0.0
        left = budget.seconds_left() or 0.0
        vote = vote_max(2.0 if reason else float(left <= STOP_VOTE_EVERY * pace), self.dist, self.device)
        if vote:
            self._time_vote_every = 1
        return "max_time" if vote == 2.0 else None

    def abandon_on_signal(self) -> Callable[[int, int], None]:
        """The hook ``evaluate`` calls before each minibatch of an abandonable validation: under torchrun
        the ranks vote on it every STOP_VOTE_EVERY minibatches (each steps through the same columns of
        its block of the split's rows, so all of them meet at the same ones, and all of them abandon it
        or none; the last row's tail, one rank's alone, is not voted on: ``evaluate``)."""
        batches = itertools.count()

        def abandon(_done: int, _total: int) -> None:
            if self.dist.enabled:
                if next(batches) % STOP_VOTE_EVERY or not self.stop_requested():
                    return
            elif not self.stops.pending:
                return
            raise EvaluationAbandoned

        return abandon
