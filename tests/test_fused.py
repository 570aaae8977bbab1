"""``model.impl: fused``: the Triton kernels equal ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, forward and backward.

The kernels run here through Triton's CPU interpreter (``TRITON_INTERPRET=1``), which executes the
programs of a grid one after another. That proves the arithmetic, the tiling (several hidden blocks,
several batch blocks, rows masked off at the edge) and both launch modes — one launch per timestep,
and the persistent kernel that loops over all timesteps. The grid barrier between persistent programs
needs them resident at once, i.e. a GPU: here it runs with one program, and a two-program grid shows
that a barrier that never opens gives up and raises its flag rather than hang. tests/test_cuda.py
repeats the equality on a GPU. Without Triton installed, only the tests of the CPU fallback run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, config_file
from pydantic import ValidationError
from torch import nn

from drnn_cli import fused_recurrence
from drnn_cli.config import ModelConfig
from drnn_cli.errors import DrnnError
from drnn_cli.model_size import GATES
from drnn_cli.models import FusedRecurrent, ScratchRecurrent, build_model, lm_loss

REPO = Path(__file__).resolve().parents[1]
# tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported, where there is no CUDA.
needs_interpreter = pytest.mark.skipif(
    not (fused_recurrence.interpreting() and fused_recurrence.triton_available()),
    reason="needs Triton and its CPU interpreter (tests/test_cuda.py runs the kernels on a GPU)",
)


def _pair(hidden: int, layers: int = 2, inputs: int = 8) -> tuple[FusedRecurrent, nn.LSTM]:
    """A fused stack and ``nn.LSTM`` with the same weights."""
    torch.manual_seed(0)
    reference = nn.LSTM(inputs, hidden, layers)
    fused = FusedRecurrent("lstm", inputs, hidden, layers)
    fused.load_state_dict(reference.state_dict())
    return fused, reference


def _scratch_pair(inputs: int, hidden: int, layers: int) -> tuple[FusedRecurrent, ScratchRecurrent]:
    """A fused stack and the scratch cells with the same weights."""
    torch.manual_seed(0)
    scratch = ScratchRecurrent("lstm", inputs, hidden, layers)
    fused = FusedRecurrent("lstm", inputs, hidden, layers)
    fused.load_state_dict(scratch.state_dict())
    return fused, scratch


def _run(module: nn.Module, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, probes: tuple) -> dict:
    """Outputs, final state and the gradients of a loss that weighs every output of the layer."""
    x = x.clone().requires_grad_(True)
    h0 = h0.clone().requires_grad_(True)
    c0 = c0.clone().requires_grad_(True)
    out, (h_n, c_n) = module(x, (h0, c0))
    loss = (out * probes[0]).sum() + (h_n * probes[1]).sum() + (c_n * probes[2]).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return {"out": out, "h_n": h_n, "c_n": c_n, "x": x.grad, "h0": h0.grad, "c0": c0.grad, **grads}


@needs_interpreter
@pytest.mark.parametrize(
    ("batch", "hidden", "mode", "grid"),
    [
        (5, 32, "stepwise", (2, 1)),  # two hidden blocks, 11 of 16 rows masked off
        (70, 32, "stepwise", (2, 5)),  # and five batch blocks of 16
        (5, 16, "persistent", (1, 1)),  # all timesteps in one launch
        (3, 64, "persistent", (1, 1)),  # K loop of one 64-wide tile; backward's over 4H = 256
    ],
)
def test_fused_stack_equals_nn_lstm_forward_and_backward(batch, hidden, mode, grid, monkeypatch):
    planned = fused_recurrence.plan_launch(batch, hidden, 1, mode)
    assert planned.grid == grid and planned.persistent == (mode == "persistent")
    real_plan = fused_recurrence.plan_launch
    launched: list[tuple[int, int]] = []

    def forced(
        batch: int, hidden: int, slots: int, _: object = None, layers: int = 1, **__
    ) -> fused_recurrence.Launch:
        if layers == 1:  # a layer's plan (the stack's, one layer's grid: no wavefront, layer by layer)
            launched.append((batch, hidden))
        return real_plan(batch, hidden, slots, mode)

    monkeypatch.setattr(fused_recurrence, "plan_launch", forced)
    fused, reference = _pair(hidden)
    torch.manual_seed(1)
    steps, layers = 4, 2
    x = torch.randn(steps, batch, 8)
    h0, c0 = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)
    probes = (
        torch.randn(steps, batch, hidden),
        torch.randn(layers, batch, hidden),
        torch.randn(layers, batch, hidden),
    )
    got = _run(fused, x, h0, c0, probes)
    want = _run(reference, x, h0, c0, probes)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert launched == [(batch, hidden)] * layers  # the kernels ran, not the scratch cells' fallback
    assert int(fused.barrier_error) == 0


@needs_interpreter
@pytest.mark.parametrize("counter_barrier", [False, True], ids=["flags", "counter"])
def test_a_barrier_that_never_opens_gives_up_and_raises_the_flag(counter_barrier):
    """Two persistent programs under the interpreter run one after another, so the first waits for a
    second that cannot start: after ``spin_limit`` polls it must give up, flag it, and return (the
    barrier of one flag per program, and the one of a single counter)."""
    torch.manual_seed(0)
    hidden, batch, steps = 32, 2, 2
    error = torch.zeros((), dtype=torch.int32)
    fused_recurrence.fused_layer(
        torch.randn(steps, batch, 4 * hidden),
        torch.zeros(batch, hidden),
        torch.zeros(batch, hidden),
        torch.randn(4 * hidden, hidden),
        fused_recurrence.Launch(
            block_b=16, block_h=16, block_k=16, grid=(2, 1), persistent=True, counter_barrier=counter_barrier
        ),
        spin_limit=3,
        error=error,
    )
    assert int(error) == 1


def _reference_layer(xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor):
    """The LSTM recurrence over precomputed input gates, written out in float64 (gate order i, f, g, o)."""
    h, c, outputs = h0, c0, []
    for gates_x in xg:
        i, f, g, o = (gates_x + h @ w_hh.T).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


@needs_interpreter
@pytest.mark.parametrize(
    ("resident", "counter_barrier", "block_h", "persistent"),
    [(True, False, 32, True), (False, True, 32, True), (True, True, 32, True), (True, False, 16, False)],
    ids=["resident", "counter", "both", "resident-two-programs"],
)
def test_kernel_variants_compute_the_lstm_recurrence_and_its_gradients(
    resident, counter_barrier, block_h, persistent
):
    """The variants scripts/fused_bench.py --sweep-tiles times against the plan: W_hh read once before
    the time loop (one 32-wide K tile, so forward and backward are one product per gate), and the
    barrier through one counter. Against the recurrence written out in float64: outputs, final
    state, and the gradients of all four inputs. Two programs of 16 units each (launched per
    timestep: the interpreter runs programs one after another) prove each reads its own units' rows
    of W_hh, which one program holding all 32 cannot."""
    torch.manual_seed(5)
    steps, batch, hidden = 4, 5, 32
    inputs = [
        torch.randn(steps, batch, 4 * hidden, dtype=torch.float64),
        torch.randn(batch, hidden, dtype=torch.float64),
        torch.randn(batch, hidden, dtype=torch.float64),
        torch.randn(4 * hidden, hidden, dtype=torch.float64) / hidden**0.5,
    ]
    probes = [torch.randn(steps, batch, hidden), torch.randn(batch, hidden), torch.randn(batch, hidden)]
    launch = fused_recurrence.Launch(
        block_b=16,
        block_h=block_h,
        block_k=32,
        grid=(hidden // block_h, 1),
        persistent=persistent,
        resident=resident,
        counter_barrier=counter_barrier,
    )
    error = torch.zeros((), dtype=torch.int32)
    results = {}
    for side in ("fused", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        if side == "fused":
            xg, h0, c0, w = (t.float() for t in leaves)
            outs = fused_recurrence.fused_layer(xg, h0, c0, w, launch, error=error)
        else:
            outs = _reference_layer(*leaves)
        sum(
            ((out.double() * probe.double()).sum() for out, probe in zip(outs, probes, strict=True))
        ).backward()
        results[side] = [out.detach().double() for out in outs] + [t.grad for t in leaves]
    for name, got, want in zip(
        ("out", "h_T", "c_T", "xg", "h0", "c0", "w_hh"), results["fused"], results["reference"], strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert int(error) == 0


def test_drnn_fused_launch_changes_the_plan_as_asked(monkeypatch):
    """README "Environment": the variants fused_bench times one layer at a time, for whole runs."""
    planned = fused_recurrence.plan_launch(32, 256, 132)
    assert planned == fused_recurrence.Launch(16, 16, 64, (16, 2), True, 4)
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "resident, counter,TF32")
    assert fused_recurrence.plan_launch(32, 256, 132) == fused_recurrence.Launch(
        16, 16, 256, (16, 2), True, 4, resident=True, counter_barrier=True, tf32=True
    )
    assert (
        fused_recurrence.plan_launch(32, 256, 132, "persistent") == planned
    )  # a forced mode (tests) ignores it
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "32x64,counter")
    assert fused_recurrence.plan_launch(32, 256, 132) == fused_recurrence.Launch(
        32, 64, 64, (4, 1), True, 8, counter_barrier=True
    )
    for asked, hidden, slots, message in [
        (
            "fast",
            256,
            132,
            "DRNN_FUSED_LAUNCH: unknown word 'fast'; use a comma-separated list of resident, "
            "counter, tf32, wavefront, grads and a tile such as 16x32, or plain",
        ),
        (
            "16x48",
            256,
            132,
            "DRNN_FUSED_LAUNCH tile 16x48: rows and units must each be 16, 32 or 64, and the "
            "units must divide model.hidden_size 256",
        ),
        ("resident", 48, 132, "DRNN_FUSED_LAUNCH resident needs model.hidden_size a power of two, not 48"),
        (
            "resident,16x32",
            512,
            132,
            "DRNN_FUSED_LAUNCH resident keeps 256 KiB of weights per program at hidden 512 and 32 units a "
            "program, more than a multiprocessor's shared memory holds beside the rest; use a tile of fewer "
            "units, or leave out resident",
        ),
        (
            "resident,wavefront,16x32",  # W_ih's tiles too: twice the weights of one layer's kernel
            256,
            132,
            "DRNN_FUSED_LAUNCH resident keeps 256 KiB of weights per program at hidden 256 and 32 units a "
            "program, more than a multiprocessor's shared memory holds beside the rest; use a tile of fewer "
            "units, or leave out resident or wavefront",
        ),
        (
            "wavefront,16x16",
            256,
            40,
            "DRNN_FUSED_LAUNCH: 64 programs of 16x16 (2 layers) do not fit this device's 40 at once; use a "
            "larger tile",
        ),
        (
            "16x16",
            256,
            20,
            "DRNN_FUSED_LAUNCH: 32 programs of 16x16 do not fit this device's 20 at once; use a larger tile",
        ),
    ]:
        monkeypatch.setenv("DRNN_FUSED_LAUNCH", asked)
        with pytest.raises(DrnnError) as refused:
            fused_recurrence.plan_launch(32, hidden, slots, layers=2)
        assert str(refused.value) == message


def test_drnn_fused_launch_wavefront_plans_one_grid_for_the_whole_stack(monkeypatch):
    """``wavefront``: every layer's grid in one launch, so the persistent plan fits all of them at once
    (a one-layer call, the layer-by-layer path, is planned as before)."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "wavefront")
    seed = fused_recurrence.plan_launch(32, 256, 132, layers=2)
    assert seed == fused_recurrence.Launch(16, 16, 64, (16, 2), True, 4, layers=2)
    assert (seed.programs, seed.kernel_grid) == (64, (16, 2, 2))
    assert fused_recurrence.plan_launch(32, 256, 132) == fused_recurrence.Launch(16, 16, 64, (16, 2), True, 4)
    # batch 1024: one layer fits in 32 × 64 tiles (128 programs); two need 64 × 64 (2 × 64)
    wide = fused_recurrence.plan_launch(1024, 256, 132, layers=2)
    assert (wide.block_b, wide.block_h, wide.grid, wide.persistent, wide.programs) == (
        64,
        64,
        (4, 16),
        True,
        128,
    )
    # on an H100 PCIe (114 multiprocessors) one layer's grid fits at 64 × 64, two do not: layer by layer
    assert fused_recurrence.plan_launch(1024, 256, 114, layers=2) == fused_recurrence.Launch(
        64, 64, 64, (4, 16), True, 8
    )
    # where no tile fits, one launch per super-step (Triton's interpreter: one program at a time) ...
    assert fused_recurrence.plan_launch(5, 32, 0, layers=3) == fused_recurrence.Launch(
        16, 16, 32, (2, 1), False, 4, layers=3
    )
    # ... but where one layer's grid is resident and the stack's is not, the layers run one at a time,
    # unless a tile was asked for: that is the stack's, as for any other tile
    assert fused_recurrence.plan_launch(5, 32, 1, layers=3) == fused_recurrence.Launch(
        16, 32, 32, (1, 1), True, 4
    )
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "wavefront,16x16")
    assert fused_recurrence.plan_launch(5, 32, 1, layers=3) == fused_recurrence.Launch(
        16, 16, 32, (2, 1), False, 4, layers=3
    )
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "wavefront,resident,counter")
    assert fused_recurrence.plan_launch(32, 256, 132, layers=2) == fused_recurrence.Launch(
        16, 16, 256, (16, 2), True, 4, resident=True, counter_barrier=True, layers=2
    )


