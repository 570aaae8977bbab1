"""train.keep_every: a run keeps its checkpoint at each cadence point as a file of its own in RUN/kept/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error

from drnn_cli.batches import PlannedLength
from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.config import TrainConfig
from drnn_cli.report import SilentReporter
from drnn_cli.run_notes import kept_files_note
from drnn_cli.train_session import TrainRequest, train_run

# 2,000 tokens in 8 rows of 10: 24 optimizer steps an epoch
TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10},
    "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 1},
    "train": {"epochs": 4, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}


def config_file(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def train(config: Path, run: str, *overrides: str, **request: object):
    reporter = SilentReporter()
    notes: list[str] = []
    reporter.note = notes.append  # type: ignore[method-assign]
    result = train_run(
        TrainRequest(config_path=config, overrides=overrides, run_dir=Path(run), **request),  # type: ignore[arg-type]
        reporter=reporter,
    )
    return result, notes


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model_state


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def kept(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "kept").iterdir())


def test_an_epoch_cadence_keeps_what_last_held_after_those_epochs(workdir: Path):
    config = config_file(workdir)
    result, _ = train(config, "runs/kept", "train.keep_every=2")
    run = workdir / "runs/kept"
    assert kept(run) == ["epoch-0002.safetensors", "epoch-0004.safetensors"]
    assert result.summary()["kept"] == [
        str((run / "kept" / name).absolute()) for name in ("epoch-0002.safetensors", "epoch-0004.safetensors")
    ]
    train(config, "runs/two", "train.epochs=2")
    assert same_weights(run / "kept/epoch-0002.safetensors", workdir / "runs/two/last.safetensors")
    assert load_checkpoint(run / "kept/epoch-0002.safetensors").epoch == 2
    # the last point is written once: last is the same file under a second name
    assert os.path.samefile(run / "kept/epoch-0004.safetensors", run / "last.safetensors")


def test_a_step_cadence_keeps_by_optimizer_step_inside_and_at_the_end_of_epochs(workdir: Path):
    config = config_file(workdir)
    train(config, "runs/kept", "train.epochs=2", "train.keep_every=12 steps")
    run = workdir / "runs/kept"
    # steps 12 and 36 fall inside epochs 1 and 2, steps 24 and 48 at their ends
    assert kept(run) == [f"step-{step:08d}.safetensors" for step in (12, 24, 36, 48)]
    inside = load_checkpoint(run / "kept/step-00000036.safetensors")
    assert (inside.epoch, inside.step_in_epoch, inside.trainer().global_step) == (1, 12, 36)
    train(config, "runs/36", "train.max_steps=36")
    assert same_weights(run / "kept/step-00000036.safetensors", workdir / "runs/36/last.safetensors")


def test_a_resume_adds_to_the_kept_files_and_a_replayed_point_leaves_one_whole_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    config = config_file(workdir)
    train(config, "runs/straight", "train.keep_every=1")
    train(config, "runs/split", "train.epochs=2", "train.keep_every=1")
    run = workdir / "runs/split"
    first = (run / "kept/epoch-0001.safetensors").stat().st_ino

    # killed after epoch 3's kept file was written and before last became it: last still holds epoch 2
    import drnn_cli.checkpoint_writer as writer_module

    real_link = writer_module.atomic_link

    def killed_at_epoch_3(source: Path, path: Path) -> None:
        if source.name == "epoch-0003.safetensors":
            raise KeyboardInterrupt
        real_link(source, path)

    monkeypatch.setattr(writer_module, "atomic_link", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, "runs/split", "train.keep_every=1", resume=True)
    assert load_checkpoint(run / "last.safetensors").epoch == 2
    monkeypatch.setattr(writer_module, "atomic_link", real_link)
    result, _ = train(config, "runs/split", "train.keep_every=1", resume=True)
    names = [f"epoch-{epoch:04d}.safetensors" for epoch in (1, 2, 3, 4)]
    assert kept(run) == names  # epoch 3 once, replayed whole; no temporary left beside it
    assert [path.name for path in result.kept] == names
    assert (run / "kept/epoch-0001.safetensors").stat().st_ino == first  # the first session's, untouched
    for name in names:
        assert same_weights(run / "kept" / name, workdir / "runs/straight/kept" / name)


def test_a_kept_file_is_a_checkpoint_that_predict_reads(workdir: Path, cli):
    config = config_file(workdir)
    train(config, "runs/kept", "train.epochs=2", "train.keep_every=1")
    kept_file = workdir / "runs/kept/kept/epoch-0001.safetensors"
    code, out, err = cli("predict", "the", "--checkpoint", str(kept_file), "-n", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(kept_file)
    before = kept_file.read_bytes()
    code, out, err = cli("inspect", "the", "--checkpoint", str(kept_file), "--html", str(kept_file))
    assert (code, out) == (1, "") and f"--html {kept_file} is in {kept_file.parent}, the folder of" in err
    assert kept_file.read_bytes() == before  # a page named as a kept file would have replaced it
    # a page not yet there in kept/ is refused as no file of the run (inspect40), a name beside it taken
    page = kept_file.parent / "epoch-0001.html"
    code, out, err = cli("inspect", "the", "--checkpoint", str(kept_file), "--html", str(page))
    assert_one_line_error(
        code,
        err,
        f"--html {page} is in {kept_file.parent}, the folder of the run's kept checkpoints (train.keep_every), "
        f"which drnn keeps to them alone; give --html a name of its own, e.g. {workdir / 'runs/kept/inspect.html'}",
    )
    code, out, err = cli("train", "--config", str(config), "--run", "runs/kept", "--overwrite", "--json")
    assert code == 0, err
    assert not (workdir / "runs/kept/kept").exists()  # --overwrite replaced the directory, kept/ with it
    assert json.loads(out.splitlines()[-1])["kept"] == []


def test_nothing_is_kept_by_default(workdir: Path):
    assert TrainConfig().keep_every == 0
    result, _ = train(config_file(workdir), "runs/plain", "train.epochs=1")
    assert not (workdir / "runs/plain/kept").exists()
    assert result.summary()["kept"] == []


def test_a_cadence_that_keeps_more_than_100_files_says_how_many_and_their_disk(workdir: Path, cli):
    length = PlannedLength(steps_per_epoch=24, step_budget=0, epochs=100, steps=2400)
    assert kept_files_note(TrainConfig(keep_every=1), length, 216_604, 12) is None  # 100 files
    assert kept_files_note(TrainConfig(keep_every="20 steps"), length, 216_604, 12) == (
        "train.keep_every (20 steps) keeps 120 checkpoints in this run's kept/ folder, 2.5 MiB each "
        "(216,604 parameters × 12 bytes): 297.5 MiB in all; a larger train.keep_every keeps fewer"
    )
    # a training says it before its first step: an LSTM of 16 units on 28 tokens, Adam's two moments
    # (train.max_time stops it after a step: the note counts the planned run)
    _, notes = train(
        config_file(workdir), "runs/many", "train.epochs=101", "train.keep_every=1", "train.max_time=0.000001"
    )
    assert "keeps 101 checkpoints in this run's kept/ folder, 40.1 KiB each (3,420 parameters" in "\n".join(
        notes
    )
    # drnn data says it before a run too, as training does: 4·16·(28 + 16 + 2) + 16·28 + 28 = 3,420
    # parameters (V 28, H 16), the weights and Adam's two moments at 4 bytes each, 101 times
    code, out, err = cli(
        "data",
        "--config",
        str(config_file(workdir)),
        "--set",
        "train.epochs=101",
        "--set",
        "train.keep_every=1",
    )
    assert code == 0, err
    assert (
        "train.keep_every (1 epoch) keeps 101 checkpoints in this run's kept/ folder, 40.1 KiB each "
        "(3,420 parameters × 12 bytes): 4.0 MiB in all" in " ".join(out.split())
    ), out


def test_where_the_filesystem_has_no_hard_links_last_is_a_copy_of_the_kept_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    def no_links(source: object, target: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # as FAT or an SMB share answers

    monkeypatch.setattr(os, "link", no_links)
    train(config_file(workdir), "runs/copied", "train.epochs=1", "train.keep_every=1")
    run = workdir / "runs/copied"
    kept_file, last = run / "kept/epoch-0001.safetensors", run / "last.safetensors"
    assert not os.path.samefile(kept_file, last) and kept_file.read_bytes() == last.read_bytes()
    assert kept(run) == ["epoch-0001.safetensors"] and sorted(p.name for p in run.glob(".*.tmp")) == []
