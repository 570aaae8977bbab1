"""Stops the terminal or the reader of drnn's output brings (red team red41, findings 2 and 3): a SIGHUP
stops a training as SIGTERM does, and a first Ctrl-C reaches its checkpoint while stdout is blocked."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import config_file, pythonpath_with_repo

from drnn_cli.checkpoint import load_checkpoint

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10},
    "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1},
    "train": {"epochs": 500, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _hup_as_by_default() -> None:
    """A child's SIGHUP as a terminal's process has it: the test runner may have been started with it
    ignored (nohup, a CI job runner, a background job), which the child would inherit, and drnn keeps an
    ignored SIGHUP ignored (test_a_sighup_ignored_when_drnn_starts_stays_ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _train(
    workdir: Path, train: dict, env: dict[str, str] = CHILD_ENV, **streams: object
) -> subprocess.Popen[bytes]:
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "checkpoint_every": 1000, **train}})
    return subprocess.Popen(
        [sys.executable, "-m", "drnn_cli", "train", "--config", str(config)],
        cwd=workdir,
        env=env,
        **{"preexec_fn": _hup_as_by_default, **streams},
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


def _python(script: str, **options: object) -> subprocess.CompletedProcess[str]:
    """``script`` run by a fresh interpreter that imports this checkout's drnn_cli."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**CHILD_ENV, "PYTHONPATH": pythonpath_with_repo()},
        timeout=60,
        **options,
    )


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


# ---------------------------------------------------------------------------------------------
# A first Ctrl-C while stdout's reader is not reading (`drnn train | less`, a stalled tee)


def _blocked_writing(pid: int) -> bool:
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def test_a_first_ctrl_c_while_stdout_is_blocked_checkpoints_and_stops(workdir: Path, tmp_path: Path):
    train = {"log_every": "1 step", "sample_every": "1 step", "sample_chars": 3000}
    with open(tmp_path / "err.txt", "wb") as err:
        # stdout block-buffered, as for `drnn train | less` (PYTHONUNBUFFERED unset)
        env = {key: value for key, value in CHILD_ENV.items() if key != "PYTHONUNBUFFERED"}
        process = _train(workdir, train, env, stdout=subprocess.PIPE, stderr=err, pipesize=4096)
        # the pipe is full and nobody reads it: the process sits in its write, its steps stand still
        _wait_for(lambda: _blocked_writing(process.pid), process)
        before = _metrics_lines(workdir)
        time.sleep(0.5)
        assert _blocked_writing(process.pid) and _metrics_lines(workdir) == before
        assert not (workdir / "runs" / "tiny" / "last.safetensors").exists()  # no periodic checkpoint
        process.send_signal(signal.SIGINT)  # once
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("the first SIGINT did not stop a training blocked writing to stdout")
    text = (tmp_path / "err.txt").read_text()
    assert code == 130, text
    assert text.splitlines()[-1].startswith("drnn: training stopped by SIGINT after "), text
    assert "Traceback" not in text
    stopped = load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors")
    assert _stopped_by(workdir) == {
        "stopped_by": "SIGINT",
        "global_step": stopped.trainer_state["global_step"],
    }


GUARD_PROBE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from drnn_cli import signals

    reading, writing = os.pipe()  # nobody reads it
    stream = open(writing, "w", encoding="utf-8")
    guard = signals._PipeGuard(stream, signals._Once())
    stops = signals.StopRequests()
    with stops.noted():
        if sys.argv[1] == "during":  # the stop arrives while the write is blocked
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:  # the stop is pending when a write that blocks begins
            signal.raise_signal(signal.SIGINT)
        began = time.monotonic()
        guard.write("x" * 1_000_000)
        guard.flush()
        waited = time.monotonic() - began
        guard.write("dropped")  # once cut, the stream takes nothing more: no write blocks again
        guard.flush()
    print(stops.name, round(waited, 1), guard.closed_by_reader, file=sys.stderr)
    """
)


