"""Weight averaging for evaluation: an exponential moving average (EMA) or SWA of the parameters.

Averaged weights generalise better than the last iterate (Polyak & Juditsky, 1992; Izmailov et al.,
"Averaging Weights Leads to Wider Optima", 2018); AWD-LSTM's averaged SGD is the SWA form started late.
The averaged copy is what validation, the best checkpoint, samples and prediction use; the raw
weights keep training.

``torch.optim.swa_utils.AveragedModel`` does the same arithmetic, but its update reads its step
counter back from the device on every call, a host sync per step; here the counter is a Python int
and every update is one in-place ``lerp_`` per parameter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The running average of a model's parameters, held in a second copy of the model.

    ``ema``: avg ← avg + (1 − decay)/(1 − decayⁿ)·(w − avg) at the n-th active step: the decay-weighted
    mean of the weights so far, bias-corrected as Adam's moments are (Kingma & Ba, 2015). Without the
    correction the first step's weights would hold decayⁿ of the average — at decay 0.998, half of it
    after 350 steps: an average of a barely trained model, its validation several times worse than the
    raw weights'. From about 5/(1 − decay) steps on the two agree (to decayⁿ).
    ``swa``: avg ← mean of the weights after every active step.
    While not yet active (``train.average_start``), the average simply follows the weights.
    """

    def __init__(self, model: nn.Module, kind: str, decay: float) -> None:
        if kind not in {"ema", "swa"}:
            raise ValueError(f"unknown weight average {kind!r}; choose ema or swa")
        self.kind = kind
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.count = 0  # optimizer steps averaged so far

    @torch.no_grad()
    def update(self, model: nn.Module, active: bool) -> None:
        """Fold in the weights after an optimizer step (or just follow them while not ``active``)."""
        pairs = zip(self.module.parameters(), model.parameters(), strict=True)
        if not active:  # the average starts afresh when it becomes active (a resume may move its start later)
            for averaged, current in pairs:
                averaged.copy_(current)
            self.count = 0
            return
        if self.kind == "ema":  # 1 at the first averaged step: it starts from the current weights
            weight = (1.0 - self.decay) / (1.0 - self.decay ** (self.count + 1))
        else:
            weight = 1.0 / (self.count + 1)
        for averaged, current in pairs:
            averaged.lerp_(current.to(averaged.dtype), weight)
        self.count += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], count: int) -> None:
        self.module.load_state_dict(state)
        self.count = count
