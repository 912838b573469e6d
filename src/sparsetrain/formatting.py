"""The one number test, finite-number reader and percentage formatter (and its table cell) of the package.

Example:
    >>> is_number(3), is_number(True), finite_float(float("nan")), finite_float(True), finite_float("0.25")
    (True, False, None, None, 0.25)
    >>> format_pct(0.1234), format_pct(None), format_pct(0.1234, 1, sign="%"), format_pct(71.29, 1, fraction=False)
    ('12.34', '—', '12.3%', '71.3')
    >>> pct_cell("0.5", 1), pct_cell(float("nan")), pct_cell(None, 1, missing="-", sign="%")
    ('50.0', '—', '-')
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_number", "finite_float", "format_pct", "pct_cell"]


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float, and not a bool (``True`` is an int to Python, never a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for None, booleans, non-numbers, NaN and infinities (a number written as
    text, as some files hold them, is read)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def format_pct(value: float | None, digits: int = 2, *, fraction: bool = True, missing: str = "—",
               sign: str = "") -> str:
    """A percentage with ``digits`` decimals: ``value`` is a fraction in [0, 1] (``fraction=False``: already in
    percent); None gives ``missing``; ``sign`` is appended (``"%"`` in plain-text tables)."""
    if value is None:
        return missing
    return f"{100.0 * value if fraction else value:.{digits}f}{sign}"


def pct_cell(value: Any, digits: int = 2, *, missing: str = "—", sign: str = "") -> str:
    """A table cell of a fraction read from a file or a measurement: :func:`format_pct` of :func:`finite_float`
    (``missing`` for None, NaN, infinities and non-numbers)."""
    return format_pct(finite_float(value), digits, missing=missing, sign=sign)
