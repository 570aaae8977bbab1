"""How drnn shows characters it did not choose (a corpus's tokens, a user's path, generated text).

A terminal acts on some characters instead of showing them, and so does a page: an escape sequence
can retitle the window or clear the screen, a bidi override reorders what follows. The terminal rule
(:func:`terminal_safe`) writes those escaped as Python does (``\\x1b``, ``\\u202e``); the page and
picture rule (:func:`visible_char`) draws every invisible or format character as its code point.
"""

import reprlib
import unicodedata
from typing import Any

# The bidirectional embeddings, overrides and isolates: they reorder the characters after them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_safe(text: str, keep: str = "\n\t") -> str:
    """``text`` with its C0/C1 controls and bidi controls escaped, except those in ``keep``: generated
    text keeps its line breaks and tabs; an error line, which must read as one line, keeps none. A lone
    surrogate (a file name's byte that is not UTF-8, PEP 383) is escaped too: a UTF-8 terminal's strict
    encoder refuses it."""
    return "".join(_escaped(char, keep) for char in text)


def _escaped(char: str, keep: str) -> str:
    if char in keep or (unicodedata.category(char) not in ("Cc", "Cs") and char not in _BIDI_CONTROLS):
        return char
    if "\udc80" <= char <= "\udcff":  # a file name's byte that is not UTF-8 (PEP 383): shown as that byte
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]  # \t, \x1b, \x85, \u202e, \ud800


def labelled_char(char: str) -> str:
    """A character as a label on its own (an axis tick, a tooltip line): whitespace as a symbol too."""
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(char) or visible_char(char)


def visible_char(char: str) -> str:
    """How the page and the picture draw a character: one that is invisible or acts on the text around
    it (a control character, a bidi override or another format character, a line or paragraph
    separator, a surrogate or a noncharacter) as ``⟨U+202E⟩``, so that it neither reorders nor breaks
    the characters after it, nor makes the page invalid HTML. Tab and line break stay themselves
    (the caller shows them); a longer token (``<unk>``) too."""
    if len(char) != 1 or char in "\t\n":
        return char
    code = ord(char)
    noncharacter = 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE
    if noncharacter or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
        return f"⟨U+{code:04X}⟩"
    return char


def percent(share: float, unlike: float | None = None) -> str:
    """A share as a percentage: three significant digits, more where three would print it as ``unlike`` (a limit it is above, or
    the share above it: "3.42% … above the allowed 3.42%") or a share short of all as 100%."""
    shown = ""
    for digits in range(3, 12):
        shown = f"{share * 100:.{digits}g}%"
        same = unlike is not None and shown == f"{unlike * 100:.{digits}g}%" and share != unlike
        if not same and (shown != "100%" or share >= 1):
            break
    return shown


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a line that echoes the input, never megabytes of it."""
    shorten = reprlib.Repr()  # keyword arguments only from Python 3.12
    shorten.maxlevel, shorten.maxlist, shorten.maxstring, shorten.maxother = 3, 10, limit, limit
    text = shorten.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
