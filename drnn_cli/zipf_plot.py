"""``drnn data --zipf OUT.png``: d2l §8.3's figure, how often each distinct unigram, bigram and trigram
occurs against its rank on log-log axes, with each order's fitted line (zipf.py) dashed over the ranks
it was fitted on. matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from drnn_cli.files import atomic_write_bytes
from drnn_cli.plot import quiet_font_fallbacks, require_plotter
from drnn_cli.zipf import FIT_FIRST_RANK, FIT_MIN_COUNT, ZipfLine

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_zipf_plot(lines: tuple[ZipfLine, ...], title: str, path: Path) -> None:
    """Draw ``lines`` and write the PNG atomically."""
    require_plotter("--zipf")
    figure = zipf_figure(lines, title)
    buffer = io.BytesIO()
    with quiet_font_fallbacks():
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def zipf_figure(lines: tuple[ZipfLine, ...], title: str) -> Figure:
    """Each order's staircase of counts against rank, and its fitted line dashed in the same colour (a
    Figure of its own, not pyplot's: no GUI backend, and no process-wide ``matplotlib.use()``)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.subplots()
    axes.set_title(title)
    for line in lines:
        if not line.corners:  # a text shorter than the order: nothing counted
            continue
        ranks, counts = zip(*line.corners, strict=True)
        fit = "not fitted" if line.exponent is None else f"α = {line.exponent:.2f} (dashed)"
        (drawn,) = axes.plot(ranks, counts, label=f"{line.name}, {line.distinct:,} distinct: {fit}")
        if line.fitted is not None:
            first, last = line.fitted
            axes.plot(
                [first, last],
                [line.fitted_count(first), line.fitted_count(last)],
                linestyle="--",
                color=drawn.get_color(),
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rank i (most frequent first)")
    axes.set_ylabel("count n(i)")
    axes.grid(alpha=0.3, which="both")
    if any(line.corners for line in lines):
        fit = f"count ∝ 1/i^α, fitted from rank {FIT_FIRST_RANK} to the last seen {FIT_MIN_COUNT}+ times"
        axes.legend(title=fit, fontsize=8, title_fontsize=8)
    else:  # a legend of nothing is matplotlib's UserWarning on stderr
        axes.text(0.5, 0.5, "no tokens to count", transform=axes.transAxes, ha="center", va="center")
    return figure
