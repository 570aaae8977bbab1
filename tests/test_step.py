"""The static-buffer step, run eagerly, is bit for bit the plain training loop.

The reference below is the step as drnn wrote it before the static buffers (and as d2l's
``train_epoch_ch8`` does it): a fresh zero state for every random minibatch or at an epoch's start,
the previous minibatch's state detached for a sequential one, forward, mean cross-entropy over the
time-major targets, backward, clip, optimizer step. Both sides start from the same weights and see
the same minibatches; losses and parameters must be *equal*, not close.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from drnn_cli.batches import epoch_generator, training_batches
from drnn_cli.config import Config, TrainConfig, build_config, load_config
from drnn_cli.data import load_dataset
from drnn_cli.errors import DrnnError
from drnn_cli.models import RNNLanguageModel, build_model, detach_state
from drnn_cli.step import StaticStep, clip_gradients, reads_lr_on_device, use_cuda_graph
from drnn_cli.train import Trainer, build_optimizer, lr_changes_every_step

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def tiny_config(corpus_path: Path, *overrides: str) -> Config:
    tree = {
        "data": {"path": str(corpus_path), "max_tokens": 1500, "batch_size": 4, "num_steps": 8},
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2},
        "train": {"optimizer": "sgd", "lr": 1.0, "clip": 1.0, "seed": 5, "device": "cpu"},
    }
    return build_config(tree, list(overrides))


def reference_losses(
    model: RNNLanguageModel, optimizer: torch.optim.Optimizer, config: Config, batches: list
) -> list[torch.Tensor]:
    """The plain loop: a new state object every minibatch, carried by detaching the last one."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    carries = config.data.sampling == "sequential"
    losses, state = [], None
    for x, y in batches:
        state = model.begin_state(x.shape[0], "cpu") if state is None or not carries else detach_state(state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.t().reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.clip > 0:
            clip_gradients(parameters, config.train.clip)
        optimizer.step()
        losses.append(loss.detach())
    return losses


def two_epochs_of_batches(config: Config, tokens: torch.Tensor) -> list[list]:
    data = config.data
    return [
        list(
            training_batches(
                tokens, data.sampling, data.batch_size, data.num_steps, epoch_generator(config.train.seed, e)
            )
        )[: STEPS // 2]
        for e in range(2)
    ]


CASES = [
    ("sgd", "sequential", 1.0, ()),
    ("sgd", "sequential", 0.0, ()),
    ("sgd", "random", 1.0, ()),
    ("adamw", "sequential", 1.0, ()),
    ("adamw", "random", 0.0, ()),
    # Dropout draws from the same generator in the same order on both sides.
    ("adamw", "sequential", 1.0, ("model.impl=scratch", "model.cell=gru", "model.dropout=0.3")),
    ("sgd", "random", 1.0, ("model.cell=rnn", "model.output_dropout=0.2", "model.embedding_dim=8")),
]


@pytest.mark.parametrize(("optimizer", "sampling", "clip", "extra"), CASES)
def test_eager_static_step_is_bit_identical_to_the_plain_step(
    corpus_path: Path, optimizer: str, sampling: str, clip: float, extra: tuple[str, ...]
) -> None:
    overrides = (f"train.optimizer={optimizer}", f"data.sampling={sampling}", f"train.clip={clip}", *extra)
    config = tiny_config(corpus_path, *overrides, *(["train.lr=0.01"] if optimizer == "adamw" else []))
    dataset = load_dataset(config.data)
    epochs = two_epochs_of_batches(config, dataset.splits.train)
    vocab_size = len(dataset.vocab)

    plain = build_model(vocab_size, config.model, seed=config.train.seed)
    plain_optimizer = build_optimizer(plain, config.train)
    static = build_model(vocab_size, config.model, seed=config.train.seed)
    static_optimizer = build_optimizer(static, config.train)
    step = StaticStep(
        static,
        static,
        static_optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        config.train.clip,
        config.train.precision,
        torch.device("cpu"),
        batch_rows=config.data.batch_size,
        num_steps=config.data.num_steps,
        carries_state=sampling == "sequential",
    )
    plain.train()
    static.train()

    expected, got = [], []
    for batches in epochs:  # each epoch starts from a zero state on both sides
        torch.manual_seed(11)
        expected += reference_losses(plain, plain_optimizer, config, batches)
        torch.manual_seed(11)
        step.begin_epoch(None)
        got += [step(x, y).clone() for x, y in batches]

    assert len(got) == STEPS
    assert torch.equal(torch.stack(got), torch.stack(expected))
    for (name, a), b in zip(plain.named_parameters(), static.parameters(), strict=True):
        assert torch.equal(a, b), name
    # The weights moved: identical because the arithmetic is, not because nothing happened.
    initial = build_model(vocab_size, config.model, seed=config.train.seed)
    assert not torch.equal(next(initial.parameters()), next(static.parameters()))


def test_trainer_epochs_equal_the_plain_loop(corpus_path: Path, tmp_path: Path) -> None:
    """Trainer.train_epoch goes through the static step: its perplexity is the plain loop's, exactly."""
    config = tiny_config(corpus_path, "train.optimizer=adamw", "train.lr=0.01")
    dataset = load_dataset(config.data)
    trainer = Trainer(config, dataset, tmp_path / "run", torch.device("cpu"))
    ppl = [trainer.train_epoch(epoch)[0] for epoch in range(2)]

    plain = build_model(len(dataset.vocab), config.model, seed=config.train.seed)
    optimizer = build_optimizer(plain, config.train)
    plain.train()
    data = config.data
    for epoch in range(2):
        batches = training_batches(
            dataset.splits.train,
            data.sampling,
            data.batch_size,
            data.num_steps,
            epoch_generator(config.train.seed, epoch),
        )
        losses = reference_losses(plain, optimizer, config, list(batches))
        mean = sum(loss.double() * data.batch_size * data.num_steps for loss in losses) / (
            len(losses) * data.batch_size * data.num_steps
        )
        assert ppl[epoch] == float(torch.exp(mean))
    for a, b in zip(plain.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resumed_epoch_starts_from_the_carried_state(corpus_path: Path) -> None:
    config = tiny_config(corpus_path)
    model = build_model(30, config.model, seed=0)
    step = StaticStep(
        model,
        model,
        build_optimizer(model, config.train),
        torch.amp.GradScaler("cpu", enabled=False),
        1.0,
        "fp32",
        torch.device("cpu"),
        batch_rows=4,
        num_steps=8,
        carries_state=True,
    )
    h, c = torch.full((2, 4, 16), 0.5), torch.full((2, 4, 16), -0.25)
    step.begin_epoch((h, c))
    carried = step.carried_state()
    assert torch.equal(carried[0], h) and torch.equal(carried[1], c)
    assert carried[0].data_ptr() != step.state[0].data_ptr()  # a copy, not the live buffer
    step.begin_epoch(None)
    assert not step.state[0].any() and not step.state[1].any()


def test_total_norm_is_the_foreach_norm_it_replaced() -> None:
    """torch.nn.utils.get_total_norm gives bit for bit the ‖·‖ that torch._foreach_norm gave."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator) * 3 for shape in [(40, 28), (40,), (7, 3, 5), (1,)]]
    before = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    assert torch.equal(torch.nn.utils.get_total_norm(grads).float(), before)


def test_cuda_graph_choice() -> None:
    # YAML 1.1 reads a bare `cuda_graph: on` as true: it still means "on".
    assert build_config({"train": {"cuda_graph": True}}).train.cuda_graph == "on"
    assert build_config({"train": {"cuda_graph": False}}).train.cuda_graph == "off"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    # auto: on for one CUDA device, quietly off wherever `on` would be refused or bypassed
    graph_note = "train.cuda_graph auto: each training step replays as one CUDA graph (off: eager)"
    assert use_cuda_graph("auto", cuda, "fp32", False) == (True, graph_note)
    assert use_cuda_graph("auto", cuda, "bf16", False) == (True, graph_note)
    assert use_cuda_graph("auto", cpu, "fp32", False) == (False, None)
    assert use_cuda_graph("auto", cuda, "fp32", True) == (False, None)  # torchrun
    assert use_cuda_graph("auto", cuda, "fp16", False) == (False, None)
    assert use_cuda_graph("auto", cuda, "fp32", False, lr_every_step=True) == (False, None)
    assert use_cuda_graph("off", cuda, "fp32", False) == (False, None)
    assert use_cuda_graph("on", cuda, "bf16", False) == (True, None)
    # A rate that moves at every step would mean a capture at every step: eager, said in one line.
    assert use_cuda_graph("on", cuda, "fp32", False, lr_every_step=True) == (
        False,
        "train.cuda_graph on: the learning rate changes at every step (train.max_steps with a schedule "
        "or warm-up) and a captured step bakes it in; training runs without the graph",
    )
    for device, precision, distributed, message in [
        (
            cpu,
            "fp32",
            False,
            "train.cuda_graph on needs a CUDA device, and this run is on cpu; set train.cuda_graph to auto or off",
        ),
        (
            cuda,
            "fp32",
            True,
            "train.cuda_graph on is not supported under torchrun: DistributedDataParallel's gradient all-reduce "
            "is not captured; set train.cuda_graph to off",
        ),
        (
            cuda,
            "fp16",
            False,
            "train.cuda_graph on cannot capture fp16 training: its gradient scaler reads the overflow check on "
            "the host at every step; use train.precision bf16 (no scaler) or train.cuda_graph off",
        ),
    ]:
        with pytest.raises(DrnnError) as error:
            use_cuda_graph("on", device, precision, distributed)
        assert str(error.value) == message


def test_which_presets_change_the_learning_rate_at_every_step() -> None:
    """Only a step budget anneals per step: lstm_full_cpu (max_steps + cosine). The d2l presets
    (constant rate) and lstm_full (cosine per epoch) change it at most once an epoch."""
    presets = {
        name: load_config(REPO / "configs" / f"{name}.yaml").train
        for name in ("lstm2", "lstm_full", "lstm_full_cpu")
    }
    assert {name: lr_changes_every_step(train) for name, train in presets.items()} == {
        "lstm2": False,
        "lstm_full": False,
        "lstm_full_cpu": True,
    }
    constant = presets["lstm_full_cpu"].model_copy(update={"schedule": "constant"})
    assert not lr_changes_every_step(constant)


def test_adam_reads_the_learning_rate_on_the_device_and_sgd_does_not() -> None:
    """So a per-step schedule keeps the graph with Adam/AdamW (lstm_full_cpu's AdamW) and runs
    eagerly with SGD (README "Using a GPU")."""
    model = torch.nn.Linear(2, 2)
    chosen = {
        name: reads_lr_on_device(build_optimizer(model, TrainConfig(optimizer=name)))
        for name in ("sgd", "adam", "adamw")
    }
    assert chosen == {"sgd": False, "adam": True, "adamw": True}


def test_cuda_graph_on_without_cuda_is_a_one_line_error(workdir: Path, cli, corpus_path: Path) -> None:
    code, out, err = cli(
        "train",
        "--config",
        str(REPO / "configs" / "quick.yaml"),
        "--device",
        "cpu",
        "--set",
        "train.cuda_graph=on",
    )
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [
        "drnn: error: train.cuda_graph on needs a CUDA device, and this run is on cpu; "
        "set train.cuda_graph to auto or off"
    ]
    assert not (workdir / "runs" / "quick").exists() and not (workdir / "runs" / "latest").exists()


def test_a_failed_capture_names_the_first_error_and_restores_the_rates(
    corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a capture an illegal operation fails, then ending the capture fails again ("a previous
    error during capture"): the one line names the first failure, which stays chained for
    DRNN_DEBUG. The optimizer's groups get their numeric rates back (checkpoints keep those)."""
    import contextlib

    config = tiny_config(corpus_path, "train.optimizer=adamw", "train.lr=0.01")
    dataset = load_dataset(config.data)
    model = build_model(len(dataset.vocab), config.model, seed=0)
    optimizer = build_optimizer(model, config.train)
    step = StaticStep(
        model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0, "fp32",
        torch.device("cpu"), batch_rows=config.data.batch_size, num_steps=config.data.num_steps,
        carries_state=True, graph=True,
    )  # fmt: skip
    seen_rates = []

    def failing_body() -> torch.Tensor:
        seen_rates.extend(group["lr"] for group in optimizer.param_groups)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    @contextlib.contextmanager
    def capture(graph: object):  # ends the capture the way torch.cuda.graph does: it fails too
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(step, "body", failing_body)
    with pytest.raises(DrnnError) as failure:
        step._capture((0.01, 0.01))
    assert str(failure.value) == (
        "train.cuda_graph on: capturing the training step failed (CUDA error: operation not permitted "
        "when stream is capturing); set train.cuda_graph to off and report this (DRNN_DEBUG=1 shows the "
        "traceback)"
    )
    assert "not permitted" in str(failure.value.__cause__)
    # While recording, AdamW read its rates from device tensors; afterwards the groups hold numbers.
    assert [type(rate) for rate in seen_rates] == [torch.Tensor, torch.Tensor]
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.01]
    assert step.captures == 0
