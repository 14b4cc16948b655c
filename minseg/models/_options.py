"""Checks for the create_model options that model configs hold: one line naming the option, its range and the value.

A wrong type raises TypeError, a value out of range ValueError (create_model names the weight file when the value
came from its metadata). The ranges bound every size an option controls, so that no option, typed by a user or read
from a file, can ask for an allocation far beyond what the model needs:
  MAX_CLASSES   10000 classes: above LVIS (1203) and ADE20K-full (3688); Mask R-CNN's box predictor is then
                ~200 MB, YOLACT's class conv ~280 MB (1e8 classes asked for about 200 GB)
  MAX_SIDE      4096 px for a resize target: a 4096 x 4096 float image is 200 MB before the backbone
  MAX_BOXES     10000 boxes where a count of proposals, candidates or detections is set
"""
from __future__ import annotations

import math

MAX_CLASSES = 10_000
MAX_SIDE = 4096
MAX_BOXES = 10_000


def shown(value) -> str:
    """repr of `value` cut to 40 characters, with its type: what a one-line message shows of a bad value."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        text = f"<{value.bit_length()}-bit integer>"
    return f"{text[:37]}... ({type(value).__name__})" if len(text) > 40 else f"{text} ({type(value).__name__})"


def check_int(name: str, value, low: int, high: int) -> int:
    """An integer (not a bool) in low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer in {low}..{high}, got {shown(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {shown(value)}")
    return value


def check_float(name: str, value, low: float, high: float) -> float:
    """A real number (int or float, not a bool) in [low, high], hence finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [{low}, {high}], got {shown(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {shown(value)}")
    return value


def check_floats(name: str, value, length: int | range, low: float, high: float) -> tuple[float, ...]:
    """A list or tuple of `length` numbers (or a length in that range), each in [low, high]; returned as a tuple."""
    if not isinstance(value, (list, tuple)) or len(value) not in as_range(length):
        count = length if isinstance(length, int) else f"{length[0]}..{length[-1]}"
        raise TypeError(f"{name} must be a list of {count} numbers in [{low}, {high}], got {shown(value)}")
    return tuple(check_float(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))


def as_range(length: int | range) -> range:
    return range(length, length + 1) if isinstance(length, int) else length


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {shown(value)}")
    return value


def check_choice(name: str, value, choices: tuple) -> object:
    """One of `choices` (compared by equality, so strings and None)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
    return value


def set_checked(config, name: str, value) -> None:
    """Store a checked (normalised) value on a frozen dataclass inside its __post_init__."""
    object.__setattr__(config, name, value)