# shared memory one program may take (CUDA's opt-in per-block maximum): H100/H200, RTX 4090 or L4, T4, A100
HOPPER_SHARED, ADA_SHARED, TURING_SHARED, A100_SHARED = 232_448, 101_376, 65_536, 166_912


def test_the_plan_takes_the_measured_variants_where_they_fit(monkeypatch):
    """Told how the products multiply and the device's shared memory (as the model tells it), the plan
    takes TUNED_WORDS: the seed stack (2×256, batch 32) as one wavefront of 64 programs, the counter
    barrier, W_hh resident (256 × 16 × 4 gates × 4 bytes × 2 weights = 128 KiB, the cap) — but not
    resident for IEEE fp32 products, which it slowed tenfold, and TF32 only where the products are TF32."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)

    def plan(
        batch: int, hidden: int, slots: int = 132, layers: int = 1, products="half", shared=HOPPER_SHARED
    ):
        return fused_recurrence.plan_launch(
            batch, hidden, slots, layers=layers, products=products, shared_bytes=shared
        )

    seed = fused_recurrence.Launch(16, 16, 64, (16, 2), True, 4, counter_barrier=True, layers=2)
    resident = dataclasses.replace(seed, block_k=256, resident=True)
    assert plan(32, 256, layers=2) == resident
    assert plan(32, 256, layers=2, products="tf32") == dataclasses.replace(resident, tf32=True)
    assert plan(32, 256, layers=2, products="ieee") == seed
    # a layer alone (the layer-by-layer path): 64 KiB of W_hh resident
    assert plan(32, 256) == dataclasses.replace(resident, layers=1)
    # hidden 512: the stack's resident tiles would take 256 KiB; one layer's, 128 KiB, fit
    assert not plan(32, 512, layers=2).resident
    assert plan(32, 512).resident
    # batch 1024: one layer fits at 32 × 64 tiles, the stack only at 64 × 64, which spill registers and
    # trained no faster: layer by layer, whose resident weights (4 × 256 × 64 × 4 = 256 KiB) do not fit
    wide = plan(1024, 256, layers=2)
    assert (wide.block_b, wide.block_h, wide.layers, wide.resident, wide.counter_barrier) == (
        32,
        64,
        1,
        False,
        True,
    )
    # batch 256: 16 × 32 for a layer, 16 × 64 for the stack: layer by layer, 128 KiB resident
    mid = plan(256, 256, layers=2)
    assert (mid.block_b, mid.block_h, mid.layers, mid.resident, mid.block_k) == (16, 32, 1, True, 256)
    # not a power of two: no resident tile (its K loop is one tile as wide as the layer)
    assert not plan(32, 48).resident
    # one launch per timestep (no grid resident): layer by layer, W_hh cannot stay on chip between launches
    stepwise = plan(32, 256, slots=0, layers=2)
    assert (stepwise.persistent, stepwise.resident, stepwise.layers) == (False, False, 1)
    # DRNN_FUSED_LAUNCH replaces the measured variants; "plain" asks for none of them, blank for the plan
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "plain")
    assert plan(32, 256, layers=2) == fused_recurrence.plan_launch(32, 256, 132)
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "counter")
    assert plan(32, 256, layers=2, products="tf32") == dataclasses.replace(seed, layers=1)
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", " ")
    assert plan(32, 256, layers=2) == resident


def test_the_gru_and_the_rnn_are_planned_by_their_own_weight_tiles(monkeypatch):
    """The GRU's 3 gate blocks and the RNN's 1 take that share of the LSTM's shared memory: at the seed
    shape all three run the same resident wavefront (GRU 96 KiB, RNN 32 KiB of weight tiles); at hidden
    512 the LSTM's and the GRU's stack tiles (256 and 192 KiB) pass the 128 KiB cap, the RNN's (64)
    do not; a launch remembers its gates, and the kernels refuse another cell's (test above)."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)

    def plan(hidden: int, cell: str, products: str = "tf32") -> fused_recurrence.Launch:
        return fused_recurrence.plan_launch(
            32, hidden, 132, layers=2, products=products, shared_bytes=HOPPER_SHARED, gates=GATES[cell]
        )

    lstm = plan(256, "lstm")
    for cell in ("gru", "rnn"):
        assert plan(256, cell) == dataclasses.replace(lstm, gates=GATES[cell])
    assert [
        fused_recurrence.resident_bytes(plan(256, cell), 256) >> 10 for cell in ("lstm", "gru", "rnn")
    ] == [
        128,
        96,
        32,
    ]
    assert [plan(512, cell).resident for cell in ("lstm", "gru", "rnn")] == [False, False, True]
    assert not plan(256, "rnn", products="ieee").resident  # as the LSTM: slower from shared memory
    # the K loop's pipelined tiles shrink with the gates: on an RTX 4090 the LSTM's 64 × 64 tiles need
    # K 16 (3 stages × 4 bytes × (64 + 4 × 64) × K), the RNN's fit K 64 (96 KiB of its 99)
    tiles = [fused_recurrence.widest_k_tile(256, 64, 64, ADA_SHARED, GATES[cell]) for cell in ("lstm", "rnn")]
    assert tiles == [16, 64]


