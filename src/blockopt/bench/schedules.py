"""Learning-rate schedules of the training loop: a multiplier of the peak LR per step."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")
DEFAULT_DECAY_FRACTION = 0.2  # WSD: the share of the run spent decaying


def lr_factor(
    step: int,
    *,
    steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warm-up, then one of

    - ``"cosine"``: cosine decay from the peak to ``min_lr_ratio`` at the end of the run;
    - ``"wsd"`` (warm-up, stable, decay): the peak until the last ``decay_fraction`` of the run,
      then a linear decay to ``min_lr_ratio``;
    - ``"constant"``: the peak until the end.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "wsd":
        decay_start = max(warmup_steps, steps - round(decay_fraction * steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, steps - decay_start)
        return 1.0 - (1.0 - min_lr_ratio) * min(progress, 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
