"""On a CUDA GPU: checkpoints cross devices, the GPU computes what the CPU computes, half precision
stays finite, torchrun runs over NCCL, and the CUDA-graph step replays what the eager step computes.

Every test here is skipped without CUDA (CI has none); ``scripts/gpu_check.py`` runs them on a GPU.
Tolerances, and why they are not zero:

* GPU vs CPU, fp32 with TF32 off: the two sum in different orders (cuDNN's RNN kernels, cuBLAS), so
  losses agree to 1e-4 relative over the first steps, and a checkpoint's perplexity to 1e-4.
* CUDA graph vs eager on the GPU: the same kernels on the same data; 1e-5 relative allows for cuDNN
  picking another algorithm inside a capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import pythonpath_with_repo
from test_fused import OTHER_CELLS, _pair, _run, _run_h, record_stack_launches

from drnn_cli import fused_recurrence
from drnn_cli.batches import epoch_batches
from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.config import Config, ModelConfig, build_config
from drnn_cli.data import load_dataset
from drnn_cli.errors import DrnnError
from drnn_cli.models import FusedRecurrent, build_model, lm_loss
from drnn_cli.optimizers import build_optimizer, make_capturable
from drnn_cli.step import StaticStep
from drnn_cli.train import Trainer
from drnn_cli.train_session import TrainRequest, train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """fp32 means fp32: TF32 matrix units would round products to 10-bit mantissas."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_config(corpus_path: Path, *overrides: str) -> Config:
    tree = {
        "data": {"path": str(corpus_path), "max_tokens": 4000, "batch_size": 16, "num_steps": 16},
        "model": {"cell": "lstm", "hidden_size": 64, "num_layers": 2},
        "train": {"optimizer": "sgd", "lr": 1.0, "clip": 1.0, "seed": 2, "sample_every": 0, "epochs": 3},
    }
    return build_config(tree, list(overrides))


def write_yaml(path: Path, config: Config) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def count_captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time any StaticStep records its step as a CUDA graph: a run
    that fell back to eager would match an eager run trivially."""
    recorded: list[int] = []
    real = StaticStep._capture

    def capture(self: StaticStep, lrs: tuple[float, ...]) -> None:
        real(self, lrs)
        recorded.append(1)

    monkeypatch.setattr(StaticStep, "_capture", capture)
    return recorded


def static_step(
    config: Config, device: torch.device, graph: bool = False
) -> tuple[StaticStep, torch.nn.Module]:
    dataset = load_dataset(config.data)
    model = build_model(len(dataset.vocab), config.model, seed=config.train.seed).to(device)
    fp16 = config.train.precision == "fp16"
    # Both CUDA sides capturable, and fp16's both fused: the comparison is about the graph alone.
    optimizer = build_optimizer(model, config.train, fused=fp16 and device.type == "cuda")
    if device.type == "cuda":
        make_capturable(optimizer)
    # fp16: a first scale far too large and quick growth, so that both sides skip overflowing
    # updates at first (inside the graph too) and grow the scale again.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**24, growth_interval=5, enabled=fp16)
    step = StaticStep(
        model,
        model,
        optimizer,
        scaler,
        config.train.clip,
        config.train.precision,
        device,
        batch_rows=config.data.batch_size,
        num_steps=config.data.num_steps,
        carries_state=config.data.sampling == "sequential",
        graph=graph,
    )
    model.train()
    return step, model


def windows(config: Config, device: torch.device, count: int) -> list[torch.Tensor]:
    """The first ``count`` minibatch windows ``(B, T+1)`` of the run's epochs, as the trainer steps them."""
    data = config.data
    tokens = load_dataset(data).splits.train.to(device)
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < count:
        out += list(epoch_batches(tokens, data, config.train.seed, epoch).windows_from(0))
        epoch += 1
    return out[:count]


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_a_gpu_checkpoint_evaluates_the_same_on_the_cpu(
    workdir: Path, cli, corpus_path: Path, impl: str
) -> None:
    """impl fused: trained by the Triton kernels, evaluated on the CPU by the scratch cells."""
    config = tiny_config(corpus_path, "data.val_fraction=0.2", f"model.impl={impl}")
    run = workdir / "runs" / "gpu"
    train_run(TrainRequest(config_path=write_yaml(workdir / "gpu.yaml", config), run_dir=run, device="cuda"))
    results = {}
    for device in ("cuda", "cpu"):
        code, out, err = cli("eval", "--run", str(run), "--device", device, "--json")
        assert code == 0, err
        results[device] = json.loads(out.strip().splitlines()[-1])["perplexity"]
    assert math.isfinite(results["cpu"]) and results["cpu"] < 28
    assert results["cpu"] == pytest.approx(results["cuda"], rel=1e-4)


