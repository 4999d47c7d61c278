"""Byte sizes: parsing user input and formatting for people."""

from __future__ import annotations

import math
import re

from hf_ftkit.errors import BadInputError

GIB = 1024**3
MIB = 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    # "80G" on a GPU spec sheet means GiB-ish marketing; we follow nvidia-smi and treat a bare G as GiB.
    "g": GIB, "gb": 1000**3, "gib": GIB,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``24GiB``, ``24GB``, ``80G`` or a plain byte count into bytes.

    Raises:
        BadInputError: the text is not a positive size with a known unit.
    """
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise BadInputError(
            f"{what} {text!r} is not a size; write it like 24GiB, 24GB or 80G."
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise BadInputError(f"{what} {text!r} must be greater than zero.")
    return int(value)


def gib(nbytes: float) -> float:
    """Bytes to GiB."""
    return nbytes / GIB


def format_bytes(nbytes: float) -> str:
    """A short human size: ``8.03 GiB``, ``512.0 MiB``."""
    sign = "-" if nbytes < 0 else ""
    value = abs(nbytes)
    if value >= GIB:
        return f"{sign}{value / GIB:.2f} GiB"
    if value >= MIB:
        return f"{sign}{value / MIB:.1f} MiB"
    return f"{sign}{value / 1024:.1f} KiB"


_COUNT_RE = re.compile(r"^\s*([0-9][0-9_]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str, *, what: str = "count") -> int:
    """Parse ``50M``, ``1.5B``, ``2e9``, ``100k`` or ``50_000_000`` into a whole number (0 allowed).

    Raises:
        BadInputError: the text is not a non-negative number with an optional k/M/B/T suffix.
    """
    match = _COUNT_RE.match(str(text))
    if not match:
        raise BadInputError(f"{what} {text!r} is not a count; write it like 50M, 1.5B or 2000000.")
    value = float(match.group(1).replace("_", "")) * _COUNT_UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value > 1e30:
        raise BadInputError(f"{what} {text!r} is too large to be a count; write it like 50M, 1.5B or 2000000.")
    return int(round(value))


def format_count(value: float) -> str:
    """``8.03B``, ``41.9M``, ``512`` — parameter and token counts for people."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"
