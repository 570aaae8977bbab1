"""``train.compile on``: training steps ``model.impl scratch``'s cells through ``torch.compile``.

On a GPU this fuses each timestep's element-wise gate arithmetic into one kernel (README "Using a GPU");
here, on the CPU, what must hold is that the compiled cell computes what the plain one does.
Most tests use the ``aot_eager`` backend (the same capture and autograd split, no code generation,
compiled in a second); one compiles with inductor, the backend drnn uses, which on a CPU generates
C++ (about 15 s with a cold cache).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_TREE, assert_one_line_error, config_file

from drnn_cli.cells import CELL_STEPS, CellSteps
from drnn_cli.models import ScratchRecurrent

CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "relu")]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch: no code cached by an earlier test (or its recompile count)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_three_steps(stack: ScratchRecurrent, seed: int = 0) -> tuple[list[float], list[torch.Tensor]]:
    """Three SGD steps of ``stack`` on fixed random data: the losses and the final parameters."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.5)
    layers, hidden = stack.num_layers, stack.hidden_size
    losses = []
    for _ in range(3):
        inputs = torch.randn(5, 3, stack.input_size, generator=generator)  # (T, B, I)
        h0 = torch.randn(layers, 3, hidden, generator=generator)
        state = (h0, torch.randn(layers, 3, hidden, generator=generator)) if stack.cell == "lstm" else h0
        outputs, _ = stack(inputs, state)
        loss = outputs.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in stack.parameters()]


