"""Range checks of numeric settings: finite, inside their bounds, refused with the setting named."""

from __future__ import annotations

import math

DAY_S = 86_400.0
# The longest wait or timeout any setting may ask for: a week (a timer of more is a mistake, and an inf or a
# huge number overflows the timers that wait on it).
MAX_WAIT_S = 7 * DAY_S


def check_range(
    name: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """ValueError starting with ``name`` unless ``value`` is None or a finite number in its bounds
    (``low`` inclusive unless ``low_open``; ``high`` inclusive)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        raise ValueError(f"{name} must be {' and '.join(part for part in (lower, upper) if part)}, got {value!r}")
