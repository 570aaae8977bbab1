"""How long a run may train and how often it reports: durations, step/time budgets, cadences.

A budget (``train.max_steps``, ``train.max_time``) ends a run by itself at a step boundary; a cadence
(``eval_every: 500 steps`` or ``eval_every: 2``, meaning epochs) says when something happens. Both are
parsed here so that the schema (config.py) and the loop (train.py) share one definition.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Literal

_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits: \d would take ٣ and １ too
_UNIT = r"(h|hours?|m|min|mins|minutes?|s|sec|secs|seconds?)"
_DURATION = re.compile(rf"^\s*{_NUMBER}\s*{_UNIT}?\s*$", re.IGNORECASE)  # 90, 90s, 1.5m, 2 hours
_COMPOUND = re.compile(
    rf"^\s*(?:{_NUMBER}\s*{_UNIT}\s*)+$", re.IGNORECASE
)  # 1h30m, 2m 30s: each with its unit
_PART = re.compile(rf"{_NUMBER}\s*{_UNIT}", re.IGNORECASE)
_SECONDS = {"h": 3600, "m": 60, "s": 1}  # largest first, the order a compound duration writes them in
_CADENCE = re.compile(r"^\s*([0-9]{1,18})\s*(steps?|epochs?)\s*$", re.IGNORECASE)  # not 4,300 digits

Unit = Literal["epochs", "steps"]


def parse_duration(value: object) -> float:
    """``90`` / ``"90s"`` / ``"10m"`` / ``"2h"`` / ``"1h30m"`` → seconds; a ValueError names the accepted
    forms. A compound duration gives each unit once, largest first, as a clock reads."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90s, 10m, 2h or 1h30m (0 = no limit)")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # a YAML integer has no size limit; one past float range is refused as inf is
            seconds = float("inf") if value > 0 else float("-inf")
    else:
        seconds = _parse_duration_text(str(value))
    if seconds == float("inf"):  # a number past float range (red41: "of 0 or more seconds" for 10³⁰⁰ s)
        raise ValueError(
            "is too long a duration; give a finite one such as 90s, 10m, 2h or 1h30m (0 = no limit)"
        )
    if not seconds >= 0:
        raise ValueError("must be a duration of 0 or more seconds, such as 90s, 10m, 2h or 1h30m")
    return seconds


def _parse_duration_text(text: str) -> float:
    match = _DURATION.match(text)
    if match is not None:
        return float(match.group(1)) * _SECONDS[(match.group(2) or "s")[0].lower()]
    parts = (
        [(float(number), unit[0].lower()) for number, unit in _PART.findall(text)]
        if _COMPOUND.match(text)
        else []
    )
    units = [unit for _, unit in parts]
    order = list(_SECONDS)
    if not parts or sorted(units, key=order.index) != units or len(set(units)) != len(units):
        raise ValueError("must be a duration such as 90s, 10m, 2h or 1h30m (0 = no limit)")
    return sum(number * _SECONDS[unit] for number, unit in parts)


def parse_cadence(value: object, allow_zero: bool, allow_zero_steps: bool = False) -> int | str:
    """A plain integer (epochs, as before) or ``"N steps"`` / ``"N epochs"``, normalised.

    ``N epochs`` becomes the integer N, so configs written before steps existed read the same and
    the stored config.yaml keeps plain integers for epoch cadences; ``N steps`` stays ``"N steps"``.
    """
    least = 0 if allow_zero else 1
    problem = f"must be an integer number of epochs (≥ {least}) or 'N steps', e.g. 500 steps"
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, int):
        if value < least:
            raise ValueError(problem)
        return value
    match = _CADENCE.match(str(value))
    if match is None:
        raise ValueError(problem)
    count, unit = int(match.group(1)), match.group(2).lower()
    if unit.startswith("epoch"):
        if count < least:
            raise ValueError(problem)
        return count
    if count < 1 and not allow_zero_steps:
        raise ValueError("a step cadence needs at least 1 step, e.g. 500 steps")
    return f"{count} steps"


