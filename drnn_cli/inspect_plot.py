"""``drnn inspect --png``: surprisal and the chosen units as heatmaps over the text, and gate saturation
per layer. Surprisal has the HTML page's colours (inspect_html's constants), and a character read as
``<unk>`` is marked on the axis as the page underlines it: the picture and the page tell one story.

Saturation follows Karpathy, Johnson & Fei-Fei (2015): a gate is left-saturated at a step when below
0.1 and right-saturated when above 0.9; the histograms count units by the fraction of characters
they spend saturated. matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from drnn_cli.files import atomic_write_bytes
from drnn_cli.inspect_html import NO_PREDICTION_COLOUR, SURPRISAL_FULL_BITS, surprisal_colour
from drnn_cli.introspect import (
    MIN_RANKING_CHARS,
    SATURATED_HIGH,
    SATURATED_LOW,
    Inspection,
    UnitScore,
    beats_untrained,
    follows_label,
)
from drnn_cli.plot import quiet_font_fallbacks, require_plotter
from drnn_cli.shown_text import labelled_char

HEATMAP_CHARS = 100  # characters with readable labels on the heatmap's axis
SURPRISAL_ROW_INCHES = 0.45  # the surprisal strip above the units
SURPRISAL_LABEL = "surprisal (bits)"
# a character not in the vocabulary (read as <unk>) is labelled in this colour, and bold: the page
# underlines it; neither the heatmap's blue nor red, nor the surprisal's orange
UNKNOWN_COLOUR, UNKNOWN_NAME = "#7b3294", "purple"
if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


def check_plot_request() -> None:
    """Refuse a picture that cannot be drawn before the text is read (the units' count is
    :data:`~drnn_cli.introspect.MAX_UNITS`'s, checked with the request)."""
    require_plotter("--png")


def _unit_label(score: UnitScore, untrained: dict[str, float]) -> str:
    """A heatmap row's name: the unit, the feature it follows best, and the best |r| with it before
    training, as the HTML page's heading: "≤ untrained" where the unit's is not above it."""
    if score.feature is None:
        return f"unit {score.unit}"
    before = untrained.get(score.feature)
    # a unit no closer to its property than the untrained layer's best, as the table marks it
    not_above = before is not None and not beats_untrained(score.correlation, before)
    unlearned = "" if before is None else f"{' ≤' if not_above else ';'} untrained {abs(before):.2f}"
    return f"unit {score.unit}: {follows_label(score)} (r = {score.correlation:+.2f}{unlearned})"


def write_inspection_plot(inspection: Inspection, path: Path) -> list[str]:
    """Write the PNG; returns the characters of the axis labels its font has no glyph for (drawn as
    boxes), in text order, for one note instead of matplotlib's two warnings per character."""
    check_plot_request()
    figure = inspection_figure(inspection)
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, quiet_font_fallbacks():
        warnings.simplefilter("always")
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
    missing: dict[str, None] = {}
    for warning in caught:
        glyph = _MISSING_GLYPH.match(str(warning.message))
        if glyph:
            missing[chr(int(glyph.group(1)))] = None
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    atomic_write_bytes(path, buffer.getvalue())
    return list(missing)


def inspection_figure(inspection: Inspection) -> Figure:
    """The picture: surprisal above the chosen units over the first :data:`HEATMAP_CHARS` characters,
    then a row of gate-saturation histograms per layer (a Figure of its own, not pyplot's: no GUI
    backend, and no process-wide ``matplotlib.use()``)."""
    from matplotlib.figure import Figure

    gate_rows = [(layer, gates) for layer, gates in enumerate(inspection.saturation, start=1) if gates]
    columns = max((len(gates) for _, gates in gate_rows), default=1)
    shown = min(HEATMAP_CHARS, len(inspection.chars))
    # 0.13 inch a character: its label legible at 9 points (6-pixel labels at 10 inches: learner32)
    figure = Figure(
        figsize=(
            max(10, 3.2 * columns, 0.13 * shown),
            2.2 + SURPRISAL_ROW_INCHES + 0.35 * len(inspection.units) + 2.4 * len(gate_rows),
        )
    )
    units_height = 1.2 + 0.25 * len(inspection.units)
    grid = figure.add_gridspec(
        1 + len(gate_rows),
        columns,
        height_ratios=[SURPRISAL_ROW_INCHES + units_height] + [1.6] * len(gate_rows),
    )
    # a grid of its own: the strip sits on the units, not a histogram row's title and labels away
    top = grid[0, :].subgridspec(2, 1, height_ratios=[SURPRISAL_ROW_INCHES, units_height], hspace=0.08)
    strip = figure.add_subplot(top[0])
    heat = figure.add_subplot(top[1], sharex=strip)
    _draw_surprisal(figure, strip, inspection, shown)
    _draw_units(figure, heat, inspection, shown)
    of = f" (first {shown} of {len(inspection.chars):,} characters)" if shown < len(inspection.chars) else ""
    signal = "cell state" if inspection.signal == "cell" else "hidden state"
    few = (
        f"\ncorrelations over {len(inspection.chars)} characters say little: read a paragraph or more"
        if inspection.tokens < MIN_RANKING_CHARS
        else ""
    )
    title = (
        f"layer {inspection.layer} {signal}, each unit scaled to its largest |activation| on the whole text{of}\n"
        f"top row: surprisal, white 0 bits → orange ≥ {SURPRISAL_FULL_BITS:g} bits "
        f"(grey: the first character, which has no prediction){few}"
    )
    verdict = inspection.untrained_verdict  # the line the table and the page give after the units (learner41)
    if verdict is not None:  # wrapped to the title's widest line, which the strip above the units holds
        title += "\n" + textwrap.fill(verdict, max(map(len, title.split("\n"))))
    strip.set_title(title, fontsize=10)

    for row, (layer, gates) in enumerate(gate_rows, start=1):
        for column, (name, saturation) in enumerate(gates.items()):
            axes = figure.add_subplot(grid[row, column])
            bins = [i / 20 for i in range(21)]
            # outlines: two filled histograms over each other mixed into a third colour (learner32)
            for share, label in (
                (saturation.left, f"< {SATURATED_LOW:g}"),
                (saturation.right, f"> {SATURATED_HIGH:g}"),
            ):
                axes.hist(share.numpy(), bins=bins, histtype="step", linewidth=1.5, label=label)
            axes.set_title(f"layer {layer} {name} gate", fontsize=9)
            axes.set_xlabel("fraction of characters saturated", fontsize=8)
            axes.set_ylabel("units", fontsize=8)
            axes.tick_params(labelsize=7)
            axes.legend(fontsize=7)
    return figure


def _draw_surprisal(figure: Figure, strip: Axes, inspection: Inspection, shown: int) -> None:
    """The surprisal row in bits, coloured as the HTML page colours it (inspect_html's scale)."""
    from matplotlib.colors import LinearSegmentedColormap

    # white to the page's orange, linear in RGB as the page's blend; above the scale, full orange
    colours = LinearSegmentedColormap.from_list(
        "surprisal", [surprisal_colour(0.0), surprisal_colour(SURPRISAL_FULL_BITS * math.log(2))]
    ).with_extremes(bad=NO_PREDICTION_COLOUR)
    bits = [math.nan if nats is None else nats / math.log(2) for nats in inspection.surprisal[:shown]]
    image = strip.imshow(
        [bits],  # imshow masks the NaN, which the colour map's "bad" colour draws
        aspect="auto",
        cmap=colours,
        vmin=0,
        vmax=SURPRISAL_FULL_BITS,
        interpolation="nearest",
    )
    bar = figure.colorbar(image, ax=strip, fraction=0.02, pad=0.01, ticks=[0, SURPRISAL_FULL_BITS])
    bar.ax.set_yticklabels(["0", f"≥ {SURPRISAL_FULL_BITS:g}"])
    bar.ax.tick_params(labelsize=7)
    strip.set_yticks([0], [SURPRISAL_LABEL])
    strip.tick_params(axis="x", bottom=False, labelbottom=False)


def _draw_units(figure: Figure, heat: Axes, inspection: Inspection, shown: int) -> None:
    """The chosen units' heatmap, the characters labelled below it and those read as ``<unk>`` marked."""
    # each unit scaled over the whole text, as the page scales it (over the first characters alone, a
    # cell state's colours were 1.5 times the page's: inspect40); the row's label gives the scale
    scale = inspection.activations.abs().amax(dim=1, keepdim=True).numpy()
    scale[scale == 0] = 1
    values = inspection.activations[:, :shown].numpy()
    image = heat.imshow(
        values / scale, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest"
    )
    bar = figure.colorbar(image, ax=heat, fraction=0.02, pad=0.01, ticks=[-1, 0, 1])
    bar.ax.tick_params(labelsize=7)
    bar.set_label("activation ÷ the unit's largest", fontsize=7)
    labels = [
        f"{_unit_label(unit, inspection.untrained)}, ±{float(largest):.3g}"
        for unit, largest in zip(inspection.units, scale[:, 0], strict=True)
    ]
    heat.set_yticks(range(len(inspection.units)), labels)
    heat.set_xticks(range(shown), [labelled_char(c) for c in inspection.chars[:shown]])
    heat.tick_params(axis="x", labelsize=9, length=0, labelbottom=True)
    for label in heat.get_xticklabels():
        if len(label.get_text()) > 1:  # ⟨U+200D⟩ across its column covered the characters beside it
            label.set(rotation=90)
    unknown = [t for t in range(shown) if inspection.unknown[t]]
    for t in unknown:
        heat.get_xticklabels()[t].set(color=UNKNOWN_COLOUR, fontweight="bold")
    if unknown:  # the page underlines them; matplotlib's text has no underline
        heat.set_xlabel(
            f"{UNKNOWN_NAME}, bold: not in the vocabulary, read and scored as <unk>",
            color=UNKNOWN_COLOUR,
            fontsize=9,
        )
