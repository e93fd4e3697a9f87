"""`TrainConfig`: the settings of the training loop, shared by the demo, `compare` and the scripts.

Light (no bench extras): the command line shows its defaults in ``--help``. ``None`` means
"derived", and every derived default is set here, in `TrainConfig.resolved`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from ..validation import boolean, choice, integer, real, validate
from .schedules import DEFAULT_DECAY_FRACTION, SCHEDULES

DEFAULT_STEPS = 100
DEFAULT_SEQ_LEN = 128  # capped at the model's max_seq_len when derived


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How `train_run` trains: the length and shape of the run, the LR schedule, clipping and
    evaluation. The defaults are the demo's: 100 steps of 32 x 128 tokens, 20% linear warm-up,
    then cosine down to 0.1x the peak, clipping at 1, validation every tenth of the run on 4 batches.

    Args:
        steps, batch_size: optimizer steps and sequences per step.
        seq_len: tokens per sequence (``None``: 128, capped at the model's maximum).
        schedule: after the warm-up, ``"cosine"``, ``"wsd"`` or ``"constant"`` (see `lr_factor`),
            down to ``min_lr_ratio`` times the peak; WSD decays over the last ``decay_fraction``.
        warmup_steps: linear LR warm-up (``None``: 20% of ``steps``, at least 1).
        shared_floor: with `blockopt.blockwise_lr` groups, end every group at the same absolute LR,
            ``min_lr_ratio`` times the base (each group's peak over its ``lr_ratio``), as the
            Blockwise LR authors do, instead of ``min_lr_ratio`` times the group's own peak (a
            group without ``lr_ratio`` counts as ratio 1).
        grad_clip: max global gradient norm; ``None`` or 0 disables clipping.
        eval_every: validate every this many steps and after the last (``None``: a tenth of the
            run, at least 1), on ``eval_batches`` fixed batches spread over the validation ids.
    """

    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    seq_len: int | None = None
    schedule: str = "cosine"
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = DEFAULT_DECAY_FRACTION
    grad_clip: float | None = 1.0
    eval_every: int | None = None
    eval_batches: int = 4
    shared_floor: bool = False

    def __post_init__(self) -> None:
        validate(_RULES, asdict(self))
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps} (--warmup-steps, --steps): "
                             "the LR would never reach its peak")

    def resolved(self, max_seq_len: int | None = None) -> TrainConfig:
        """This config with every derived value filled in; ``max_seq_len``, the model's limit,
        caps the derived ``seq_len`` and refuses a larger explicit one."""
        seq_len = self.seq_len
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, max_seq_len or DEFAULT_SEQ_LEN)
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's maximum sequence length {max_seq_len}")
        warmup_steps = max(1, self.steps // 5) if self.warmup_steps is None else self.warmup_steps  # 20%
        eval_every = max(1, self.steps // 10) if self.eval_every is None else self.eval_every  # a tenth
        return self.replace(seq_len=seq_len, warmup_steps=warmup_steps, eval_every=eval_every)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


_RULES = {
    "steps": integer(1),
    "batch_size": integer(1),
    "seq_len": integer(1, optional=True),
    "schedule": choice(*SCHEDULES),
    "warmup_steps": integer(0, optional=True),
    "min_lr_ratio": real(0, 1),
    "decay_fraction": real(0, 1),
    "grad_clip": real(0, optional=True),
    "eval_every": integer(1, optional=True),
    "eval_batches": integer(1),
    "shared_floor": boolean(),
}
