"""torchrun: two CPU processes (gloo, DistributedDataParallel) train exactly what one process trains.

Each rank owns B/W rows of every global minibatch (sequential: a contiguous group of the layout's
rows; random: a disjoint share of each shuffled minibatch), DDP averages the per-rank mean-loss
gradients into the global mean, and every rank draws the same batching randomness, so the same seed
and the same global ``data.batch_size`` end in the same parameters.

The jobs go through ``python -m torch.distributed.run`` as a user's would (``--standalone`` picks a
free port). Starting a job costs three torch imports, so the module starts all of its jobs at once
and each test waits for its own; the single-process references train in the test process
meanwhile. The jobs run in a directory prepared as the ``workdir`` fixture prepares one (corpus
cache filled, downloads pointed at a dead address); the references and ``drnn eval`` use ``workdir``.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import pythonpath_with_repo

from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.models import build_model
from drnn_cli.train_session import TrainRequest, train_run

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
LAUNCH_TIMEOUT = 300  # seconds; a hung collective fails the test instead of stalling the suite
SAMPLINGS = ("sequential", "random")

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


@dataclass
class Launch:
    """One ``torchrun --standalone --nproc_per_node 2 -m drnn_cli -- ARGS`` job."""

    process: subprocess.Popen[bytes]
    run_dir: Path
    stdout: Path
    stderr: Path

    def finish(self) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        out, err = self.stdout.read_text(), self.stderr.read_text()
        if code == -1:
            pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT}s\nstdout:\n{out}\nstderr:\n{err}")
        return code, out, err

    def stop(self) -> None:
        """SIGKILL the job: its ranks first (torchrun starts each in a session of its own, so killing
        torchrun's process group would orphan them, training on), then its own process group."""
        if self.process.poll() is None:
            for pid in _descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, children first (``pgrep -P``, level by level)."""
    found, level = [], [pid]
    while level:
        listed = subprocess.run(["pgrep", "-P", ",".join(map(str, level))], capture_output=True, text=True)
        level = [int(child) for child in listed.stdout.split()]
        found += level
    return found


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, corpus_path: Path) -> Iterator[dict[str, Launch]]:
    root = tmp_path_factory.mktemp("torchrun")
    cache = root / "data"
    cache.mkdir()
    shutil.copyfile(corpus_path, cache / "timemachine.txt")
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "DRNN_DEBUG"}}
    env["DRNN_DATA_DIR"] = str(cache)
    env["DRNN_DATA_URL"] = "http://127.0.0.1:9/unreachable"  # any download would fail loudly
    env["OMP_NUM_THREADS"] = "1"  # one intra-op thread per rank
    env["PYTHONPATH"] = pythonpath_with_repo(env)

    def start(
        name: str, config: Path, *extra: str, then: tuple[str, ...] = (), processes: tuple[int, int] = (2, 2)
    ) -> Launch:
        """One job; with ``then``, a second one on the same run directory once the first succeeded.
        ``processes``: how many processes each of the two runs (1: plain ``python -m drnn_cli``)."""
        run_dir = root / "runs" / name

        def command(count: int) -> list[str]:
            # `--` keeps torchrun's parser off drnn's options: `--run` alone is an ambiguous prefix of
            # torchrun's --run-path/--run_path.
            launcher = [sys.executable, "-m", "drnn_cli"]
            if count > 1:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                launcher += ["--nproc_per_node", str(count), "-m", "drnn_cli", "--"]
            return [
                *launcher,
                "train",
                "--config",
                str(config),
                "--device",
                "cpu",
                "--run",
                str(run_dir),
                "--json",
            ]

        argv = [*command(processes[0]), *extra]
        if then:
            argv = ["sh", "-c", f"{shlex.join(argv)} && {shlex.join([*command(processes[1]), *then])}"]
        stdout, stderr = root / f"{name}.out", root / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                argv, cwd=root, env=env, stdout=out, stderr=err, start_new_session=True
            )
        return Launch(process, run_dir, stdout, stderr)

    # The finished run the --overwrite job replaces, trained here first (in process: a child of its own
    # waited behind the jobs' twenty-odd interpreters starting at once).
    overwrite = write_config(root, "random")
    finished = root / "runs" / "overwrite"
    with pytest.MonkeyPatch.context() as patch:  # the jobs' corpus cache, as their environment names it
        patch.setenv("DRNN_DATA_DIR", env["DRNN_DATA_DIR"])
        patch.setenv("DRNN_DATA_URL", env["DRNN_DATA_URL"])
        train_run(TrainRequest(overwrite, ("train.epochs=1",), run_dir=finished, device="cpu"))
    jobs = {sampling: start(sampling, write_config(root, sampling)) for sampling in SAMPLINGS}
    jobs["indivisible"] = start("indivisible", write_config(root, "sequential"), "--set", "data.batch_size=7")
    # Dropout draws from each rank's own random stream: an uninterrupted run, and one stopped inside
    # epoch 1 (step 30 of ~22 an epoch) by a step budget, then resumed without one.
    dropout = write_config(root, "sequential", dropout=0.3)
    jobs["dropout_full"] = start("dropout_full", dropout)
    jobs["dropout_resumed"] = start(
        "dropout_resumed",
        dropout,
        "--set",
        "train.max_steps=30",
        then=("--resume", "--set", "train.max_steps=0"),
    )
    # Stopped inside epoch 1 by one number of processes, resumed by another.
    for name, processes in (("two_then_one", (2, 1)), ("one_then_two", (1, 2))):
        jobs[name] = start(
            name,
            write_config(root, "sequential"),
            "--set",
            "train.max_steps=30",
            then=("--resume", "--set", "train.max_steps=0"),
            processes=processes,
        )
    # --overwrite of a finished run under torchrun, killed before its first checkpoint.
    jobs["sigterm_rank0"] = start(  # signalled by the test once it trains
        "sigterm_rank0", write_config(root, "sequential"), "--set", "train.epochs=10000",
        "--set", "train.log_every=1",
    )  # fmt: skip
    jobs["overwrite"] = start(  # killed by the test once it trains: its first checkpoint never comes
        "overwrite", overwrite, "--overwrite", "--set", "model.cell=gru", "--set", "train.epochs=10000",
        "--set", "train.checkpoint_every=10000", "--set", "train.log_every=1",
    )  # fmt: skip
    try:
        yield jobs
    finally:
        for job in jobs.values():
            job.stop()


# First: it stops the job that would otherwise train on beside every other test.
def test_overwrite_under_torchrun_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
    launches: dict[str, Launch],
) -> None:
    """--overwrite trains beside the old run and swaps only on success, under torchrun too: killed
    while it trains, before its first checkpoint, the old run is still there, unchanged."""
    import time

    job = launches["overwrite"]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while "epoch 1/" not in job.stderr.read_text() and job.process.poll() is None:
        assert time.monotonic() < deadline, job.stderr.read_text()
        time.sleep(0.2)
    job.stop()  # SIGKILL to torchrun and its ranks, as an out-of-memory killer would
    old = load_checkpoint(job.run_dir / "last.safetensors")
    assert (old.config.model.cell, old.epoch) == ("lstm", 1)
    assert yaml.safe_load((job.run_dir / "config.yaml").read_text())["model"]["cell"] == "lstm"


def test_sigterm_to_rank_0_alone_stops_the_job_with_its_checkpoint_and_stop_line(
    launches: dict[str, Launch],
) -> None:
    """The ranks vote on it and stop at the same step; the others wait for rank 0's checkpoint. They left
    at once, exited 143, torchrun sent rank 0 a SIGTERM of its own, and rank 0 took it for a second one:
    no checkpoint, no stop line, no JSON (practitioner trial, a 2×1024 model: 3 runs of 3)."""
    import time

    job = launches["sigterm_rank0"]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while "epoch 1/" not in job.stderr.read_text() and job.process.poll() is None:
        assert time.monotonic() < deadline, job.stderr.read_text()
        time.sleep(0.2)
    rank_0 = next(
        pid
        for pid in _descendants(job.process.pid)
        if b"\0RANK=0\0" in Path(f"/proc/{pid}/environ").read_bytes()
    )
    os.kill(rank_0, signal.SIGTERM)
    _, out, err = job.finish()  # torchrun's own status is 1: a worker exited 143
    stopped = json.loads(out.strip().splitlines()[-1])
    assert (stopped["stop_reason"], stopped["checkpoint"]) == (
        "SIGTERM",
        str(job.run_dir / "last.safetensors"),
    )
    assert "drnn: training stopped by SIGTERM after " in err and "interrupted" not in err, err
    assert load_checkpoint(job.run_dir / "last.safetensors").trainer_state["global_step"] == stopped["steps"]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_two_processes_train_what_one_process_trains(
    launches: dict[str, Launch], workdir: Path, cli, sampling: str
) -> None:
    one_dir = workdir / "runs" / "one"
    one = train_run(TrainRequest(config_path=write_config(workdir, sampling), run_dir=one_dir, device="cpu"))
    job = launches[sampling]
    code, out, err = job.finish()
    assert code == 0, f"torchrun failed ({code})\nstdout:\n{out}\nstderr:\n{err}"
    two_dir = job.run_dir

    # The same parameters after 2 epochs (and they moved well away from the initialisation).
    reference = load_checkpoint(one_dir / "last.safetensors")
    distributed = load_checkpoint(two_dir / "last.safetensors")
    assert distributed.epoch == reference.epoch == 2
    assert distributed.config.data.sampling == sampling
    assert distributed.model_state.keys() == reference.model_state.keys()
    for name, expected in reference.model_state.items():
        torch.testing.assert_close(distributed.model_state[name], expected, rtol=0, atol=1e-5, msg=name)
    initial = build_model(len(reference.vocab), reference.config.model, seed=reference.config.train.seed)
    moved = max((reference.model_state[k] - v).abs().max().item() for k, v in initial.state_dict().items())
    assert moved > 1e-2

    # Rank 0 alone reports: one JSON line on stdout, one human run log on stderr.
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    summary = json.loads(lines[0])
    assert summary["world_size"] == WORLD_SIZE and one.world_size == 1
    assert summary["epochs"] == 2 and summary["run_dir"] == str(two_dir)
    assert err.count("from scratch") == 1, err
    # Loss sums are all-reduced, so the reported numbers are the single-process ones.
    assert summary["train_ppl"] == pytest.approx(one.train_ppl, rel=1e-6)
    assert summary["val_ppl"] == pytest.approx(one.val_ppl, rel=1e-6)
    assert summary["best_val_ppl"] == pytest.approx(one.best_val_ppl, rel=1e-6)
    assert set(summary["samples"]) == set(one.samples)

    # The run directory is written once: the single-process run's files, one metrics line an epoch.
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir())
    assert len((two_dir / "metrics.jsonl").read_text().splitlines()) == 2

    # The checkpoint needs nothing special: drnn eval reads it as it reads any other.
    code, eval_out, eval_err = cli("eval", "--run", str(two_dir), "--device", "cpu", "--json")
    assert code == 0, eval_err
    report = json.loads(eval_out.strip().splitlines()[-1])
    assert report["split"] == "val" and report["epoch"] == 2
    assert report["perplexity"] == pytest.approx(summary["best_val_ppl"], rel=1e-6)


def test_two_processes_resumed_inside_an_epoch_train_what_an_uninterrupted_run_trains(
    launches: dict[str, Launch],
) -> None:
    """Each rank resumes its own dropout stream and its own rows' carried state from a mid-epoch
    checkpoint, not rank 0's (with rank 0's random state the parameters differ by ~0.09)."""
    for name in ("dropout_full", "dropout_resumed"):
        code, out, err = launches[name].finish()
        assert code == 0, f"{name}: torchrun failed ({code})\nstdout:\n{out}\nstderr:\n{err}"
    stopped, resumed = (
        json.loads(line) for line in launches["dropout_resumed"].stdout.read_text().splitlines()
    )
    assert (stopped["stop_reason"], stopped["steps"]) == ("max_steps", 30) and 1 < stopped["epochs"] < 2
    assert (resumed["stop_reason"], resumed["epochs"]) == ("epochs", 2)
    assert (resumed["start_epoch"], resumed["start_step"]) == (stopped["epochs"], 30)
    full = load_checkpoint(launches["dropout_full"].run_dir / "last.safetensors")
    continued = load_checkpoint(launches["dropout_resumed"].run_dir / "last.safetensors")
    assert continued.epoch == full.epoch == 2 and continued.config.model.dropout == 0.3
    assert continued.trainer_state["global_step"] == full.trainer_state["global_step"] > 30
    for name, expected in full.model_state.items():
        torch.testing.assert_close(continued.model_state[name], expected, rtol=0, atol=1e-6, msg=name)


def test_a_run_stopped_inside_an_epoch_resumes_with_another_number_of_processes(
    launches: dict[str, Launch], workdir: Path
) -> None:
    """Two processes stopped at step 30 (inside epoch 2) and resumed by one, and the reverse, end
    where one uninterrupted process ends: the rows' carried states are put back together and shared
    out again, the epoch's loss sums kept (README "Several processes, GPUs or nodes")."""
    one_dir = workdir / "runs" / "one"
    config = write_config(workdir, "sequential")
    one = train_run(TrainRequest(config_path=config, run_dir=one_dir, device="cpu"))
    reference = load_checkpoint(one_dir / "last.safetensors")
    # the training perplexity of the resumed epoch's last line covers the steps since the stop's line
    stop_dir = workdir / "runs" / "one-stopped"
    train_run(TrainRequest(config, ("train.max_steps=30",), run_dir=stop_dir, device="cpu"))
    one_resumed = train_run(
        TrainRequest(config, ("train.max_steps=0",), run_dir=stop_dir, device="cpu", resume=True)
    )
    assert one_resumed.train_ppl != pytest.approx(one.train_ppl, rel=1e-3)  # not the whole epoch's
    for name in ("two_then_one", "one_then_two"):
        code, out, err = launches[name].finish()
        assert code == 0, f"{name} failed ({code})\nstdout:\n{out}\nstderr:\n{err}"
        stopped, resumed = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
        assert (stopped["stop_reason"], stopped["steps"]) == ("max_steps", 30), name
        assert resumed["start_epoch"] == stopped["epochs"] and resumed["epochs"] == 2, name
        assert resumed["train_ppl"] == pytest.approx(one_resumed.train_ppl, rel=1e-5), name
        continued = load_checkpoint(launches[name].run_dir / "last.safetensors")
        for key, expected in reference.model_state.items():
            torch.testing.assert_close(
                continued.model_state[key], expected, rtol=0, atol=1e-5, msg=f"{name} {key}"
            )


