"""The one finite-number reader and the one percentage formatter (and its table cell) of reports and tables.

Example:
    >>> finite_float(float("nan")), finite_float(True), finite_float("0.25")
    (None, None, 0.25)
    >>> format_pct(0.1234), format_pct(None), format_pct(0.1234, 1, missing="-", sign="%")
    ('12.34', '—', '12.3%')
    >>> format_pct(71.29, 1, fraction=False)
    '71.3'
    >>> pct_cell("0.5", 1), pct_cell(float("nan")), pct_cell(None, 1, missing="-", sign="%")
    ('50.0', '—', '-')
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_float", "format_pct", "pct_cell"]


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
