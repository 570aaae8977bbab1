"""The optimizer: which one, built how, on what schedule, restored from a checkpoint, readied for a graph.

``train.optimizer`` names SGD, Adam or AdamW (README "Configuration"); the learning rate follows
``train.schedule`` with an optional warm-up. How PyTorch runs the update (its per-tensor loop,
foreach or fused kernels, capturable step counters) is chosen here for the run at hand: a CUDA graph
needs step counters on the device and, under fp16, fused updates that skip overflowed steps there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from drnn_cli.config import TrainConfig
from drnn_cli.strict_json import is_number


def lr_factor(epoch: float, config: TrainConfig, horizon: float | None = None) -> float:
    """Learning-rate multiplier for (0-based) ``epoch``: linear warm-up, then the schedule.

    Per epoch, ``epoch`` is an integer and cosine spans ``train.epochs``. Under ``train.max_steps``
    it is the fractional epoch of the step about to be taken and cosine spans ``horizon``, the
    epochs the run will take, so a step-budgeted run anneals fully.
    """
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    progress = epoch - config.warmup_epochs
    if config.schedule == "step":
        return config.gamma ** (progress // config.step_size)
    if config.schedule == "cosine":
        if horizon is None:
            span: float = max(1, config.epochs - config.warmup_epochs)
        else:
            span = max(horizon - config.warmup_epochs, 1e-9)
        floor = config.min_lr / config.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, span) / span))
    return 1.0


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The PyTorch optimizer that ``train.optimizer`` names."""
    classes: dict[str, type[torch.optim.Optimizer]] = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
    }
    return classes[name]


def build_optimizer(
    model: nn.Module, config: TrainConfig, decay_biases: bool | None = None, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the trainable parameters.

    AdamW decays only parameters with two or more dimensions (weight matrices, embeddings), as
    nanoGPT does: shrinking biases and norm gains towards zero only regularises the offsets. Those go
    into a second group without decay, unless ``train.decay_biases`` (or ``decay_biases``, which
    overrides it) asks for one group. ``fused``: PyTorch's fused update kernels (fp16 under a CUDA
    graph, see ``fused_updates``); otherwise PyTorch's default (foreach on CUDA, a loop on a CPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # called with each class's own keywords (the base class's signature is (params, defaults))
    kind: Callable[..., torch.optim.Optimizer] = optimizer_class(config.optimizer)
    implementation: dict[str, Any] = {"fused": True} if fused else {}
    if kind is torch.optim.SGD:
        return kind(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **implementation
        )
    if kind is torch.optim.Adam or (config.decay_biases if decay_biases is None else decay_biases):
        return kind(params, lr=config.lr, weight_decay=config.weight_decay, **implementation)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return kind([g for g in groups if g["params"]], lr=config.lr, **implementation)


IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable")  # how an optimizer runs, not what it computes


def restore_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into the optimizer built for this run.

    ``load_state_dict`` also brings back the saved groups' hyper-parameters and implementation flags,
    and places Adam's
    step counters by them: a state saved by a CUDA-graph run (``capturable``, perhaps ``fused``)
    resumed on a CPU would make PyTorch refuse the update ("capturable=True ... supported devices"),
    and resumed eagerly would run fused or capturable kernels that this run did not choose. The flags
    go back to the ones this optimizer was built with, and the counters of a plain Adam/AdamW back to
    the host, where PyTorch keeps them; ``make_capturable`` readies them for a graph afterwards.

    A saved state that does not fit this optimizer (a tampered or corrupt checkpoint) raises a
    ValueError naming the part: PyTorch checks only the number of groups and parameters, so a buffer
    of another shape or a hyper-parameter of another type would fail at the first update instead.
    """
    built = [
        {key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups
    ]
    _check_saved_form(saved)
    optimizer.load_state_dict(saved)
    _check_restored(optimizer, saved, built)
    for group, fresh in zip(optimizer.param_groups, built, strict=True):
        # the hyper-parameters this run's config built, and its implementation flags: a resume cannot
        # change the config's (momentum, weight_decay), the schedule sets lr, and the rest are
        # PyTorch's defaults, which a tampered file set otherwise (maximize: the loss climbed; amsgrad
        # without its buffers, betas of 2: internal errors at the first update; red41)
        group.update({key: value for key, value in fresh.items() if key not in IMPLEMENTATION_FLAGS})
        for flag in IMPLEMENTATION_FLAGS:
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
        if group.get("capturable") or group.get("fused"):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].cpu()


# Per-parameter buffers an update reads once a parameter has state (PyTorch starts afresh only from none).
_REQUIRED_STATE = {
    torch.optim.Adam: ("step", "exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("step", "exp_avg", "exp_avg_sq"),
}
_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")  # running means of squares: never negative


def _check_saved_form(saved: dict[str, Any]) -> None:
    """The form ``load_state_dict`` relies on: groups listing distinct integer ids, and each
    parameter's state a dict of tensors and numbers (PyTorch would iterate a string as a sequence)."""
    groups = saved["param_groups"]
    for index, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(param) is int for param in params):
            raise ValueError(f"param_groups.{index} is no group of parameter ids")
    ids = [param for group in groups for param in group["params"]]
    if len(set(ids)) != len(ids):
        raise ValueError("param_groups list a parameter twice")
    for key, entry in saved["state"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"state.{key} is a {type(entry).__name__}")
        for name, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, torch.Tensor | int | float | None):
                raise ValueError(f"state.{key}.{name} is a {type(value).__name__}")


