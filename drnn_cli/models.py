"""The language model: input encoding → stacked recurrent layers → linear layer to the vocabulary.

Two implementations of the recurrent stack sit behind one interface:

* ``impl: torch`` uses ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (cuDNN on a GPU);
* ``impl: scratch`` steps the cells written from d2l's equations, with their backward pass through
  time written out too (:mod:`drnn_cli.cells`), with *the same parameter names and layouts* as
  PyTorch's, so weights copy across and the two are tested equal.

By default the scratch cells are PyTorch's form: the GRU applies its reset gate after the recurrent
product, and every gate has two biases, so a scratch stack equals ``nn.GRU`` & co. (d2l's concise
§9.1–9.3). ``model.cell_form: d2l`` makes them d2l's from-scratch code (§8.5, §9.1, §9.2): one bias
per gate (``bias_hh`` is kept, at zero and untrained, so checkpoints keep PyTorch's names) and the
GRU's reset gate before the product (README "Reproducing d2l").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from drnn_cli import fused_recurrence
from drnn_cli.cells import CELL_STEPS, CellSteps, gru_d2l_layer, gru_layer, lstm_layer, rnn_layer
from drnn_cli.config import ModelConfig
from drnn_cli.model_size import GATES

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# One-hot inputs of vocabularies up to this size are rows looked up in an identity table (at most 4 MiB
# in fp32): one kernel per minibatch where zeros-then-scatter is two. Larger ones scatter, as a V × V
# table would outgrow the features it saves a kernel on.
ONE_HOT_TABLE_MAX = 1024


class ScratchRecurrent(nn.Module):
    """A stack of recurrent layers stepped in Python, parameter-compatible with ``nn.LSTM`` & co.

    Input ``(T, B, I)`` time-major; state ``h`` (and ``c`` for LSTM) of shape ``(L, B, H)``. The input
    projection of all timesteps is one matrix product per layer; each timestep then costs one
    ``addmm`` for the recurrent product and a few element-wise gate operations, forward and backward
    (:mod:`drnn_cli.cells`).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float = 0.0,
        nonlinearity: str = "tanh",
        weight_drop: float = 0.0,
        locked: bool = False,
        form: str = "torch",
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"unknown cell {cell!r}; choose rnn, gru or lstm")
        self.cell = cell
        self.form = form  # model.cell_form
        self._steps_name = "gru_d2l" if (cell, form) == ("gru", "d2l") else cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.nonlinearity = nonlinearity
        self.weight_drop = weight_drop
        self.locked = locked
        # What steps a timestep, forward and backward, while training: the plain cell, or
        # torch.compile's (compile_cells).
        self._training_steps: CellSteps = CELL_STEPS[self._steps_name]
        rows = GATES[cell] * hidden_size
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(rows, width)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(rows, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(rows)))
            # d2l's cells have one bias per gate: the second stays zero and gets no gradient, so neither
            # SGD nor the clipping norm counts a gate's bias gradient twice.
            self.register_parameter(
                f"bias_hh_l{layer}", nn.Parameter(torch.empty(rows), requires_grad=form != "d2l")
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            if weight.requires_grad:
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.zeros_(weight)  # d2l's form: the held recurrent bias

    def compile_cells(self, backend: str | Callable[..., Any] = "inductor") -> None:
        """Step training minibatches through ``torch.compile``'s version of the cell (``train.compile``).

        Each timestep is one recurrent matrix product and a handful of element-wise gate operations,
        each its own kernel; compiled, the gate arithmetic of a forward timestep, and that of a
        backward one, each become one generated kernel. Evaluation and sampling keep the plain cell:
        other shapes and no gradients would mean more compilations for a small share of the time.
        """
        self._training_steps = CELL_STEPS[self._steps_name].compiled(backend)

    def _layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        w_ih = getattr(self, f"weight_ih_l{layer}")
        w_hh = getattr(self, f"weight_hh_l{layer}")
        if self.weight_drop > 0:  # DropConnect: one mask on the recurrent weights per forward pass
            w_hh = drop_connect(w_hh, self.weight_drop, self.training)
        return w_ih, w_hh, getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h0, c0 = state if isinstance(state, tuple) else (state, None)
        steps = self._training_steps if self.training else CELL_STEPS[self._steps_name]
        final_h, final_c = [], []
        layer_input = inputs
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer_weights(layer)
            # (T, B, I) @ (I, G·H) for all timesteps at once.
            projected = F.linear(layer_input, w_ih, b_ih)
            outputs, h, c = self._recurrence(
                projected, b_hh, h0[layer], None if c0 is None else c0[layer], w_hh, steps
            )
            final_h.append(h)
            if c is not None:
                final_c.append(c)
            if layer < self.num_layers - 1:
                outputs = sequence_dropout(outputs, self.dropout, self.training, self.locked)
            layer_input = outputs
        h_n = torch.stack(final_h)
        return layer_input, ((h_n, torch.stack(final_c)) if self.cell == "lstm" else h_n)

    def _recurrence(
        self,
        projected: torch.Tensor,
        b_hh: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor | None,
        w_hh: torch.Tensor,
        steps: CellSteps,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer's recurrence over ``projected`` (T, B, G·H) = x_t W_ihᵀ + b_ih: ``(outputs, h_T,
        c_T)``, c_T the LSTM's (else None)."""
        if self.cell == "lstm":
            assert c is not None
            return lstm_layer(projected + b_hh, h, c, w_hh, steps)
        if self.cell == "gru" and self.form == "d2l":
            return (*gru_d2l_layer(projected + b_hh, h, w_hh, steps), None)
        if self.cell == "gru":
            return (*gru_layer(projected, h, w_hh, b_hh, steps), None)
        return (*rnn_layer(projected + b_hh, h, w_hh, self.nonlinearity, steps), None)


class FusedRecurrent(ScratchRecurrent):
    """``impl: fused``: the scratch stack with each layer's recurrence in Triton kernels
    (:mod:`drnn_cli.fused_recurrence`; LSTM, GRU in PyTorch's form, tanh or ReLU RNN). Where they cannot run
    (no CUDA, no Triton), it steps the scratch cells instead — the same equations and parameters — so
    a checkpoint trained on a GPU predicts and evaluates anywhere. ``barrier_error`` becomes 1 if a
    persistent kernel's grid barrier gave up waiting (the trainer checks it at epoch ends).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.form != "torch":
            raise ValueError(f"model.impl fused runs PyTorch's cell form, not {self.form}")
        self.kernel_cell = fused_recurrence.KernelCell(self.cell, self.nonlinearity)
        self.barrier_error: torch.Tensor
        self.register_buffer("barrier_error", torch.zeros((), dtype=torch.int32), persistent=False)

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Layer by layer as the scratch stack does, unless the plan runs the stack as one wavefront
        (where its grid fits the device): then one launch for all layers, with the same weight-drop and
        dropout masks drawn in the same order as the layer-by-layer path draws them."""
        launch = self._wavefront(inputs)
        if launch is None:
            return super().forward(inputs, state)
        h0, c0 = state if isinstance(state, tuple) else (state, None)
        w_hh, w_ih, biases, hbiases, masks = [], [], [], [], []
        for layer in range(self.num_layers):
            weights = self._layer_weights(layer)
            w_hh.append(weights[1])
            folded, apart = self._split_hidden_bias(weights[3])
            if apart is not None:
                hbiases.append(apart)
            if layer > 0:
                w_ih.append(weights[0])
                biases.append(weights[2] + folded)
            else:
                x_gates = F.linear(inputs, weights[0], weights[2]) + folded
            if layer < self.num_layers - 1 and self.training and self.dropout > 0:
                shape = (1 if self.locked else inputs.shape[0], inputs.shape[1], self.hidden_size)
                masks.append(dropout_scale(inputs.new_empty((), dtype=torch.float32), shape, self.dropout))
        out, h_n, c_n = fused_recurrence.fused_stack(
            x_gates,
            h0,
            c0,
            w_hh,
            w_ih,
            biases,
            masks or None,
            launch,
            cell=self.kernel_cell,
            hbiases=hbiases or None,
            error=self.barrier_error,
        )
        return out, (h_n if c_n is None else (h_n, c_n))

    def _split_hidden_bias(self, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what of b_hh adds to the input gates, what stays apart): the GRU's b_hn stays apart, as its
        reset gate multiplies the recurrent term with it; every other bias adds."""
        if self.cell != "gru":
            return b_hh, None
        n_gate = 2 * self.hidden_size
        return torch.cat((b_hh[:n_gate], torch.zeros_like(b_hh[n_gate:]))), b_hh[n_gate:]

    def _wavefront(self, inputs: torch.Tensor) -> fused_recurrence.Launch | None:
        """The plan's launch when it runs this stack as one wavefront, else None."""
        if self.num_layers < 2 or not fused_recurrence.can_run(inputs.device):
            return None
        launch = fused_recurrence.plan_for(
            inputs.device, inputs.shape[1], self.hidden_size, self.num_layers, self.cell
        )
        return launch if launch.layers > 1 else None

    def _recurrence(
        self,
        projected: torch.Tensor,
        b_hh: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor | None,
        w_hh: torch.Tensor,
        steps: CellSteps,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not fused_recurrence.can_run(projected.device):
            return super()._recurrence(projected, b_hh, h, c, w_hh, steps)
        folded, apart = self._split_hidden_bias(b_hh)
        return fused_recurrence.fused_layer(
            projected + folded, h, c, w_hh, cell=self.kernel_cell, hbias=apart, error=self.barrier_error
        )


class _LayerwiseRegularised:
    """Mixin for ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: DropConnect and locked dropout on torch's kernels.

    cuDNN and oneDNN run the whole stack from fused weights, with standard dropout between layers.
    AWD-LSTM's regularisers (Merity et al., 2017) need two things the fused call cannot do: a dropped
    copy of each ``weight_hh`` (one mask per forward pass, i.e. per minibatch) and one dropout mask per
    sequence between layers. In training, with either active, the stack runs one layer at a time
    through the same kernels (``torch.lstm`` / ``torch.gru`` / ``torch.rnn_*``), drawing random numbers
    in the same order as :class:`ScratchRecurrent`, so the two implementations agree mask for mask.
    ``model.layer_calls: each`` takes the same path without them: cuDNN runs its persistent kernels
    (the recurrent weights kept on chip across timesteps) only for one-layer fp16 calls (PyTorch's
    ``get_algo``, aten/src/ATen/native/cudnn/RNN.cpp). Otherwise, and always in evaluation, the
    module's own fused forward runs unchanged. Parameter names stay PyTorch's, so checkpoints move
    freely between the paths and implementations.
    """

    training: bool  # nn.Module's, beside which it is mixed in
    weight_drop: float = 0.0
    locked: bool = False
    per_layer: bool = False  # model.layer_calls: each
    layer_dropout: float = 0.0  # between layers; the module's own ``dropout`` is 0 on the layerwise path

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:  # type: ignore[override]
        if not self.training or (self.weight_drop == 0 and not self.locked and not self.per_layer):
            return super().forward(inputs, state)  # type: ignore[misc]
        module: nn.RNNBase = self  # type: ignore[assignment]
        h0, c0 = state if isinstance(state, tuple) else (state, None)
        final_h, final_c = [], []
        layer_input = inputs
        for layer in range(module.num_layers):
            w_hh = drop_connect(getattr(module, f"weight_hh_l{layer}"), self.weight_drop, True)
            weights = [
                getattr(module, f"weight_ih_l{layer}"),
                w_hh,
                getattr(module, f"bias_ih_l{layer}"),
                getattr(module, f"bias_hh_l{layer}"),
            ]
            h = h0[layer : layer + 1]
            if module.mode == "LSTM":
                assert c0 is not None
                outputs, h, c = torch.lstm(
                    layer_input, (h, c0[layer : layer + 1]), weights, True, 1, 0.0, True, False, False
                )
                final_c.append(c)
            else:
                kernel = {"GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[
                    module.mode
                ]
                outputs, h = kernel(layer_input, h, weights, True, 1, 0.0, True, False, False)
            final_h.append(h)
            if layer < module.num_layers - 1:
                outputs = sequence_dropout(outputs, self.layer_dropout, True, self.locked)
            layer_input = outputs
        h_n = torch.cat(final_h)
        return layer_input, ((h_n, torch.cat(final_c)) if module.mode == "LSTM" else h_n)


class RegularisedLSTM(_LayerwiseRegularised, nn.LSTM):  # type: ignore[misc]  # forward: a state always given
    pass


class RegularisedGRU(_LayerwiseRegularised, nn.GRU):  # type: ignore[misc]  # forward: a state always given
    pass


class RegularisedRNN(_LayerwiseRegularised, nn.RNN):  # type: ignore[misc]  # forward: a state always given
    pass


def dropout_scale(like: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 with probability ``p``, else ``1 / (1 - p)``.

    Drawn as ``rand >= p`` rather than with ``bernoulli_`` (which ``F.dropout`` uses): on CPU that is
    four times faster (0.8 against 3.3 ms for a 1024×256 recurrent matrix), and weight drop draws one
    such mask per layer at every step. Every dropout of the regularised models draws through here, so
    the torch and scratch implementations consume the generator identically.
    """
    keep = torch.rand(shape, dtype=like.dtype, device=like.device) >= p
    return keep.to(like.dtype).div_(1 - p)


def drop_connect(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropConnect (Wan et al., 2013): a copy of ``weight`` with elements zeroed, the rest rescaled."""
    if not training or p == 0:
        return weight
    return weight * dropout_scale(weight, tuple(weight.shape), p)


def sequence_dropout(x: torch.Tensor, p: float, training: bool, locked: bool) -> torch.Tensor:
    """Dropout on a time-major ``(T, B, F)`` sequence; ``locked`` keeps one mask for all T steps.

    Locked ("variational") dropout (Gal & Ghahramani, 2016) drops the same units of a sequence at
    every timestep, so the recurrence sees a consistent thinned input rather than fresh noise.
    """
    if not training or p == 0:
        return x
    shape = (1, *x.shape[1:]) if locked else tuple(x.shape)
    return x * dropout_scale(x, shape, p)


def make_recurrent(config: ModelConfig, input_size: int) -> nn.Module:
    """The recurrent stack that ``config.impl`` names, with dropout between layers as configured."""
    dropout = config.dropout if config.num_layers > 1 else 0.0
    locked = config.dropout_kind == "locked"
    if config.impl in ("scratch", "fused"):
        return (FusedRecurrent if config.impl == "fused" else ScratchRecurrent)(
            config.cell,
            input_size,
            config.hidden_size,
            config.num_layers,
            dropout,
            config.nonlinearity,
            config.weight_drop,
            locked,
            config.cell_form,
        )
    per_layer = config.layer_calls == "each"
    layerwise = config.weight_drop > 0 or locked or per_layer
    # On the layerwise path this class applies the between-layer dropout itself.
    fused_dropout = 0.0 if layerwise else dropout
    if config.cell == "lstm":
        module: nn.RNNBase = RegularisedLSTM(
            input_size, config.hidden_size, config.num_layers, dropout=fused_dropout
        )
    elif config.cell == "gru":
        module = RegularisedGRU(input_size, config.hidden_size, config.num_layers, dropout=fused_dropout)
    else:
        module = RegularisedRNN(
            input_size,
            config.hidden_size,
            config.num_layers,
            nonlinearity=config.nonlinearity,
            dropout=fused_dropout,
        )
    module.weight_drop = config.weight_drop
    module.locked = locked
    module.per_layer = per_layer
    module.layer_dropout = dropout
    return module


def _embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(vocab_size, dim)``, initialised as it initialises itself (N(0, 1)), except on the
    meta device, where a model is built for its shapes alone (checkpoint.expected_model_shapes): there
    ``normal_`` goes through PyTorch's reference implementations, whose first use imports dynamo,
    sympy and triton (1.5 s and 150 MB more for every predict, eval and inspect of such a model)."""
    weight = torch.empty(vocab_size, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(vocab_size, dim, _weight=weight)


class RNNLanguageModel(nn.Module):
    """Tokens ``(B, T)`` → logits ``(T, B, V)``, time-major as d2l's ``Y.T.reshape(-1)`` expects.

    The input is one-hot (d2l) or a learned embedding (``model.embedding_dim``); the output layer may
    share the embedding's weights (``model.tie_weights``). In training, ``embedding_dropout`` drops
    whole tokens (rows of the embedding), then ``input_dropout`` and ``output_dropout`` thin the
    recurrent stack's input and output, standard or locked (``model.dropout_kind``).
    """

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.config = config
        self.embedding = _embedding(vocab_size, config.embedding_dim) if config.embedding_dim else None
        self.rnn = make_recurrent(config, config.embedding_dim or vocab_size)
        self.locked = config.dropout_kind == "locked"
        self.decoder = nn.Linear(config.hidden_size, vocab_size)
        # the identity tables the one-hot input looks rows up in, made at first use
        self._one_hot_rows: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        if config.tie_weights:
            assert self.embedding is not None
            self.decoder.weight = self.embedding.weight
        if config.init == "d2l":
            init_d2l_(self)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` indices → ``(T, B, I)`` features."""
        if self.embedding is None:
            features = self._one_hot(inputs.t().long())
        else:
            weight = self.embedding.weight
            p = self.config.embedding_dropout
            if self.training and p > 0:
                # One mask per minibatch over the vocabulary: a dropped token is zero wherever it occurs.
                weight = weight * dropout_scale(weight, (weight.shape[0], 1), p)
            features = F.embedding(inputs.t(), weight)
        return sequence_dropout(features, self.config.input_dropout, self.training, self.locked)

    def _one_hot(self, indices: torch.Tensor) -> torch.Tensor:
        """One-hot rows in the weights' dtype at once (F.one_hot's int64 tensor is 2× the features,
        then a copy). ``indices`` time-major: the training step's are contiguous, so a lookup is one
        kernel."""
        dtype = self.decoder.weight.dtype
        if self.vocab_size > ONE_HOT_TABLE_MAX:
            shape = (*indices.shape, self.vocab_size)
            return torch.zeros(shape, dtype=dtype, device=indices.device).scatter_(
                -1, indices.unsqueeze(-1), 1.0
            )
        # One table per device and dtype, never replaced: a CUDA graph captured with one keeps its
        # address, so a table freed after a capture would be read as whatever reused its memory.
        key = (indices.device, dtype)
        table = self._one_hot_rows.get(key)
        if table is None:
            table = self._one_hot_rows[key] = torch.eye(self.vocab_size, dtype=dtype, device=indices.device)
        return F.embedding(indices, table)

    def forward(self, inputs: torch.Tensor, state: State, with_hidden: bool = False) -> tuple:
        """``(logits, state)``; with ``with_hidden`` also the last layer's output before and after
        output dropout, ``(T, B, H)`` each, for activation regularisation."""
        raw, state = self.rnn(self.encode(inputs), state)
        dropped = sequence_dropout(raw, self.config.output_dropout, self.training, self.locked)
        logits = self.decoder(dropped)
        return (logits, state, raw, dropped) if with_hidden else (logits, state)

    def begin_state(self, batch_size: int, device: torch.device | str) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        dtype = self.decoder.weight.dtype
        h = torch.zeros(shape, device=device, dtype=dtype)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Literal["mean", "sum", "none"] = "mean"
) -> torch.Tensor:
    """Cross-entropy of the model's time-major logits (T, B, V) against batch-major targets (B, T).

    Logits row t·B + b predicts ``targets[b, t]``, so targets are read column-wise (d2l's
    ``y = Y.T.reshape(-1)``). Half-precision logits are scored in fp32, wider ones as they are.
    ``reduction="sum"`` gives the summed negative log-likelihood (evaluation adds it over batches),
    ``"none"`` each target's, in the logits' row order.
    """
    scores, flat_targets = _scored_rows(logits, targets)
    return F.cross_entropy(scores, flat_targets, reduction=reduction)


def lm_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`lm_loss` scores, as log-probabilities (rows as its logits', in fp32 or wider) and their
    targets in the same order: ``F.cross_entropy`` is ``nll_loss`` of ``log_softmax``, so sums over these
    equal ``lm_loss``'s to the bit, and one log-softmax over the vocabulary serves several of them."""
    scores, flat_targets = _scored_rows(logits, targets)
    return F.log_softmax(scores, dim=-1), flat_targets


def _scored_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, B, V) logits as (T·B, V) rows in fp32 or wider, and (B, T) targets in the same row order."""
    scores = logits.reshape(-1, logits.shape[-1])
    return scores.to(torch.promote_types(scores.dtype, torch.float32)), targets.t().reshape(-1)


def activation_penalty(raw: torch.Tensor, dropped: torch.Tensor, ar: float, tar: float) -> torch.Tensor:
    """AWD-LSTM's AR and TAR (Merity et al., 2017, §4.6) on the last layer's ``(T, B, H)`` output.

    AR penalises large activations of the dropped output, ``ar · mean(dropped²)``; TAR penalises fast
    change between consecutive steps of the raw output, ``tar · mean((h_t − h_{t−1})²)``.
    """
    penalty = ar * dropped.float().pow(2).mean()
    if tar and raw.shape[0] > 1:
        penalty = penalty + tar * (raw[1:] - raw[:-1]).float().pow(2).mean()
    return penalty


def init_d2l_(model: nn.Module) -> None:
    """d2l's from-scratch initialisation: every weight ~ normal(0, 0.01), every bias zero."""
    for name, parameter in model.named_parameters():
        with torch.no_grad():
            if "bias" in name:
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.01)


def detach_state(state: State) -> State:
    """Cut the graph between minibatches while keeping the values (sequential partition)."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()  # type: ignore[return-value]


def select_state_rows(state: State, rows: slice) -> State:
    """Keep some rows (batch entries) of the state.

    Contiguous copies: cuDNN refuses a strided ``hx`` ("rnn: hx is not contiguous"); the CPU kernels
    accept one, so only a GPU would notice.
    """
    if isinstance(state, tuple | list):
        return tuple(s[:, rows].contiguous() for s in state)  # type: ignore[return-value]
    return state[:, rows].contiguous()


def select_state_row(state: State, row: int) -> State:
    """Keep one row of the state, as a batch of one."""
    return select_state_rows(state, slice(row, row + 1))


def join_state_rows(states: list[State]) -> State:
    """States of consecutive row groups (e.g. torchrun ranks'), side by side as one batch."""
    if isinstance(states[0], tuple | list):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*states, strict=True))  # type: ignore[return-value]
    return torch.cat(states, dim=1)  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once (tied weights)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(vocab_size: int, config: ModelConfig, seed: int | None = None) -> RNNLanguageModel:
    if seed is not None:
        torch.manual_seed(seed)
    return RNNLanguageModel(vocab_size, config)