def test_resident_weights_are_taken_only_where_the_device_holds_them(monkeypatch):
    """A Hopper's 227 KiB hold the seed stack's 128 KiB of resident weights and the 17 KiB tile of h_{t-1}
    beside them (+ 1 KiB); an RTX 4090's or L4's 99 KiB hold one layer's 64 KiB but not the stack's; a
    T4's 64 KiB neither; an A100's 163 KiB not 64 × 64 tiles at hidden 128 (128 KiB of weights and 48 of
    h: batch 2048 alone, or 1024 under DDP). Triton would refuse those launches. A device that does not
    say (None) gets none; DRNN_FUSED_LAUNCH's resident on a device that cannot hold it (a tile of more
    rows, too) is a one-line error before training, not Triton's in its first step."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)

    def resident(shared, layers):
        return fused_recurrence.plan_launch(
            32, 256, 132, layers=layers, products="tf32", shared_bytes=shared
        ).resident

    assert [resident(HOPPER_SHARED, 2), resident(HOPPER_SHARED, 1)] == [True, True]
    assert [resident(ADA_SHARED, 2), resident(ADA_SHARED, 1)] == [False, True]
    assert [resident(TURING_SHARED, 2), resident(TURING_SHARED, 1)] == [False, False]
    assert [resident(None, 2), resident(None, 1)] == [False, False]
    a100 = fused_recurrence.plan_launch(2048, 128, 108, products="tf32", shared_bytes=A100_SHARED)
    assert (a100.block_b, a100.block_h, a100.resident) == (64, 64, False)
    assert fused_recurrence.plan_launch(1024, 128, 108, products="tf32", shared_bytes=A100_SHARED).resident
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "wavefront,resident")
    with pytest.raises(DrnnError) as refused:
        fused_recurrence.plan_launch(32, 256, 132, layers=2, shared_bytes=ADA_SHARED)
    assert str(refused.value) == (
        "DRNN_FUSED_LAUNCH resident needs 146 KiB of shared memory per program at hidden 256 in 16x16 tiles, "
        "more than this device's 99 KiB; use a smaller tile, or leave out resident or wavefront"
    )
    assert fused_recurrence.plan_launch(32, 256, 132, layers=2, shared_bytes=HOPPER_SHARED).resident
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "resident,32x16")  # 32 rows of h_{t-1} at hidden 512: 66 KiB
    with pytest.raises(DrnnError, match=r"needs 195 KiB .* 32x16 tiles, more than this device.s 163 KiB"):
        fused_recurrence.plan_launch(32, 512, 132, shared_bytes=A100_SHARED)


def test_the_k_tile_narrows_until_the_loop_fits_the_device(monkeypatch):
    """The forward kernel's K loop pipelines fp32 tiles of x and the four gates' W: at 32 × 64 tiles and
    K 64 that is up to 3 × 4 × (32·64 + 4·64·64) = 216 KiB, which a Hopper holds (227 KiB) and an RTX
    4090 (99 KiB) does not: Triton refused such launches in the first step. The K tile narrows to fit;
    the shapes measured on the H200 keep K 64."""
    monkeypatch.delenv("DRNN_FUSED_LAUNCH", raising=False)

    def k_tile(batch, hidden, slots, shared, layers=2):
        return fused_recurrence.plan_launch(
            batch, hidden, slots, layers=layers, products="ieee", shared_bytes=shared
        ).block_k

    assert fused_recurrence.loop_shared_bytes(32, 64, 64) == 221_184
    assert [k_tile(32, 256, 132, HOPPER_SHARED), k_tile(1024, 256, 132, HOPPER_SHARED)] == [64, 64]
    assert k_tile(1024, 256, 128, ADA_SHARED) == 16  # 32 × 64 tiles: K 32 would need 108 KiB
    assert k_tile(1024, 512, 132, HOPPER_SHARED) == 32  # 64 × 64 tiles: K 64 would need 240 KiB
    assert k_tile(1024, 512, 132, None) == 64  # a device that does not say: as before
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "64x64")  # a tile asked for gets its own K tile
    assert k_tile(256, 256, 132, ADA_SHARED, layers=1) == 16


@pytest.mark.skipif(not fused_recurrence.triton_available(), reason="Triton is not installed")
def test_every_planned_kernel_fits_an_rtx_4090s_shared_memory(compiled_plans):
    """Compiled for sm_89 (99 KiB of shared memory a program, 128 multiprocessors), every launch the
    plan makes for the benchmark's shapes fits: scripts/fused_compile.py fails on one that would not."""
    kernels = compiled_plan(compiled_plans, RTX_4090)
    assert len(kernels) == 36 and max(k["shared_bytes"] for k in kernels) <= ADA_SHARED


