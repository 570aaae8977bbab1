"""JSON that every parser reads: Python's ``json`` writes NaN and Infinity, which the JSON standard
(and ``jq``, JavaScript, pandas' strict readers) refuse. A diverged perplexity becomes null instead."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts and lists too) replaced by None."""
    kind = type(value)  # the exact types first: a metrics file's rewrite calls this millions of times
    if kind is int or kind is str or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def is_number(value: Any) -> bool:
    """Whether a value read from JSON is a number: an int or a float, not a bool (``True`` is an int
    to Python, and a tampered file may hold one where a count or a rate belongs)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# Characters that ``str.splitlines`` (and JavaScript's line terminators) break lines at and that
# ``json.dumps(ensure_ascii=False)`` writes raw: a corpus holding one would split a one-line JSON object.
# (JSON escapes every C0 control character, \n, \r, \v, \f and \x1c-\x1e among them, by itself.)
# Lone surrogates too: a file name that is not UTF-8 reaches Python as one (\udcff for a byte 0xff),
# which would be written as the raw byte (invalid UTF-8) or fail to encode at all; escaped, it is JSON.
_SURROGATE_ESCAPES = {chr(code): f"\\u{code:04x}" for code in range(0xD800, 0xE000)}
_ESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"} | _SURROGATE_ESCAPES)
_SURROGATES = str.maketrans(_SURROGATE_ESCAPES)


def escape_surrogates(text: str) -> str:
    """``text`` (JSON written with ``ensure_ascii=False``) with its lone surrogates escaped, so that it
    encodes as UTF-8."""
    return text.translate(_SURROGATES)


def dumps(value: Any, **options: Any) -> str:
    """JSON on one line in valid UTF-8, whatever its strings hold, for the parsers above and line-based
    readers."""
    text = json.dumps(finite(value), allow_nan=False, **options)
    return text if text.isascii() else text.translate(_ESCAPED)  # ensure_ascii's: nothing to escape
