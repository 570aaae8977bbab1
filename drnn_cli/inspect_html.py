"""``drnn inspect --html``: one self-contained page (no network, no library; a few lines of inline JS).

The text appears once coloured by surprisal and once per chosen unit, every character a ``<span>`` with
its background colour and nothing else: a span's place in its row is its character's index, and what
the tooltip shows of a character (the model's next guesses, its surprisal, the units' values) is in the
page's script once, not once per row. Hovering a character shows it; opening the page with ``#i=N``
pins the tooltip on character N (used for screenshots).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator

import torch

from drnn_cli.introspect import NOT_ABOVE_UNTRAINED, Inspection, follows_label
from drnn_cli.shown_text import labelled_char, visible_char

SURPRISAL_FULL_BITS = 6.0  # a character this surprising (or more) is fully orange
SURPRISAL_RGB = (230, 85, 13)  # surprisal's full colour, here and in the PNG (inspect_plot)
NO_PREDICTION_COLOUR = "#e0e0e0"  # the first character's surprisal: it has no prediction


def _mix(weight: float, colour: tuple[int, int, int]) -> str:
    """White blended towards ``colour`` by ``weight`` in [0, 1]."""
    weight = min(1.0, max(0.0, weight))
    r, g, b = (round(255 + (c - 255) * weight) for c in colour)
    return f"#{r:02x}{g:02x}{b:02x}"


def activation_colour(value: float, scale: float) -> str:
    """Diverging: negative blue, zero white, positive red, ``scale`` = full colour."""
    share = value / scale if scale > 0 else 0.0
    return _mix(abs(share), (214, 39, 40) if share >= 0 else (31, 119, 180))


def surprisal_colour(nats: float | None) -> str:
    """White at 0 bits to orange at :data:`SURPRISAL_FULL_BITS`; grey where there is no prediction."""
    if nats is None:
        return NO_PREDICTION_COLOUR
    return _mix(nats / math.log(2) / SURPRISAL_FULL_BITS, SURPRISAL_RGB)


def _row(inspection: Inspection, colours: list[str]) -> str:
    """One row of the text: a span per character, coloured (``class="unk"`` when not in the vocabulary)."""
    spans = []
    for char, unknown, colour in zip(inspection.chars, inspection.unknown, colours, strict=True):
        shown = "↵" if char == "\n" else html.escape(visible_char(char))
        extra = ' class="unk"' if unknown else ""
        spans.append(f'<span{extra} style="background:{colour}">{shown}</span>')
        if char == "\n":
            spans.append("\n")
    return "".join(spans)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
h2 { font-size: 1em; margin: 1.2em 0 0.3em; }
.meta { color: #555; font-size: 0.9em; }
.text { font-family: ui-monospace, monospace; font-size: 15px; line-height: 1.55; white-space: pre-wrap;
        overflow-wrap: anywhere; border: 1px solid #ddd; padding: 0.5em; }
.text > span { cursor: default; }
.text > span.unk { text-decoration: underline wavy #999; }
.text > span.pin { outline: 2px solid #000; }
.legend { display: inline-block; width: 160px; height: 0.8em; vertical-align: middle; border: 1px solid #ccc; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 0.4em 0.6em;
       font: 13px ui-monospace, monospace; box-shadow: 0 2px 6px rgba(0,0,0,.25); pointer-events: none;
       white-space: pre; z-index: 10; }
"""

_SCRIPT = """
const tip = document.getElementById('tip');
function show(span) {
  const row = span.parentElement, i = Array.prototype.indexOf.call(row.children, span), unit = row.dataset.unit;
  let s = 'char ' + i + ': ' + CHARS[i] + '\\n';
  s += SURPRISAL[i] === null ? 'surprisal: - (first character)\\n'
       : 'surprisal: ' + (SURPRISAL[i] / Math.LN2).toFixed(2) + ' bits (p = ' + Math.exp(-SURPRISAL[i]).toFixed(3)
         + (span.classList.contains('unk') ? ' of <unk>: not in the vocabulary' : '') + ')\\n';
  if (unit !== undefined) s += 'unit ' + unit + ': ' + (ACTS[unit][i] / 1000).toFixed(3) + '\\n';
  if (i > 0) {  // what the model expected here, read before this character
    s += 'expected here:';
    for (let k = 0; k < 6 && k < TOP[i - 1].length; k += 2) s += ' ' + GUESSES[TOP[i - 1][k]] + ' ' + (TOP[i - 1][k + 1] / 1000).toFixed(3);
    s += '\\n';
  }
  s += 'guesses for the next character:';
  for (let k = 0; k < TOP[i].length; k += 2) s += '\\n  ' + GUESSES[TOP[i][k]] + '  ' + (TOP[i][k + 1] / 1000).toFixed(3);
  tip.textContent = s;
  const r = span.getBoundingClientRect();
  tip.style.display = 'block';
  tip.style.left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8) + 'px';
  tip.style.top = (r.bottom + 6 + tip.offsetHeight > window.innerHeight ? r.top - tip.offsetHeight - 6 : r.bottom + 6) + 'px';
}
document.addEventListener('mouseover', e => { if (e.target.matches('.text > span')) show(e.target); });
document.addEventListener('mouseout', e => { if (e.target.matches('.text > span')) tip.style.display = 'none'; });
const pin = /#i=(\\d+)/.exec(location.hash);
if (pin) {
  const spans = [...document.querySelectorAll('.text')].map(row => row.children[+pin[1]]).filter(Boolean);
  spans.forEach(s => s.classList.add('pin'));
  if (spans.length) show(spans[0]);
}
"""


