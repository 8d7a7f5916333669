"""The candidate glyph classes of the broad pretraining corpus, and what is left out and why.

Every class is one Unicode character, rendered MNIST-style: the glyph's bounding box is scaled
to fill a ~20 px box in a 32 px frame, so absolute size and baseline position are gone. Three
kinds of characters are therefore left out, each with a reason (``EXCLUDED``):

- digits in any script, and characters that pass for a digit (``O`` = 0, ``l`` / ``I`` / ``|``
  = 1, ``З`` = 3, ``Ч`` = 4, ``б`` = 6, ``g`` / ``q`` = 9, ...), so that MNIST digits stay a new
  domain with new classes for the adapter;
- characters drawn like another kept class (Cyrillic ``А`` is Latin ``A``; Greek ``Γ`` and
  Cyrillic ``Г``; upright Cyrillic lower case is small capitals, which box scaling turns into the
  capital), so that no two classes are the same picture and the gate's classifier can tell them;
- marks whose identity is their size or position (``.``, ``,``, ``-``, ``'``): box scaling turns
  them into blobs or bars.

``build_corpus.py`` then keeps a candidate only where enough font families have it (read from
each font's cmap), so the final class list depends on the installed fonts and is written to
``labels.json``.
"""

from __future__ import annotations

import unicodedata

# Characters left out, with the reason. Checked by tests: no candidate is in here, and no
# candidate is a digit (Unicode category Nd/No/Nl).
EXCLUDED: dict[str, str] = {
    # digit look-alikes
    "O": "reads as 0",
    "o": "reads as 0",
    "Ο": "Greek Omicron, reads as 0",
    "ο": "Greek omicron, reads as 0",
    "О": "Cyrillic O, reads as 0",
    "о": "Cyrillic o, reads as 0",
    "Θ": "Greek Theta, a barred 0",
    "θ": "Greek theta, a barred 0",
    "Ø": "slashed O, a slashed 0",
    "ø": "slashed o, a slashed 0",
    "°": "degree sign, a small 0 once box-scaled",
    "○": "circle, reads as 0",
    "◯": "large circle, reads as 0",
    "●": "disc, a filled 0 once box-scaled",
    "•": "bullet, a filled 0 once box-scaled",
    "∞": "infinity, a lying 8",
    "I": "reads as 1",
    "l": "reads as 1",
    "|": "reads as 1",
    "Ι": "Greek Iota, reads as 1",
    "ι": "Greek iota, reads as 1",
    "І": "Cyrillic I, reads as 1",
    "і": "Cyrillic i, same as Latin i",
    "Ї": "Cyrillic Yi, a 1 with dots",
    "/": "slash, a slanted 1",
    "\\": "backslash, a slanted 1",
    "Z": "handwritten Z reads as 2",
    "z": "handwritten z reads as 2",
    "З": "Cyrillic Ze, reads as 3",
    "з": "Cyrillic ze, reads as 3",
    "Э": "Cyrillic E, handwritten like 3",
    "э": "Cyrillic e, handwritten like 3",
    "ε": "Greek epsilon, a mirrored 3",
    "Ч": "Cyrillic Che, reads as 4",
    "ч": "Cyrillic che, reads as 4",
    "S": "handwritten S reads as 5",
    "s": "handwritten s reads as 5",
    "б": "Cyrillic be, reads as 6",
    "b": "reads as 6",
    "δ": "Greek delta, reads as 6 or 8",
    "B": "handwritten B reads as 8",
    "ß": "sharp s, reads as 8 or B",
    "g": "single-storey g reads as 9",
    "q": "reads as 9",
    "%": "two small zeros",
    "‰": "three small zeros",
    # drawn like another class (kept elsewhere or excluded above)
    "c": "lower case twin of C once box-scaled",
    "p": "lower case twin of P once box-scaled",
    "v": "lower case twin of V once box-scaled",
    "w": "lower case twin of W once box-scaled",
    "x": "lower case twin of X once box-scaled",
    "ν": "Greek nu, drawn as v",
    "υ": "Greek upsilon, drawn as u",
    "ρ": "Greek rho, drawn as p",
    "χ": "Greek chi, drawn as x",
    "κ": "Greek kappa, drawn as small-capital K",
    "µ": "micro sign, the same glyph as Greek mu",
    "∑": "n-ary sum, drawn as Greek Sigma",
    "∏": "n-ary product, drawn as Greek Pi",
    "∆": "increment, drawn as Greek Delta",
    "\u2126": "ohm sign, the twin of Greek Omega (kept)",
    "◊": "lozenge, drawn as the white diamond",
    "♦": "diamond suit, drawn as the black diamond",
    "Ð": "Eth, drawn as a barred D",
    **{
        ch: "Greek capital drawn as the Latin capital"
        for ch in "ΑΒΕΖΗΚΜΝΡΤΥΧ"  # noqa: RUF001 (these are Greek letters on purpose)
    },
    **{ch: "Cyrillic capital drawn as the Latin capital" for ch in "АВЕКМНРСТУХЅЈрсу"},  # noqa: RUF001
    **{ch: "Cyrillic capital drawn as the Greek capital" for ch in "ГПФ"},
    **{
        ch: "upright Cyrillic lower case is the small capital, the capital once box-scaled"
        for ch in "авгдежийклмнптуфхцшщъыьюяђѓєѕјљњћќўџґѝ"  # noqa: RUF001
    },
    # identity is size or position
    ".": "a dot: a blob once box-scaled",
    ",": "a comma: a blob once box-scaled",
    "'": "an apostrophe: a bar once box-scaled",
    "`": "a grave accent: a blob once box-scaled",
    '"': "two ticks: two bars once box-scaled",
    "-": "a hyphen: a bar once box-scaled",
    "_": "an underscore: the same bar as the hyphen",
    "‐": "hyphen: a bar",
    "–": "en dash: a bar",
    "—": "em dash: a bar",
    "·": "middle dot: a blob",
    "´": "acute accent: a blob",
    "¨": "diaeresis: two blobs",
    "¯": "macron: a bar",
}

