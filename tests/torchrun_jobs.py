"""The torchrun jobs that tests/test_distributed.py checks, started with the session.

A job costs three torch imports (torchrun's and each rank's): about 12 CPU-seconds, and the module's
jobs about 100 in all. The in-process tests that come before the module leave one of CI's two cores
idle most of the time, so the session starts the jobs with its first test, one at a time, at the
lowest priority (``nice -n 19``): they take CPU time that nothing else wants, and the tests that
run meanwhile keep their core. When the module's first test starts, ``hurry`` starts the jobs still
waiting, all at once at normal priority as before, and starts again, at normal priority, the one
still running niced (under other load a niced job would wait behind everything else).

Two jobs train until they are stopped; a thread watches each, and once it trains (``epoch 1/`` in
its log) SIGKILLs the job (``overwrite``) or sends its rank 0 a SIGTERM (``sigterm_rank0``). The
tests read what was done in ``Launch.acted``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import pythonpath_with_repo

WORLD_SIZE = 2
LAUNCH_TIMEOUT = 300  # seconds; a hung collective fails the test instead of stalling the suite
SAMPLINGS = ("sequential", "random")
TRAINING = "epoch 1/"  # in a job's log once it trains

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10, "val_fraction": 0.1},
    "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2, "dropout": 0.0, "output_dropout": 0.0},
    "train": {
        "epochs": 2,  # ~22 minibatches an epoch either way
        "optimizer": "adam",
        "lr": 0.01,
        "clip": 1.0,
        "seed": 3,
        "sample_every": 0,
        "sample_chars": 5,
        "device": "cpu",
    },
}


def write_config(directory: Path, sampling: str, dropout: float = 0.0) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree["data"]["sampling"] = sampling
    tree["model"]["dropout"] = dropout
    path = directory / f"tiny_{sampling}_{dropout}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@dataclass(frozen=True)
class Spec:
    """One ``torchrun --standalone --nproc_per_node 2 -m drnn_cli -- train ARGS`` job; with ``then``, a
    second one on the same run directory once the first succeeded. ``processes``: how many processes
    each of the two runs (1: plain ``python -m drnn_cli``). ``seed_run``: a run directory copied to
    the job's own before it starts. ``once_training``: "SIGKILL" (the whole job) or "SIGTERM to rank 0".
    ``rank_1_extra``: arguments rank 1 alone is given after ``extra`` (as if its node read another
    command or lacked a file), through ``torchrun --no-python sh -c``."""

    name: str
    config: Path
    extra: tuple[str, ...] = ()
    then: tuple[str, ...] = ()
    processes: tuple[int, int] = (2, 2)
    seed_run: Path | None = None
    once_training: str | None = None
    rank_1_extra: tuple[str, ...] = ()


@dataclass
class Launch:
    """A started job: its process (the launcher: torchrun, or ``sh`` for a job with ``then``)."""

    spec: Spec
    process: subprocess.Popen[bytes]
    run_dir: Path
    stdout: Path
    stderr: Path
    niced: bool
    acted: str | None = None  # what was done to it once it trained (Spec.once_training)
    action_error: str | None = None  # why that failed

    def finish(self) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        out, err = self.stdout.read_text(), self.stderr.read_text()
        if code == -1:
            pytest.fail(
                f"torchrun did not finish in {LAUNCH_TIMEOUT}s ({self.action_error})\nstdout:\n{out}\nstderr:\n{err}"
            )
        return code, out, err

    def stop(self) -> None:
        """SIGKILL the job: its ranks first (torchrun starts each in a session of its own, so killing
        torchrun's process group would orphan them, training on), then its own process group."""
        if self.process.poll() is None:
            for pid in descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def act_once_training(self) -> None:
        """Spec.once_training, once the job trains (still running, not yet acted on)."""
        action = self.spec.once_training
        if action is None or self.acted is not None or self.process.poll() is not None:
            return
        if TRAINING not in self.stderr.read_text():
            return
        try:
            if action == "SIGKILL":  # as an out-of-memory killer would
                self.stop()
            else:
                rank_0 = next(
                    pid
                    for pid in descendants(self.process.pid)
                    if b"\0RANK=0\0" in Path(f"/proc/{pid}/environ").read_bytes()
                )
                os.kill(rank_0, signal.SIGTERM)
            self.acted = action
        except Exception:  # the test fails on it, with this job stopped
            self.action_error = traceback.format_exc()
            self.acted = "failed"
            self.stop()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``, children first (``pgrep -P``, level by level)."""
    found, level = [], [pid]
    while level:
        listed = subprocess.run(["pgrep", "-P", ",".join(map(str, level))], capture_output=True, text=True)
        level = [int(child) for child in listed.stdout.split()]
        found += level
    return found


class Jobs:
    """test_distributed's jobs: started one at a time, niced, from construction; ``hurry`` for the rest."""

    def __init__(self, root: Path, corpus_path: Path) -> None:
        from drnn_cli.train_session import TrainRequest, train_run

        self.root = root
        cache = root / "data"
        cache.mkdir()
        shutil.copyfile(corpus_path, cache / "timemachine.txt")
        env = {
            k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "DRNN_DEBUG"}
        }
        env["DRNN_DATA_DIR"] = str(cache)
        env["DRNN_DATA_URL"] = "http://127.0.0.1:9/unreachable"  # any download would fail loudly
        env["OMP_NUM_THREADS"] = "1"  # one intra-op thread per rank
        env["PYTHONPATH"] = pythonpath_with_repo(env)
        self.env = env

        # The finished run the --overwrite job replaces, trained here (in process) and copied to the
        # job's run directory when it starts.
        overwrite = write_config(root, "random")
        finished = root / "finished"
        with pytest.MonkeyPatch.context() as patch:  # the jobs' corpus cache, as their environment names it
            patch.setenv("DRNN_DATA_DIR", env["DRNN_DATA_DIR"])
            patch.setenv("DRNN_DATA_URL", env["DRNN_DATA_URL"])
            train_run(
                TrainRequest(
                    overwrite, ("train.epochs=1",), run_dir=finished, device="cpu", runs_root=root / "runs"
                )
            )
        sequential = write_config(root, "sequential")
        # Dropout draws from each rank's own random stream: an uninterrupted run, and one stopped inside
        # epoch 1 (step 30 of ~22 an epoch) by a step budget, then resumed without one.
        dropout = write_config(root, "sequential", dropout=0.3)
        resume = ("--resume", "--set", "train.max_steps=0")
        # The longest first (two runs each), so that what is left for `hurry` runs side by side.
        specs = [
            Spec("dropout_resumed", dropout, ("--set", "train.max_steps=30"), then=resume),
            # Stopped inside epoch 1 by one number of processes, resumed by another.
            Spec("two_then_one", sequential, ("--set", "train.max_steps=30"), then=resume, processes=(2, 1)),
            Spec("one_then_two", sequential, ("--set", "train.max_steps=30"), then=resume, processes=(1, 2)),
            Spec("dropout_full", dropout),
            *(Spec(sampling, write_config(root, sampling)) for sampling in SAMPLINGS),
            # --overwrite of a finished run under torchrun, killed before its first checkpoint.
            Spec(
                "overwrite", overwrite,
                ("--overwrite", "--set", "model.cell=gru", "--set", "train.epochs=10000",
                 "--set", "train.checkpoint_every=10000", "--set", "train.log_every=1"),
                seed_run=finished, once_training="SIGKILL",
            ),
            Spec(
                "sigterm_rank0", sequential, ("--set", "train.epochs=10000", "--set", "train.log_every=1"),
                once_training="SIGTERM to rank 0",
            ),
            Spec("indivisible", sequential, ("--set", "data.batch_size=7")),
            # A config error every rank meets before the process group exists, and one rank 1 alone meets
            # (its node has no such text: data.path is not compared among the ranks).
            Spec("every_rank_refuses", sequential, ("--set", "train.lr=-1")),
            Spec("rank_1_refuses", sequential, rank_1_extra=("--set", f"data.path={root / 'absent.txt'}")),
        ]  # fmt: skip
        self.launches: dict[str, Launch] = {}
        self._pending = specs
        self._attempts: dict[str, int] = {}
        self._hurried = False
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="torchrun-jobs", daemon=True)
        self._watcher.start()

    def _launch(self, spec: Spec, niced: bool) -> Launch:
        attempt = self._attempts[spec.name] = self._attempts.get(spec.name, 0) + 1
        name = spec.name if attempt == 1 else f"{spec.name}-{attempt}"
        run_dir = self.root / "runs" / name
        if spec.seed_run is not None:
            shutil.copytree(spec.seed_run, run_dir)

        def command(count: int) -> list[str]:
            # `--` keeps torchrun's parser off drnn's options: `--run` alone is an ambiguous prefix of
            # torchrun's --run-path/--run_path.
            launcher = [sys.executable, "-m", "drnn_cli"]
            if count > 1:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                launcher += ["--nproc_per_node", str(count), "-m", "drnn_cli", "--"]
            if count > 1 and spec.rank_1_extra:  # sh gets drnn's command as "$@" and adds rank 1's words;
                # its $0, `--`, keeps torchrun's parser off them as above
                script = f'if [ "$RANK" = 1 ]; then exec "$@" {shlex.join(spec.rank_1_extra)}; fi; exec "$@"'
                launcher[launcher.index("drnn_cli") - 1 :] = ["--no-python", "sh", "-c", script, "--"]
                launcher += [sys.executable, "-m", "drnn_cli"]
            return [
                *launcher,
                "train",
                "--config",
                str(spec.config),
                "--device",
                "cpu",
                "--run",
                str(run_dir),
                "--json",
            ]

        argv = [*command(spec.processes[0]), *spec.extra]
        if spec.then:
            argv = [
                "sh",
                "-c",
                f"{shlex.join(argv)} && {shlex.join([*command(spec.processes[1]), *spec.then])}",
            ]
        niced = niced and shutil.which("nice") is not None
        if niced:
            argv = ["nice", "-n", "19", *argv]  # exec's the command: the same process
        stdout, stderr = self.root / f"{name}.out", self.root / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                argv, cwd=self.root, env=self.env, stdout=out, stderr=err, start_new_session=True
            )
        return Launch(spec, process, run_dir, stdout, stderr, niced)

    def _watch(self) -> None:
        try:
            self._watch_until_done()
        except Exception:  # reported by `hurry`
            self.error = traceback.format_exc()

    def _watch_until_done(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                for launch in self.launches.values():
                    launch.act_once_training()
                idle = all(launch.process.poll() is not None for launch in self.launches.values())
                if idle and not self._pending:
                    return  # every job has ended
                if idle and not self._hurried:
                    spec = self._pending.pop(0)
                    self.launches[spec.name] = self._launch(spec, niced=True)
            time.sleep(0.1)

    def hurry(self) -> dict[str, Launch]:
        """Every job started, at normal priority but for those already done (or acted on) niced."""
        if self.error is not None:
            pytest.fail(f"the jobs' watcher failed:\n{self.error}")
        with self._lock:
            self._hurried = True
            for name, launch in list(self.launches.items()):
                if launch.niced and launch.process.poll() is None and launch.acted is None:
                    launch.stop()
                    self.launches[name] = self._launch(launch.spec, niced=False)
            while self._pending:
                spec = self._pending.pop(0)
                self.launches[spec.name] = self._launch(spec, niced=False)
        if not self._watcher.is_alive():  # it returns once every job has ended
            self._watcher = threading.Thread(target=self._watch, name="torchrun-jobs", daemon=True)
            self._watcher.start()
        return self.launches

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for launch in self.launches.values():
                launch.stop()
