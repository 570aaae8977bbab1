"""Probes of a built model on its device before training starts, each failing in one line: the
half precision asked for runs there, and ``train.compile``'s cells compile (outside training time).
"""

from __future__ import annotations

import contextlib
import time

import torch

from drnn_cli.errors import DrnnError, first_line
from drnn_cli.models import RNNLanguageModel, ScratchRecurrent
from drnn_cli.runtime import autocast


def _random_streams_kept(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A probe's dropout draws come from forked generators (the CPU's, and the device's on CUDA):
    training draws the same masks with or without the probe."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def compile_cells(
    model: RNNLanguageModel, device: torch.device, precision: str, batch_rows: int, graph: bool = False
) -> str:
    """``train.compile on``: the scratch cells through ``torch.compile``, compiled now; returns the note.

    One forward and backward of a two-step minibatch of the training shape compiles what training
    will call (the cell's forward timestep and its backward one), so a compiler failure is one line
    before training starts, its time is not counted as training time, and a CUDA graph's warm-up
    finds the code ready. The random streams are put back afterwards:
    the probe draws dropout masks that training must draw again. Autocast's weight-cast cache is on
    or off as in the step (off under a graph): compiled code is specialised to that setting.
    """
    started = time.perf_counter()
    probe = torch.zeros((batch_rows, 2), dtype=torch.long, device=device)
    assert isinstance(model.rnn, ScratchRecurrent)  # a Config refuses train.compile on with another impl
    try:
        model.rnn.compile_cells()
        with _random_streams_kept(device), autocast(device, precision, cache_enabled=not graph):
            logits, _ = model(probe, model.begin_state(batch_rows, device))
            logits.float().sum().backward()
    except Exception as error:  # the compiler's failures come in many types; all end the same way
        raise DrnnError(
            f"train.compile on: torch.compile could not compile the {model.config.cell} cell "
            f"({first_line(error)}); set train.compile off (DRNN_DEBUG=1 shows the traceback)"
        ) from error
    finally:
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return f"train.compile on: the {model.config.cell} cell compiled in {seconds:.1f} s (torch.compile)"


def check_precision_works(model: RNNLanguageModel, device: torch.device, precision: str) -> None:
    """Half precision is not everywhere: e.g. oneDNN has no bf16 LSTM on CPUs without AVX-512 BF16."""
    if precision == "fp32":
        return
    probe = torch.zeros((1, 1), dtype=torch.long, device=device)
    try:
        with torch.no_grad(), _random_streams_kept(device), autocast(device, precision):
            model(probe, model.begin_state(1, device))
    except RuntimeError as error:
        first = first_line(error, 120)
        raise DrnnError(
            f"train.precision {precision} does not run on {device} with model.cell {model.config.cell} / "
            f"model.impl {model.config.impl} ({first}); use train.precision fp32"
            + (" or model.impl scratch" if model.config.impl == "torch" else "")
        ) from None
