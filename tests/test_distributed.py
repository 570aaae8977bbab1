"""torchrun: two CPU processes (gloo, DistributedDataParallel) train exactly what one process trains.

Each rank owns B/W rows of every global minibatch (sequential: a contiguous group of the layout's
rows; random: a disjoint share of each shuffled minibatch), DDP averages the per-rank mean-loss
gradients into the global mean, and every rank draws the same batching randomness, so the same seed
and the same global ``data.batch_size`` end in the same parameters.

The jobs go through ``python -m torch.distributed.run`` as a user's would (``--standalone`` picks a
free port). Starting a job costs three torch imports, so the session starts the jobs with its first
test, niced, on the core the in-process tests leave idle, and each test here waits for its own
(tests/torchrun_jobs.py); the single-process references train in the test process meanwhile. The
jobs run in a directory prepared as the ``workdir`` fixture prepares one (corpus
cache filled, downloads pointed at a dead address); the references and ``drnn eval`` use ``workdir``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TREE, config_file
from torchrun_jobs import SAMPLINGS, WORLD_SIZE, Jobs, Launch, write_config

from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.models import build_model
from drnn_cli.train_session import TrainRequest, train_run


@pytest.fixture(scope="module")
def launches(torchrun_jobs: Jobs) -> Iterator[dict[str, Launch]]:
    """The module's jobs, each test waiting for its own; those not yet started (with the session,
    niced) start now at once (tests/torchrun_jobs.py)."""
    try:
        yield torchrun_jobs.hurry()
    finally:
        torchrun_jobs.stop()


def test_overwrite_under_torchrun_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
    launches: dict[str, Launch],
) -> None:
    """--overwrite trains beside the old run and swaps only on success, under torchrun too: killed
    while it trains, before its first checkpoint, the old run is still there, unchanged."""
    job = launches["overwrite"]
    code, _, err = job.finish()  # SIGKILLed, torchrun and its ranks, once it trained
    assert (job.acted, code) == ("SIGKILL", -signal.SIGKILL), (job.action_error, err)
    old = load_checkpoint(job.run_dir / "last.safetensors")
    assert (old.config.model.cell, old.epoch) == ("lstm", 1)
    assert yaml.safe_load((job.run_dir / "config.yaml").read_text())["model"]["cell"] == "lstm"


def test_sigterm_to_rank_0_alone_stops_the_job_with_its_checkpoint_and_stop_line(
    launches: dict[str, Launch],
) -> None:
    """The ranks vote on it and stop at the same step; the others wait for rank 0's checkpoint. They left
    at once, exited 143, torchrun sent rank 0 a SIGTERM of its own, and rank 0 took it for a second one:
    no checkpoint, no stop line, no JSON (practitioner trial, a 2×1024 model: 3 runs of 3)."""
    job = launches["sigterm_rank0"]
    _, out, err = job.finish()  # torchrun's own status is 1: a worker exited 143
    assert job.acted == "SIGTERM to rank 0", (job.action_error, err)
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
    out again, the epoch's loss sums kept (docs/distributed.md; README "Several processes, GPUs or nodes")."""
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
    # Every rank meets it, rank 0 says it (torchrun then adds its own failure summary).
    lines = [line for line in err.splitlines() if line.startswith("drnn:")]
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("drnn: error: ") and "data.batch_size 7" in line, line
    assert f"{WORLD_SIZE} processes" in line, line
    assert "internal error" not in err
    assert not (job.run_dir / "last.safetensors").exists()


def exit_codes(torchrun_err: str) -> list[int]:
    """Each process's exit code as torchrun's failure summary lists them (``exitcode  : 2 (pid: 41)``)."""
    return sorted(
        int(line.split(":", 1)[1].split("(")[0])
        for line in torchrun_err.splitlines()
        if line.strip().startswith("exitcode")
    )


