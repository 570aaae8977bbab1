"""TrainerState: what resuming needs, typed, and unchanged through a real checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from drnn_cli.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from drnn_cli.config import build_config
from drnn_cli.models import build_model
from drnn_cli.trainer_state import EpochProgress, RankState, TrainerState, UnusableTrainerState, check_shapes
from drnn_cli.vocab import Vocab


def assert_same_tree(a: Any, b: Any) -> None:
    """Equal nested values; tensors equal in dtype, shape and every element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    else:
        assert a == b


def a_trained_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def roundtrip(state: TrainerState, step_in_epoch: int, tmp_path: Path) -> TrainerState:
    config = build_config({"model": {"hidden_size": 4, "num_layers": 1}})
    vocab = Vocab.from_counts({"a": 2, "b": 1})
    checkpoint = Checkpoint(
        config=config,
        vocab=vocab,
        # A real model's weights: loading checks them against the shapes the config implies.
        model_state=build_model(len(vocab), config.model, seed=0).state_dict(),
        epoch=3,
        step_in_epoch=step_in_epoch,
        trainer_state=state.to_tree(),
    )
    save_checkpoint(tmp_path / "last.safetensors", checkpoint)
    loaded = load_checkpoint(tmp_path / "last.safetensors")
    return TrainerState.from_tree(loaded.trainer_state, loaded.step_in_epoch)


def test_a_mid_epoch_state_with_every_field_survives_a_checkpoint_file(tmp_path: Path) -> None:
    model, optimizer = a_trained_optimizer()
    progress = EpochProgress(
        loss_sum=torch.tensor(123.456, dtype=torch.float64),
        first_bad_step=torch.tensor(-1),
        step=7,
        count=560,
        state=(torch.randn(2, 4, 5), torch.randn(2, 4, 5)),  # an LSTM's (H, C)
        elapsed=1.25,
        logged_loss_sum=100.5,  # the totals at the epoch's last log line (all ranks')
        logged_count=960,
    )
    torch.manual_seed(1)
    rank1 = RankState(
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.ones(16, dtype=torch.uint8),
        progress=EpochProgress(
            torch.tensor(99.0, dtype=torch.float64), torch.tensor(5), 7, 560, None, 1.25, 100.5, 960
        ),
    )
    state = TrainerState(
        optimizer=optimizer.state_dict(),
        scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.arange(16, dtype=torch.uint8),
        bad_evals=2,
        elapsed=98.5,
        global_step=4321,
        tokens_seen=1_234_567,
        epoch_progress=progress,
        raw_model=model.state_dict(),
        average_count=17,
    )
    state.ranks = [RankState(state.rng_cpu, state.rng_cuda, progress), rank1]
    loaded = roundtrip(state, 7, tmp_path)
    assert loaded.epoch_progress is not None and loaded.epoch_progress.step == 7
    assert_same_tree(loaded.to_tree(), state.to_tree())
    assert (loaded.bad_evals, loaded.elapsed, loaded.global_step, loaded.tokens_seen) == (
        2,
        98.5,
        4321,
        1_234_567,
    )
    assert loaded.average_count == 17
    own = loaded.for_rank(1, 2)
    assert own is not None and torch.equal(own.rng_cpu, rank1.rng_cpu)
    assert (own.progress.step, float(own.progress.loss_sum), int(own.progress.first_bad_step)) == (7, 99.0, 5)
    # Another world size cannot use per-rank parts: every rank takes the writer's.
    assert loaded.for_rank(1, 4) is None
    # the parts put back together and shared out again keep the window of the next log line
    # (without a carried state here: its rows are shared out in tests/test_distributed.py)
    written = EpochProgress(
        torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1), 7, 560, None, 1.0, 100.5, 960
    )
    boundary = TrainerState(optimizer.state_dict(), {}, torch.get_rng_state(), epoch_progress=written)
    for rank in range(3):
        regrouped = boundary.progress_for(rank, 3, 4)
        assert regrouped is not None and (regrouped.logged_loss_sum, regrouped.logged_count) == (100.5, 960)


def test_an_epoch_boundary_state_keeps_the_keys_older_checkpoints_have(tmp_path: Path) -> None:
    _, optimizer = a_trained_optimizer()
    state = TrainerState(optimizer.state_dict(), {}, torch.get_rng_state(), global_step=40, tokens_seen=3200)
    tree = state.to_tree()
    assert sorted(tree) == [
        "bad_evals",
        "elapsed",
        "global_step",
        "optimizer",
        "rng_cpu",
        "scaler",
        "tokens_seen",
    ]
    loaded = roundtrip(state, 0, tmp_path)
    assert loaded.epoch_progress is None and loaded.raw_model is None and loaded.ranks is None
    assert_same_tree(loaded.to_tree(), tree)