# the targets the tests compile for: an H100 (scripts/fused_compile.py's default) and an RTX 4090
H100, RTX_4090 = (), ("--arch", "89", "--slots", "128")
# One interpreter runs scripts/fused_compile.py's main for each target in turn, so that its start and
# the imports of torch and Triton are paid once; after each, a line holding that run's exit code.
COMPILE_EACH = """
import json, sys
sys.path.insert(0, sys.argv[1])
from fused_compile import main
for args in json.loads(sys.argv[2]):
    code = main(["--json", *args])
    sys.stdout.flush()
    print(json.dumps({"exit_code": code}), flush=True)
"""


@pytest.fixture(scope="module")
def compiled_plans() -> dict[tuple[str, ...], tuple[int, str]]:
    """scripts/fused_compile.py's run for each target: its exit code and its --json report (or what it
    said instead), and the interpreter's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    targets = [H100, RTX_4090]
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_EACH, str(REPO / "scripts"), json.dumps(targets)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(targets), done.stdout + done.stderr
    return {
        target: (json.loads(lines[2 * index + 1])["exit_code"], lines[2 * index] + "\n" + done.stderr)
        for index, target in enumerate(targets)
    }


def compiled_plan(plans: dict[tuple[str, ...], tuple[int, str]], target: tuple[str, ...]) -> list[dict]:
    """scripts/fused_compile.py's report of every kernel the plan launches for ``target`` (compiled, not
    run), which must have exited 0: each compiled and fits its architecture's shared memory."""
    code, said = plans[target]
    assert code == 0, said
    return json.loads(said.splitlines()[0])["kernels"]


def test_products_follow_autocast_the_cudnn_tf32_switch_and_the_device(monkeypatch):
    """On a CPU fp32 stays IEEE whatever the switch says (the interpreter computes in fp32); under a
    bf16 autocast the products are half precision. On a GPU, TF32 where cuDNN's switch is on and the
    chip has TF32 tensor cores (compute capability 8.0 on: not a V100's 7.0 or a T4's 7.5)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert fused_recurrence.products_for(cpu) == "ieee"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_recurrence.products_for(cpu) == "half"
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert fused_recurrence.products_for(cuda) == "tf32"
    capability = (7, 5)
    assert fused_recurrence.products_for(cuda) == "ieee"
    capability = (8, 0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert fused_recurrence.products_for(cuda) == "ieee"


@pytest.mark.parametrize(
    "tile",
    [
        "48x16",  # tl.arange takes powers of two only: Triton failed inside the first training step
        "16x48",
        "1024x16",  # past the plan's 64: registers and shared memory the kernel was never sized for
        "\uff11\uff16x16",  # full-width digits, which \\d and int() read as 16
        "1" * 5000 + "x16",  # int() refuses 4,300 digits with a ValueError (a traceback)
    ],
)
def test_drnn_fused_launch_takes_only_the_tiles_the_kernel_is_built_for(monkeypatch, tile):
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", tile)
    with pytest.raises(DrnnError) as refused:
        fused_recurrence.plan_launch(32, 768, 132)
    assert str(refused.value) == str(  # a DrnnError: a 5,000-character tile is quoted cut in the middle
        DrnnError(
            f"DRNN_FUSED_LAUNCH tile {tile}: rows and units must each be 16, 32 or 64, and the units must "
            "divide model.hidden_size 768"
        )
    )
    assert str(refused.value).endswith("the units must divide model.hidden_size 768")


def test_drnn_fused_launch_takes_one_tile(monkeypatch):
    """Two tiles were taken as the last one, without a word."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "16x16,32x32")
    with pytest.raises(DrnnError) as refused:
        fused_recurrence.plan_launch(32, 256, 132)
    assert str(refused.value) == "DRNN_FUSED_LAUNCH: two tiles, 16x16 and 32x32; give one"


@needs_interpreter
def test_a_fused_stack_under_drnn_fused_launch_runs_the_variant_and_equals_nn_lstm(monkeypatch):
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "resident,counter")
    used: list[fused_recurrence.Launch] = []
    real = fused_recurrence.launch_from_environment
    monkeypatch.setattr(
        fused_recurrence, "launch_from_environment", lambda *args: used.append(real(*args)) or used[-1]
    )
    _assert_equal_to_nn_lstm(*_pair(32), steps=3, batch=5)
    # the stack's plan (no wavefront asked: one layer at a time), then each of the two layers'
    assert [(launch.resident, launch.counter_barrier, launch.block_k, launch.layers) for launch in used] == [
        (True, True, 32, 1)
    ] * 3


