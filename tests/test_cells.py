"""Specification of drnn_cli.cells: the scratch cells' hand-written backward pass through time.

``tests/test_models.py`` proves whole scratch stacks equal ``nn.LSTM``/``nn.GRU``/``nn.RNN``, outputs,
states and gradients; here each layer function is checked against finite differences
(``gradcheck``), its structure (one weight-gradient product per layer, not per timestep), and its
behaviour under autocast.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from drnn_cli.cells import CELL_STEPS, gru_d2l_layer, gru_layer, lstm_layer, rnn_layer

T, B, H = 4, 3, 5


def layer_call(cell: str, nonlinearity: str = "tanh") -> tuple[Callable, tuple[torch.Tensor, ...]]:
    """A layer function of ``cell`` and float64 inputs for it, each requiring a gradient."""
    generator = torch.Generator().manual_seed(7)
    gates = {"lstm": 4, "gru": 3, "gru_d2l": 3, "rnn": 1}[cell]

    def tensor(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.7).requires_grad_()

    x_gates, h0, w_hh = tensor(T, B, gates * H), tensor(B, H), tensor(gates * H, H)
    steps = CELL_STEPS[cell]
    if cell == "lstm":
        return (lambda x, h, c, w: lstm_layer(x, h, c, w, steps)), (x_gates, h0, tensor(B, H), w_hh)
    if cell == "gru":
        return (lambda x, h, w, b: gru_layer(x, h, w, b, steps)), (x_gates, h0, w_hh, tensor(gates * H))
    if cell == "gru_d2l":
        return (lambda x, h, w: gru_d2l_layer(x, h, w, steps)), (x_gates, h0, w_hh)
    return (lambda x, h, w: rnn_layer(x, h, w, nonlinearity, steps)), (x_gates, h0, w_hh)


CASES = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu"), ("gru_d2l", "tanh")]
IDS = ["lstm", "gru", "rnn-tanh", "rnn-relu", "gru-d2l"]


@pytest.mark.parametrize(("cell", "nonlinearity"), CASES, ids=IDS)
def test_the_backward_pass_through_time_matches_finite_differences(cell: str, nonlinearity: str) -> None:
    """Every input's gradient — x_gates, the initial state(s), W_hh, the GRU's b_hh — from every
    output: the sequence, the final h and the LSTM's final c."""
    layer, inputs = layer_call(cell, nonlinearity)
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-7)


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products dispatched while active, by operator."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "matmul"):
            self.counts[name] += 1
            self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("cell", "nonlinearity"), CASES[:3], ids=IDS[:3])
def test_the_backward_pass_is_one_product_per_timestep_and_one_for_the_weights(
    cell: str, nonlinearity: str
) -> None:
    """Autograd through the steps would run two per timestep (∂h_{t-1} and ∂W_hh), then add up T
    weight gradients; written out, ∂W_hh for all timesteps is one (G·H, T·B) × (T·B, H) product."""
    layer, inputs = layer_call(cell, nonlinearity)
    outputs = layer(*inputs)
    loss = sum(o.sum() for o in outputs)
    with MatrixProducts() as products:
        loss.backward()
    assert products.counts == Counter({"addmm": T, "mm": 1})


def test_d2l_s_gru_backward_pass_is_two_products_per_timestep_and_two_for_the_weights() -> None:
    """The candidate's product reads r ⊙ h_{t-1}, so ∂(r ⊙ h) and ∂h_{t-1} are a product each, and
    ∂W_hh is one product for the r and z rows (over h_{t-1}) and one for the candidate's (over r ⊙ h)."""
    layer, inputs = layer_call("gru_d2l")
    outputs = layer(*inputs)
    loss = sum(o.sum() for o in outputs)
    with MatrixProducts() as products:
        loss.backward()
    assert products.counts == Counter({"addmm": T, "mm": T + 2})


def test_under_autocast_the_backward_products_run_in_its_dtype_and_gradients_come_back_in_fp32() -> None:
    layer, inputs = layer_call("lstm")
    inputs32 = tuple(x.detach().float().requires_grad_() for x in inputs)
    with torch.autocast("cpu", torch.bfloat16), MatrixProducts() as forward_products:
        outputs = layer(*inputs32)
    with MatrixProducts() as backward_products:
        sum(o.sum() for o in outputs).backward()  # outside autocast, as a training step calls it
    assert forward_products.dtypes == backward_products.dtypes == {torch.bfloat16}
    reference = tuple(x.detach().float().requires_grad_() for x in inputs)
    sum(o.sum() for o in layer(*reference)).backward()
    for half, full in zip(inputs32, reference, strict=True):
        assert half.grad is not None and full.grad is not None
        assert half.grad.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: the gradients agree to about 1%, not to float precision
        assert (half.grad - full.grad).norm() <= 0.03 * full.grad.norm()


@pytest.mark.parametrize(("cell", "nonlinearity"), CASES, ids=IDS)
def test_without_gradients_the_layer_computes_what_training_computes(cell: str, nonlinearity: str) -> None:
    """Evaluation skips keeping the activations for the backward pass; the numbers are the same."""
    layer, inputs = layer_call(cell, nonlinearity)
    recorded = layer(*inputs)
    with torch.no_grad():
        plain = layer(*inputs)
    for a, b in zip(recorded, plain, strict=True):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize(("cell", "nonlinearity"), CASES, ids=IDS)
def test_a_layer_s_graph_is_freed_with_its_outputs_not_by_the_garbage_collector(
    cell: str, nonlinearity: str
) -> None:
    """What a backward pass keeps is freed as soon as nothing refers to the outputs: a reference
    cycle (a returned c_T kept by its own graph node) would hold every step's activations until a
    full collection — on a GPU trained without a CUDA graph, device memory."""
    layer, inputs = layer_call(cell, nonlinearity)
    gc.disable()
    try:
        outputs = layer(*inputs)
        node = weakref.ref(outputs[0].grad_fn)
        del outputs
        assert node() is None
    finally:
        gc.enable()


def test_changing_the_initial_cell_state_in_place_before_the_backward_pass_is_an_error() -> None:
    """As autograd's own: the backward pass would read the changed c_0 and give a wrong gradient."""
    layer, (x_gates, h0, c0, w_hh) = layer_call("lstm")
    outputs = layer(x_gates, h0, c0, w_hh)
    with torch.no_grad():
        c0.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        outputs[0].sum().backward()
