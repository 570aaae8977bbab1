"""The from-scratch cells (``model.impl: scratch``): one timestep forward, and backpropagation through
time written out by hand (d2l 0.17.6 §8.7), tested equal to autograd's.

Why a hand-written backward pass: through autograd, the recurrent weight's gradient is one small
matrix product per timestep, added up, and a timestep's backward is a replay of each gate operation
on its own (a gate block sliced out of four gets the other three zero-filled on the way back).
Written out, ``∂W_hh`` is one matrix product over all timesteps, and a timestep's backward is one
function of what its forward step kept: the chain rule through that step, which reads as the
equations below. ``train.compile`` turns each such function into one generated kernel beside the
product for ``∂h_{t-1}`` (a GPU's batch-32 step is bound by how many kernels run one after another).
On a CPU it runs at about autograd's speed (docs/benchmarks.md: same-process A/B at 2×64 and
2×256 units).

Gate layouts are PyTorch's and cuDNN's (rows of ``weight_ih_l{k}`` / ``weight_hh_l{k}``)::

    lstm  [ i | f | g | o ]   c' = σ(f)⊙c + σ(i)⊙tanh(g);   h' = σ(o)⊙tanh(c')
    gru   [ r | z | n ]       n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))   ← reset gate applied
                              h' = (1 − z)⊙n + z⊙h                                AFTER the product
    gru, d2l's form           n  = tanh(W_in x + b_n + W_hn (r ⊙ h))            ← BEFORE the product
                                                                                 (model.cell_form d2l)
    rnn   [ h ]               h' = tanh(W_ih x + b_ih + W_hh h + b_hh)   (or relu)

A layer's functions take ``x_gates`` (T, B, G·H), the input projection of all timesteps (for the LSTM,
the RNN and d2l's GRU with both biases in it; cuDNN's GRU adds ``b_hh`` inside the reset product), and
``w_hh`` (G·H, H).
Under autocast the backward pass runs under the forward pass's autocast state (what
``torch.amp.custom_bwd`` does), so its products are half precision where the forward's were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# A function of one timestep (forward or backward), plain or torch.compile's version of it.
CellStep = Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# One timestep forward (also what drnn inspect traces, one character at a time)


def lstm_step(
    x_gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM step: ``(h', c', gates)`` with ``gates`` = ``[σ(i) | σ(f) | tanh(g) | σ(o)]``."""
    hidden = h.shape[-1]
    pre = torch.addmm(x_gates, h, w_hh_t)
    gates = torch.sigmoid(pre)  # σ over all four blocks at once, then tanh for the g block
    gates[:, 2 * hidden : 3 * hidden] = torch.tanh(pre[:, 2 * hidden : 3 * hidden])
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.addcmul(f * c, i, g)
    return o * torch.tanh(c), c, gates