def test_a_tree_from_before_step_counts_takes_the_defaults() -> None:
    old = {"optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "rng_cpu": torch.get_rng_state()}
    state = TrainerState.from_tree(old)
    assert (state.bad_evals, state.elapsed, state.global_step, state.tokens_seen) == (0, 0.0, None, None)
    assert state.epoch_progress is None and state.rng_cuda is None


def _a_tree(**changes: Any) -> dict[str, Any]:
    """A valid epoch-boundary tree with ``changes`` applied (a value of ``...`` removes the key)."""
    tree = {"optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "rng_cpu": torch.get_rng_state()}
    tree |= {"bad_evals": 1, "elapsed": 2.5, "global_step": 40, "tokens_seen": 3200}
    tree |= changes
    return {key: value for key, value in tree.items() if value is not ...}


PROGRESS = {
    "loss_sum": torch.tensor(1.0, dtype=torch.float64),
    "first_bad_step": torch.tensor(-1),
    "count": 8,
    "state": None,
    "elapsed": 1.0,
}


@pytest.mark.parametrize(
    ("tree", "step_in_epoch", "message"),
    [
        (None, 0, "the trainer state is null"),
        ([1, 2], 0, "the trainer state is a list"),
        ({}, 0, "trainer.optimizer is missing"),
        (_a_tree(optimizer=None), 0, "trainer.optimizer is null"),
        (_a_tree(optimizer={"state": {}}), 0, "trainer.optimizer.param_groups is missing"),
        (_a_tree(rng_cpu=...), 0, "trainer.rng_cpu is missing"),
        (_a_tree(rng_cpu=torch.zeros(3)), 0, "trainer.rng_cpu is a torch.float32 tensor of shape (3,)"),
        (_a_tree(rng_cuda="x"), 0, "trainer.rng_cuda is a str"),
        (_a_tree(scaler={"scale": "big"}), 0, "trainer.scaler.scale is a str"),
        (_a_tree(global_step=-1), 0, "trainer.global_step is negative (-1)"),
        (_a_tree(bad_evals=True), 0, "trainer.bad_evals is a bool"),
        (_a_tree(elapsed=float("nan")), 0, "trainer.elapsed is nan, not a duration"),
        (_a_tree(raw_model={"w": [1.0]}), 0, "trainer.raw_model.w is a list"),
        (_a_tree(epoch_progress="x"), 5, "trainer.epoch_progress is a str"),
        (
            _a_tree(epoch_progress=PROGRESS | {"loss_sum": torch.zeros(2, dtype=torch.float64)}),
            5,
            "trainer.epoch_progress.loss_sum is a torch.float64 tensor of shape (2,), not a scalar",
        ),
        (_a_tree(epoch_progress=PROGRESS | {"count": "8"}), 5, "trainer.epoch_progress.count is a str"),
        (
            _a_tree(epoch_progress=PROGRESS | {"logged_loss_sum": -1.0}),
            5,
            "trainer.epoch_progress.logged_loss_sum is -1.0, not a sum of losses",
        ),
        (
            _a_tree(epoch_progress=PROGRESS | {"logged_count": -8}),
            5,
            "trainer.epoch_progress.logged_count is negative (-8)",
        ),
        (  # a checkpoint is written only while every loss is finite: this would resume into a false NaN stop
            _a_tree(epoch_progress=PROGRESS | {"first_bad_step": torch.tensor(5)}),
            5,
            "trainer.epoch_progress.first_bad_step is 5, not -1 or one of the epoch's 5 steps",
        ),
        (
            _a_tree(epoch_progress=PROGRESS | {"state": (torch.zeros(1),)}),
            5,
            "trainer.epoch_progress.state is a tuple of 1 parts, not 2 tensors",
        ),
        (
            _a_tree(epoch_progress=PROGRESS, ranks=[{"rng_cpu": torch.get_rng_state()}]),
            5,
            "trainer.ranks.0.epoch_progress is missing",
        ),
        (_a_tree(epoch_progress=PROGRESS, ranks=[]), 5, "trainer.ranks is empty"),  # was an IndexError
    ],
)
def test_a_tree_that_is_not_a_trainer_state_is_refused_naming_the_part(
    tree: Any, step_in_epoch: int, message: str
) -> None:
    """A tampered or corrupt checkpoint: refused as it is read, not inside PyTorch once training runs
    (``drnn eval``, which wants only the step from it, then reports the epoch alone)."""
    with pytest.raises(UnusableTrainerState) as refused:
        TrainerState.from_tree(tree, step_in_epoch)
    assert str(refused.value) == message


def test_a_valid_tree_reads_its_values() -> None:
    state = TrainerState.from_tree(_a_tree(epoch_progress=PROGRESS), 5)
    assert (state.bad_evals, state.elapsed, state.global_step, state.tokens_seen) == (1, 2.5, 40, 3200)
    assert state.epoch_progress is not None and (state.epoch_progress.step, state.epoch_progress.count) == (
        5,
        8,
    )


def test_weights_and_carried_states_of_other_shapes_are_refused_naming_the_tensor() -> None:
    """What only the model can judge, checked before PyTorch loads it (an averaged run's raw weights,
    a mid-epoch checkpoint's carried state)."""
    h = torch.zeros(2, 4, 3)
    check_shapes("trainer.epoch_progress.state", (h, h), (h, h))  # the same shapes: accepted
    with pytest.raises(
        UnusableTrainerState, match=r"^trainer\.raw_model\.w has shape \(3,\), this model's \(2, 3\)$"
    ):
        check_shapes("trainer.raw_model", {"w": torch.zeros(3)}, {"w": torch.zeros(2, 3)})
    with pytest.raises(
        UnusableTrainerState, match=r"^trainer\.raw_model\.b has shape None, this model's \(2,\)$"
    ):
        check_shapes("trainer.raw_model", {}, {"b": torch.zeros(2)})
    with pytest.raises(
        UnusableTrainerState, match=r"^s is a torch\.float32 tensor of shape \(2, 4, 3\), not 2 tensors$"
    ):
        check_shapes("s", h, (h, h))  # a GRU's state where an LSTM's pair belongs
    with pytest.raises(UnusableTrainerState, match=r"^s\.1 has shape \(2, 5, 3\), this model's \(2, 4, 3\)$"):
        check_shapes("s", (h, torch.zeros(2, 5, 3)), (h, h))


def test_a_fresh_epoch_has_a_zero_loss_sum_and_no_bad_step() -> None:
    progress = EpochProgress.start(torch.device("cpu"))
    assert progress.loss_sum.dtype == torch.float64 and float(progress.loss_sum) == 0.0
    assert progress.first_bad_step.dtype == torch.int64 and int(progress.first_bad_step) == -1
    assert (progress.step, progress.count, progress.state, progress.elapsed) == (0, 0, None, 0.0)


def _progress(loss: float, count: int, rows: list[float]) -> EpochProgress:
    """Mid-epoch progress at step 5 carrying (h, c) for the given rows (2 layers, hidden 3)."""
    h = torch.tensor(rows).reshape(1, -1, 1).expand(2, -1, 3).contiguous()
    return EpochProgress(
        torch.tensor(loss, dtype=torch.float64), torch.tensor(-1), 5, count, (h, -h), elapsed=1.5
    )


def test_a_mid_epoch_state_written_by_two_processes_is_shared_out_to_one_or_four() -> None:
    """Rows keep their places in the global batch; the epoch's totals land on rank 0 alone, so summed
    over the processes they stay what the writers had."""
    ranks = [
        RankState(torch.zeros(1), None, _progress(10.0, 40, [0.0, 1.0])),
        RankState(torch.zeros(1), None, _progress(30.0, 40, [2.0, 3.0])),
    ]
    state = TrainerState({}, {}, torch.zeros(1), epoch_progress=ranks[0].progress, ranks=ranks)

    assert state.progress_for(1, 2, batch_size=4) is ranks[1].progress  # the same world: its own part
    alone = state.progress_for(0, 1, batch_size=4)
    assert alone is not None and (alone.step, alone.count, float(alone.loss_sum)) == (5, 80, 40.0)
    assert alone.state[0][0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(alone.state[1], -alone.state[0])
    quarters = [state.progress_for(rank, 4, batch_size=4) for rank in range(4)]
    assert [q.state[0][1, :, 2].tolist() for q in quarters] == [[0.0], [1.0], [2.0], [3.0]]
    assert [(q.count, float(q.loss_sum), int(q.first_bad_step)) for q in quarters] == [
        (80, 40.0, -1),
        (0, 0.0, -1),
        (0, 0.0, -1),
        (0, 0.0, -1),
    ]
    # Written by one process (no per-rank parts): two processes take its halves.
    single = TrainerState({}, {}, torch.zeros(1), epoch_progress=_progress(7.0, 80, [0.0, 1.0, 2.0, 3.0]))
    halves = [single.progress_for(rank, 2, batch_size=4) for rank in range(2)]
    assert [h.state[0][0, :, 0].tolist() for h in halves] == [[0.0, 1.0], [2.0, 3.0]]
    assert [(h.count, float(h.loss_sum)) for h in halves] == [(80, 7.0), (0, 0.0)]
    boundary = TrainerState({}, {}, torch.zeros(1))
    assert boundary.progress_for(0, 2, batch_size=4) is None
    # A non-finite loss seen by one writer: rank 0 carries the first such step, so the epoch still stops.
    ranks[1].progress.first_bad_step = torch.tensor(3)
    merged = [state.progress_for(rank, 1 if rank == 0 else 4, batch_size=4) for rank in (0, 2)]
    assert [int(m.first_bad_step) for m in merged] == [3, -1]