# Candidates in label order: Latin, Greek, Cyrillic, punctuation, symbols, arrows and shapes.
_LATIN_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_LATIN_LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_GREEK_UPPER = [chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2]  # 0x3A2 is unassigned
_GREEK_LOWER = [chr(c) for c in range(0x3B1, 0x3CA)]
_CYRILLIC = [chr(c) for c in range(0x400, 0x460)] + ["Ґ", "ґ"]
_PUNCT = list("!?#$&*+@[](){}<>=~^;:") + list("¡¿§¶©®£€¥¢¤¬±×÷†‡")
_LATIN_EXTRA = list("ÆæŒœÞþðÇÑ")
_MATH = list("√∫≈≠≤≥∂∇∀∃∈∩∪⊂⊃")
_ARROWS_SHAPES = list("←↑→↓↔↕⇒⇐■□▲△▼▽◆◇◊♠♣♥♦★☆✓✗♪♫☺☼⌂")


def candidates() -> list[str]:
    """All candidate characters, deduplicated, in label order, without the exclusions."""
    seen: set[str] = set()
    out: list[str] = []
    for ch in (
        _LATIN_UPPER
        + _LATIN_LOWER
        + _GREEK_UPPER
        + _GREEK_LOWER
        + _CYRILLIC
        + _LATIN_EXTRA
        + _PUNCT
        + _MATH
        + _ARROWS_SHAPES
    ):
        if ch in seen or ch in EXCLUDED or is_digit_like(ch):
            continue
        seen.add(ch)
        out.append(ch)
    return out


def is_digit_like(ch: str) -> bool:
    """True for any numeric character of any script (Nd, Nl, No: digits, numerals, fractions)."""
    return unicodedata.category(ch) in ("Nd", "Nl", "No")


def class_name(ch: str) -> str:
    """A readable class name: the character and its Unicode name, e.g. ``"A (LATIN CAPITAL LETTER A)"``."""
    return f"{ch} ({unicodedata.name(ch, hex(ord(ch)))})"