def test_an_error_every_rank_meets_is_said_once(launches: dict[str, Launch]) -> None:
    """A config error each of the two processes meets before the process group exists was printed once
    by each: rank 0 says it, rank 1 exits quietly (it waited for torchrun's signal, which followed rank
    0's exit), and both exit non-zero, so torchrun fails the job. (Under load rank 1 may not have reached
    the error when the signal comes: it then says it was interrupted, as before.)"""
    job = launches["every_rank_refuses"]
    code, out, err = job.finish()
    assert (code, out) == (1, "")
    error = "drnn: error: config error: train.lr: Input should be greater than 0 (got -1)"
    assert err.count("train.lr") == 1 and f"{error}\n" in err, err
    others = {line for line in err.splitlines() if line.startswith("drnn:")} - {error}
    assert others <= {"drnn: interrupted (SIGTERM) (torchrun's, if another process of the job failed)"}, err
    codes = exit_codes(err)
    assert len(codes) == WORLD_SIZE and 0 not in codes, err
    assert not job.run_dir.exists()


def test_an_error_one_rank_meets_is_said_naming_that_rank(launches: dict[str, Launch]) -> None:
    """Rank 1 alone has no such text (as a node without the file): it waits for torchrun's signal, none
    comes (rank 0 waits for it in the process group), and it says its error naming its rank and host;
    rank 0, ended by torchrun, says it was. The job fails."""
    import socket

    job = launches["rank_1_refuses"]
    code, out, err = job.finish()
    assert (code, out) == (1, "")
    missing = job.run_dir.parent.parent / "absent.txt"
    said = [line for line in err.splitlines() if line.startswith("drnn:")]
    assert said[0] == (
        f"drnn: error: rank 1 of {WORLD_SIZE} on host {socket.gethostname()}: corpus file {missing} does not "
        "exist; fix data.path: it must name a UTF-8 text file"
    ), err
    # rank 0's own line: torchrun's SIGTERM (143), or the peer's leaving if that came first (1)
    assert err.count("does not exist") == 1 and len(said) == 2, err
    assert said[1].startswith(("drnn: interrupted (SIGTERM)", "drnn: error: another process")), err
    codes = exit_codes(err)
    assert len(codes) == WORLD_SIZE and 1 in codes and 0 not in codes, err
    assert not (job.run_dir / "last.safetensors").exists()


@pytest.mark.parametrize("signalled", [True, False])
def test_a_worker_not_local_rank_0_says_its_error_only_where_torchruns_signal_does_not_come(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch, signalled: bool
) -> None:
    """Rank 3 of 4 (local rank 1 of its node) waits before saying an error: torchrun's SIGTERM, which
    follows local rank 0's exit, means local rank 0 met it too and said it; without one the error is this
    process's own, said naming its rank and host. Either way the exit code is the error's."""
    import socket

    import drnn_cli.cli
    from drnn_cli.signals import Signalled

    environment = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    waited: list[str] = []

    def wait() -> None:
        waited.append("waited")
        if signalled:  # what the handler of exit_on_signals raises on torchrun's SIGTERM
            raise Signalled(signal.SIGTERM)

    monkeypatch.setattr(drnn_cli.cli, "_await_local_rank_0", wait)
    code, out, err = cli("train", "--config", str(config_file(workdir, TINY_TREE)), "--set", "train.lr=-1")
    assert (code, out, waited) == (2, "", ["waited"])
    assert err == (
        ""
        if signalled
        else f"drnn: error: rank 3 of 4 on host {socket.gethostname()}: config error: train.lr: Input should "
        "be greater than 0 (got -1)\n"
    )
    assert not (workdir / "runs").exists()
    monkeypatch.setenv("LOCAL_RANK", "0")  # a node's local rank 0 says it at once (rank 3: on another node)
    code, out, err = cli("train", "--config", str(config_file(workdir, TINY_TREE)), "--set", "train.lr=-1")
    assert (code, waited) == (2, ["waited"])
    assert err.startswith(f"drnn: error: rank 3 of 4 on host {socket.gethostname()}: config error: train.lr")


