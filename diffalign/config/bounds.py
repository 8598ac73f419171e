"""The allowed range of every numeric setting, checked with the config before any model loads.

A number out of range is never a setting that "also works": ``train.learning_rate=inf`` trains NaN
weights, ``objective.beta=-5`` trains the preference backwards, ``train.warmup_steps=-5`` makes a
schedule that starts above its peak. Each is refused naming the key and its range, in interval
notation: ``(0, inf)`` for a strictly positive number, ``[0, 1)`` for a decay, and so on. Every float
of the config must also be finite (:func:`check_finite`), which covers keys added later without an
entry here.
"""

from __future__ import annotations

import math
from typing import Any

from diffalign.errors import UserError

INF = math.inf

# dotted key -> (low, low included, high, high included). None values are "unset" and not checked.
BOUNDS: dict[str, tuple[float, bool, float, bool]] = {
    "model.distilled_guidance": (0, True, INF, False),
    "model.prompt_tokens": (1, True, INF, False),
    "data.width": (1, True, INF, False),
    # a negative beta flips which item the loss prefers; no shipped loss defines it
    "objective.beta": (0, False, INF, False),
    "objective.sample_steps": (1, True, INF, False),
    "objective.sample_eta": (0, True, INF, False),
    "objective.sample_guidance_scale": (0, True, INF, False),
    "train.learning_rate": (0, False, 1, True),  # AdamW moves each weight by about lr a step: above 1 is no rate
    "train.warmup_steps": (0, True, INF, False),
    "train.lora_alpha": (0, False, INF, False),
    "train.checkpoint_every": (0, True, INF, False),
    "train.checkpoints_keep": (1, True, INF, False),
    "train.max_grad_norm": (0, True, INF, False),
    "train.weight_decay": (0, True, INF, False),
    "train.max_bad_steps": (0, True, INF, False),
    "train.log_every": (1, True, INF, False),
    "data.max_image_pixels": (1, True, INF, False),
    "data.frames": (0, True, INF, False),
    "data.fps": (0, True, INF, False),
    "validation.every": (0, True, INF, False),
    "validation.images_per_prompt": (1, True, INF, False),
    "validation.steps": (1, True, INF, False),
    "validation.guidance_scale": (0, True, INF, False),
}


def interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    """``[0, 1)``-style notation of a range."""
    def show(x: float) -> str:
        return "inf" if x == INF else f"{x:g}"

    return f"{'[' if low_in else '('}{show(low)}, {show(high)}{']' if high_in else ')'}"


def parse_interval(text: str) -> tuple[float, bool, float, bool]:
    """``"[0, 1)"`` as (0, True, 1, False); ``inf`` for an open end."""
    low, high = (part.strip() for part in text.strip()[1:-1].split(","))
    return float(low), text.strip()[0] == "[", float(high), text.strip()[-1] == "]"


def in_range(value: float, low: float, low_in: bool, high: float, high_in: bool) -> bool:
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below


def check_bounds(config: Any) -> None:
    """Refuse any setting of :data:`BOUNDS` outside its range, and a ``t_range`` that is no sub-interval of [0, 1]."""
    for dotted, bounds in BOUNDS.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value is not None and not in_range(value, *bounds):
            raise UserError(f"{dotted}={value!r} is out of range: it must be in {interval(*bounds)}")
    lo_hi = config.objective.t_range
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(_is_number(x) for x in lo_hi)
            and 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0):
        raise UserError(f"objective.t_range={lo_hi!r} must be [lo, hi] with 0 <= lo < hi <= 1 (a fraction of the "
                        "noise schedule)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(dotted: str, value: Any) -> None:
    """Refuse NaN and infinity anywhere in a setting (a float, or numbers inside lists and mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{dotted}={value!r}: settings must be finite numbers")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(f"{dotted}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite(dotted, item)