def test_predict_puts_the_model_on_the_gpu_and_leaves_the_trainer_state_on_the_cpu(
    workdir: Path, corpus_path: Path
) -> None:
    """An AdamW run with an average: its moments and raw weights would double or triple the weights'
    GPU memory for nothing a prediction reads."""
    from drnn_cli.commands import load_model

    config = tiny_config(corpus_path, "train.optimizer=adamw", "train.lr=0.01", "train.average=ema")
    run = workdir / "runs" / "gpu"
    train_run(TrainRequest(config_path=write_yaml(workdir / "gpu.yaml", config), run_dir=run, device="cuda"))
    loaded = load_model(run, None, "cuda")
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    held = [v for v in loaded.checkpoint.trainer_state["raw_model"].values()]
    # read for predicting: the small ones on the CPU, the larger standing in as shapes (meta), none on the GPU
    assert held and {t.device.type for t in held} == {"cpu", "meta"}
    assert loaded.checkpoint.model_state == {}  # the weights are kept once, in the model


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_gpu_and_cpu_losses_agree_over_the_first_steps(corpus_path: Path, sampling: str) -> None:
    config = tiny_config(corpus_path, f"data.sampling={sampling}")
    cpu_step, _ = static_step(config, CPU)
    gpu_step, _ = static_step(config, CUDA)
    cpu_losses = [float(cpu_step(window)) for window in windows(config, CPU, 10)]
    gpu_losses = [float(gpu_step(window)) for window in windows(config, CUDA, 10)]
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert cpu_losses[-1] < cpu_losses[0]


@pytest.mark.parametrize(("precision", "impl"), [("bf16", "torch"), ("fp16", "torch"), ("bf16", "fused")])
def test_half_precision_training_stays_finite(
    workdir: Path, corpus_path: Path, precision: str, impl: str
) -> None:
    config = tiny_config(
        corpus_path, f"train.precision={precision}", "data.val_fraction=0.2", f"model.impl={impl}"
    )
    path = write_yaml(workdir / f"{precision}.yaml", config)
    run_dir = workdir / "runs" / f"{precision}-{impl}"
    result = train_run(TrainRequest(config_path=path, run_dir=run_dir, device="cuda"))
    assert math.isfinite(result.train_ppl) and result.train_ppl < 28
    assert result.val_ppl is not None and math.isfinite(result.val_ppl)


