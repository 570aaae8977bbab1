"""The run's perplexity plot (PNG bytes), drawn from the metrics; matplotlib is an optional extra.

It receives what it draws and returns the image: writing the file is the caller's job (report.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from drnn_cli.errors import DrnnError

if TYPE_CHECKING:  # matplotlib is the optional plot extra: imported where a plot is drawn
    from matplotlib.figure import Figure


class PlottedRecord(Protocol):
    """What the plot reads of a metrics line (report.py's ``EpochRecord``, which imports this module)."""

    # read-only properties: a frozen dataclass's fields satisfy them
    @property
    def epoch(self) -> float: ...
    @property
    def train_ppl(self) -> float | None: ...  # None: a fine-tuning run's starting weights, before training
    @property
    def val_ppl(self) -> float | None: ...
    @property
    def tokens_seen(self) -> int: ...
    @property
    def val_tokens(self) -> int: ...  # the predictions val_ppl read (0: not said)


PLOT_INSTALL = "pip install 'matplotlib>=3.9', drnn's plot extra"
NOT_INSTALLED = ("is not installed", PLOT_INSTALL)


def plotter_missing() -> tuple[str, str] | None:
    """``plotter_problem``'s answer where matplotlib is not installed, found without importing it (the
    import took 0.5 s of every training's start, whose plot comes after its first epoch); None where
    it is installed, whether or not it imports: ``plotter_problem`` says so when a plot is first drawn."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except ValueError:  # imported already, by a path that left no spec: installed
        return None
    return NOT_INSTALLED if spec is None else None


def plotter_problem() -> tuple[str, str] | None:
    """Why matplotlib cannot draw here, as (what is wrong, the fix); None where it imports. It is the
    optional ``plot`` extra. Installed is not enough: a matplotlib built for NumPy 1 under NumPy 2 fails
    to import after NumPy prints a 40-line banner, which is kept off the user's stderr here."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import matplotlib  # noqa: F401 - the package first: its figure module may be loaded already
            from matplotlib.figure import Figure  # noqa: F401
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == "matplotlib":
            return NOT_INSTALLED
        return f"does not import here ({error})", "pip install --upgrade 'matplotlib>=3.9'"
    except Exception as error:  # any failure of an optional package's import: NumPy's mismatch raises several
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        return (
            f"does not import here ({type(error).__name__}: {first})",
            "pip install --upgrade 'matplotlib>=3.9'",
        )
    return None


def require_plotter(flag: str) -> None:
    """Refuse the option ``flag`` that asks for a picture where matplotlib cannot draw, in one line
    with the fix: before the work the picture would show is done."""
    problem = plotter_problem()
    if problem is not None:
        what, fix = problem
        raise DrnnError(f"{flag} needs matplotlib, which {what}: {fix} (or leave out {flag})")


@contextlib.contextmanager
def quiet_font_fallbacks() -> Iterator[None]:
    """matplotlib logs "findfont: Font family ['STIXGeneral'] not found. Falling back to DejaVu Sans." for each
    font it falls back from (21 lines on a machine's first plot, as it builds its font cache): the
    fallback draws the plot, and drnn's stderr holds drnn's own lines."""
    logger = logging.getLogger("matplotlib.font_manager")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tokens_per_epoch(records: Sequence[PlottedRecord]) -> float | None:
    """Training tokens an epoch, from the last line that counted them (None before one): the scale
    between the plot's two x axes. An epoch's token count moves by a minibatch at most between epochs
    (a random offset), so one ratio serves the whole run."""
    counted = [r for r in records if r.epoch > 0 and r.tokens_seen > 0]
    return counted[-1].tokens_seen / counted[-1].epoch if counted else None


def render_perplexity_plot(
    records: Sequence[PlottedRecord],
    title: str | None = None,
    val_split_tokens: int = 0,
    train_as: str | None = None,
) -> bytes | None:
    """:func:`perplexity_figure` as PNG bytes; None when matplotlib is missing."""
    try:
        figure = perplexity_figure(records, title, val_split_tokens, train_as)
    except ImportError:
        return None
    buffer = io.BytesIO()
    with quiet_font_fallbacks():
        figure.tight_layout()
        figure.savefig(buffer, format="png")
    return buffer.getvalue()


# A perplexity past this is a run that diverged (its log lines say so), left out of the plot as a
# non-finite one is: matplotlib's log axis fails on a range of about 280 decades (30 beside 1.5e289).
DRAWN_PERPLEXITY_MAX = 1e100


def drawn(perplexity: float | None) -> TypeGuard[float]:
    """Whether the plot draws a perplexity: a number, finite and at most ``DRAWN_PERPLEXITY_MAX``."""
    return perplexity is not None and perplexity <= DRAWN_PERPLEXITY_MAX  # NaN compares False


def perplexity_figure(
    records: Sequence[PlottedRecord],
    title: str | None = None,
    val_split_tokens: int = 0,
    train_as: str | None = None,
) -> Figure:
    """Train (and validation) perplexity against training tokens seen, epochs on the top axis as d2l
    plots them (against epoch alone for runs whose metrics predate token counts).

    Validations over other numbers of tokens are other measurements (``train.eval_tokens`` changed on a
    resume: 6.06 over the split's first 5,000 beside 7.02 over all of it read as a sudden rise): each
    count is a line of its own, and one over fewer than the split's ``val_split_tokens`` says so.
    ``train_as``: how training's perplexity was read where validation reads otherwise (``dropout on``:
    report.as_trained), in its legend as in the summary."""
    # a Figure of its own, not pyplot's: no GUI backend, and no process-wide matplotlib.use()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    if title:
        axes.set_title(title)
    by_tokens = all(r.tokens_seen for r in records if r.epoch > 0)  # epoch 0 has seen none either way
    xs = [r.tokens_seen if by_tokens else r.epoch for r in records]
    trained = [(x, r.train_ppl) for x, r in zip(xs, records, strict=True) if drawn(r.train_ppl)]
    if trained:  # points marked while few: a line of one point is invisible
        label = f"train ({train_as})" if train_as else "train"
        axes.plot(*zip(*trained, strict=True), label=label, marker="." if len(trained) < 50 else None)

    def validation_label(count: int) -> str:  # 0: a line that does not say (written before lines did)
        partial = 0 < count < val_split_tokens
        return f"validation (first {count:,} of {val_split_tokens:,} tokens)" if partial else "validation"

    validated = [
        (x, r.val_ppl, validation_label(r.val_tokens))
        for x, r in zip(xs, records, strict=True)
        if drawn(r.val_ppl)
    ]
    colours: dict[str, Any] = {}  # one colour (as matplotlib gives it) and one legend entry a measurement
    for label, run in itertools.groupby(validated, key=lambda point: point[2]):
        points = list(run)
        (line,) = axes.plot(
            [x for x, _, _ in points],
            [ppl for _, ppl, _ in points],
            label=label if label not in colours else "_nolegend_",
            color=colours.get(label),
            marker="." if len(validated) < 50 else None,
        )
        colours.setdefault(label, line.get_color())
    axes.set_xlabel("tokens seen" if by_tokens else "epoch")
    per_epoch = tokens_per_epoch(records) if by_tokens else None
    if per_epoch:

        def to_epochs(tokens: Any) -> Any:  # matplotlib passes arrays of tick positions
            return tokens / per_epoch

        def to_tokens(epochs: Any) -> Any:
            return epochs * per_epoch

        epochs = axes.secondary_xaxis("top", functions=(to_epochs, to_tokens))
        epochs.set_xlabel("epoch")
    axes.set_ylabel("perplexity")
    plotted = [ppl for _, ppl in trained] + [ppl for _, ppl, _ in validated]
    # a fine-tuning run's starting validation of 427 beside training's 3 is a log scale's case too
    if plotted and max(plotted) > 20 * min(plotted):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if plotted:
        axes.legend()
    else:  # a legend of nothing is matplotlib's UserWarning on stderr, inside drnn's own lines
        axes.text(0.5, 0.5, "no finite perplexity yet", transform=axes.transAxes, ha="center", va="center")
    return figure