def test_a_batch_that_does_not_divide_among_the_processes_is_a_one_line_error(
    launches: dict[str, Launch],
) -> None:
    job = launches["indivisible"]
    code, out, err = job.finish()
    assert code != 0
    assert out.strip() == ""
    # Every rank reports the same single line (torchrun then adds its own failure summary).
    lines = {line for line in err.splitlines() if line.startswith("drnn:")}
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("drnn: error: ") and "data.batch_size 7" in line, line
    assert f"{WORLD_SIZE} processes" in line, line
    assert "internal error" not in err
    assert not (job.run_dir / "last.safetensors").exists()


def test_torchrun_with_one_process_joins_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --nproc_per_node 1`` takes the distributed path (gloo here, NCCL on a GPU)."""
    import socket

    from drnn_cli.runtime import init_distributed, shutdown_distributed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    for name, value in {**environment, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    context = init_distributed("cpu")
    try:
        assert (context.world_size, context.rank, context.launched, context.enabled) == (1, 0, True, True)
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    finally:
        shutdown_distributed(context)
    assert not torch.distributed.is_initialized()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert init_distributed("cpu").enabled is False  # a plain `python -m drnn_cli`: no process group


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_a_torchrun_worker_leaves_without_the_interpreters_teardown(under_torchrun: bool) -> None:
    """At interpreter exit, the gloo group DDP still held was torn down by destructors, and a worker
    thread destroyed unjoined aborted the process ("terminate called without an active exception"):
    torchrun failed two finished CI runs. Under torchrun the process leaves by os._exit once its output
    is flushed (no atexit handler, no destructor runs), with the program's exit code; elsewhere as usual."""
    script = (
        "import atexit, sys\n"
        "from drnn_cli.signals import exit_process\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "def program():\n"
        "    sys.stdout.write('written, unflushed')\n"
        "    sys.exit(3)\n"
        "exit_process(program)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    if under_torchrun:
        environment["TORCHELASTIC_RUN_ID"] = "test"
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3
    assert done.stdout == ("written, unflushed" if under_torchrun else "written, unflushedteardown ran\n")