def _check_restored(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], built: list[dict[str, Any]]
) -> None:
    """Each loaded group's hyper-parameters of the kinds this optimizer was built with, and each
    parameter's buffers of its shape (``step`` a non-negative count)."""
    for index, (group, fresh) in enumerate(zip(optimizer.param_groups, built, strict=True)):
        for key, value in fresh.items():
            if key in IMPLEMENTATION_FLAGS or value is None or isinstance(value, torch.Tensor):
                continue  # the flags are put back below; None and tensors are PyTorch's own defaults
            if key not in group:
                raise ValueError(f"param_groups.{index}.{key} is missing")
            if not _same_kind(group[key], value):
                raise ValueError(f"param_groups.{index}.{key} is {group[key]!r:.40}")
    required = _REQUIRED_STATE.get(type(optimizer), ())
    saved_ids = [param_id for group in saved["param_groups"] for param_id in group["params"]]
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for param_id, param in zip(saved_ids, params, strict=True):
        entry = optimizer.state.get(param)
        if not entry:
            continue
        for key in required:
            if entry.get(key) is None:
                raise ValueError(f"state.{param_id}.{key} is missing")
        for key, value in entry.items():
            where = f"state.{param_id}.{key}"
            if key == "step":
                count = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if not _same_kind(count, 0.0) or count < 0:
                    raise ValueError(f"{where} is no step count")
            elif value is not None:
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise ValueError(f"{where} is no floating-point tensor")
                if value.shape != param.shape:
                    raise ValueError(
                        f"{where} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )
                if key in _SQUARES and bool((value < 0).any()):
                    raise ValueError(f"{where} holds negative values")


def _same_kind(value: Any, like: Any) -> bool:
    """Whether ``value`` is a hyper-parameter of the kind of ``like``: a bool, a finite number, or a
    tuple of finite numbers of the same length (Adam's betas)."""
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, int | float):
        return is_number(value) and math.isfinite(value)
    if isinstance(like, tuple | list):
        return (
            isinstance(value, tuple | list)
            and len(value) == len(like)
            and all(_same_kind(part, 0.0) for part in value)
        )
    return isinstance(value, type(like))


def lr_changes_every_step(train: TrainConfig) -> bool:
    """Under ``max_steps`` a schedule moves at every step (to anneal over the budget); else per epoch."""
    return bool(train.max_steps) and (train.schedule != "constant" or train.warmup_epochs > 0)


def reads_lr_on_device(kind: type[torch.optim.Optimizer]) -> bool:
    """Whether a captured update of this kind of optimizer can read the learning rate from device memory.

    Adam/AdamW with ``capturable=True`` accept the rate as a one-element device tensor; SGD's update
    passes it to its kernels as a host number (a tensor rate would be read back with ``.item()``, a
    sync that cannot be captured), so a changed rate needs a new capture.
    """
    return issubclass(kind, torch.optim.Adam | torch.optim.AdamW)


def fused_updates(precision: str, graph: bool) -> bool:
    """Whether the optimizer is built fused: fp16 under a graph.

    ``GradScaler.step`` reads its overflow flag on the host (``.item()``) to skip an update whose
    gradients overflowed, a sync that cannot be captured, except for optimizers whose update kernels
    take the flag as a device tensor and skip themselves: PyTorch's fused SGD, Adam and AdamW. The
    skip decisions and the scale are GradScaler's either way; the fused kernels round their updates
    differently in the last bits (a fused multiply-add), which is why eager fp16 keeps the plain ones.
    """
    return graph and precision == "fp16"


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Ready an optimizer for capture (after ``restore_optimizer_state``, when resuming).

    Adam/AdamW keep their step counters on the device, so a replayed update advances them. Fused SGD
    with momentum (``fused_updates``) gets zero momentum buffers where it has none: PyTorch's fused
    SGD allocates them uninitialised at its first step and leaves them so when that step is skipped
    for an overflow, as fp16's first steps often are. A zero buffer gives the same first update
    (momentum · 0 + g = g, no dampening).
    """
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(dtype=torch.float32, device=param.device)
            seeds_momentum = fused and isinstance(optimizer, torch.optim.SGD) and group["momentum"]
            if seeds_momentum and state.get("momentum_buffer") is None:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
