"""One contender of tests/test_reliability_red_team.py's lock race, in a module of its own: a spawned
process imports the module that defines its target, and the test module's imports (torch, drnn's
commands) took each contender ~1.9 s to start, where this one's (drnn_cli.rundir) take ~0.1 s."""

from __future__ import annotations

import time
from pathlib import Path


def contend(directory: str, ready, go, go_at, tried, results, trials: int) -> None:
    """One contender: at each agreed instant (busy-waited, so both start within microseconds), try."""
    from drnn_cli.errors import DrnnError as Refused
    from drnn_cli.rundir import RunLock as Lock

    ready.wait()
    go.wait()  # the instants are agreed once both interpreters have started
    start = go_at.value
    for trial in range(trials):
        lock = Lock(Path(directory) / str(trial))
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        while time.time() < start + trial * 0.1:
            pass
        try:
            lock.acquire()
        except Refused:
            held = False
        else:
            held = True
        tried.wait()  # both have tried before either lets go
        results.put((trial, held))
        lock.release()