def test_torchrun_with_one_process_trains_over_nccl(tmp_path: Path, corpus_path: Path) -> None:
    cache = tmp_path / "data"
    cache.mkdir()
    shutil.copyfile(corpus_path, cache / "timemachine.txt")
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(corpus_path))
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK"}}
    env |= {"DRNN_DATA_DIR": str(cache), "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = pythonpath_with_repo(env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += ["-m", "drnn_cli", "--", "train", "--config", str(config), "--device", "cuda"]
    command += ["--run", str(tmp_path / "run"), "--json"]
    # killed whole (torchrun starts its worker in a session of its own) within the 90 s a test has under
    # scripts/gpu_check.py: a hung NCCL job left behind would hold the GPU through the benchmarks after it
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        family, level = [], [process.pid]
        while level:  # the launcher's descendants, level by level
            listed = subprocess.run(
                ["pgrep", "-P", ",".join(map(str, level))], capture_output=True, text=True
            )
            level = [int(child) for child in listed.stdout.split()]
            family += level
        for pid in [*family, process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["world_size"] == 1 and summary["epochs"] == 3 and "cuda" in summary["device"]
    assert "NCCL INFO" in done.stdout + done.stderr  # the process group really was NCCL's


CASES = [(o, s, "torch", "fp32") for o in ("sgd", "adamw") for s in ("sequential", "random")]
CASES += [("sgd", "sequential", "fused", "fp32"), ("adamw", "random", "fused", "fp32")]
# fp16: GradScaler's skips decided on the device by the fused updates (SGD with momentum: the first,
# skipped, steps must leave its buffers at zero;
# the other, unclipped: GradScaler does not unscale first, the fused kernel divides by the scale)
CASES += [("sgd-momentum", "sequential", "torch", "fp16"), ("adamw", "random", "torch", "fp16")]
CASES += [("sgd-unclipped", "random", "torch", "fp16")]


@pytest.mark.parametrize(("optimizer", "sampling", "impl", "precision"), CASES)
def test_cuda_graph_replays_what_the_eager_step_computes(
    corpus_path: Path, optimizer: str, sampling: str, impl: str, precision: str
) -> None:
    lr = "0.01" if optimizer == "adamw" else "1.0"
    momentum = "0.9" if optimizer == "sgd-momentum" else "0"
    config = tiny_config(
        corpus_path,
        f"train.optimizer={optimizer.split('-')[0]}",
        f"train.momentum={momentum}",
        f"train.clip={0 if optimizer == 'sgd-unclipped' else 1}",
        f"data.sampling={sampling}",
        f"train.lr={lr}",
        f"model.impl={impl}",
        f"train.precision={precision}",
    )
    eager, eager_model = static_step(config, CUDA)
    graphed, graphed_model = static_step(config, CUDA, graph=True)
    losses: dict[str, list[float]] = {"eager": [], "graph": []}
    scales: dict[str, list[float]] = {"eager": [], "graph": []}
    for index, window in enumerate(windows(config, CUDA, 50)):
        if index == 25:  # a schedule changes the rate: the graph is captured again
            for step in (eager, graphed):
                for group in step.optimizer.param_groups:
                    group["lr"] = group["lr"] * 0.5
        if index and index % 10 == 0 and sampling == "sequential":  # an epoch boundary
            eager.begin_epoch(None)
            graphed.begin_epoch(None)
        losses["eager"].append(float(eager(window)))
        losses["graph"].append(float(graphed(window)))
        scales["eager"].append(eager.scaler.get_scale())
        scales["graph"].append(graphed.scaler.get_scale())
    # The later steps really were replays; SGD's halved rate needed a second recording, AdamW's
    # device-tensor rate none.
    assert graphed.captures == (1 if optimizer == "adamw" else 2)
    assert losses["graph"] == pytest.approx(losses["eager"], rel=1e-5)
    assert scales["graph"] == scales["eager"]  # fp16: the same steps skipped; else 1.0 throughout
    if precision == "fp16":
        assert min(scales["graph"]) < 2.0**24 and scales["graph"][-1] > min(scales["graph"]), scales
    for a, b in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_layer_calls_each_trains_as_the_stack(corpus_path: Path, precision: str) -> None:
    """model.layer_calls each: one cuDNN call per layer. 256 units, batch 16: in fp16 the second
    layer (input 256) meets PyTorch's conditions for cuDNN's persistent kernels (PERSIST_STATIC),
    which round differently from the stacked call's standard ones; in fp32 both run the standard
    kernels (PyTorch's small-hidden persistent kernels need ≤ 192 units forward, ≤ 128 backward), but
    as different calls: 1e-4 over 30 steps at lr 1, as the GPU against the CPU."""
    config = tiny_config(corpus_path, "model.hidden_size=256", f"train.precision={precision}")
    each_config = config.model_copy(deep=True)
    each_config.model.layer_calls = "each"
    stack, _ = static_step(config, CUDA)
    each, _ = static_step(each_config, CUDA)
    pairs = [(float(stack(window)), float(each(window))) for window in windows(config, CUDA, 30)]
    stacked, layered = zip(*pairs, strict=True)
    assert all(math.isfinite(loss) for loss in layered)
    assert list(layered) == pytest.approx(list(stacked), rel=1e-4 if precision == "fp32" else 1e-2)
    assert layered[-1] < layered[0]


def test_the_tally_inside_the_graph_counts_each_replay_once_and_finds_the_first_nan(
    corpus_path: Path,
) -> None:
    """The loss sum and the NaN watch run inside the captured step: a replay adds its loss once (three
    warm-up steps eager, the capture records without running), and weights poisoned after step 8 make
    step 8 the first bad one, as in the eager step."""
    config = tiny_config(corpus_path)
    eager, eager_model = static_step(config, CUDA)
    graphed, graphed_model = static_step(config, CUDA, graph=True)
    for step in (eager, graphed):
        step.begin_epoch(None)
    sums: dict[str, list[float]] = {"eager": [], "graph": []}
    for index, window in enumerate(windows(config, CUDA, 12)):
        if index == 8:
            with torch.no_grad():
                for model in (eager_model, graphed_model):
                    next(model.parameters()).fill_(float("nan"))
        eager(window)
        graphed(window)
        sums["eager"].append(float(eager.tally().loss_sum))
        sums["graph"].append(float(graphed.tally().loss_sum))
    assert graphed.captures == 1
    assert sums["graph"][:8] == pytest.approx(sums["eager"][:8], rel=1e-5)
    assert sums["eager"][0] > 0 and sums["eager"][7] > sums["eager"][6]
    assert all(math.isnan(total) for total in sums["graph"][8:])
    assert int(graphed.tally().first_bad_step) == int(eager.tally().first_bad_step) == 8


def test_adamw_under_a_graph_follows_a_rate_that_changes_at_every_step(corpus_path: Path) -> None:
    """A warm-up then cosine decay at every step (train.max_steps with a schedule): one recording,
    and the replays follow the rate as the eager step does (the rate lives in a device tensor)."""
    config = tiny_config(corpus_path, "train.optimizer=adamw", "train.lr=0.01", "model.dropout=0.0")
    eager, eager_model = static_step(config, CUDA)
    graphed, graphed_model = static_step(config, CUDA, graph=True)
    losses: dict[str, list[float]] = {"eager": [], "graph": []}
    for index, window in enumerate(windows(config, CUDA, 40)):
        rate = 0.01 * min(1.0, (index + 1) / 10) * 0.5 * (1 + math.cos(math.pi * index / 40))
        for step in (eager, graphed):
            for group in step.optimizer.param_groups:
                group["lr"] = rate
        losses["eager"].append(float(eager(window)))
        losses["graph"].append(float(graphed(window)))
    assert graphed.captures == 1
    assert all(isinstance(group["lr"], float) for group in graphed.optimizer.param_groups)  # as saved
    assert losses["graph"] == pytest.approx(losses["eager"], rel=1e-5)
    for a, b in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "dropout", ["model.dropout=0.5", "model.output_dropout=0.5", "model.weight_drop=0.5"]
)
def test_dropout_masks_differ_between_replays(corpus_path: Path, dropout: str) -> None:
    """The same minibatch again and again with a negligible rate: only fresh masks change the loss.

    model.dropout is cuDNN's own dropout between the layers; model.output_dropout is nn.Dropout;
    model.weight_drop is DropConnect on the recurrent weights (a mask drawn per step).
    """
    config = tiny_config(corpus_path, "data.sampling=random", dropout)
    config.train.lr = 1e-9
    step, _ = static_step(config, CUDA, graph=True)
    window = windows(config, CUDA, 1)[0]
    losses = [float(step(window)) for _ in range(8)]
    replays = losses[3:]  # after the warm-up steps, every step is a replay
    # Weights move by ~1e-9, so a repeated mask would repeat the loss to within a float ulp (~2e-7
    # at a loss of 3.3); a fresh mask moves it by more than that, though not always by 1e-4 (on the
    # CPU, eager steps with fresh masks gave consecutive differences down to 1.9e-6), and the spread
    # over the replays is far larger.
    assert all(abs(a - b) > 1e-6 for a, b in itertools.pairwise(replays)), replays
    assert max(replays) - min(replays) > 1e-4, replays


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # SGD at a constant rate: d2l's recipe
        # fp16: eager keeps PyTorch's plain SGD and GradScaler's host check; the graph, fused SGD
        # skipping on the device (the same skips; its updates round differently in the last bits)
        ("train.precision=fp16", "train.momentum=0.5"),
        # lstm_full_cpu's kind (less its dropouts, whose masks come from the generator in another
        # order under a graph): AdamW, cosine over a step budget, AR/TAR, EMA weights
        (
            "train.optimizer=adamw",
            "train.lr=0.003",
            "train.schedule=cosine",
            "train.max_steps=40",
            "train.epochs=5",
            "train.ar=1.0",
            "train.tar=1.0",
            "train.average=ema",
        ),
        # d2l §8.5's second run on d2l's own GRU: one bias per gate (bias_hh held at zero), the
        # reset gate before the product, and a zero state before every minibatch
        ("model.impl=scratch", "model.cell=gru", "model.cell_form=d2l", "train.reset_state=true"),
        # fp16 through the scratch cells and the Triton kernels (auto captures them since these passed
        # on an H200, 2026-11-27)
        ("train.precision=fp16", "model.impl=scratch"),
        ("train.precision=fp16", "model.impl=fused"),
    ],
    ids=["sgd", "sgd-fp16", "adamw-per-step-schedule", "d2l-gru-reset-state", "scratch-fp16", "fused-fp16"],
)
def test_trainer_with_cuda_graph_on_trains_as_eager(
    workdir: Path, corpus_path: Path, overrides: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(corpus_path, "data.val_fraction=0.2", *overrides)
    path = write_yaml(workdir / "tiny.yaml", config)
    captures = count_captures(monkeypatch)
    results = {}
    for mode in ("off", "on"):
        results[mode] = train_run(
            TrainRequest(
                config_path=path,
                overrides=(f"train.cuda_graph={mode}",),
                run_dir=workdir / "runs" / mode,
                device="cuda",
            )
        )
        assert (len(captures) > 0) == (mode == "on"), mode  # off never records; on did
    rel = 1e-4 if "train.precision=fp16" in overrides else 1e-5
    assert results["on"].train_ppl == pytest.approx(results["off"].train_ppl, rel=rel)
    assert results["on"].val_ppl == pytest.approx(results["off"].val_ppl, rel=rel)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "sgd-fp16", "adamw-fp16"])