def test_grads_multiplies_the_weight_gradients_as_the_recurrent_products_multiply(monkeypatch):
    """DRNN_FUSED_LAUNCH grads: Σ_t dz_tᵀ h_{t-1} from the autocast dtype's operands in half precision
    and on TF32 tensor cores for a TF32 launch (cuBLAS's switch on for that product alone), as cuDNN
    computes its own; without it, IEEE fp32 whatever the launch."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "tf32,grads")
    launch = fused_recurrence.plan_launch(32, 256, 132)
    assert (launch.tf32, launch.gradient_products) == (True, True)
    a, b = torch.randn(2, 64, 40), torch.randn(2, 40, 16)
    switch: list[bool] = []
    real = torch.Tensor.bmm

    def bmm(self: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        switch.append(torch.backends.cuda.matmul.allow_tf32)
        return real(self, other)

    monkeypatch.setattr(torch.Tensor, "bmm", bmm)
    before = torch.backends.cuda.matmul.allow_tf32
    plain = fused_recurrence.Launch(16, 16, 64, (16, 2), True, tf32=True)
    ieee_asked = dataclasses.replace(launch, tf32=False)
    for used, dtype, tf32 in (
        (plain, torch.float32, before),
        (ieee_asked, torch.float32, before),
        (launch, torch.float32, True),
    ):
        assert torch.equal(
            fused_recurrence.gradient_product(a, b, used, dtype), real(a, b)
        )  # the CPU has no TF32
        assert switch.pop() == tf32 and torch.backends.cuda.matmul.allow_tf32 == before
    half = fused_recurrence.gradient_product(a, b, launch, torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, real(a.half(), b.half()))


@needs_interpreter
def test_grads_under_fp16_autocast_keeps_the_gradients_to_fp16s_rounding(monkeypatch):
    """The weight gradients from fp16 operands: within fp16's rounding of the fp32 ones, and not them."""
    fused, _ = _pair(32, layers=1)
    x, state = torch.randn(4, 5, 8), (torch.zeros(1, 5, 32), torch.zeros(1, 5, 32))
    grads = {}
    for words in ("counter", "counter,grads"):
        monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
        fused.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out, _ = fused(x, state)
        out.float().square().sum().backward()
        grads[words] = {name: p.grad.clone() for name, p in fused.named_parameters()}
    exact, fp16 = grads["counter"], grads["counter,grads"]
    for name in exact:
        torch.testing.assert_close(fp16[name], exact[name], rtol=2e-3, atol=2e-3, msg=name)
    assert not torch.equal(fp16["weight_hh_l0"], exact["weight_hh_l0"])
    assert torch.equal(fp16["weight_ih_l0"], exact["weight_ih_l0"])  # the input projection is autograd's


@needs_interpreter
def test_under_half_autocast_the_interpreter_runs_fp16_and_leaves_bf16_to_the_scratch_cells():
    """Under fp16 autocast the kernels run interpreted and agree with the scratch cells under the same
    autocast (both multiply in fp16); under bf16 the interpreter's products are wrong (outputs off by
    ~1.2 after the first timestep), so the fused module steps the scratch cells: the same outputs."""
    fused, scratch = _scratch_pair(8, 32, 1)
    x = torch.randn(4, 5, 8)
    state = (torch.zeros(1, 5, 32), torch.zeros(1, 5, 32))
    launched = []
    real = fused_recurrence.fused_layer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_recurrence, "fused_layer", lambda *a, **k: launched.append(1) or real(*a, **k))
        for dtype, tolerance, kernels in ((torch.float16, 2e-3, 1), (torch.bfloat16, 0.0, 0)):
            with torch.autocast("cpu", dtype=dtype), torch.no_grad():
                want, got = scratch(x, state)[0].float(), fused(x, state)[0].float()
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=str(dtype))
            assert len(launched) == kernels, dtype
            launched.clear()


def record_stack_launches(monkeypatch: pytest.MonkeyPatch) -> list[fused_recurrence.Launch]:
    """The launch of every stack run as one wavefront from now on (the kernels still run)."""
    launches: list[fused_recurrence.Launch] = []
    real = fused_recurrence.fused_stack

    def recorded(*args, **kwargs):
        launches.append(args[7])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_recurrence, "fused_stack", recorded)
    return launches


def no_resident_grid(device: torch.device) -> int:
    """A device where no grid is resident at once: a wavefront runs one launch per super-step, the only
    way Triton's interpreter, one program at a time, can run a stack's programs (with one slot, the
    plan would run the layers one at a time, each grid resident)."""
    return 0


def _assert_equal_to_nn_lstm(fused: FusedRecurrent, reference: nn.LSTM, steps: int, batch: int) -> None:
    """Outputs, final state and every gradient (inputs, initial state, parameters) of the two stacks."""
    layers, hidden = reference.num_layers, reference.hidden_size
    torch.manual_seed(1)
    x = torch.randn(steps, batch, reference.input_size)
    h0, c0 = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)
    probes = (
        torch.randn(steps, batch, hidden),
        torch.randn(layers, batch, hidden),
        torch.randn(layers, batch, hidden),
    )
    got, want = _run(fused, x, h0, c0, probes), _run(reference, x, h0, c0, probes)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@needs_interpreter
@pytest.mark.parametrize(
    ("layers", "batch", "words"),
    [(2, 5, "wavefront"), (3, 20, "wavefront"), (2, 5, "wavefront,resident")],
    ids=["two-layers", "three-layers-two-batch-blocks", "resident"],
)
def test_a_stack_run_as_one_wavefront_equals_nn_lstm(layers, batch, words, monkeypatch):
    """``wavefront``: the whole stack in one launch per super-step, layer l at timestep s - l, the input
    products of the layers above the first inside the kernel. The interpreter runs a launch's
    programs top layer first forward and bottom layer first backward, so a schedule that read what
    another layer writes in the same super-step fails here (checked by mutation: every layer at s)."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
    monkeypatch.setattr(fused_recurrence, "device_slots", no_resident_grid)
    launches = record_stack_launches(monkeypatch)
    _assert_equal_to_nn_lstm(*_pair(32, layers), steps=4, batch=batch)
    assert [
        (launch.layers, launch.persistent, launch.resident, launch.kernel_grid) for launch in launches
    ] == [(layers, False, "resident" in words, (2, -(-batch // 16), layers))]


def _run_h(module: nn.Module, x: torch.Tensor, h0: torch.Tensor, probes: tuple) -> dict:
    """``_run`` for the cells whose state is h alone (GRU, RNN)."""
    x, h0 = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    out, h_n = module(x, h0)
    ((out * probes[0]).sum() + (h_n * probes[1]).sum()).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return {"out": out, "h_n": h_n, "x": x.grad, "h0": h0.grad, **grads}


# The other cells' references: (module, its options, drnn's model.cell)
OTHER_CELLS = {
    "gru": (nn.GRU, {}, "gru"),
    "rnn-tanh": (nn.RNN, {"nonlinearity": "tanh"}, "rnn"),
    "rnn-relu": (nn.RNN, {"nonlinearity": "relu"}, "rnn"),
}


@needs_interpreter
@pytest.mark.parametrize(
    ("cell", "layers", "batch", "words"),
    [
        ("gru", 2, 5, ""),
        ("gru", 2, 5, "wavefront"),
        ("gru", 3, 20, "wavefront,resident"),
        ("rnn-tanh", 2, 5, ""),
        ("rnn-tanh", 3, 20, "wavefront,resident"),
        ("rnn-relu", 2, 5, "wavefront"),
    ],
    ids=[
        "gru-layer-by-layer",
        "gru-wavefront",
        "gru-wavefront-resident-two-batch-blocks",
        "rnn-tanh-layer-by-layer",
        "rnn-tanh-wavefront-resident-two-batch-blocks",
        "rnn-relu-wavefront",
    ],
)
def test_gru_and_rnn_kernels_equal_nn_gru_and_nn_rnn(cell, layers, batch, words, monkeypatch):
    """The same kernels with the GRU's gates (its reset gate times the recurrent term with b_hn, which
    stays out of the input gates) and the plain RNN's: outputs, h_n and every gradient equal PyTorch's.
    Layer by layer the plan here is one persistent program of 16 × 32 a layer (the counter barrier);
    as a wavefront, one launch per super-step of 16 × 16 tiles (2 hidden blocks), with the input and
    recurrent weights resident, and 2 batch blocks at batch 20."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
    if words:
        monkeypatch.setattr(fused_recurrence, "device_slots", no_resident_grid)
    kernels = []
    for name in ("fused_layer", "fused_stack"):
        real = getattr(fused_recurrence, name)
        monkeypatch.setattr(
            fused_recurrence,
            name,
            lambda *a, _real=real, _name=name, **k: kernels.append(_name) or _real(*a, **k),
        )
    module, options, drnn_cell = OTHER_CELLS[cell]
    torch.manual_seed(0)
    hidden, steps = 32, 4
    reference = module(8, hidden, layers, **options)
    fused = FusedRecurrent(drnn_cell, 8, hidden, layers, **options)
    fused.load_state_dict(reference.state_dict())
    torch.manual_seed(1)
    x, h0 = torch.randn(steps, batch, 8), torch.randn(layers, batch, hidden)
    probes = torch.randn(steps, batch, hidden), torch.randn(layers, batch, hidden)
    got, want = _run_h(fused, x, h0, probes), _run_h(reference, x, h0, probes)
    assert got.keys() == want.keys() and len(want) == 4 + 4 * layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert kernels == (["fused_stack"] if words else ["fused_layer"] * layers)  # not the scratch cells
    assert int(fused.barrier_error) == 0


