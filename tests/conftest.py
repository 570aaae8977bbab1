"""Shared fixtures: the reference corpus beside the checkout, isolated working directories."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

# Triton decides when it is first imported whether kernels compile for a GPU or run in its CPU
# interpreter, so the choice is made here, before any test imports it: without CUDA, the fused LSTM
# kernels (tests/test_fused.py) run interpreted. (Importing torch does not import Triton.)
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# DRNN_TEST_CORPUS points elsewhere where ../shared is absent (scripts/gpu_check.py on a GPU machine).
CORPUS = Path(os.environ.get("DRNN_TEST_CORPUS") or REPO.parent / "shared" / "data" / "timemachine.txt")
TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


def pythonpath_with_repo(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """PYTHONPATH for a child interpreter: the checkout first, then the caller's own entries (on the
    GPU machine, the carried wheels that hold pydantic)."""
    return os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True, scope="session")
def _session_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures (runs trained once) are set up in a scratch directory too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that test the torchrun jobs run last: the jobs, started with the session, niced, then
    have the idle core of the whole suite before them (tests/torchrun_jobs.py)."""
    last = {item.path for item in items if "torchrun_jobs" in item.fixturenames}
    items.sort(key=lambda item: item.path in last)  # stable: the order within each part is kept


@pytest.fixture(scope="session")
def torchrun_jobs(tmp_path_factory: pytest.TempPathFactory, corpus_path: Path) -> Iterator[object]:
    """tests/test_distributed.py's torchrun jobs (tests/torchrun_jobs.py), stopped with the session."""
    from torchrun_jobs import Jobs

    jobs = Jobs(tmp_path_factory.mktemp("torchrun"), corpus_path)
    try:
        yield jobs
    finally:
        jobs.stop()


@pytest.fixture(autouse=True, scope="session")
def _torchrun_jobs_from_the_start(request: pytest.FixtureRequest) -> None:
    """Where the session holds tests of the torchrun jobs, they start with its first test, niced, on
    the core that the in-process tests before them leave idle (tests/torchrun_jobs.py)."""
    if CORPUS.is_file() and any("torchrun_jobs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("torchrun_jobs")


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts in a scratch directory, so that what drnn writes relative to the working
    directory (``runs/latest``, ``runs/<config>``, ``data/``) never lands in the checkout; ``workdir``
    moves a test into a directory of its own that already holds the corpus."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """``../shared/data/timemachine.txt``: the file d2l downloads, never committed here."""
    if not CORPUS.is_file():
        pytest.fail(f"the reference corpus is missing: {CORPUS} (CI places ../shared beside the checkout)")
    return CORPUS


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus_path: Path) -> Path:
    """A fresh current directory whose corpus cache already holds the verified Time Machine.

    ``runs/`` and ``data/`` are relative to the current directory, so each test gets its own.
    """
    enter_workdir(tmp_path, monkeypatch, corpus_path)
    return tmp_path


def enter_workdir(directory: Path, patch: pytest.MonkeyPatch, corpus_path: Path) -> None:
    """``workdir``'s set-up in ``directory`` (a fixture of a wider scope uses it with a MonkeyPatch of
    its own): the corpus cache, the current directory and the environment."""
    cache = directory / "data"
    cache.mkdir()
    (cache / "timemachine.txt").write_bytes(corpus_path.read_bytes())
    patch.chdir(directory)
    patch.setenv("DRNN_DATA_DIR", str(cache))
    patch.setenv("DRNN_DATA_URL", "http://127.0.0.1:9/unreachable")  # any download would fail loudly
    patch.delenv("DRNN_DEBUG", raising=False)
    patch.delenv("DRNN_CACHE_DIR", raising=False)  # the token cache in data/token-cache
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        patch.delenv(name, raising=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "draws_plot: training in this test renders perplexity.png with matplotlib (elsewhere a stand-in)",
    )


PLOT_STAND_IN = b"perplexity.png stand-in: tests/conftest.py renders no PNG in a test not marked draws_plot\n"


@pytest.fixture(autouse=True)
def _plot_rendered_only_where_tested(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering perplexity.png (tight_layout and savefig: ~0.2 s at each first and last epoch) was a
    fifth of the suite's time, in tests that never look at it. Outside tests marked ``draws_plot`` a
    run's plot still builds its figure from the run's records (drnn_cli/plot.py's perplexity_figure:
    log scale, the epochs axis, values left out) and is still written where and when it would be, but
    its bytes are PLOT_STAND_IN, not a PNG, so a test that reads the image and lacks the mark fails.
    The drawing itself is tested by the tests marked ``draws_plot`` and by tests/test_long_runs.py's
    and tests/test_finetune.py's direct render_perplexity_plot calls; drnn started as a subprocess
    always draws."""
    if request.node.get_closest_marker("draws_plot") is not None:
        return
    monkeypatch.setattr("drnn_cli.report.render_perplexity_plot", plot_figure_only)


def plot_figure_only(
    records: object, title: str | None = None, val_split_tokens: int = 0, train_as: str | None = None
) -> bytes | None:
    """``render_perplexity_plot`` as tests not marked ``draws_plot`` have it: the figure built, the
    bytes PLOT_STAND_IN."""
    from drnn_cli.plot import perplexity_figure

    try:
        perplexity_figure(records, title, val_split_tokens, train_as)  # type: ignore[arg-type]
    except ImportError:
        return None  # as render_perplexity_plot answers where matplotlib is missing
    return PLOT_STAND_IN