def test_a_graph_run_stopped_mid_epoch_and_resumed_trains_as_a_straight_one(
    workdir: Path, corpus_path: Path, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT at a step boundary inside epoch 2, then --resume, under cuda_graph on: the resumed process
    records its graph again (its first steps are eager warm-ups, AdamW's state made capturable after
    loading, fp16's optimizer fused again and its loss scale restored) and ends where an uninterrupted graph
    run ends. Not bit for bit: warm-up steps run eagerly where the straight run replays (1e-5
    relative, as graph against eager)."""
    lr = "0.01" if optimizer.startswith("adamw") else "1.0"
    precision = "fp16" if optimizer.endswith("-fp16") else "fp32"
    config = tiny_config(
        corpus_path,
        f"train.optimizer={optimizer.removesuffix('-fp16')}",
        f"train.lr={lr}",
        "train.cuda_graph=on",
        f"train.precision={precision}",
        f"train.momentum={0.5 if optimizer == 'sgd-fp16' else 0}",
    )
    path = write_yaml(workdir / "tiny.yaml", config)

    def run(name: str, resume: bool = False):
        return train_run(
            TrainRequest(config_path=path, run_dir=workdir / "runs" / name, device="cuda", resume=resume)
        )

    straight = run("straight")
    original = Trainer._stop_requested

    def stop_at_step_20(self: Trainer, *args: object) -> bool:
        if self.global_step == 20:  # 15 minibatches an epoch (4,000 characters, 16 × 16): step 5 of epoch 2
            self.stops.signum = 2
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_stop_requested", stop_at_step_20)
    with pytest.raises(DrnnError, match="stopped by SIGINT after step 5 of epoch 2, optimizer step 20;"):
        run("split")
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    resumed = run("split", resume=True)
    assert 1 < resumed.start_epoch < 2 and resumed.epochs == 3  # began 5 steps into epoch 2
    assert resumed.train_ppl == pytest.approx(straight.train_ppl, rel=1e-5)
    weights = {
        name: load_checkpoint(workdir / "runs" / name / "last.safetensors").model_state
        for name in ("straight", "split")
    }
    for key, value in weights["straight"].items():
        torch.testing.assert_close(weights["split"][key], value, rtol=1e-4, atol=1e-6)


def test_tokens_per_second_under_a_graph_time_the_gpu_not_the_launches(
    workdir: Path, corpus_path: Path
) -> None:
    """A replay returns before the GPU has run it. Timed without waiting for the device, the seed
    config reported 4.0 M tokens/s on an H200 where the benchmark measured 0.9 M (2026-11-26). The
    trainer's figure must agree with the same step timed between synchronisations, within 1.5×."""
    config = tiny_config(
        corpus_path,
        "data.max_tokens=-1",
        "data.batch_size=64",
        "data.num_steps=64",
        "model.hidden_size=512",
        "train.epochs=2",
        "train.cuda_graph=on",
    )
    path = write_yaml(workdir / "rate.yaml", config)
    reported = train_run(TrainRequest(config_path=path, run_dir=workdir / "runs" / "rate", device="cuda"))
    step, _ = static_step(config, CUDA, graph=True)
    data = windows(config, CUDA, 45)
    for window in data[:5]:  # warm-up and capture
        step(window)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for window in data[5:]:
        step(window)
    torch.cuda.synchronize()
    measured = sum(step.targets.numel() for _ in data[5:]) / (time.perf_counter() - started)
    # Wide: under pytest -n the GPU is shared with other workers' tests, which can slow one of the two
    # timings and not the other; the bug this guards against read 4.4× the real rate.
    assert measured / 2.5 < reported.tokens_per_s < measured * 2.5, (reported.tokens_per_s, measured)


@pytest.mark.parametrize("cell", ["lstm", "gru-d2l"])
def test_compiled_scratch_cells_inside_the_graph_train_as_the_plain_cells(
    workdir: Path, corpus_path: Path, monkeypatch: pytest.MonkeyPatch, cell: str
) -> None:
    """train.compile on with cuda_graph on: inductor's Triton kernels recorded in the graph (for
    d2l's GRU too, whose second product waits for the gates). The compiled gate arithmetic rounds
    differently from the eager kernels, hence 1e-4."""
    form = ("model.cell=gru", "model.cell_form=d2l") if cell == "gru-d2l" else ()
    config = tiny_config(corpus_path, "data.val_fraction=0.2", "model.impl=scratch", *form)
    path = write_yaml(workdir / "tiny.yaml", config)
    captures = count_captures(monkeypatch)
    graphs = torch._dynamo.utils.counters["stats"]  # kept across dynamo resets: counted from here
    results = {}
    for name, overrides in {
        "plain": ("train.cuda_graph=off",),
        "compiled-graph": ("train.compile=on", "train.cuda_graph=on"),
    }.items():
        before = graphs["unique_graphs"]
        results[name] = train_run(
            TrainRequest(
                config_path=path, overrides=overrides, run_dir=workdir / "runs" / name, device="cuda"
            )
        )
        compiled = name == "compiled-graph"
        assert (len(captures) > 0, graphs["unique_graphs"] >= before + 2) == (compiled, compiled), name
    assert results["compiled-graph"].train_ppl == pytest.approx(results["plain"].train_ppl, rel=1e-4)
    assert results["compiled-graph"].val_ppl == pytest.approx(results["plain"].val_ppl, rel=1e-4)


def seed_stack_against_cudnn() -> tuple[torch.nn.Module, dict, dict]:
    """The seed stack (2×256, one-hot 28 wide, batch 32, 35 steps) through the fused kernels as planned
    and through nn.LSTM from the same weights: (fused module, its results, cuDNN's); see ``_run``."""
    fused, reference = (module.to(CUDA) for module in _pair(256, inputs=28))
    torch.manual_seed(1)
    steps, batch, layers = 35, 32, 2
    x = torch.randn(steps, batch, 28, device=CUDA)
    h0 = torch.randn(layers, batch, 256, device=CUDA)
    c0 = torch.randn(layers, batch, 256, device=CUDA)
    probes = tuple(torch.randn(shape, device=CUDA) for shape in ((steps, batch, 256), h0.shape, c0.shape))
    return fused, _run(fused, x, h0, c0, probes), _run(reference, x, h0, c0, probes)


@pytest.mark.parametrize("mode", ["persistent", "stepwise"])
def test_fused_kernels_equal_nn_lstm_on_the_gpu(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed shape (2×256, batch 32, 35 steps): outputs, final state and every gradient as
    nn.LSTM's (cuDNN, TF32 off), in both launch modes; no barrier timed out. The sums run in other
    orders (tiles of 64 against cuBLAS's), hence 1e-4."""
    real_plan = fused_recurrence.plan_launch
    launched: list[int] = []

    def forced(
        batch: int, hidden: int, slots: int, _: object = None, layers: int = 1, **__
    ) -> fused_recurrence.Launch:
        if layers == 1:  # a layer's plan (the stack's, one layer's grid: no wavefront, layer by layer)
            launched.append(batch)
        return real_plan(batch, hidden, slots, mode)

    monkeypatch.setattr(fused_recurrence, "plan_launch", forced)
    fused, got, want = seed_stack_against_cudnn()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    assert launched == [32, 32]  # both layers ran the kernels, not the scratch cells' fallback
    assert int(fused.barrier_error) == 0


@pytest.mark.parametrize(
    "variant",
    [
        {"resident": True},
        {"counter_barrier": True},
        {"resident": True, "counter_barrier": True},
        {"tf32": True},
    ],
    ids=["resident", "counter", "resident-counter", "tf32"],
)
def test_fused_kernel_variants_equal_nn_lstm_on_the_gpu(
    variant: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variants scripts/fused_bench.py --sweep-tiles times, at the seed shape with 32 programs
    resident at once (a barrier is only exercised where programs run concurrently). A resident W_hh
    takes one K tile as wide as the layer. IEEE products as above (1e-4); TF32's 10-bit mantissas over
    35 steps stay within 2e-2 (4e-3 worst, emulated on a CPU) but must differ from the IEEE result."""
    real_plan, real_constants = fused_recurrence.plan_launch, fused_recurrence.kernel_constants
    compiled: list[dict] = []

    def forced(batch: int, hidden: int, slots: int, _: object = None, **__) -> fused_recurrence.Launch:
        planned = real_plan(batch, hidden, slots, "persistent")  # one layer's grid: layer by layer
        wide = {"block_k": hidden} if variant.get("resident") else {}
        return dataclasses.replace(planned, **variant, **wide)

    def recorded(
        launch: fused_recurrence.Launch,
        fp32_products: bool,
        masked: bool = False,
        cell=fused_recurrence.KernelCell(),
    ) -> dict:
        compiled.append(real_constants(launch, fp32_products, masked, cell))
        return compiled[-1]

    monkeypatch.setattr(fused_recurrence, "plan_launch", forced)
    monkeypatch.setattr(fused_recurrence, "kernel_constants", recorded)  # what the kernels were launched with
    fused, got, want = seed_stack_against_cudnn()
    tolerance = 2e-2 if variant.get("tf32") else 1e-4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance, msg=name)
    if variant.get("tf32"):
        assert (got["out"] - want["out"]).abs().max() > 1e-5  # TF32 really rounded the products
    assert len(compiled) == 4  # forward and backward of each of the two layers
    expected = {"RESIDENT": bool(variant.get("resident")), "COUNTER": bool(variant.get("counter_barrier"))}
    expected |= {"PRECISION": "tf32" if variant.get("tf32") else "ieee", "NUM_PROGRAMS": 32}
    assert all({key: constants[key] for key in expected} == expected for constants in compiled), compiled
    assert int(fused.barrier_error) == 0


@pytest.mark.parametrize(
    "words",
    [
        "wavefront",
        "wavefront,counter",
        "wavefront,resident,counter",
        "16x32,wavefront,counter,tf32",
        "wavefront,counter,grads",  # IEEE products: grads changes nothing (1e-4)
        "wavefront,counter,tf32,grads",  # the weight gradients on TF32 tensor cores too
    ],
)
def test_a_wavefront_stack_equals_nn_lstm_on_the_gpu(words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DRNN_FUSED_LAUNCH=wavefront: both layers of the seed shape in one persistent launch (64 programs
    resident at once, meeting at one barrier per super-step; the second layer's input products in the
    kernel). Outputs, final state and every gradient as nn.LSTM's (cuDNN, TF32 off): 1e-4 with IEEE
    products, 2e-2 with TF32 (as for one layer); no barrier timed out."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
    launches = record_stack_launches(monkeypatch)
    fused, got, want = seed_stack_against_cudnn()
    tolerance = 2e-2 if "tf32" in words else 1e-4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance, msg=name)
    assert [(launch.layers, launch.persistent) for launch in launches] == [(2, True)]
    assert int(fused.barrier_error) == 0


def test_grads_changes_the_weight_gradients_alone_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """DRNN_FUSED_LAUNCH grads with tf32: the same forward bit for bit; the weight gradients that go through
    gradient_product (W_hh of both layers, the upper W_ih) differ from the IEEE ones (cuBLAS took the TF32
    switch) and stay within TF32's rounding of them; the input layer's W_ih (autograd's) is untouched."""
    runs = {}
    for words in ("wavefront,counter,tf32", "wavefront,counter,tf32,grads"):
        monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
        _, runs[words], _ = seed_stack_against_cudnn()
    ieee, tf32 = runs["wavefront,counter,tf32"], runs["wavefront,counter,tf32,grads"]
    assert torch.equal(ieee["out"], tf32["out"])
    for name in ("weight_hh_l0", "weight_hh_l1", "weight_ih_l1"):
        assert not torch.equal(ieee[name], tf32[name]), name
        torch.testing.assert_close(tf32[name], ieee[name], rtol=1e-2, atol=1e-2, msg=name)
    assert torch.equal(ieee["weight_ih_l0"], tf32["weight_ih_l0"])
    assert torch.backends.cuda.matmul.allow_tf32 is False  # put back (the autouse fixture turned it off)


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32-on", "tf32-off"])
def test_the_planned_variants_equal_nn_lstm_on_the_gpu(tf32: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """DRNN_FUSED_LAUNCH unset: the seed stack runs as the plan's measured variants — one wavefront,
    the counter barrier, and with cuDNN's TF32 switch on (PyTorch's default) TF32 products and W_hh
    resident; off, IEEE products and W_hh read from memory. Against nn.LSTM under the same switch:
    2e-2 with TF32 on both sides, 1e-4 without."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)
    torch.backends.cudnn.allow_tf32 = tf32  # the autouse fixture restores it
    launches = record_stack_launches(monkeypatch)
    fused, got, want = seed_stack_against_cudnn()
    tolerance = 2e-2 if tf32 else 1e-4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance, msg=name)
    shown = [(run.layers, run.persistent, run.counter_barrier, run.resident, run.tf32) for run in launches]
    assert shown == [(2, True, True, tf32, tf32)]
    assert fused_recurrence.products_for(CUDA) == ("tf32" if tf32 else "ieee")
    assert int(fused.barrier_error) == 0


@pytest.mark.parametrize("cell", ["gru", "rnn-tanh"])
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32-on", "tf32-off"])
def test_the_gru_and_rnn_kernels_as_planned_equal_cudnn_on_the_gpu(
    cell: str, tf32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GRU's and the tanh RNN's seed stacks (2×256, one-hot 28 wide, batch 32, 35 steps) through the
    kernels as planned — one persistent wavefront, the counter barrier, TF32 products and resident
    weights with cuDNN's TF32 switch on — against nn.GRU / nn.RNN (cuDNN) under the same switch:
    outputs, h_n and every gradient: with TF32 on both sides within 1e-2 of each tensor's norm, without
    to 1e-4."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)
    torch.backends.cudnn.allow_tf32 = tf32  # the autouse fixture restores it
    launches = record_stack_launches(monkeypatch)
    module, options, drnn_cell = OTHER_CELLS[cell]
    torch.manual_seed(0)
    reference = module(28, 256, 2, **options).to(CUDA)
    fused = FusedRecurrent(drnn_cell, 28, 256, 2, **options).to(CUDA)
    fused.load_state_dict(reference.state_dict())
    torch.manual_seed(1)
    x = torch.randn(35, 32, 28, device=CUDA)
    h0 = torch.randn(2, 32, 256, device=CUDA)
    probes = torch.randn(35, 32, 256, device=CUDA), torch.randn(2, 32, 256, device=CUDA)
    got, want = _run_h(fused, x, h0, probes), _run_h(reference, x, h0, probes)
    for name in want:
        if tf32:
            # TF32's 10-bit mantissas, emulated on a CPU against float64, leave the RNN's worst gradient
            # elements 2.6× past the LSTM's 2e-2 (each side's error its own), the tensors within 1.5e-3
            # of their norm: compared as tensors, not element by element
            error = (got[name] - want[name]).norm() / want[name].norm()
            assert error <= 1e-2, (name, float(error))
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    shown = [(run.layers, run.persistent, run.counter_barrier, run.resident, run.tf32) for run in launches]
    assert shown == [(2, True, True, tf32, tf32)]
    assert int(fused.barrier_error) == 0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_wavefront_stack_with_dropout_trains_as_the_layer_by_layer_one_on_the_gpu(
    cell: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout between the layers (its masks multiplied in inside the wavefront kernels) and weight
    drop: three SGD steps of the language model, persistent, as the layer-by-layer kernels take them;
    for the LSTM, the GRU and the ReLU RNN (the one place a GPU runs the ReLU)."""
    config = ModelConfig(
        cell=cell,
        nonlinearity="relu" if cell == "rnn" else "tanh",
        hidden_size=256,
        num_layers=2,
        weight_drop=0.2,
        dropout=0.3,
        dropout_kind="locked",
        impl="fused",
    )
    losses = {}
    for words in ("plain", "wavefront"):
        monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
        model = build_model(28, config, seed=3).to(CUDA)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        torch.manual_seed(4)
        data = torch.randint(0, 28, (3, 32, 36), device=CUDA)
        losses[words] = []
        for batch in data:
            logits, _ = model(batch[:, :-1], model.begin_state(32, CUDA))
            loss = lm_loss(logits, batch[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[words].append(loss.item())
        assert int(model.rnn.barrier_error) == 0
    assert losses["wavefront"] == pytest.approx(losses["plain"], rel=1e-4)


def test_the_counter_barrier_counts_each_program_once_per_timestep() -> None:
    """Each of the 32 programs adds one to the counter per timestep (a scalar atomic runs on one thread
    of the program): after 35 steps it holds 35 × 32. Were every thread to add, the barrier would open
    before its programs had arrived, which equal results need not show."""
    kernels = fused_recurrence._kernels()
    steps, batch, hidden = 35, 32, 256
    planned = fused_recurrence.plan_launch(batch, hidden, fused_recurrence.device_slots(CUDA), "persistent")
    launch = dataclasses.replace(planned, counter_barrier=True)
    torch.manual_seed(0)
    xg = torch.randn(steps, batch, 4 * hidden, device=CUDA)
    w_hh = torch.randn(4 * hidden, hidden, device=CUDA) / hidden**0.5
    hs = torch.zeros(1, steps + 1, batch, hidden, device=CUDA)  # (layers, T + 1, B, H)
    cs = torch.zeros_like(hs)
    act = torch.empty(1, steps, batch, 4 * hidden, device=CUDA)
    flags = torch.zeros(launch.programs, device=CUDA, dtype=torch.int32)
    error = torch.zeros((), device=CUDA, dtype=torch.int32)
    args = fused_recurrence._launch_args(
        launch, fused_recurrence.SPIN_LIMIT, w_hh, False, fused_recurrence.KernelCell()
    )
    unused = torch.zeros(1, device=CUDA)  # a lone layer's W_ih, biases, b_hn and dropout scale: never read
    kernels.forward[launch.kernel_grid](
        *(xg, w_hh, w_hh, unused, unused, unused, hs, cs, act, flags, error),
        *(0, steps, steps, batch, hidden),
        **args,
    )
    torch.cuda.synchronize()
    assert (int(flags[0]), int(error), launch.programs) == (steps * 32, 0, 32)


def test_auto_captures_fp16_through_every_impl(
    workdir: Path, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 as one graph trains as it does eagerly through cuDNN, the scratch cells and the Triton
    kernels (test_trainer_with_cuda_graph_on_trains_as_eager): auto captures all three."""
    captures = count_captures(monkeypatch)
    for impl, expected in (("torch", True), ("scratch", True), ("fused", True)):
        config = tiny_config(corpus_path, "train.precision=fp16", f"model.impl={impl}", "train.epochs=1")
        path = write_yaml(workdir / f"{impl}.yaml", config)
        before = len(captures)
        train_run(TrainRequest(config_path=path, run_dir=workdir / "runs" / impl, device="cuda"))
        assert (len(captures) > before) == expected, impl


@pytest.mark.parametrize(("optimizer", "captured"), [("sgd", False), ("adamw", True)])
def test_auto_with_a_rate_that_moves_every_step_captures_adamw_and_says_why_sgd_runs_eagerly(
    workdir: Path, corpus_path: Path, cli, monkeypatch: pytest.MonkeyPatch, optimizer: str, captured: bool
) -> None:
    """A captured SGD update bakes its rate in, so under a schedule read at every step (train.max_steps)
    auto trains SGD eagerly, which is several times slower: the run says so, and names AdamW, whose
    rate the graph reads from the device (test_adamw_under_a_graph_follows_a_rate_that_changes_at_every_step)."""
    captures = count_captures(monkeypatch)
    config = tiny_config(
        corpus_path,
        f"train.optimizer={optimizer}",
        "train.max_steps=30",
        "train.schedule=cosine",
        "train.lr=0.01",
    )
    path = write_yaml(workdir / f"{optimizer}.yaml", config)
    code, _, err = cli("train", "--config", str(path), "--device", "cuda", "--run", f"runs/{optimizer}")
    assert code == 0, err
    assert bool(captures) == captured
    said = " ".join(err.split())  # the note may fold across lines on a terminal's width
    assert ("the learning rate changes at every step" in said) == (not captured), err
    if not captured:
        assert "train.optimizer adamw reads its rate on the device and trains as one graph" in said, err