@pytest.mark.parametrize(
    ("cell", "nonlinearity", "form"),
    [(cell, nonlinearity, "torch") for cell, nonlinearity in CELLS] + [("gru", "tanh", "d2l")],
    ids=[*(c for c, _ in CELLS), "gru-d2l"],
)
def test_compiled_cells_train_as_the_plain_cells(cell: str, nonlinearity: str, form: str) -> None:
    torch.manual_seed(0)
    plain = ScratchRecurrent(cell, 6, 8, 2, nonlinearity=nonlinearity, form=form)
    compiled = copy.deepcopy(plain)
    compiled.compile_cells(backend="aot_eager")
    graphs = torch._dynamo.utils.counters["stats"]  # kept across dynamo resets: counted from here
    before = graphs["unique_graphs"]
    plain_losses, plain_params = train_three_steps(plain)
    assert graphs["unique_graphs"] == before
    compiled_losses, compiled_params = train_three_steps(compiled)
    assert graphs["unique_graphs"] >= before + 2  # the forward and the backward timestep went through dynamo
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-6)
    for a, b in zip(plain_params, compiled_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_evaluation_and_sampling_step_the_plain_cells() -> None:
    """Other shapes and no gradients would each mean a compilation: only training is compiled."""
    stack = ScratchRecurrent("lstm", 6, 8, 2)

    def refuse(*args: object) -> None:
        raise AssertionError("the compiled cell ran in eval mode")

    stack._training_steps = CellSteps(refuse, refuse)
    stack.eval()
    outputs, _ = stack(torch.randn(4, 1, 6), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)))
    assert outputs.shape == (4, 1, 8)
    stack.train()
    with pytest.raises(AssertionError, match="compiled cell ran in eval mode"):
        stack(torch.randn(4, 1, 6), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_two_step_probe_compiles_every_variant_a_longer_minibatch_needs(cell: str) -> None:
    """compile_cells' probe (two timesteps, as in drnn_cli/model_probes.py) must leave nothing to
    compile inside the first training step: under bf16 a backward timestep sees an fp32 ∂h at the
    last timestep and a bf16 one after it, and every timestep's saved values alike."""
    stack = ScratchRecurrent(cell, 6, 8, 2)
    stack.compile_cells(backend="aot_eager")

    def train_step(steps: int) -> None:
        h0 = torch.zeros(2, 3, 8)
        with torch.autocast("cpu", torch.bfloat16):
            outputs, _ = stack(torch.randn(steps, 3, 6), (h0, h0.clone()) if cell == "lstm" else h0)
        outputs.float().square().sum().backward()  # ∂outputs as a layer above sends it: dense, bf16

    train_step(2)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train_step(7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled > 0


def test_training_runs_both_timesteps_of_the_training_cell_forward_and_backward() -> None:
    """What compile_cells compiles is what training calls: the forward and the backward timestep."""
    stack = ScratchRecurrent("gru", 6, 8, 1)
    calls: Counter[str] = Counter()
    plain = CELL_STEPS["gru"]

    def counted(name: str, step: Callable) -> Callable:
        def wrapper(*args: object) -> object:
            calls[name] += 1
            return step(*args)

        return wrapper

    stack._training_steps = CellSteps(counted("forward", plain.forward), counted("backward", plain.backward))
    outputs, _ = stack(torch.randn(4, 1, 6), torch.zeros(1, 1, 8))
    outputs.sum().backward()
    assert calls == Counter({"forward": 4, "backward": 4})


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="inductor compiles C++ for CPU tensors and there is no C++ compiler here",
)
def test_inductor_compiles_the_lstm_cell_to_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(1)
    # input as wide as the state: both layers' cells share one compiled graph (a 6-wide input compiled
    # two, the test's main cost)
    plain = ScratchRecurrent("lstm", 16, 16, 2)
    compiled = copy.deepcopy(plain)
    compiled.compile_cells()  # inductor
    inputs = torch.randn(7, 4, 16)
    state = (torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    results = []
    for stack in (plain, compiled):
        outputs, (h, c) = stack(inputs, state)
        (outputs.square().sum() + h.sum() + c.sum()).backward()
        results.append([outputs, h, c, *(p.grad for p in stack.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_drnn_train_with_compile_on_trains_as_compile_off(
    workdir: Path, cli, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_cells = ScratchRecurrent.compile_cells
    monkeypatch.setattr(ScratchRecurrent, "compile_cells", lambda self: compile_cells(self, "aot_eager"))
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}
    tree["model"] = {**TINY_TREE["model"], "impl": "scratch", "dropout": 0.3}  # masks drawn in both
    config = config_file(workdir, tree)
    outputs = {}
    for mode in ("off", "on"):
        code, out, err = cli(
            "train", "--config", str(config), "--run", mode, "--set", f"train.compile={mode}"
        )
        assert code == 0, err
        outputs[mode] = out + err
    assert "train.compile on: the lstm cell compiled in" in outputs["on"]
    assert "train.compile" not in outputs["off"]
    off, on = _metrics(workdir / "off"), _metrics(workdir / "on")
    assert [m["epoch"] for m in on] == [m["epoch"] for m in off] == [1, 2, 3, 4]
    for a, b in zip(off, on, strict=True):
        assert b["train_ppl"] == pytest.approx(a["train_ppl"], rel=1e-5)
        assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-5)


def test_compile_on_with_torch_cells_is_a_one_line_error(
    workdir: Path, cli, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compile_cells = ScratchRecurrent.compile_cells  # the fixed settings train through aot_eager, not inductor
    monkeypatch.setattr(ScratchRecurrent, "compile_cells", lambda self: compile_cells(self, "aot_eager"))
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}
    code, out, err = cli("train", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on")
    assert out == ""
    assert_one_line_error(
        code, err, "train.compile on compiles model.impl scratch's cells, and this model is impl torch",
        "set model.impl scratch, or train.compile off",
    )  # fmt: skip
    assert code == 2  # settings that contradict each other: a config error
    assert not (workdir / "runs").exists() or not any((workdir / "runs").rglob("*.safetensors"))
    # With one cuDNN call per layer the advice names both keys: impl scratch refuses layer_calls each.
    code, _, err = cli("train", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on",
                       "--set", "model.layer_calls=each")  # fmt: skip
    assert_one_line_error(
        code, err, "set model.impl scratch with model.layer_calls stack, or train.compile off"
    )
    fixed = ("--set", "model.impl=scratch", "--set", "model.layer_calls=stack", "--set", "train.epochs=1")
    assert (
        cli("train", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on", *fixed)[0] == 0
    )
    # drnn data refuses it as training does (it described it as trainable: audit43)
    assert cli("data", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on") == (
        2,
        "",
        "drnn: error: config error: train.compile on compiles model.impl scratch's cells, and this model is "
        "impl torch; set model.impl scratch, or train.compile off\n",
    )


def test_a_compiler_failure_is_a_one_line_error(
    workdir: Path, cli, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: ScratchRecurrent) -> None:
        raise RuntimeError("C++ compile error\nthe compiler's long log")

    monkeypatch.setattr(ScratchRecurrent, "compile_cells", failing)
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}
    tree["model"] = {**TINY_TREE["model"], "impl": "scratch"}
    code, out, err = cli("train", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on")
    assert out == ""  # before training started
    assert_one_line_error(
        code,
        err,
        "train.compile on: torch.compile could not compile the lstm cell (C++ compile error); "
        "set train.compile off",
    )


def test_a_bare_yaml_on_means_on() -> None:
    """YAML 1.1 reads `compile: on` as true: it still means "on" (as for train.cuda_graph)."""
    from drnn_cli.config import build_config

    assert build_config({"model": {"impl": "scratch"}, "train": {"compile": True}}).train.compile == "on"
    assert build_config({"train": {"compile": False}}).train.compile == "off"


def test_a_backend_failure_is_named_by_its_cause_and_debug_shows_the_traceback(
    workdir: Path, cli, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dynamo wraps a backend's failure as "backend='...' raised:" with the cause on the next line:
    the one line names the cause; DRNN_DEBUG=1 prints the traceback above it."""

    def broken_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> None:
        raise ValueError("out of registers")

    compile_cells = ScratchRecurrent.compile_cells
    monkeypatch.setattr(ScratchRecurrent, "compile_cells", lambda self: compile_cells(self, broken_backend))
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(corpus_path)}}
    tree["model"] = {**TINY_TREE["model"], "impl": "scratch"}
    argv = ("train", "--config", str(config_file(workdir, tree)), "--set", "train.compile=on")
    code, _, err = cli(*argv)
    assert_one_line_error(
        code, err, "could not compile the lstm cell (out of registers); set train.compile off"
    )
    monkeypatch.setenv("DRNN_DEBUG", "1")
    code, _, err = cli(*argv)
    assert code == 1 and "Traceback" in err and "ValueError: out of registers" in err
    assert err.strip().splitlines()[-1].startswith("drnn: error: train.compile on: torch.compile could not")