@pytest.fixture(autouse=True)
def _fsync_checks_its_descriptor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each atomic write (drnn_cli/files.py) fsyncs the file and its folder: ~2 ms a call on a CI disk,
    ~4,500 calls in the in-process training tests alone. What reaching the disk buys shows only after
    a power cut, which no test makes, so in-process tests fsync with ``os.fstat``: a descriptor that is
    closed or not one still fails as fsync would (EBADF), and a test that patches ``os.fsync`` itself
    (a full disk) replaces this. drnn started as a subprocess always fsyncs."""
    monkeypatch.setattr(os, "fsync", os.fstat)


@pytest.fixture(autouse=True, scope="session")
def _each_typer_app_built_once() -> Iterator[None]:
    """Typer builds drnn's click command from the command functions' signatures on every main() call
    (~10 ms: their annotations evaluated anew), which the in-process tests make some 800 times. What it
    builds depends on those declarations alone, so in-process calls reuse an app's first build; each
    call still parses its own arguments and runs its command. drnn started as a subprocess builds its
    own, and a test that replaces ``get_command`` (a Typer that fails to build) still replaces it."""
    import typer
    import typer.main

    build = typer.main.get_command
    built: dict[int, tuple[typer.Typer, Any]] = {}  # the command's class is typer's vendored click's

    def once(app: typer.Typer) -> Any:  # a reloaded drnn_cli.cli's new app is built anew
        entry = built.get(id(app))
        if entry is None or entry[0] is not app:
            entry = built[id(app)] = (app, build(app))
        return entry[1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.main, "get_command", once)
        yield


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tests use tiny models on 2-core CI machines: one intra-op thread is fastest, and an OpenMP
    team spinning against a busy second core makes a tiny LSTM step ~100x slower."""
    import torch

    torch.set_num_threads(1)


TINY_TREE = {
    "data": {"max_tokens": 3000, "batch_size": 8, "num_steps": 10, "val_fraction": 0.2},
    "model": {"cell": "lstm", "hidden_size": 32, "num_layers": 2},
    "train": {"epochs": 4, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu", "seed": 3},
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_path: Path) -> Path:
    """A small trained run (with a validation split), trained once per session; use it read-only."""
    import torch
    import yaml

    from drnn_cli.train_session import TrainRequest, train_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_run")
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    run_dir = root / "run"
    # its own runs root: the fixture may be set up before a test moves into its workdir, and must not
    # record a latest run in whatever directory pytest started in (the checkout)
    train_run(TrainRequest(config_path=config, run_dir=run_dir, runs_root=root / "runs"))
    return run_dir


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``drnn ARGS...`` in-process (no interpreter start-up): returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = drnn_in_process(*args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def drnn_in_process(*args: str) -> int:
    """``drnn ARGS...`` run in this process: its exit code."""
    from drnn_cli.cli import main

    try:
        main(list(args))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The error contract: non-zero exit, one ``drnn: error:`` line naming each needle, never a
    traceback or an "internal error"."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("drnn: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_run_locked_by_this_process(run_dir: Path) -> None:
    """Inside ``with RunLock(run_dir)``: the lock file names this process, and another taker is refused
    (``acquire`` either holds the lock or raises, so ``lock.held`` there proves nothing)."""
    import socket

    from drnn_cli.errors import DrnnError
    from drnn_cli.rundir import RunLock

    assert (run_dir / "train.lock").read_text().split() == [socket.gethostname(), str(os.getpid())]
    with pytest.raises(DrnnError, match="is in use by another training"):
        RunLock(run_dir).acquire()


def config_file(directory: Path, tree: dict | str, name: str = "tiny.yaml") -> Path:
    """``tree`` (a mapping, or raw YAML text) written as a config file in ``directory``."""
    import yaml

    path = directory / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


@pytest.fixture
def step_losses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each training step's mean loss, in order, as the step returns it (a list the test reads)."""

    from drnn_cli.step import StaticStep

    losses: list[float] = []
    original = StaticStep.__call__

    def recording(self: StaticStep, window: torch.Tensor) -> torch.Tensor:
        loss = original(self, window)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(StaticStep, "__call__", recording)
    return losses


def rewrite_checkpoint(source: Path, target: Path, edit_tensors=None, edit_header=None) -> None:
    """Write a copy of ``source`` with edited tensors or drnn header, bypassing drnn's own checks."""
    payload = source.read_bytes()
    (length,) = struct.unpack("<Q", payload[:8])
    drnn = json.loads(json.loads(payload[8 : 8 + length])["__metadata__"]["drnn"])
    tensors = dict(load_safetensors(payload))
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_header is not None:
        edit_header(drnn)
    target.write_bytes(save_safetensors(tensors, metadata={"drnn": json.dumps(drnn)}))


def poison_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """After the given epoch's last update, the weights are NaN while every loss so far was finite."""
    from drnn_cli.train import Trainer

    original = Trainer.train_epoch

    def train_epoch(self, index: int):
        result = original(self, index)
        if index + 1 == epoch:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