@needs_interpreter
def test_a_persistent_wavefront_meets_at_one_barrier_for_all_layers():
    """The top layer's program runs first in the interpreter and waits for the layer below's at the
    first barrier: it must give up and raise the flag (every layer's programs count at the barrier)."""
    torch.manual_seed(0)
    hidden, batch, steps = 16, 2, 2
    error = torch.zeros((), dtype=torch.int32)
    fused_recurrence.fused_stack(
        torch.randn(steps, batch, 4 * hidden),
        torch.zeros(2, batch, hidden),
        torch.zeros(2, batch, hidden),
        [torch.randn(4 * hidden, hidden)] * 2,
        [torch.randn(4 * hidden, hidden)],
        [torch.zeros(4 * hidden)],
        None,
        fused_recurrence.Launch(block_b=16, block_h=16, block_k=16, grid=(1, 1), persistent=True, layers=2),
        spin_limit=3,
        error=error,
    )
    assert int(error) == 1


@pytest.mark.parametrize(("hidden", "block_k"), [(32, 16), (48, 48)], ids=["narrow-k", "not-a-power-of-two"])
def test_a_resident_w_hh_needs_one_k_tile_as_wide_as_the_layer(hidden, block_k):
    launch = fused_recurrence.Launch(
        block_b=16, block_h=16, block_k=block_k, grid=(2, 1), persistent=True, resident=True
    )
    with pytest.raises(ValueError, match="block_k = hidden_size, a power of two"):
        fused_recurrence.fused_layer(
            torch.zeros(2, 1, 4 * hidden),
            torch.zeros(1, hidden),
            torch.zeros(1, hidden),
            torch.zeros(4 * hidden, hidden),
            launch,
        )


def test_the_kernels_are_compiled_as_the_launch_asks():
    """fp32 products are IEEE unless the launch asks for TF32; half precision operands run on the tensor
    cores either way (the setting only matters for fp32); the variants reach the kernels as constants."""
    plain = fused_recurrence.Launch(16, 16, 64, (16, 2), True)
    variant = fused_recurrence.Launch(
        16, 16, 256, (16, 2), True, resident=True, counter_barrier=True, tf32=True
    )
    assert fused_recurrence.kernel_constants(plain, True) == {
        "BLOCK_B": 16,
        "BLOCK_H": 16,
        "BLOCK_K": 64,
        "PERSISTENT": True,
        "NUM_PROGRAMS": 32,
        "FLAGS": 32,
        "PRECISION": "ieee",
        "RESIDENT": False,
        "COUNTER": False,
        "LAYERS": 1,
        "MASKED": False,
        "CELL": 0,
        "GATES": 4,
        "SLOTS": 4,
        "INPUT_SLOT_2": 2,
    }
    assert fused_recurrence.kernel_constants(plain, False)["PRECISION"] == "tf32"
    stack = fused_recurrence.kernel_constants(dataclasses.replace(plain, layers=3), True, masked=True)
    assert (stack["LAYERS"], stack["MASKED"], stack["NUM_PROGRAMS"], stack["FLAGS"]) == (3, True, 96, 128)
    constants = fused_recurrence.kernel_constants(variant, True)
    assert (constants["PRECISION"], constants["RESIDENT"], constants["COUNTER"], constants["BLOCK_K"]) == (
        "tf32",
        True,
        True,
        256,
    )
    # the cell: its code, gate blocks and gradient slots (fused_kernels' docstring); a launch planned
    # for another cell's gates is refused
    gru, relu = fused_recurrence.KernelCell("gru"), fused_recurrence.KernelCell("rnn", "relu")
    constants = fused_recurrence.kernel_constants(dataclasses.replace(plain, gates=3), True, cell=gru)
    assert (constants["CELL"], constants["GATES"], constants["SLOTS"], constants["INPUT_SLOT_2"]) == (
        1,
        3,
        4,
        3,
    )
    constants = fused_recurrence.kernel_constants(dataclasses.replace(plain, gates=1), True, cell=relu)
    assert (constants["CELL"], constants["GATES"], constants["SLOTS"]) == (3, 1, 1)
    assert fused_recurrence.KernelCell("rnn").code == 2
    with pytest.raises(ValueError, match="planned for 4 gates cannot run the gru's 3"):
        fused_recurrence.kernel_constants(plain, True, cell=gru)


