"""Specification of AWD-LSTM's regularisers (Merity, Keskar & Socher, 2017) in drnn_cli.models.

DropConnect on the recurrent weights and locked (variational) dropout run on PyTorch's own kernels
(``impl: torch``) exactly as the from-scratch cells run them, mask for mask; embedding dropout drops
whole tokens; and a model with none of them takes PyTorch's fused path untouched.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.testing import assert_close

from drnn_cli.config import ModelConfig, build_config
from drnn_cli.models import build_model, dropout_scale, make_recurrent, sequence_dropout
from drnn_cli.run_notes import idle_setting_notes

TOL = {"atol": 1e-12, "rtol": 1e-12}
CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"), ("lstm", "tanh")]


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{"hidden_size": 6, "num_layers": 3, **overrides})


def initial_state(cell: str, layers: int, batch: int, hidden: int):
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(layers, batch, hidden, dtype=torch.float64, generator=generator)
    return (
        (h, torch.randn(layers, batch, hidden, dtype=torch.float64, generator=generator))
        if cell == "lstm"
        else h
    )


@pytest.mark.parametrize("kind", ["standard", "locked"])
@pytest.mark.parametrize(("cell", "nonlinearity"), CELLS, ids=["rnn-tanh", "rnn-relu", "gru", "lstm"])
def test_torch_kernels_with_weight_drop_equal_the_scratch_cells_with_the_same_masks(cell, nonlinearity, kind):
    """Same seed → same DropConnect and between-layer masks → same outputs, states and gradients."""
    settings = {
        "cell": cell,
        "nonlinearity": nonlinearity,
        "weight_drop": 0.4,
        "dropout": 0.3,
        "dropout_kind": kind,
    }
    fused = make_recurrent(config(impl="torch", **settings), 5).double().train()
    scratch = make_recurrent(config(impl="scratch", **settings), 5).double().train()
    scratch.load_state_dict(fused.state_dict(), strict=True)
    inputs = torch.randn(7, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = initial_state(cell, 3, 4, 6)

    results = []
    for module in (fused, scratch):
        torch.manual_seed(11)
        outputs, final = module(inputs, state)
        loss = outputs.square().sum() + sum(
            part.sum() for part in (final if isinstance(final, tuple) else (final,))
        )
        grads = torch.autograd.grad(loss, list(module.parameters()))
        results.append((outputs, final, grads))
    (out_a, final_a, grads_a), (out_b, final_b, grads_b) = results
    assert_close(out_a, out_b, **TOL)
    assert_close(final_a, final_b, **TOL)
    for name, grad_a, grad_b in zip([n for n, _ in fused.named_parameters()], grads_a, grads_b, strict=True):
        assert_close(grad_a, grad_b, **TOL, msg=name)
    # DropConnect really dropped something: some recurrent weights got no gradient at all.
    assert (grads_a[1] == 0).any()


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_weight_drop_draws_one_mask_per_forward_pass(cell):
    module = make_recurrent(config(cell=cell, weight_drop=0.5), 5).train()
    inputs = torch.randn(4, 2, 5)
    state = initial_state(cell, 3, 2, 6)
    state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
    with torch.no_grad():
        first, _ = module(inputs, state)
        second, _ = module(inputs, state)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_without_regularisers_the_torch_stack_is_plain_pytorch_and_draws_no_random_numbers(cell):
    module = make_recurrent(config(cell=cell, dropout=0.0), 5).train()
    reference = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](5, 6, 3)
    reference.load_state_dict(module.state_dict(), strict=True)
    inputs = torch.randn(4, 2, 5)
    state = torch.zeros(3, 2, 6)
    state = (state, state) if cell == "lstm" else state
    rng = torch.get_rng_state()
    assert torch.equal(module(inputs, state)[0], reference(inputs, state)[0])
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(("cell", "nonlinearity"), CELLS, ids=["rnn-tanh", "rnn-relu", "gru", "lstm"])
def test_layer_calls_each_runs_one_kernel_call_per_layer_and_computes_the_stack(
    cell: str, nonlinearity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.layer_calls each (README "Using a GPU"): in training, one torch.lstm/gru/rnn_* call per
    layer, with the stacked call's outputs, final state and gradients; in evaluation, the stacked call."""
    kernel = {"lstm": "lstm", "gru": "gru", "rnn": f"rnn_{nonlinearity}"}[cell]
    calls = []
    original = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *args: calls.append(1) or original(*args))
    settings = {"cell": cell, "nonlinearity": nonlinearity}
    each = make_recurrent(config(layer_calls="each", **settings), 5).double().train()
    stack = make_recurrent(config(**settings), 5).double().train()
    stack.load_state_dict(each.state_dict(), strict=True)
    inputs = torch.randn(7, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = initial_state(cell, 3, 4, 6)

    results = []
    for module in (each, stack):
        outputs, final = module(inputs, state)
        loss = outputs.square().sum() + sum(
            part.sum() for part in (final if isinstance(final, tuple) else (final,))
        )
        results.append((outputs, final, torch.autograd.grad(loss, list(module.parameters()))))
    assert len(calls) == 3  # the three layers of `each`; the stack went through one fused call
    (out_a, final_a, grads_a), (out_b, final_b, grads_b) = results
    assert_close(out_a, out_b, **TOL)
    assert_close(final_a, final_b, **TOL)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        assert_close(grad_a, grad_b, **TOL)
    each.eval()
    with torch.no_grad():
        each(inputs, state)
    assert len(calls) == 3


def test_a_dropout_mask_zeroes_a_p_share_and_scales_the_rest_by_one_over_one_minus_p():
    like = torch.zeros(1, dtype=torch.float64)
    torch.manual_seed(3)
    scale = dropout_scale(like, (400, 250), 0.4)
    torch.manual_seed(3)
    uniform = torch.rand(400, 250, dtype=torch.float64)
    assert scale.dtype == torch.float64 and scale.shape == (400, 250)
    assert torch.equal(scale, (uniform >= 0.4).double() / 0.6)  # exactly the seeded draw
    assert abs((scale == 0).double().mean().item() - 0.4) < 0.01  # 100,000 draws: sd 0.0015


def test_locked_dropout_keeps_one_mask_for_every_timestep():
    torch.manual_seed(0)
    ones = torch.ones(9, 3, 50)
    locked = sequence_dropout(ones, 0.5, training=True, locked=True)
    assert set(locked.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert all(torch.equal(locked[t], locked[0]) for t in range(9))
    standard = sequence_dropout(ones, 0.5, training=True, locked=False)
    assert not all(torch.equal(standard[t], standard[0]) for t in range(9))
    assert torch.equal(sequence_dropout(ones, 0.5, training=False, locked=True), ones)


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("kind", ["standard", "locked"])
def test_locked_dropout_between_layers_drops_the_same_units_at_every_step(impl, kind):
    """One sequence, 2 layers: a unit of layer 1 dropped by a locked mask is zero at all 8 steps, so
    its column of ``weight_ih_l1`` gets exactly zero gradient; standard dropout redraws per step."""
    settings = {"impl": impl, "cell": "rnn", "num_layers": 2, "dropout": 0.5, "dropout_kind": kind}
    torch.manual_seed(3)
    module = make_recurrent(config(**settings), 5).double().train()
    torch.manual_seed(4)
    outputs, _ = module(torch.randn(8, 1, 5, dtype=torch.float64), torch.zeros(2, 1, 6, dtype=torch.float64))
    outputs.sum().backward()
    zero_columns = int((module.weight_ih_l1.grad == 0).all(dim=0).sum())
    if kind == "locked":
        assert 0 < zero_columns < 6
    else:
        assert zero_columns == 0


def test_embedding_dropout_drops_whole_tokens_and_rescales_the_rest():
    model = build_model(
        12, ModelConfig(hidden_size=8, num_layers=1, embedding_dim=20, embedding_dropout=0.5), seed=0
    )
    tokens = torch.tensor([[3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7] * 2])
    torch.manual_seed(2)
    features = model.train().encode(tokens)  # (T, 1, 20)
    weight = model.embedding.weight
    torch.manual_seed(2)
    keep = (torch.rand(12, 1) >= 0.5).squeeze(1)  # the mask encode drew: one draw per vocabulary entry
    assert {token: bool(keep[token]) for token in (3, 5, 7)} == {3: False, 5: True, 7: False}  # seed 2's
    for token in (3, 5, 7):
        rows = features[tokens[0] == token, 0]
        expected = weight[token] * 2 if keep[token] else torch.zeros_like(weight[token])
        assert torch.equal(rows, expected.expand_as(rows)), (
            f"token {token}: all zero, or all scaled by 1/(1-p)"
        )
    assert torch.equal(model.eval().encode(tokens), nn.functional.embedding(tokens.t(), weight))


def test_embedding_dropout_needs_a_learned_embedding():
    with pytest.raises(ValidationError, match=r"embedding_dropout needs a learned embedding"):
        ModelConfig(embedding_dropout=0.1)


def test_dropout_kind_is_standard_or_locked():
    with pytest.raises(ValidationError, match=r"dropout_kind"):
        ModelConfig(dropout_kind="variational")


def test_between_layer_dropout_on_one_layer_drops_nothing_and_training_says_so():
    one_layer = {"model": {"hidden_size": 6, "num_layers": 1, "dropout": 0.3}}
    stack = make_recurrent(build_config(one_layer).model, 5).train()
    inputs, state = torch.randn(7, 4, 5), (torch.zeros(1, 4, 6), torch.zeros(1, 4, 6))
    assert torch.equal(stack(inputs, state)[0], stack(inputs, state)[0])  # no mask: no second layer
    assert idle_setting_notes(build_config(one_layer), planned_epochs=3, planned_steps=30) == [
        "model.dropout 0.3 drops between stacked layers, and this model has one: it drops nothing "
        "(use model.output_dropout or model.input_dropout, or set model.num_layers ≥ 2)"
    ]
    two_layers = {"model": {**one_layer["model"], "num_layers": 2}}
    assert idle_setting_notes(build_config(two_layers), planned_epochs=3, planned_steps=30) == []