def test_a_signal_outside_training_is_said_by_a_nodes_local_rank_0_alone(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun's SIGTERM after one process failed (or a Ctrl-C, which every process gets) reached a
    worker still starting, and each said `interrupted (SIGTERM)` beside the error that caused it: the
    node's local rank 0 says the signal's line; the others end quietly, with the signal's exit code."""
    import drnn_cli.cli
    from drnn_cli.signals import Signalled

    def signalled(*args: object) -> str:
        raise Signalled(signal.SIGTERM)

    monkeypatch.setattr(drnn_cli.cli, "find_config", signalled)  # still starting: reading its config
    for name, value in {
        "TORCHELASTIC_RUN_ID": "test",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli("train", "--config", "lstm2") == (143, "", "")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli("train", "--config", "lstm2") == (
        143,
        "",
        "drnn: interrupted (SIGTERM) (torchrun's, if another process of the job failed)\n",
    )


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


def test_processes_given_other_settings_or_another_text_refuse_in_one_line_naming_them(
    corpus_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node reads its own command, config and text: two one-process nodes given other
    ``train.max_steps`` hung, other ``train.lr`` trained on silently with the rates mixed, another copy
    of the text silently, another vocabulary failed as an internal error in DDP's constructor (ddp32).
    The ranks compare digests of every setting, the text and the vocabulary before the model is built.
    Here rank 1's view: the other rank's digests (recorded from its own check) are what all_reduce
    combines with this rank's, as gloo would."""
    from conftest import TINY_TREE

    from drnn_cli import rank_agreement
    from drnn_cli.config import Config, build_config
    from drnn_cli.data import Dataset, load_dataset
    from drnn_cli.errors import DrnnError
    from drnn_cli.rank_agreement import check_every_rank_runs_alike, rank_words
    from drnn_cli.runtime import DistContext

    shuffled = tmp_path / "stale.txt"  # a stale copy: the same characters, its lines in another order
    lines = corpus_path.read_text(encoding="utf-8").splitlines(keepends=True)
    shuffled.write_text("".join(lines[1::2] + lines[::2]), encoding="utf-8")

    def node(text: Path, *overrides: str) -> tuple[Config, Dataset]:
        tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(text)}}
        config = build_config(tree, list(overrides))
        return config, load_dataset(config.data)

    other_ranks: list[torch.Tensor] = []

    def recording(tensor: torch.Tensor, op: object) -> None:
        other_ranks.append(tensor.clone())

    def combining(tensor: torch.Tensor, op: object) -> None:
        assert op == torch.distributed.ReduceOp.MAX
        torch.maximum(tensor, other_ranks.pop(0), out=tensor)

    def compare(mine: tuple[Config, Dataset], theirs: tuple[Config, Dataset]) -> str | None:
        monkeypatch.setattr(torch.distributed, "all_reduce", recording)
        check_every_rank_runs_alike(*theirs, DistContext(0, 2), torch.device("cpu"))
        monkeypatch.setattr(torch.distributed, "all_reduce", combining)

        def exchanged(config: Config, dataset: Dataset, names: list[str], *_: object) -> list[str]:
            # the words each rank sends where they differ (the table's sum: test_every_ranks_words_...)
            return [rank_words(*theirs, names), rank_words(config, dataset, names)]

        monkeypatch.setattr(rank_agreement, "every_ranks_words", exchanged)
        try:
            check_every_rank_runs_alike(*mine, DistContext(1, 2), torch.device("cpu"))
        except DrnnError as refused:
            return str(refused)
        finally:
            assert other_ranks == []  # two collectives each: the largest digests, and the smallest
        return None

    same = node(corpus_path)
    assert compare(same, node(corpus_path)) is None
    # where the text lies and the device are each node's own; a note-only setting is still a setting
    assert compare(same, node(corpus_path, "train.device=auto")) is None
    assert compare(node(corpus_path, "train.max_steps=300"), node(corpus_path, "train.max_steps=200")) == (
        "the processes of this torchrun job differ in train.max_steps (rank 0: train.max_steps 200; rank 1: "
        "train.max_steps 300): run the same command, config and text on every node "
        '(README "Several processes, GPUs or nodes")'
    )
    refused = compare(node(shuffled, "train.lr=0.02"), same)
    lr = same[0].train.lr
    assert refused is not None and refused.startswith(
        f"the processes of this torchrun job differ in train.lr, the text (rank 0: train.lr {lr!r}, the text "
        f"{corpus_path} (SHA-1 "
    ), refused
    assert f"; rank 1: train.lr 0.02, the text {shuffled} (SHA-1 " in refused, refused
    other_vocabulary = tmp_path / "other.txt"
    other_vocabulary.write_text("a b c\n" * 500, encoding="utf-8")
    refused = compare(node(other_vocabulary), same)
    assert refused is not None and "differ in the text, the vocabulary (rank 0: the text" in refused, refused
    assert "; rank 1: the text" in refused, refused
    assert ", a vocabulary of " in refused and "internal error" not in refused
    # another drnn on the other node knows another setting: digests of lists of two lengths aborted in
    # gloo ("Received data size doesn't match expected size") rather than refusing (review rev32)
    settings = Config.settings
    monkeypatch.setattr(Config, "settings", lambda self: {**settings(self), "train.newer": 1})
    monkeypatch.setattr(torch.distributed, "all_reduce", recording)
    check_every_rank_runs_alike(*same, DistContext(0, 2), torch.device("cpu"))
    monkeypatch.setattr(Config, "settings", settings)
    monkeypatch.setattr(torch.distributed, "all_reduce", combining)
    with pytest.raises(DrnnError) as older:
        check_every_rank_runs_alike(*node(corpus_path), DistContext(1, 2), torch.device("cpu"))
    assert str(older.value).startswith(
        "the processes of this torchrun job differ in the settings drnn knows (rank 1: drnn "
    ), older.value
    # this rank met the names' two collectives alone (the recording rank, combining nothing, went on to
    # the values' two, which in a job it would skip as this one did)
    assert len(other_ranks) == 2
    other_ranks.clear()


def test_every_ranks_words_reach_every_rank_through_one_sum_of_a_fixed_table(
    corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """red42: on one node the refusal named rank 0's train.lr alone (the other rank's line is not said).
    Each rank writes its words into its own row of a (ranks, 240) table, and one sum gives every rank
    all of them: here rank 2 of 3, the sum adding the other two's rows as gloo would."""
    from conftest import TINY_TREE

    from drnn_cli.config import build_config
    from drnn_cli.data import load_dataset
    from drnn_cli.rank_agreement import RANK_WORDS_BYTES, every_ranks_words, grouped_by_words
    from drnn_cli.runtime import DistContext

    config = build_config(
        {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}, ["train.lr=0.5"]
    )
    dataset = load_dataset(config.data)
    others = {0: "train.lr 0.1", 1: "train.lr 0.1 — é" + "x" * 400}  # a long one is cut at 240 bytes

    def summing(table: torch.Tensor, op: object = None) -> None:
        for rank, words in others.items():
            encoded = words.encode()[:RANK_WORDS_BYTES]
            table[rank, : len(encoded)] += torch.tensor(list(encoded), dtype=torch.int32)

    monkeypatch.setattr(torch.distributed, "all_reduce", summing)
    words = every_ranks_words(config, dataset, ["train.lr"], DistContext(2, 3), torch.device("cpu"))
    assert words[0] == "train.lr 0.1" and words[2] == "train.lr 0.5"
    assert words[1].startswith("train.lr 0.1 — é") and len(words[1].encode()) == RANK_WORDS_BYTES
    assert grouped_by_words(["a", "a", "b", "a", "a", "c"]) == "ranks 0–1, 3–4: a; rank 2: b; rank 5: c"
    assert grouped_by_words([str(rank) for rank in range(6)]) == (
        "rank 0: 0; rank 1: 1; rank 2: 2; rank 3: 3; and 2 other values"
    )


def test_under_torchrun_commands_other_than_train_run_on_rank_0_alone(
    tiny_run: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torchrun --nproc-per-node 2 -m drnn_cli -- eval --json`` printed its answer twice and a script's
    reader got two JSON objects (ddp32): only training is shared out among the processes."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("WORLD_SIZE", "2")
    answers = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        answers[rank] = cli("eval", "--run", str(tiny_run), "--split", "val", "--json")
    assert answers["1"] == (0, "", "")
    code, out, err = answers["0"]
    assert code == 0 and json.loads(out)["split"] == "val", err
    monkeypatch.setenv("RANK", "1")
    for command in (("predict", "the", "--run", str(tiny_run)), ("presets",), ("data", "--config", "quick")):
        assert cli(*command) == (0, "", ""), command
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # a stray WORLD_SIZE and RANK, no torchrun: it answers
    code, out, err = cli("eval", "--run", str(tiny_run), "--split", "val", "--json")
    assert code == 0 and json.loads(out)["split"] == "val", err