@needs_interpreter
@pytest.mark.parametrize(
    ("words", "dropout_kind", "kernel", "cell"),
    [
        ("", "standard", "fused_layer", "lstm"),
        ("wavefront", "standard", "fused_stack", "lstm"),
        ("wavefront", "locked", "fused_stack", "lstm"),
        ("wavefront", "locked", "fused_stack", "gru"),
        ("", "standard", "fused_layer", "rnn"),
    ],
    ids=["layer-by-layer", "wavefront", "wavefront-locked", "gru-wavefront-locked", "rnn-layer-by-layer"],
)
def test_fused_model_trains_step_for_step_like_the_scratch_model(
    words, dropout_kind, kernel, cell, monkeypatch
):
    """Three SGD steps of the whole language model, with weight drop and dropout between the layers
    (the same masks: the fused stack draws them exactly as the scratch stack does, layer by layer or
    as one wavefront, which multiplies them in inside the kernels): the same losses and weights."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
    if words:
        monkeypatch.setattr(fused_recurrence, "device_slots", no_resident_grid)
    real = getattr(fused_recurrence, kernel)
    calls = []
    monkeypatch.setattr(
        fused_recurrence, kernel, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    )
    config = ModelConfig(
        cell=cell,
        hidden_size=16,
        num_layers=2,
        embedding_dim=8,
        weight_drop=0.3,
        dropout=0.4,
        dropout_kind=dropout_kind,
        impl="fused",
    )
    losses = {}
    weights = {}
    for impl in ("fused", "scratch"):
        model = build_model(12, config.model_copy(update={"impl": impl}), seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        torch.manual_seed(4)
        data = torch.randint(0, 12, (3, 5, 7))
        losses[impl] = []
        for batch in data:
            state = model.begin_state(5, "cpu")
            logits, _ = model(batch[:, :-1], state)
            loss = lm_loss(logits, batch[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[impl].append(loss.item())
        weights[impl] = model.state_dict()
    # the fused model's 3 steps ran the kernels: 2 layers each, or one stack
    assert len(calls) == 3 * (1 if words else 2)
    assert losses["fused"] == pytest.approx(losses["scratch"], rel=1e-6)
    for name, value in weights["scratch"].items():
        torch.testing.assert_close(weights["fused"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_without_a_device_for_the_kernels_the_fused_stack_steps_the_scratch_cells(monkeypatch):
    """On a CPU (no interpreter) a fused model — e.g. a checkpoint trained on a GPU — still predicts
    and evaluates: the same equations through the scratch cells, bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_recurrence.can_run(torch.device("cpu"))
    fused, scratch = _scratch_pair(6, 16, 2)
    x = torch.randn(3, 2, 6)
    state = (torch.zeros(2, 2, 16), torch.zeros(2, 2, 16))
    out_scratch, _ = scratch(x, state)
    out_fused, _ = fused(x, state)
    assert torch.equal(out_fused, out_scratch)


def test_fused_impl_is_refused_where_there_is_no_kernel():
    """Every cell has kernels in PyTorch's form (d2l's GRU form only steps the scratch cells), with
    hidden sizes in whole 16-unit tiles."""
    for cell in ("lstm", "gru", "rnn"):
        assert ModelConfig(cell=cell, impl="fused").impl == "fused"
    with pytest.raises(ValidationError, match="cell_form d2l is d2l's from-scratch cells"):
        ModelConfig(cell="gru", impl="fused", cell_form="d2l")
    with pytest.raises(ValidationError, match="hidden_size divisible by 16"):
        ModelConfig(hidden_size=20, impl="fused")


def test_launch_plan_fits_the_grid_to_the_device():
    """On a GPU with 132 multiprocessors (an H100), the seed config's 2×256 LSTM at batch 32 runs as one
    persistent grid of 32 programs of 16 × 16; at batch 1024 the tiles grow (units, then rows) until
    the grid fits; at batch 4096 even 64 × 64 tiles would need 256 programs: one launch per step."""

    seed = fused_recurrence.plan_launch(32, 256, slots=132)
    wide = fused_recurrence.plan_launch(1024, 256, slots=132)
    huge = fused_recurrence.plan_launch(4096, 256, slots=132)
    assert (seed.block_b, seed.block_h, seed.block_k, seed.grid) == (16, 16, 64, (16, 2))
    assert (seed.persistent, seed.num_warps) == (True, 4)
    assert (wide.block_b, wide.block_h, wide.grid) == (32, 64, (4, 32))
    assert (wide.persistent, wide.num_warps) == (True, 8)
    assert (huge.block_b, huge.block_h, huge.grid, huge.persistent) == (16, 16, (16, 256), False)


FUSED_TREE = {
    # 96 training tokens: two steps of 4 × 8; 24 validate
    "data": {"max_tokens": 120, "batch_size": 4, "num_steps": 8, "val_fraction": 0.2},
    "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2},
    # Short samples: in the interpreter each generated character is a launch per layer.
    "train": {
        "epochs": 1,
        "optimizer": "sgd",
        "lr": 1.0,
        "sample_every": 0,
        "sample_prefixes": ["the"],
        "sample_chars": 3,
        "device": "cpu",
        "seed": 3,
    },
}


@needs_interpreter
@pytest.mark.parametrize(
    ("words", "cell"), [("", "lstm"), ("wavefront", "gru")], ids=["layer-by-layer", "gru-wavefront"]
)
def test_drnn_train_with_impl_fused_trains_as_impl_scratch(workdir, cli, monkeypatch, words, cell):
    """The whole trainer (static step, clipping, state carry, validation, checkpoint) over the kernels,
    layer by layer or the stack as one wavefront (one epoch of two steps: in the interpreter a launch is
    slow), an LSTM and a GRU: the same perplexities as the scratch cells."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", words)
    if words:
        monkeypatch.setattr(fused_recurrence, "device_slots", no_resident_grid)
    launches = record_stack_launches(monkeypatch)
    real_layer, layer_calls = fused_recurrence.fused_layer, []
    monkeypatch.setattr(
        fused_recurrence, "fused_layer", lambda *a, **k: layer_calls.append(1) or real_layer(*a, **k)
    )
    config = config_file(workdir, FUSED_TREE)
    summaries = {}
    for impl in ("fused", "scratch"):
        code, out, err = cli(
            *("train", "--config", str(config), "--set", f"model.impl={impl}", "--set", f"model.cell={cell}"),
            *("--run", f"runs/{impl}", "--json"),
        )
        assert code == 0, err
        assert "steps the scratch cells" not in out + err  # the interpreter ran the kernels
        summaries[impl] = json.loads(out.strip().splitlines()[-1])
    assert summaries["fused"]["train_ppl"] == pytest.approx(summaries["scratch"]["train_ppl"], rel=1e-5)
    assert summaries["fused"]["val_ppl"] == pytest.approx(summaries["scratch"]["val_ppl"], rel=1e-5)
    assert summaries["fused"]["samples"] == summaries["scratch"]["samples"]
    assert [(prefix, len(text)) for prefix, text in summaries["fused"]["samples"].items()] == [("the", 6)]
    assert bool(launches) == bool(words) and all(launch.layers == 2 for launch in launches)
    assert bool(layer_calls) != bool(words)  # layer by layer: the one-layer kernels, each step


def test_drnn_train_with_impl_fused_on_a_cpu_says_it_steps_the_scratch_cells(workdir, cli, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = config_file(workdir, FUSED_TREE)
    code, out, err = cli("train", "--config", str(config), "--set", "model.impl=fused")
    assert code == 0, err
    said = " ".join((out + err).split())  # the console wraps long lines
    assert "note: model.impl fused runs Triton kernels on CUDA; on cpu it steps the scratch cells" in said


def test_impl_fused_on_cuda_without_triton_names_triton_as_what_is_missing(
    corpus_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A CUDA build without Triton fell back to the scratch cells saying "fused runs Triton kernels on
    CUDA; on cuda it steps the scratch cells": the missing piece is Triton, not CUDA."""
    from drnn_cli.config import Config
    from drnn_cli.data import load_dataset
    from drnn_cli.run_notes import data_notes

    config = Config.model_validate(
        {
            "data": {"path": str(corpus_path), "max_tokens": 2000},
            "model": {"impl": "fused", "hidden_size": 16},
        }
    )
    dataset = load_dataset(config.data)
    monkeypatch.setattr(fused_recurrence, "triton_available", lambda: False)
    cuda_notes = data_notes(config, dataset, torch.device("cuda", 0))
    assert (
        "model.impl fused runs Triton kernels, and Triton is not installed (pip install triton); it steps the "
        "scratch cells (the same model)"
    ) in cuda_notes
    assert not any("on cuda" in note for note in cuda_notes)
    assert (
        "model.impl fused runs Triton kernels on CUDA; on cpu it steps the scratch cells (the same model)"
        in data_notes(config, dataset, torch.device("cpu"))
    )


