"""Range checks for the numbers users pass: one wording everywhere.

Booleans are not integers, strings that look like numbers are refused (not
coerced), NaN and infinity are refused unless asked for.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from tfopt.errors import ConfigError


def number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False,
           hint: str = ""):
    """Return ``value`` (an int or float) if it is in range, else raise ConfigError."""
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    wanted = kind + (f" {' and '.join(bounds)}" if bounds else "")
    fix = f" {hint}" if hint else ""
    if isinstance(value, str):
        raise ConfigError(f"{name} must be {wanted}, got the string {value!r}: pass the "
                          f"number itself, without quotes.{fix}")
    if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if integer else numbers.Real):
        raise ConfigError(f"{name} must be {wanted}, got {value!r} "
                          f"({type(value).__name__}).{fix}")
    if not integer and not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.{fix}")
    if low is not None and (value < low or (low_open and value == low)) or \
            high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}.{fix}")
    return int(value) if integer else float(value)


def boolean(name: str, value) -> bool:
    """Return ``value`` if it is a bool (numpy's too), else raise ConfigError."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ConfigError(f"{name} must be True or False, got {value!r} "
                      f"({type(value).__name__}).")
