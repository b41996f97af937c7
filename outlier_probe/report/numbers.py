"""Numbers for 80-column tables: at most 7 characters, 4 significant digits, never cut.

`compact(40284.26)` -> "4.03e4", `compact(218.29)` -> "218.3", `compact(68)` -> "68.00",
`compact(0.00042)` -> "4.2e-4".
CSV and JSON keep full precision; these strings are for the terminal only.
"""

from __future__ import annotations

import math
from typing import Any

SCI_ABOVE = 1e4  # |x| >= 1e4 in scientific form: "19,234.1" would not fit a narrow column
SCI_BELOW = 1e-3  # 0 < |x| < 1e-3 too: "0.000042" says less than "4.2e-5"


def compact(value: Any, digits: int = 4, signed: bool = False) -> str:
    """A number in at most ~7 characters: `digits` significant digits, "1.92e4" beyond 1e4 or below 1e-3."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return ("+inf" if signed else "inf") if x > 0 else "-inf"
    sign = "+" if signed and x >= 0 else ""
    if x == 0 or isinstance(value, int) and abs(x) < 1e6:
        return f"{sign}{int(x)}"
    if x != 0 and not SCI_BELOW <= abs(x) < SCI_ABOVE:
        mantissa, exponent = f"{x:.{max(digits - 2, 0)}e}".split("e")
        return f"{sign}{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{int(exponent)}"
    text = f"{x:#.{digits}g}"  # '#' keeps trailing zeros: 68.00 and 7.500 line up with 89.31
    if "e" in text:  # .4g of 9999.7 is "1.000e+04"
        return compact(float(round(x)), digits, signed)
    return sign + text.rstrip(".")


def percent(fraction: Any, signed: bool = True) -> str:
    """A relative change as a percentage: 0.3145 -> "+31.45%", 12.5 -> "+1.25e3%"."""
    if fraction is None or isinstance(fraction, float) and math.isnan(fraction):
        return "-"
    return compact(100 * float(fraction), digits=4, signed=signed) + "%"