@pytest.mark.parametrize("when", ["during", "before"])
def test_a_stop_cuts_a_write_that_blocks_and_nothing_else(when: str):
    done = subprocess.run(
        [sys.executable, "-c", GUARD_PROBE, when],
        env={**CHILD_ENV, "PYTHONPATH": pythonpath_with_repo()},
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    name, waited, by_reader = done.stderr.split()
    assert name == "SIGINT" and float(waited) < 5 and by_reader == "False", done.stderr


SLOW_READER_PROBE = textwrap.dedent(
    """
    import fcntl, os, signal, sys, threading, time
    from drnn_cli import signals

    reading, writing = os.pipe()
    fcntl.fcntl(writing, 1031, 4096)  # F_SETPIPE_SZ: a 4 KiB pipe, full at once
    got = bytearray()

    def reader():  # alive throughout: 1 KiB every 0.25 s, slow, never stalled
        while chunk := os.read(reading, 1024):
            got.extend(chunk)
            time.sleep(0.25)

    threading.Thread(target=reader, daemon=True).start()
    stream = open(writing, "w", encoding="utf-8")
    guard = signals._PipeGuard(stream, signals._Once())
    with signals.StopRequests().noted():
        signal.raise_signal(signal.SIGINT)  # a stop noted before the closing report is written
        for line in range(24):
            guard.write(f"summary line {line:03d} " + "x" * 480 + "\\n")  # 12 KB: 3 s at its pace
        guard.flush()
    stream.close()
    time.sleep(1.5)
    print(got.decode().count("\\n"), guard._dropped, file=sys.stderr)
    """
)


def test_a_stop_leaves_a_slow_reader_that_reads_its_whole_output():
    """Once a stop is noted, a write is cut only where its reader took nothing for a whole tick, not
    where the pipe is full at one look (review rev41b: a reader draining 1 KiB every 0.25 s got 16 of
    40 closing lines, the --json object among those lost)."""
    done = subprocess.run(
        [sys.executable, "-c", SLOW_READER_PROBE],
        env={**CHILD_ENV, "PYTHONPATH": pythonpath_with_repo()},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.split() == ["24", "False"], done.stderr


def test_a_stop_leaves_a_write_that_does_not_block_alone(capfd: pytest.CaptureFixture[str]):
    """Ctrl-C during a write that goes through costs none of the output after it; and in-process (here,
    outside guard_output) the stop leaves no state behind: no stop pending for the guards, the SIGALRM
    handler as it was (review rev41b: both outlived the stop in the test process)."""
    from drnn_cli import signals

    alarm = signal.getsignal(signal.SIGALRM)
    reading, writing = os.pipe()
    with open(writing, "w", encoding="utf-8") as stream:
        guard = signals._PipeGuard(stream, signals._Once())
        stops = signals.StopRequests()

        class Interrupting:
            def write(self, text: str) -> int:
                signal.raise_signal(signal.SIGINT)  # arrives inside the guarded write
                return stream.write(text)

            def flush(self) -> None:
                stream.flush()

        guard._stream = Interrupting()  # type: ignore[assignment]
        try:
            with stops.noted():
                guard.write("first\n")
                guard.flush()
                guard._stream = stream
                guard.write("second\n")
                guard.flush()
            assert stops.pending
            assert os.read(reading, 100) == b"first\nsecond\n"
            assert not signals._Cutting.stopping and signal.getsignal(signal.SIGALRM) is alarm
        finally:
            os.close(reading)


# ---------------------------------------------------------------------------------------------
# A Ctrl-C that arrives twice while drnn starts (red42: a terminal's reaches a torchrun worker from the
# terminal and again from torchrun; two presses 2 ms apart do the same to a lone drnn)


def test_a_second_signal_while_the_first_unwinds_changes_nothing():
    """The handler outside the training loop raises once; the signals after it return (the second raised
    inside the first's unwinding: a traceback, an abort, or numpy's ImportError)."""
    from drnn_cli.signals import Signalled, exit_on_signals

    with exit_on_signals() as exits:
        with pytest.raises(Signalled) as first:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises as soon as the signal is delivered
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # delivered, and ignored: nothing raised here
    assert exits.first is first.value and first.value.name == "SIGINT"
    # one raised elsewhere (the training loop's handler) and being handled: a signal then is its echo too
    with exit_on_signals() as exits:
        try:
            raise Signalled(signal.SIGINT)
        except Signalled:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # delivered, and ignored: nothing raised here
    assert exits.first is None


def test_a_failure_after_a_stop_signal_is_reported_as_that_signal(cli, monkeypatch: pytest.MonkeyPatch):
    """red42: a Ctrl-C that cut numpy's import short, swallowed by an import machinery's except, then
    "drnn: internal error: ImportError: cannot load module more than once per process" when imported
    again. Whatever fails after the signal is its doing: one interrupted line, exit 130."""
    import drnn_cli.cli as cli_module

    def interrupted_import(*_args: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:  # an import machinery's, not drnn's
            pass
        raise ImportError("cannot load module more than once per process")

    monkeypatch.setattr(cli_module, "describe_presets", interrupted_import)
    code, out, err = cli("presets")
    assert (code, out, err) == (130, "", "drnn: interrupted (SIGINT)\n")


def test_a_signal_during_the_interpreters_exit_keeps_the_exit_code_and_prints_no_traceback():
    """After drnn's one line, a late Ctrl-C raised KeyboardInterrupt inside torch's atexit finaliser: a
    traceback under the line, and the exit code lost. Once the command has ended, a Ctrl-C is ignored, and
    SIGTERM ends the process at once with the code it decided: a hung finaliser stays killable."""
    script = textwrap.dedent(
        """
        import atexit, os, signal, sys, time
        from drnn_cli.signals import exit_process
        def finaliser():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("not reached", file=sys.stderr)
        atexit.register(finaliser)
        exit_process(lambda: sys.exit(3))
        """
    )
    started = time.monotonic()
    done = _python(script)
    assert (done.returncode, done.stdout, done.stderr) == (3, "", "")
    assert time.monotonic() - started < 4  # ended by the signal, not after the finaliser's sleep


def test_a_stop_signal_a_library_swallowed_still_stops_the_command(cli, monkeypatch: pytest.MonkeyPatch):
    """rev42: with every signal after the first ignored, a first that a library's broad except swallowed
    left the command unstoppable, and it exited 0. A signal past the first's echo raises again, and a
    command that ends after a swallowed one ends as stopped."""
    import drnn_cli.cli as cli_module
    import drnn_cli.signals

    monkeypatch.setattr(drnn_cli.signals, "ECHO_S", 0.05)
    seen: list[str] = []

    def swallowing(*_args: object) -> list:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:  # an import machinery's, not drnn's
            seen.append("swallowed")
        return []

    monkeypatch.setattr(cli_module, "describe_presets", swallowing)
    code, _, err = cli("presets")
    assert (code, seen, err) == (130, ["swallowed"], "drnn: interrupted (SIGINT)\n")

    def swallowing_then_working(*_args: object) -> list:
        swallowing()
        time.sleep(0.1)  # past the echo
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        seen.append("not stopped")
        return []

    monkeypatch.setattr(cli_module, "describe_presets", swallowing_then_working)
    code, _, err = cli("presets")
    assert (code, seen[-1], err) == (143, "swallowed", "drnn: interrupted (SIGTERM)\n")


@pytest.mark.parametrize("delay", [0.3, 0.9])
def test_two_ctrl_c_2_ms_apart_while_drnn_starts_end_it_with_one_line(workdir: Path, delay: float):
    """The whole process group signalled twice, as a terminal does a double press, while Python imports
    torch or reads the text: one "drnn: interrupted (SIGINT)" line, exit 130, no traceback."""
    process = _train(workdir, {}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    lines = err.decode().splitlines()
    assert process.returncode == 130, lines
    # before the training loop, or in it (where a second press stops at once, or after the first's stop)
    said = ("drnn: interrupted (SIGINT)", "drnn: training stopped by SIGINT")
    assert len(lines) == 1 and lines[0].startswith(said), lines


def test_a_signal_while_the_commands_modules_load_ends_drnn_with_its_one_line():
    """Typer, rich, pydantic and torch load before the command's handlers are in place: a Ctrl-C then
    printed Python's KeyboardInterrupt traceback through pydantic's import (red42). The entry point
    handles stop signals first; here the signal arrives where drnn_cli.cli would be loading."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time, types
        loading = types.ModuleType("drnn_cli.cli")
        def program():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        loading.program = program
        sys.modules["drnn_cli.cli"] = loading
        from drnn_cli.launch import program as drnn
        drnn()
        """
    )
    done = _python(script, preexec_fn=_hup_as_by_default)
    assert (done.returncode, done.stdout, done.stderr) == (143, "", "drnn: interrupted (SIGTERM)\n")
