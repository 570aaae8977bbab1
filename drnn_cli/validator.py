"""What a training run reads of its weights without training them: the validation split's perplexity,
which a signal may cut short and the session's clock counts apart from training, and the greedy samples
shown while it trains and at its end."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from drnn_cli.config import Config
from drnn_cli.decode import greedy_samples
from drnn_cli.evaluate import evaluate
from drnn_cli.models import RNNLanguageModel
from drnn_cli.report import Reporter
from drnn_cli.runtime import DistContext
from drnn_cli.session_time import SessionTime, Validating
from drnn_cli.stop_votes import StopVotes
from drnn_cli.vocab import Vocab


class Validator:
    """Validates and samples the weights a run evaluates (its weight average, where enabled)."""

    def __init__(
        self,
        model: RNNLanguageModel,
        tokens: torch.Tensor,
        validates: bool,
        config: Config,
        vocab: Vocab,
        device: torch.device,
        dist: DistContext,
        reporter: Reporter,
        stop_votes: StopVotes,
    ) -> None:
        """``model``: the weights validated and sampled (the weight average, where enabled); ``tokens``: the validation
        split, on ``device``; ``validates``: whether it is long enough to score."""
        self.model = model
        self.tokens = tokens
        self.validates = validates
        self.config = config
        self.vocab = vocab
        self.device = device
        self.dist = dist
        self.reporter = reporter
        self.stop_votes = stop_votes

    @property
    def predictions(self) -> int:
        """The predictions a validation reads: every token of the split after its first, or the first
        ``train.eval_tokens`` of them."""
        return self.config.train.validated_predictions(len(self.tokens))

    def perplexity(
        self,
        session_time: SessionTime,
        seconds_left: Callable[[Validating], float | None],
        abandonable: bool = False,
    ) -> float | None:
        """Validation perplexity (None: no validation split); ``train.eval_tokens`` caps it to the
        split's first N tokens. ``session_time`` counts it; ``seconds_left``: the run's time left with
        this validation part done, shown as the bar moves through it.

        ``abandonable`` (a step boundary or an epoch's end): a signal ends it at the next minibatch with
        :class:`EvaluationAbandoned`, rather than after the whole split (minutes on a large text, past a
        scheduler's grace before its SIGKILL, or torchrun's 30 s before it kills its workers); under
        torchrun all ranks abandon it or none (:meth:`StopVotes.abandon_on_signal`)."""
        if not self.validates:
            return None
        data = self.config.data
        limit = self.config.train.eval_tokens
        abandon = self.stop_votes.abandon_on_signal() if abandonable else None
        tokens = self.tokens[: limit + 1] if limit else self.tokens  # N predictions need N + 1 tokens
        began = time.perf_counter()

        def before_batch(done: int, total: int) -> None:
            # the bar moves through a long validation, its time left with it
            self.reporter.validating(done, total, seconds_left((done, total, began)))
            if abandon is not None:
                abandon(done, total)

        with session_time.validation(max(0, len(tokens) - 1)):
            result = evaluate(
                self.model,
                tokens,
                data.batch_size,
                data.num_steps,
                self.device,
                self.config.train.precision,
                before_batch,
                dist=self.dist,  # each rank its block of the rows
            )
        return result.perplexity

    def samples(self) -> dict[str, str]:
        """Greedy continuations of ``train.sample_prefixes``, as training shows its progress."""
        data, train = self.config.data, self.config.train
        return greedy_samples(
            self.model,
            self.vocab,
            train.sample_prefixes,
            data.preprocess,
            data.token,
            train.sample_chars,
            self.device,
        )