# Inside <script>, "</script" closes the element and "<!--" then "<script" makes the parser skip the
# real end tag (a checkpoint's vocabulary can hold any string); JSON's \u escapes read back the same.
_SCRIPT_UNSAFE = str.maketrans({c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"})


def _script_json(value: object) -> str:
    """JSON that cannot end or confuse the <script> element it sits in."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_UNSAFE)


def _thousandths(values: torch.Tensor) -> torch.Tensor:
    """What the tooltip shows to three decimals, as whole thousandths: the page's data is most of its size."""
    return (values.double() * 1000).round().long()


def _script_data(inspection: Inspection) -> Iterator[str]:
    """The tooltip's data, each character's once: its label, surprisal (nats) and next guesses, then
    each unit's values (one statement per unit, so that no more than one unit's list is built at once)."""
    guesses = inspection.top_next
    data = {
        "CHARS": [labelled_char(c) for c in inspection.chars],  # whitespace as symbols
        "SURPRISAL": [None if s is None else round(s, 5) for s in inspection.surprisal],
        "GUESSES": [labelled_char(c) for c in guesses.names],  # the vocabulary
        # per character, for its 5 likeliest next: [guess, probability in thousandths], a guess indexing GUESSES
        "TOP": torch.stack([guesses.indices, _thousandths(guesses.probs)], dim=2).flatten(1).tolist(),
    }
    for name, value in data.items():
        yield f"const {name} = {_script_json(value)};\n"
    yield "const ACTS = {};  // per unit shown: its value at each character, in thousandths\n"
    for score, row in zip(inspection.units, inspection.activations, strict=True):
        yield f"ACTS[{score.unit}] = {_script_json(_thousandths(row).tolist())};\n"


def page_pieces(inspection: Inspection, title: str) -> Iterator[str]:
    """The page, a row of the text at a time (64 units over 20,000 characters make a page of about
    59 MB, which need never be one string); ``title`` names the checkpoint."""
    signal = "cell state" if inspection.signal == "cell" else "hidden state"
    summary = (
        f"{len(inspection.chars):,} characters ({inspection.source}); {inspection.cell.upper()}, "
        f"layer {inspection.layer} of {inspection.num_layers}, {signal}; "
        f"perplexity {inspection.perplexity:.3f}, {inspection.bits_per_char:.3f} bits/char over "
        f"{inspection.tokens:,} predicted characters"
        + (
            f"; {inspection.scored_unknown:,} of them not in the vocabulary, scored as <unk> (underlined)"
            if inspection.scored_unknown
            else ""
        )
        + ". Hover a character for its surprisal, what the model expected there, and its guesses for the "
        "next one."
    )
    notes = "".join(f'<p class="meta">note: {html.escape(note)}</p>\n' for note in inspection.notes)
    verdict = inspection.untrained_verdict  # as the table's line after it
    notes += f'<p class="meta">{html.escape(verdict)}</p>\n' if verdict is not None else ""
    yield (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>drnn inspect: {html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>drnn inspect: {html.escape(title)}</h1>\n"
        f'<p class="meta">{html.escape(summary)}</p>\n{notes}'
    )
    yield (
        "<h2>Surprisal: how unexpected each character was</h2>"
        f'<p class="meta">white 0 bits → <span class="legend" style="background:linear-gradient(90deg,#fff,'
        f'{surprisal_colour(SURPRISAL_FULL_BITS * math.log(2))})"></span> ≥ {SURPRISAL_FULL_BITS:g} bits; '
        "grey: the first character (no prediction)</p>"
        f'<div class="text">{_row(inspection, [surprisal_colour(s) for s in inspection.surprisal])}</div>'
    )
    for score, row in zip(inspection.units, inspection.activations, strict=True):
        values = row.tolist()
        scale = max((abs(v) for v in values), default=0.0)
        before = inspection.untrained.get(score.feature or "")
        unlearned = "" if before is None else f"; untrained, the layer's best: {abs(before):.2f}"
        if inspection.above_untrained(score) is False:  # as the table marks it
            unlearned += f"; {NOT_ABOVE_UNTRAINED}"
        label = (
            f"r = {score.correlation:+.2f} with {follows_label(score)}{unlearned}"
            if score.feature
            else "no text feature varies here"
        )
        yield (
            f"\n<h2>Unit {score.unit} ({label})</h2>"
            f'<p class="meta">{-scale:.3f} <span class="legend" style="background:linear-gradient(90deg,'
            f'{activation_colour(-1, 1)},#fff,{activation_colour(1, 1)})"></span> {scale:+.3f} '
            "(the unit's largest |activation| on this text is full colour)</p>"
            f'<div class="text" data-unit="{score.unit}">'
            f"{_row(inspection, [activation_colour(v, scale) for v in values])}</div>"
        )
    yield '\n<div id="tip"></div>\n<script>\n'
    yield from _script_data(inspection)
    yield f"{_SCRIPT}</script>\n</body></html>\n"


def render_html(inspection: Inspection, title: str) -> str:
    """The whole page as one string (:func:`page_pieces` joined)."""
    return "".join(page_pieces(inspection, title))
