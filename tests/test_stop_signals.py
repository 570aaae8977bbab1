"""Stops the terminal brings (red team red41, finding 3): a SIGHUP stops a training as SIGTERM does."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import config_file

from drnn_cli.checkpoint import load_checkpoint

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10},
    "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1},
    "train": {"epochs": 500, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(
    workdir: Path, train: dict, env: dict[str, str] = CHILD_ENV, **streams: object
) -> subprocess.Popen[bytes]:
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "checkpoint_every": 1000, **train}})
    return subprocess.Popen(
        [sys.executable, "-m", "drnn_cli", "train", "--config", str(config)],
        cwd=workdir,
        env=env,
        **streams,
    )  # type: ignore[call-overload]


def _wait_for(ready, process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode})")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training made no progress")
        time.sleep(0.05)


def _metrics_lines(workdir: Path) -> int:
    metrics = workdir / "runs" / "tiny" / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _stopped_by(workdir: Path) -> dict:
    return json.loads((workdir / "runs" / "tiny" / "stopped.json").read_text())


# ---------------------------------------------------------------------------------------------
# SIGHUP: the terminal closed, the ssh connection dropped


def test_sighup_stops_a_training_like_sigterm_and_resume_continues(workdir: Path, cli):
    process = _train(workdir, {}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _metrics_lines(workdir) >= 2, process)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=60)
    text = err.decode()
    assert process.returncode == 129, text
    (line,) = [line for line in text.splitlines() if line.startswith("drnn: ")]
    assert line.startswith("drnn: training stopped by SIGHUP after ") and "--resume" in line, text
    stopped = load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors")
    step = stopped.trainer_state["global_step"]
    assert _stopped_by(workdir) == {"stopped_by": "SIGHUP", "global_step": step}
    code, out, err = cli("runs", "runs", "--json")
    assert code == 0, err
    (run,) = json.loads(out.splitlines()[-1])["runs"]
    assert run["state"] == "resumable" and run["stopped_by"] == "SIGHUP", run
    code, out, _ = cli("runs", "runs")
    assert "resumable (SIGHUP)" in out
    code, out, err = cli(
        "train", "--config", "tiny.yaml", "--resume", "--json", "--set", f"train.epochs={stopped.epoch + 1}"
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["start_step"] == step


def test_sighup_from_a_terminal_that_is_gone_still_checkpoints(workdir: Path):
    """Its stdout and stderr a terminal that hung up: every write fails (EIO), the stop line's too; that
    neither costs the checkpoint nor becomes a traceback's exit 1."""
    leader, follower = pty.openpty()
    process = _train(workdir, {}, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    hung_up = threading.Event()

    def drain() -> None:  # the terminal reads until it hangs up
        while not hung_up.is_set():
            if select.select([leader], [], [], 0.05)[0]:
                try:
                    os.read(leader, 65536)
                except OSError:
                    break
        os.close(leader)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        _wait_for(lambda: _metrics_lines(workdir) >= 2, process)
    finally:
        hung_up.set()
        reader.join()
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=60) == 129
    stopped = load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors")
    assert _stopped_by(workdir) == {
        "stopped_by": "SIGHUP",
        "global_step": stopped.trainer_state["global_step"],
    }


def test_a_sighup_ignored_when_drnn_starts_stays_ignored(workdir: Path):
    """``nohup drnn train ...``: the user asked for the training to outlive the terminal."""
    process = _train(
        workdir, {}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    try:
        _wait_for(lambda: _metrics_lines(workdir) >= 2, process)
        process.send_signal(signal.SIGHUP)
        seen = _metrics_lines(workdir)
        _wait_for(lambda: _metrics_lines(workdir) >= seen + 2, process)  # still training
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