@dataclass(frozen=True)
class Cadence:
    """``every`` epochs or steps; ``every == 0`` means never (only where the key allows 0)."""

    every: int
    unit: Unit

    @classmethod
    def of(cls, value: int | str) -> Cadence:
        if isinstance(value, int):
            return cls(value, "epochs")
        return cls(int(str(value).split()[0]), "steps")

    @property
    def in_steps(self) -> bool:
        return self.unit == "steps" and self.every > 0

    def due_at_step(self, global_step: int) -> bool:
        """True after optimizer step ``global_step`` (1-based count) for a step cadence."""
        return self.in_steps and global_step % self.every == 0

    def passed(self, epochs_done: int, global_step: int) -> bool:
        """At least ``every`` epochs (or steps) done: a count of them, read as a point in the run rather
        than a cadence (``train.average_start``)."""
        return (epochs_done if self.unit == "epochs" else global_step) >= self.every

    def due_at_epoch_end(self, epochs_done: int, global_step: int) -> bool:
        if self.every == 0:
            return False
        if self.unit == "epochs":
            return epochs_done % self.every == 0
        return global_step % self.every == 0


@dataclass(frozen=True)
class Cadences:
    """When a run's evaluations, 'last' checkpoints, samples, log lines and kept checkpoints happen
    (epochs or steps)."""

    eval: Cadence
    checkpoint: Cadence
    sample: Cadence
    log: Cadence
    keep: Cadence

    def due_at_step(self, global_step: int) -> bool:
        cadences = (self.eval, self.checkpoint, self.sample, self.log, self.keep)
        return any(c.due_at_step(global_step) for c in cadences)


StopReason = Literal["epochs", "max_steps", "max_time", "patience"]


@dataclass
class Budget:
    """The first of ``max_steps`` optimizer steps (in total, across resumes) and ``max_time``
    seconds of wall-clock time (this invocation, from its first step) that is reached ends the run."""

    max_steps: int = 0  # 0 = no limit
    max_time: float = 0.0  # seconds; 0 = no limit
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self) -> float | None:
        return max(0.0, self.max_time - self.elapsed()) if self.max_time else None

    def steps_spent(self, global_step: int) -> bool:
        return bool(self.max_steps) and global_step >= self.max_steps

    def reached(self, global_step: int) -> StopReason | None:
        if self.steps_spent(global_step):
            return "max_steps"
        if self.max_time and self.elapsed() >= self.max_time:
            return "max_time"
        return None


def format_duration(seconds: float) -> str:
    """``4:05`` / ``1:02:03``: how the progress line shows the time left to a budget."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_count(epochs: float, steps_per_epoch: float) -> str:
    """Epochs as a log line counts them: ``3``, and inside an epoch to the decimals that tell one step
    from the next (``2.14`` at 19 steps an epoch, ``0.00057`` at 17,616): two decimals said ``0.00`` of
    every line on a large text, and the same ``0.05`` of two lines 20 steps apart."""
    if epochs == int(epochs):
        return f"{epochs:,g}"
    decimals = min(6, max(2, math.ceil(math.log10(steps_per_epoch)))) if steps_per_epoch > 1 else 2
    return f"{epochs:,.{decimals}f}"


def steps_span(steps: int, steps_per_epoch: float, epochs: float = 0.0) -> str:
    """A step budget as the run's first line and its notes say it: "25 steps (1.32 epochs)", "1 step
    (0.125 epochs)", "1,206 epochs" past a thousand (not "1.21e+03"), "0.0036% of an epoch" below a
    hundredth (not "3.61e-05")."""
    epochs = epochs or steps / steps_per_epoch  # given: counted through the real epoch lengths
    shown = f"{epochs:,.0f}" if epochs >= 1000 else f"{epochs:.3g}"
    share = f"{shown} epoch{'' if epochs == 1 else 's'}"
    if epochs < 0.01:
        share = f"{100 * epochs:.2g}% of an epoch"
    return f"{steps:,} step{'' if steps == 1 else 's'} ({share})"
