"""TensorBoard logs (train.tensorboard): the scalars and samples, read back from the event file."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from drnn_cli.errors import DrnnError
from drnn_cli.train_session import TrainRequest, train_run

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10, "val_fraction": 0.2},
    "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1},
    "train": {"epochs": 1, "optimizer": "adam", "lr": 0.01, "device": "cpu", "sample_chars": 5},
}


def train(directory: Path, *overrides: str) -> object:
    config = directory / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return train_run(TrainRequest(config_path=config, overrides=overrides))


def test_scalars_and_samples_are_in_the_event_file(workdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        workdir,
        "train.tensorboard=true",
        "train.eval_every=5 steps",
        "train.sample_every=10 steps",
        "train.sample_prefixes=[the]",
    )
    run = workdir / "runs" / "tiny"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {
        "perplexity/train",
        "perplexity/validation",
        "learning_rate",
        "tokens_per_s",
        "gradient_norm",
    } <= set(tags["scalars"])
    steps = [line["step"] for line in lines]
    assert steps == [5, 10, 15, 19]
    for tag, key in (
        ("perplexity/validation", "val_ppl"),
        ("perplexity/train", "train_ppl"),
        ("learning_rate", "lr"),
    ):
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == steps
        assert [value for _, value in logged] == pytest.approx([line[key] for line in lines], rel=1e-6)
    norms = [event.value for event in events.Scalars("gradient_norm")]
    assert len(norms) == 4 and all(math.isfinite(norm) and norm > 0 for norm in norms)
    samples = events.Tensors("samples/the/text_summary")
    assert [event.step for event in samples] == [10, 19]  # at step 10, and the final samples
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("the") and len(text) == len("the") + 5


def test_an_unclipped_run_logs_its_gradient_norm_and_trains_as_without_the_log(workdir: Path):
    """train.clip 0 (d2l's unclipped recipes) is where the norm matters most: it is measured for the
    log all the same, and measuring it leaves the training untouched."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = train(workdir, "train.clip=0", "train.tensorboard=true", "train.eval_every=5 steps")
    events = EventAccumulator(str(workdir / "runs" / "tiny" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    norms = [(event.step, event.value) for event in events.Scalars("gradient_norm")]
    assert [step for step, _ in norms] == [5, 10, 15, 19]
    assert all(math.isfinite(norm) and norm > 0 for _, norm in norms)
    plain = train_run(
        TrainRequest(
            workdir / "tiny.yaml", ("train.clip=0", "train.eval_every=5 steps"), run_dir=Path("runs/plain")
        )
    )
    assert (plain.train_ppl, plain.best_val_ppl) == (logged.train_ppl, logged.best_val_ppl)
    # the norm's value: a clip too large to act reports the norm it measured before clipping (tested by
    # value against torch's in test_train.py), and trains the same steps
    train_run(
        TrainRequest(
            workdir / "tiny.yaml",
            ("train.clip=1e9", "train.tensorboard=true", "train.eval_every=5 steps"),
            run_dir=Path("runs/unclipped-by-a-huge-clip"),
        )
    )
    reference = EventAccumulator(
        str(workdir / "runs" / "unclipped-by-a-huge-clip" / "tensorboard"), size_guidance={"scalars": 0}
    )
    reference.Reload()
    assert norms == [
        (event.step, pytest.approx(event.value, rel=1e-6)) for event in reference.Scalars("gradient_norm")
    ]


def test_a_resumed_run_keeps_the_events_up_to_its_checkpoint_and_a_finished_one_adds_none(workdir: Path):
    """TensorBoard equals metrics.jsonl after a resume: the checkpoint's own step stays, and a resume
    that has nothing to train neither hides events nor writes its samples a second time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    settings = ("train.tensorboard=true", "train.eval_every=5 steps", "train.sample_prefixes=[the]")
    train_run(TrainRequest(config_path=config, overrides=(*settings, "train.max_steps=10")))
    for _ in range(2):  # to the end of the epoch (step 19), then again with nothing left to train
        train_run(TrainRequest(config_path=config, overrides=settings, resume=True))
    run = workdir / "runs" / "tiny"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 19]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = events.Scalars("perplexity/validation")
    assert [event.step for event in logged] == [5, 10, 15, 19]
    assert [event.value for event in logged] == pytest.approx([line["val_ppl"] for line in lines], rel=1e-6)
    assert [event.step for event in events.Tensors("samples/the/text_summary")] == [10, 19]


def test_without_the_package_the_option_is_refused_in_one_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Refused before the text is read: a big one's token cache went into the corpus folder first."""
    from drnn_cli import train_session

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(train_session, "load_same_corpus", _not_read)
    with pytest.raises(DrnnError) as error:
        train(workdir, "train.tensorboard=true")
    assert str(error.value) == (
        "train.tensorboard needs the tensorboard package: pip install 'tensorboard>=2.14' (drnn's "
        "tensorboard extra), "
        "or set train.tensorboard: false"
    )
    assert not (workdir / "runs" / "tiny").exists()


def _not_read(*args: object, **kwargs: object) -> None:
    raise AssertionError("the text was read before train.tensorboard was refused")


def test_the_logged_gradient_norm_leaves_out_the_steps_an_fp16_overflow_skipped(tmp_path: Path) -> None:
    """fp16: a step whose gradients overflowed has an inf/NaN norm and no update; the interval's
    mean is over the other steps, where it used to be dropped whole (a non-finite sum)."""
    import torch

    from drnn_cli.tensorboard_log import TensorBoardLog

    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir: str, purge_step: int | None) -> None:
            pass

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

    log = TensorBoardLog(Writer, tmp_path, torch.device("cpu"), resume_step=None)
    for norm in (2.0, math.inf, 4.0, math.nan):
        log.add_grad_norm(torch.tensor(norm))
    record = SimpleNamespace(train_ppl=5.0, val_ppl=None, lr=0.1, tokens_per_s=100.0, step=4)
    log.add_record(record)
    log.add_grad_norm(torch.tensor(math.inf))  # an interval of skipped steps only: no figure, not a wrong one
    log.add_record(SimpleNamespace(**{**vars(record), "step": 5}))
    assert [(tag, value) for tag, value, step in scalars if tag == "gradient_norm"] == [
        ("gradient_norm", 3.0)
    ]
