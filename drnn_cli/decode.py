"""Continuing a prefix: greedy (d2l's ``predict_ch8``) or sampled with temperature, top-k, top-p."""

from __future__ import annotations

import shlex
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from drnn_cli.corpus import prefix_pieces
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.models import RNNLanguageModel
from drnn_cli.vocab import Vocab, tokens_of

MAX_NEW_TOKENS = 100_000
MIN_TEMPERATURE = 1e-6  # far below it logits / T overflow to inf; sampling is greedy long before
MAX_TEMPERATURE = 1e3
MAX_DECODE_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


class InvalidDecodeOption(DrnnError):
    """A :class:`DecodeOptions` field out of its range; the message names the field, not a CLI flag."""

    def __init__(self, field_name: str, requirement: str, value: object) -> None:
        self.field_name = field_name
        self.requirement = requirement  # e.g. "must be >= 1"
        self.value = value
        super().__init__(f"{field_name} {requirement} (got {value})")


@dataclass(frozen=True)
class DecodeOptions:
    """How to pick each next token. Greedy unless ``sample`` is set."""

    num_tokens: int = 50
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.num_tokens <= MAX_NEW_TOKENS:
            raise InvalidDecodeOption("num_tokens", f"must be in 0..{MAX_NEW_TOKENS:,}", self.num_tokens)
        if self.sample and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidDecodeOption(
                "temperature",
                f"must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}] when sampling",
                self.temperature,
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_DECODE_SEED:
            raise InvalidDecodeOption("seed", f"must be in 0..{MAX_DECODE_SEED}", self.seed)
        if self.top_k is not None and self.top_k < 1:
            raise InvalidDecodeOption("top_k", "must be >= 1", self.top_k)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidDecodeOption("top_p", "must be in (0, 1]", self.top_p)

    def for_prefix(self, index: int) -> DecodeOptions:
        """The options of a call's ``index``-th prefix: its own sampling stream, seed + index. One seed
        for every prefix would draw the same numbers for each, and their samples, once the state has
        forgotten the prefix, would be copies of one another (a prefix given twice, the same text)."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % (MAX_DECODE_SEED + 1))


def prefix_tokens(prefix: str, vocab: Vocab, preprocess: str, token: str) -> list[str]:
    """The prefix as the run's tokens, preprocessed like its corpus; unknown tokens are refused.

    Refusing (rather than mapping to ``<unk>``) keeps a continuation honest: ``<unk>`` stands for every
    token the vocabulary lacks (none in the d2l corpora; every rare word under ``min_freq``), so a
    continuation from it rests on no particular token. A prefix the vocabulary spells only in the other
    Unicode form (an accent typed as a combining mark, as macOS writes "café"; the model's text
    composed, as most text is) is read in that form: it is the same text.
    """
    if not prefix:
        example = _example_prefix(vocab, preprocess, token)
        raise UsageError(
            f"the prefix is empty; give at least one {'word' if token == 'word' else 'character'}, e.g. drnn "
            f"predict {shlex.quote(example)}"
        )
    tokens = list(tokens_of(prefix_pieces(prefix, preprocess), token))  # words split line by line
    if not tokens:
        raise DrnnError(
            f"the prefix {prefix!r} is empty after data.preprocess={preprocess}; use letters the model knows"
        )
    unknown = _unknown(tokens, vocab)
    if unknown:
        for form in ("NFC", "NFD"):
            other = list(tokens_of(prefix_pieces(unicodedata.normalize(form, prefix), preprocess), token))
            if other and not _unknown(other, vocab):
                return other
        shown = ", ".join(_named(t) for t in unknown[:10])
        raise DrnnError(
            f"the prefix {prefix!r} contains {token}s not in the model's vocabulary: {shown}; "
            f"remove or replace them"
        )
    return tokens


def _example_prefix(vocab: Vocab, preprocess: str, token: str) -> str:
    """A prefix the model can continue, for an error's example: d2l's where the vocabulary spells it,
    else the vocabulary's two most frequent tokens that show as text (a Chinese text's own characters)."""
    if not _unknown(list(tokens_of(prefix_pieces("time traveller", preprocess), token)), vocab):
        return "time traveller"
    # idx_to_token lists a counted vocabulary's tokens most frequent first, <unk> (index 0) aside
    shown = [t for t in vocab.idx_to_token[1:] if t.strip() and t.isprintable()]
    return (" " if token == "word" else "").join(shown[:2]) or "time traveller"


def _unknown(tokens: list[str], vocab: Vocab) -> list[str]:
    return sorted({t for t in tokens if t not in vocab or vocab[t] == 0})


def _named(token: str) -> str:
    """A token as an error shows it; a character that shows as nothing or as part of its neighbour (a
    combining accent, a zero-width or other format character, an unusual space) also by its code point."""
    if len(token) == 1 and token != " " and unicodedata.category(token)[0] in "MCZ":
        return f"{token!r} (U+{ord(token):04X})"
    return repr(token)


def blank_continuation(generated: str) -> str | None:
    """What a continuation of whitespace alone is, in words ("50 spaces"), where it reads as if nothing
    was written (an undertrained model's likeliest token, every time); None for any other."""
    if not generated or generated.strip():
        return None
    return f"{len(generated):,} {'spaces' if set(generated) == {' '} else 'whitespace characters'}"


def separator(token: str) -> str:
    """What stands between two tokens in text: nothing between characters, a space between words."""
    return "" if token == "char" else " "


def join_tokens(tokens: list[str], token: str) -> str:
    return separator(token).join(tokens)


def ids_to_text(ids: Iterable[int], vocab: Vocab, token: str) -> str:
    """Token ids as the text they spell: characters together, words with a space between."""
    return join_tokens(vocab.to_tokens(ids), token)


def _pick(logits: torch.Tensor, options: DecodeOptions, generator: torch.Generator | None) -> int:
    """The next token's index. ``<unk>`` (index 0) stands for "some token outside the vocabulary":
    never written, greedy or sampled. Where it is the likeliest (a word model's rare words, all at
    once) greedy decoding would write it, feed it back and write it again and again; d2l's greedy
    continuations are the same, as no trained character model of its texts puts it first."""
    if not options.sample:
        return int(logits[1:].argmax()) + 1 if logits.numel() > 1 else 0
    scores = logits.double().cpu() / options.temperature
    scores[0] = float("-inf")
    if options.top_k is not None and options.top_k < scores.numel():
        threshold = torch.topk(scores, options.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if options.top_p is not None and options.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest head whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= options.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class NonFiniteOutputs(DrnnError):
    """A model whose outputs are NaN or infinite: its weights are finite (a checkpoint holds no other)
    but overflow float32 in its products, so greedy decoding wrote whitespace from NaN scores and
    sampling failed inside PyTorch."""

    def __init__(self, tokens_read: int) -> None:
        super().__init__(
            f"the model's outputs are NaN or infinite after {tokens_read:,} tokens (its weights overflow "
            "float32): this checkpoint cannot be decoded; retrain or pick another checkpoint"
        )


@torch.no_grad()
def generate(
    model: RNNLanguageModel,
    vocab: Vocab,
    tokens: list[str],
    options: DecodeOptions,
    device: torch.device,
    on_token: Callable[[str], None] | None = None,
) -> list[str]:
    """Warm the state on ``tokens``, then append ``options.num_tokens`` tokens; returns only the new ones.

    On a CPU one thread: a step is a 1-row product, too small to share, and on a busy machine
    OpenMP's threads wait for each other at every step (10× slower under a load of 3).
    """
    was_training = model.training
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    model.eval()
    try:
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        ids = torch.tensor([[vocab[t] for t in tokens]], device=device)
        state = model.begin_state(1, device)
        logits, state = model(ids, state)  # the whole prefix at once ≡ d2l feeding it one by one
        produced: list[str] = []
        for step in range(options.num_tokens):
            scores = logits[-1, 0].float()
            if not bool(torch.isfinite(scores).all()):  # finite weights whose products overflow (red41)
                raise NonFiniteOutputs(len(tokens) + step)
            next_id = _pick(scores, options, generator)
            produced.append(vocab.idx_to_token[next_id])
            if on_token is not None:
                on_token(produced[-1])
            if step + 1 < options.num_tokens:
                logits, state = model(torch.tensor([[next_id]], device=device), state)
        return produced
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)


def continue_prefix(
    model: RNNLanguageModel,
    vocab: Vocab,
    prefix: str,
    preprocess: str,
    token: str,
    options: DecodeOptions,
    device: torch.device,
    on_token: Callable[[str], None] | None = None,
) -> str:
    """The prefix (as the model saw it) followed by the continuation, as d2l prints it.

    ``on_token`` (for streaming) receives the checked, preprocessed prefix first, then each new token
    with the separator before it, so that the pieces written one after another are the returned text.
    """
    tokens = prefix_tokens(prefix, vocab, preprocess, token)
    stream = None
    if on_token is not None:
        on_token(join_tokens(tokens, token))
        gap = separator(token)

        def stream(piece: str) -> None:
            on_token(gap + piece)

    produced = generate(model, vocab, tokens, options, device, stream)
    return join_tokens(tokens + produced, token)


def greedy_samples(
    model: RNNLanguageModel,
    vocab: Vocab,
    prefixes: Sequence[str],
    preprocess: str,
    token: str,
    num_tokens: int,
    device: torch.device,
) -> dict[str, str]:
    """Each prefix continued by ``num_tokens`` greedy tokens, as training shows its progress; a prefix
    the corpus cannot spell is skipped, not fatal."""
    options = DecodeOptions(num_tokens=num_tokens)
    samples = {}
    for prefix in prefixes:
        try:
            samples[prefix] = continue_prefix(model, vocab, prefix, preprocess, token, options, device)
        except DrnnError:
            continue
    return samples