@needs_interpreter
def test_drnn_train_refuses_a_drnn_fused_launch_it_cannot_run_before_writing_the_run(
    workdir, cli, monkeypatch
):
    """The plan was first made inside the first training step: the error came after the run's
    config.yaml, vocab.json and an empty metrics.jsonl were written."""
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "fast")
    config = config_file(workdir, FUSED_TREE)
    code, out, err = cli("train", "--config", str(config), "--set", "model.impl=fused", "--run", "runs/x")
    assert_one_line_error(code, err, "DRNN_FUSED_LAUNCH: unknown word 'fast'")
    assert out == "" and not (workdir / "runs").exists()


def test_every_stack_variant_the_sweep_times_plans_a_resident_grid_on_an_h100(monkeypatch):
    """scripts/fused_bench.py's STACK_VARIANTS, as the seed model's stack plans them on 132
    multiprocessors: the plan's layers one at a time, then wavefronts of both layers' grids, all
    resident at once (a refused or stepwise one would time nothing the issue asks about)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("drnn_fused_bench", REPO / "scripts" / "fused_bench.py")
    assert spec is not None and spec.loader is not None
    fused_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fused_bench)
    monkeypatch.setenv("DRNN_FUSED_LAUNCH", "counter")  # what the sweep sets, it sets for its own rows only
    planned = {words: launch for words, launch in fused_bench.stack_variant_launches(132)}
    assert os.environ["DRNN_FUSED_LAUNCH"] == "counter"
    assert {
        words: (launch.layers, launch.programs, launch.persistent) for words, launch in planned.items()
    } == {
        "16x16": (1, 32, True),
        "16x16,wavefront": (2, 64, True),
        "16x16,wavefront,counter": (2, 64, True),
        "16x16,wavefront,resident": (2, 64, True),
        "16x16,wavefront,resident,counter": (2, 64, True),
        "16x32,wavefront,counter": (2, 32, True),
        "32x16,wavefront,counter": (2, 32, True),
    }
    assert planned["16x16,wavefront,resident"].block_k == 256  # one K tile as wide as the layer


@pytest.mark.skipif(not fused_recurrence.triton_available(), reason="Triton is not installed")
def test_every_planned_kernel_compiles_for_an_h100_without_one(compiled_plans):
    """Triton compiles for a named target with no device present: forward and backward of the launches
    the plan makes for the two-layer stack at batch 32, 256, 1024 (persistent) and 4096 (one per step),
    in bf16, fp32 with TF32 products and fp32 with IEEE ones, each with the variants it takes there."""
    every = compiled_plan(compiled_plans, H100)
    assert len(every) == 36 and not [k for k in every if "error" in k]
    assert all(0 < k["registers"] <= 255 for k in every)
    # the GRU's and the RNN's at the seed shape, planned as the LSTM's: one resident wavefront
    # (their smaller weight tiles take less shared memory), IEEE fp32 products through the K loop
    others = every[24:]
    assert [k["cell"] for k in others] == ["gru"] * 6 + ["rnn"] * 6
    assert all(k["tensor_cores"] == (k["precision"] == "tf32") for k in others)
    assert [(k["layers"], k["persistent"], k["tile"]) for k in others] == [(2, True, "16x16")] * 12
    assert [k["resident"] for k in others] == [True] * 4 + [False] * 2 + [True] * 4 + [False] * 2
    kernels = every[:24]
    assert {k["cell"] for k in kernels} == {"lstm"}
    # bf16 and TF32 products run on the tensor cores; IEEE fp32 ones on the FMA units
    assert all(k["tensor_cores"] == (k["precision"] == "tf32") for k in kernels)
    assert [k["precision"] for k in kernels[:6]] == ["tf32", "tf32", "tf32", "tf32", "ieee", "ieee"]
    assert [k["persistent"] for k in kernels] == [True] * 18 + [False] * 6
    # the seed stack runs as one wavefront; W_hh resident wherever the products are not IEEE fp32 and
    # its tiles fit (not at batch 1024's 64 units, nor between the launches of one per timestep)
    assert [k["layers"] for k in kernels[:6]] == [2] * 6 and {k["layers"] for k in kernels[6:]} == {1}
    assert [k["resident"] for k in kernels] == ([True] * 4 + [False] * 2) * 2 + [False] * 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
def test_the_kernel_benchmark_says_in_one_line_that_it_needs_cuda():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fused_bench.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "fused_bench: no CUDA device\n")


@needs_interpreter
def test_a_barrier_timeout_stops_training_in_one_line(workdir, cli, monkeypatch):
    """The flag is read at the epoch's end: training stops there, with the way out named."""
    real_layer = fused_recurrence.fused_layer

    def timing_out(*args, **kwargs):
        result = real_layer(*args, **kwargs)
        kwargs["error"].fill_(1)  # as a barrier that gave up would leave it
        return result

    monkeypatch.setattr(fused_recurrence, "fused_layer", timing_out)
    config = config_file(workdir, FUSED_TREE)
    code, _, err = cli("train", "--config", str(config), "--set", "model.impl=fused")
    assert_one_line_error(code, err, "barrier timed out in epoch 1", "Use model.impl torch")
    assert not (workdir / "runs" / "tiny" / "stopped.json").exists()  # no "diverged": the loss was fine


@needs_interpreter
def test_a_barrier_timeout_while_the_averaged_copy_validates_stops_training(workdir, cli, monkeypatch):
    """With train.average the deep-copied average validates, through kernels with a flag of their own:
    that flag is read after each validation."""
    real_layer = fused_recurrence.fused_layer

    def timing_out_without_gradients(*args, **kwargs):
        result = real_layer(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation, not training
            kwargs["error"].fill_(1)
        return result

    monkeypatch.setattr(fused_recurrence, "fused_layer", timing_out_without_gradients)
    tree = {**FUSED_TREE, "train": {**FUSED_TREE["train"], "average": "ema"}}
    code, _, err = cli("train", "--config", str(config_file(workdir, tree)), "--set", "model.impl=fused")
    assert_one_line_error(code, err, "barrier timed out while validating", "Use model.impl torch")