def gru_step(
    x_gates: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, b_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GRU step: ``(h', σ([r | z]), n, W_hn h + b_hn)``."""
    hidden = h.shape[-1]
    h_gates = torch.addmm(b_hh, h, w_hh_t)
    rz = torch.sigmoid(x_gates[:, : 2 * hidden] + h_gates[:, : 2 * hidden])
    r, z = rz.chunk(2, dim=1)
    h_n = h_gates[:, 2 * hidden :]
    n = torch.tanh(torch.addcmul(x_gates[:, 2 * hidden :], r, h_n))
    return torch.addcmul(n, z, h - n), rz, n, h_n  # n + z(h − n) = (1 − z)⊙n + z⊙h


def gru_d2l_step(
    x_gates: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of d2l's from-scratch GRU (§9.1, ``H̃ = tanh(X W_xh + (R ⊙ H) W_hh + b_h)``): the reset
    gate scales ``h`` before the candidate's recurrent product, so the step takes two products, the
    second waiting for the gates. ``(h', σ([r | z]), n, r ⊙ h)``."""
    hidden = h.shape[-1]
    rz = torch.sigmoid(torch.addmm(x_gates[:, : 2 * hidden], h, w_hh_t[:, : 2 * hidden]))
    r, z = rz.chunk(2, dim=1)
    reset_h = r * h
    n = torch.tanh(torch.addmm(x_gates[:, 2 * hidden :], reset_h, w_hh_t[:, 2 * hidden :]))
    return torch.addcmul(n, z, h - n), rz, n, reset_h  # n + z(h − n) = (1 − z)⊙n + z⊙h


def rnn_step(x_gates: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    pre = torch.addmm(x_gates, h, w_hh_t)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


# ---------------------------------------------------------------------------------------------
# One timestep backward: the chain rule through one step, from what that step's forward pass
# kept. Each takes ∂L/∂h_t (all paths: the layer above, and h_{t+1}) and the gradient the layer
# above sends to h_{t-1} (``d_out_prev``), and returns the gate gradients at t and ∂L/∂h_{t-1}.


def lstm_backward_step(
    dh: torch.Tensor,
    dc: torch.Tensor,
    d_out_prev: torch.Tensor,
    gates: torch.Tensor,
    c_prev: torch.Tensor,
    c: torch.Tensor,
    w_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂pre-activations (B, 4H), ∂h_{t-1}, ∂c_{t-1})``; ``dc`` arrives from c_{t+1} only.

    Written over all four gate blocks at once (a few wide operations rather than four narrow ones
    each: on a GPU, each operation is a kernel launch).
    """
    i, f, g, o = gates.chunk(4, dim=1)
    tanh_c = torch.tanh(c)
    dc = torch.addcmul(dc, dh * o, 1 - tanh_c * tanh_c)  # + the path through h_t = o·tanh(c_t)
    # c_t = f·c_{t-1} + i·g and h_t = o·tanh(c_t): what each gate multiplies, the gradient arriving
    # there (∂c_t for i, f, g; ∂h_t for o), and each gate's slope, σ' = σ(1 − σ) and tanh' = 1 − tanh²
    times = torch.cat([g, c_prev, i, tanh_c], dim=1)
    arriving = torch.cat([dc, dc, dc, dh], dim=1)
    slope = gates * (1 - gates)
    slope[:, 2 * g.shape[1] : 3 * g.shape[1]] = 1 - g * g
    d_pre = times * arriving * slope
    return d_pre, torch.addmm(d_out_prev, d_pre, w_hh), dc * f


def gru_backward_step(
    dh: torch.Tensor,
    d_out_prev: torch.Tensor,
    rz: torch.Tensor,
    n: torch.Tensor,
    h_n: torch.Tensor,
    h_prev: torch.Tensor,
    w_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂x_gates (B, 3H), ∂h_gates (B, 3H), ∂h_{t-1})``: the two differ in the n block, where the
    recurrent product is multiplied by the reset gate."""
    r, z = rz.chunk(2, dim=1)
    d_n = dh * (1 - z) * (1 - n * n)  # h_t = n + z·(h_{t-1} − n)
    d_z = dh * (h_prev - n) * z * (1 - z)
    d_r = d_n * h_n * r * (1 - r)  # n = tanh(x_n + r·h_n)
    d_x = torch.cat([d_r, d_z, d_n], dim=1)
    d_h_gates = torch.cat([d_r, d_z, d_n * r], dim=1)
    return d_x, d_h_gates, torch.addmm(d_out_prev + dh * z, d_h_gates, w_hh)


def gru_d2l_backward_step(
    dh: torch.Tensor,
    d_out_prev: torch.Tensor,
    rz: torch.Tensor,
    n: torch.Tensor,
    reset_h: torch.Tensor,
    h_prev: torch.Tensor,
    w_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂x_gates (B, 3H), ∂h_{t-1})`` of :func:`gru_d2l_step`; ``h_{t-1}`` reaches the loss through
    the update gate, both gates' products and, scaled by r, the candidate's product."""
    hidden = h_prev.shape[-1]
    r, z = rz.chunk(2, dim=1)
    d_n = dh * (1 - z) * (1 - n * n)  # h_t = n + z·(h_{t-1} − n)
    d_z = dh * (h_prev - n) * z * (1 - z)
    d_reset_h = d_n.mm(w_hh[2 * hidden :])  # n = tanh(x_n + (r·h) W_hnᵀ)
    d_r = d_reset_h * h_prev * r * (1 - r)
    d_rz = torch.cat([d_r, d_z], dim=1)
    d_h_prev = torch.addmm(d_out_prev + dh * z + d_reset_h * r, d_rz, w_hh[: 2 * hidden])
    return torch.cat([d_rz, d_n], dim=1), d_h_prev


def rnn_backward_step(
    dh: torch.Tensor, d_out_prev: torch.Tensor, h: torch.Tensor, nonlinearity: str, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂pre-activation, ∂h_{t-1})``; tanh' = 1 − h², relu' = 1 where h > 0 (0 at 0, as autograd's)."""
    d_pre = dh * (1 - h * h) if nonlinearity == "tanh" else dh * (h > 0)
    return d_pre, torch.addmm(d_out_prev, d_pre, w_hh)


@dataclass(frozen=True)
class CellSteps:
    """A cell's forward and backward timestep, plain or compiled (``train.compile``)."""

    forward: CellStep
    backward: CellStep

    def compiled(self, backend: str | Callable[..., Any]) -> CellSteps:
        return CellSteps(
            torch.compile(self.forward, backend=backend, fullgraph=True),
            torch.compile(self.backward, backend=backend, fullgraph=True),
        )


CELL_STEPS = {
    "lstm": CellSteps(lstm_step, lstm_backward_step),
    "gru": CellSteps(gru_step, gru_backward_step),
    "gru_d2l": CellSteps(gru_d2l_step, gru_d2l_backward_step),
    "rnn": CellSteps(rnn_step, rnn_backward_step),
}


# ---------------------------------------------------------------------------------------------
# A layer over all timesteps


def _above(d_out: torch.Tensor, t: int, zero: torch.Tensor) -> torch.Tensor:
    """The gradient the layer above sends to h_{t-1}; none reaches h_0."""
    return d_out[t - 1] if t else zero


def _weight_gradient(d_pre: torch.Tensor, h0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ_t ∂pre_tᵀ h_{t-1} as one (G·H, T·B) × (T·B, H) product."""
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])
    return d_pre.flatten(0, 1).t().mm(h_prev.flatten(0, 1))


@dataclass(frozen=True)
class _Autocast:
    """The forward pass's autocast state, for its backward pass (what ``torch.amp.custom_bwd`` does
    for one device type)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> _Autocast:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, self.dtype, enabled=self.enabled)


def _dtypes(*inputs: torch.Tensor) -> tuple[torch.dtype, ...]:
    return tuple(x.dtype for x in inputs)


def _saved(ctx: Any) -> list[torch.Tensor]:
    """What the forward pass saved, detached: a step function then sees tensors that need no
    gradient at every timestep (one compiled variant, not one for outputs and one for h_0)."""
    return [tensor.detach() for tensor in ctx.saved_tensors]


def _cast(gradients: tuple[torch.Tensor, ...], dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor, ...]:
    """Each gradient in its input's dtype (products under autocast may have made them half)."""
    return tuple(g.to(dtype) for g, dtype in zip(gradients, dtypes, strict=True))


def _lstm_forward(
    x_gates: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The forward loop: ``(outputs, h_T, c_T, [c_0 … c_T], [gates_1 … gates_T])``."""
    w_hh_t, h, c = w_hh.t(), h0, c0
    outputs, cells, gates = [], [c0], []
    for x_t in x_gates:
        h, c, gates_t = steps.forward(x_t, h, c, w_hh_t)
        outputs.append(h)
        cells.append(c)
        gates.append(gates_t)
    return torch.stack(outputs), h, c, cells, gates


def _gru_forward(
    x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, steps: CellSteps, *b_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The forward loop of either GRU form: ``(outputs, h_T, [σ([r | z]), n, W_hn h + b_hn] for each
    timestep, flat)``; ``b_hh`` for cuDNN's form only, whose step adds it inside the reset product
    (d2l's keeps ``r ⊙ h_{t-1}`` in the last place)."""
    w_hh_t, h = w_hh.t(), h0
    outputs, kept = [], []
    for x_t in x_gates:
        h, *kept_t = steps.forward(x_t, h, w_hh_t, *b_hh)
        outputs.append(h)
        kept.extend(kept_t)
    return torch.stack(outputs), h, kept


def _rnn_forward(
    x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, nonlinearity: str, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward loop: ``(outputs, h_T)``."""
    w_hh_t, h = w_hh.t(), h0
    outputs = []
    for x_t in x_gates:
        h = steps.forward(x_t, h, w_hh_t, nonlinearity)
        outputs.append(h)
    return torch.stack(outputs), h


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_gates, h0, c0, w_hh, steps: CellSteps):  # type: ignore[override]
        out, h, c, cells, gates = _lstm_forward(x_gates, h0, c0, w_hh, steps)
        # Per timestep, as the backward pass reads them; saved tensors are freed once it ran, and an
        # in-place change to one of them before then (c_0, say) is an error, not a wrong gradient.
        ctx.save_for_backward(h0, out, w_hh, *cells, *gates)
        ctx.steps, ctx.autocast = steps, _Autocast.current(x_gates.device)
        ctx.dtypes = _dtypes(x_gates, h0, c0, w_hh)
        return out, h, c

    @staticmethod
    def backward(ctx: Any, d_out, d_h, d_c):  # type: ignore[override]
        h0, out, w_hh, *kept = _saved(ctx)
        steps = len(out)
        cells, gates = kept[: steps + 1], kept[steps + 1 :]
        with ctx.autocast():
            zero = torch.zeros_like(d_out[0])  # what reaches h_0 from above: none, in d_out's dtype
            dh, dc = d_out[-1] + d_h, d_c
            d_pre = [torch.Tensor()] * steps
            for t in reversed(range(steps)):
                d_pre[t], dh, dc = ctx.steps.backward(
                    dh, dc, _above(d_out, t, zero), gates[t], cells[t], cells[t + 1], w_hh
                )
            d_x = torch.stack(d_pre)
            d_w = _weight_gradient(d_x, h0, out)
        return *_cast((d_x, dh, dc, d_w), ctx.dtypes), None


class _GRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_gates, h0, w_hh, b_hh, steps: CellSteps):  # type: ignore[override]
        out, h, kept = _gru_forward(x_gates, h0, w_hh, steps, b_hh)
        ctx.save_for_backward(h0, out, w_hh, *kept)  # per timestep, as the backward pass reads them
        ctx.steps, ctx.autocast = steps, _Autocast.current(x_gates.device)
        ctx.dtypes = _dtypes(x_gates, h0, w_hh, b_hh)
        return out, h

    @staticmethod
    def backward(ctx: Any, d_out, d_h):  # type: ignore[override]
        h0, out, w_hh, *kept = _saved(ctx)
        steps = len(out)
        with ctx.autocast():
            zero = torch.zeros_like(d_out[0])  # what reaches h_0 from above: none, in d_out's dtype
            dh = d_out[-1] + d_h
            d_x = [torch.Tensor()] * steps
            d_h_gates = [torch.Tensor()] * steps
            for t in reversed(range(steps)):
                h_prev = out[t - 1] if t else h0
                d_x[t], d_h_gates[t], dh = ctx.steps.backward(
                    dh, _above(d_out, t, zero), *kept[3 * t : 3 * t + 3], h_prev, w_hh
                )
            d_hg = torch.stack(d_h_gates)
            d_w = _weight_gradient(d_hg, h0, out)
            d_b = d_hg.sum(dim=(0, 1))
        return *_cast((torch.stack(d_x), dh, d_w, d_b), ctx.dtypes), None


class _GRUD2LLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_gates, h0, w_hh, steps: CellSteps):  # type: ignore[override]
        out, h, kept = _gru_forward(x_gates, h0, w_hh, steps)
        ctx.save_for_backward(h0, out, w_hh, *kept)  # per timestep, as the backward pass reads them
        ctx.steps, ctx.autocast = steps, _Autocast.current(x_gates.device)
        ctx.dtypes = _dtypes(x_gates, h0, w_hh)
        return out, h

    @staticmethod
    def backward(ctx: Any, d_out, d_h):  # type: ignore[override]
        h0, out, w_hh, *kept = _saved(ctx)
        steps, hidden = len(out), h0.shape[-1]
        with ctx.autocast():
            zero = torch.zeros_like(d_out[0])  # what reaches h_0 from above: none, in d_out's dtype
            dh = d_out[-1] + d_h
            d_x = [torch.Tensor()] * steps
            for t in reversed(range(steps)):
                h_prev = out[t - 1] if t else h0
                d_x[t], dh = ctx.steps.backward(
                    dh, _above(d_out, t, zero), *kept[3 * t : 3 * t + 3], h_prev, w_hh
                )
            d_gates = torch.stack(d_x)
            # The r and z rows multiply h_{t-1}; the candidate's rows multiply r ⊙ h_{t-1}.
            reset_h = torch.stack(kept[2::3])
            d_w = torch.cat(
                [
                    _weight_gradient(d_gates[..., : 2 * hidden], h0, out),
                    d_gates[..., 2 * hidden :].flatten(0, 1).t().mm(reset_h.flatten(0, 1)),
                ]
            )
        return *_cast((d_gates, dh, d_w), ctx.dtypes), None


class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_gates, h0, w_hh, nonlinearity: str, steps: CellSteps):  # type: ignore[override]
        out, h = _rnn_forward(x_gates, h0, w_hh, nonlinearity, steps)
        ctx.save_for_backward(h0, out, w_hh)
        ctx.nonlinearity, ctx.steps = nonlinearity, steps
        ctx.autocast, ctx.dtypes = _Autocast.current(x_gates.device), _dtypes(x_gates, h0, w_hh)
        return out, h

    @staticmethod
    def backward(ctx: Any, d_out, d_h):  # type: ignore[override]
        h0, out, w_hh = _saved(ctx)
        steps = len(out)
        with ctx.autocast():
            zero = torch.zeros_like(d_out[0])  # what reaches h_0 from above: none, in d_out's dtype
            dh = d_out[-1] + d_h
            d_pre = [torch.Tensor()] * steps
            for t in reversed(range(steps)):
                d_pre[t], dh = ctx.steps.backward(dh, _above(d_out, t, zero), out[t], ctx.nonlinearity, w_hh)
            d_x = torch.stack(d_pre)
            d_w = _weight_gradient(d_x, h0, out)
        return *_cast((d_x, dh, d_w), ctx.dtypes), None, None


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call, so the forward pass must keep what its backward reads."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lstm_layer(
    x_gates: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(outputs (T, B, H), h_T, c_T)``."""
    if _recording(x_gates, h0, c0, w_hh):
        return _LSTMLayer.apply(x_gates, h0, c0, w_hh, steps)
    out, h, c, _, _ = _lstm_forward(x_gates, h0, c0, w_hh, steps)
    return out, h, c


def gru_layer(
    x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs (T, B, H), h_T)``; ``x_gates`` without ``b_hh``."""
    if _recording(x_gates, h0, w_hh, b_hh):
        return _GRULayer.apply(x_gates, h0, w_hh, b_hh, steps)
    out, h, _ = _gru_forward(x_gates, h0, w_hh, steps, b_hh)
    return out, h


def gru_d2l_layer(
    x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """d2l's GRU form: ``(outputs (T, B, H), h_T)``; ``x_gates`` holds both biases."""
    if _recording(x_gates, h0, w_hh):
        return _GRUD2LLayer.apply(x_gates, h0, w_hh, steps)
    out, h, _ = _gru_forward(x_gates, h0, w_hh, steps)
    return out, h


def rnn_layer(
    x_gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, nonlinearity: str, steps: CellSteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs (T, B, H), h_T)``; ``nonlinearity`` is ``tanh`` or ``relu``."""
    if _recording(x_gates, h0, w_hh):
        return _RNNLayer.apply(x_gates, h0, w_hh, nonlinearity, steps)
    return _rnn_forward(x_gates, h0, w_hh, nonlinearity, steps)
