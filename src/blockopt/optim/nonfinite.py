"""What a step does about inf and nan: the ``nonfinite=`` option of every blockwise optimizer.

Note [why a block optimizer must care]: AdamW that meets one inf in a gradient loses that
coordinate. A block optimizer loses the whole block: ``v_b`` takes the mean of ``g^2`` over the
block, becomes inf (or nan) and stays so, so every coordinate of the block divides by it and
stops moving, silently. The options:

* ``"warn"`` (default): step as usual; warn once, naming the tensors, when a block statistic is
  found non-finite. Checking every statistic each step would cost a pass over thousands of small
  tensors, so a bounded number (`WATCH_PER_STEP`) is checked per step, in rotation; a
  non-finite statistic stays non-finite, so it is found within ``ceil(tensors / WATCH_PER_STEP)``
  steps of going bad.
* ``"skip_tensor"``: a tensor whose gradient holds inf or nan is not updated at this step (its
  state is left as it was); ``state[p]["nonfinite_skips"]`` counts the skips (0 from the
  parameter's first step: a DCP load fills only the keys a fresh optimizer's state holds).
* ``"skip_step"``: if any gradient the step checks holds inf or nan (a gradient of a group with
  ``"skip_step"`` or ``"skip_tensor"``: groups that warn or ignore are not read), no parameter of
  the ``"skip_step"`` groups is updated at this step (each counts the skip). An inf anywhere
  says the backward went wrong, so a group that asked to skip whole steps skips this one.
* ``"ignore"``: no check at all.

The skip modes read every gradient once more per step (about one seventh of an Adam step's
memory traffic): they are opt-in.

Note [nonfinite under torch.compile]: ``"warn"`` and ``"ignore"`` compile with no graph break.
A traced step cannot read a flag on the host, nor rotate a window (a cursor that changes every
step would be a new constant each step, so a recompile), so while compiling the watch checks
every block statistic in the graph (a float64 sum per tensor, which inductor fuses, rather than
an `isfinite().all()` per tensor) and hands the per-tensor flags to `warn_nonfinite`, a custom
op that warns at run time, once, naming the tensors. The skip modes decide on the host which tensors to step, so under
``torch.compile`` they cost a graph break per step.
"""

from __future__ import annotations

import warnings

import torch

from ..validation import caller_stacklevel
from .state import NONFINITE_SKIPS

NONFINITE = ("warn", "skip_tensor", "skip_step", "ignore")
SKIPPING = ("skip_tensor", "skip_step")
WATCH_PER_STEP = 64


def to_skip(optimizer) -> set[int]:
    """ids of the parameters the skip modes leave out of this step; counts each skip in state.

    Under a sharding each rank sees only its shard of a gradient, so the verdicts are agreed
    (a MAX over the ranks the parameters live on) before anything is skipped: every rank skips
    the same tensors, or the shards of one parameter would drift apart."""
    flagged: list[tuple[dict, list[torch.Tensor]]] = []
    layouts = []
    for group in optimizer.param_groups:
        if group["nonfinite"] in SKIPPING:
            with_grad = [(p, layout) for p, layout in zip(group["params"], optimizer.layouts(group)) if p.grad is not None]
            flagged.append((group, [p for p, _ in with_grad]))
            layouts.extend(layout for _, layout in with_grad)
    checked = [p for _, ps in flagged for p in ps]
    if not checked:
        return set()
    device = _local(checked[0].grad).device
    bad_flags = torch.stack([(~torch.isfinite(_local(p.grad)).all()).to(device) for p in checked]).float()
    optimizer._collectives(layouts).max_(bad_flags, layouts)
    bad = {id(p) for p, flag in zip(checked, bad_flags.tolist()) if flag}
    skipped: set[int] = set()
    for group, ps in flagged:
        if group["nonfinite"] == "skip_step":
            if bad:  # any non-finite gradient of the step stops every skip_step group
                skipped.update(id(p) for p in ps)
        else:
            skipped.update(id(p) for p in ps if id(p) in bad)
    for p in checked:
        if id(p) in skipped:
            state = optimizer.state[p]
            state[NONFINITE_SKIPS] = state.get(NONFINITE_SKIPS, 0) + 1
    return skipped


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.reshape(-1))
    return all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_device.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class StatisticsWatch:
    """The ``"warn"`` check: a rotating window over the block statistics of the steps' batches
    (all of them, in the graph, while compiling: Note [nonfinite under torch.compile])."""

    def __init__(self) -> None:
        self.cursor = 0
        self.warned = False
        self.warned_compiled = torch.zeros((), dtype=torch.bool)  # set by `warn_nonfinite` at run time

    def check(self, owner: str, key: str, columns: list[tuple[list[str], list[torch.Tensor]]]) -> None:
        """Look at the next `WATCH_PER_STEP` of the statistics in ``columns`` (``(names, tensors)``
        per batch), continuing where the last step stopped."""
        total = sum(len(names) for names, _ in columns)
        if self.warned or not total:
            return
        if torch.compiler.is_compiling():
            names = [name for column_names, _ in columns for name in column_names]
            tensors = [t for _, column_tensors in columns for t in column_tensors]
            # a float64 sum is finite exactly when every entry is (no float32 statistic can overflow
            # it): one plain reduction per tensor, cheaper in inductor's code than isfinite().all()
            sums = torch.stack([t.sum(dtype=torch.float64).to(tensors[0].device) for t in tensors])
            bad = torch.isfinite(sums).logical_not()
            torch.ops.blockopt.warn_nonfinite(self.warned_compiled, bad, owner, key, "\n".join(names))
            return
        if self.warned_compiled.item():  # a compiled step has warned already
            self.warned = True
            return
        start, size = self.cursor % total, min(WATCH_PER_STEP, total)
        window = []
        for lo, hi in ((start, min(start + size, total)), (0, start + size - total)):  # wrapping around once
            index = 0
            for names, tensors in columns:
                a, b = max(lo, index) - index, min(hi, index + len(names)) - index
                if a < b:
                    window.extend(zip(names[a:b], tensors[a:b]))
                index += len(names)
        self.cursor = start + size
        if _all_finite([t for _, t in window]):  # one reduction per device; tensors only when it fails
            return
        bad = [name for name, t in window if not bool(torch.isfinite(t).all())]
        if bad:
            self.warned = True
            _warn(owner, key, bad)


def _warn(owner: str, key: str, bad: list[str]) -> None:
    shown = ", ".join(repr(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    warnings.warn(
        f"{owner}: the block statistic {key!r} of {shown} is inf or nan, so every coordinate of those "
        "blocks has stopped training (a gradient held inf or nan). Pass nonfinite='skip_tensor' or "
        "'skip_step' to skip such gradients, or find where they overflow (e.g. fp16 without a GradScaler). "
        "This warning is shown once.",
        RuntimeWarning, stacklevel=caller_stacklevel(),
    )


@torch.library.custom_op("blockopt::warn_nonfinite", mutates_args=("warned",))
def warn_nonfinite(warned: torch.Tensor, bad: torch.Tensor, owner: str, key: str, names: str) -> None:
    """The compiled step's ``"warn"``: warn once (``warned`` records it) naming the tensors
    flagged in ``bad`` (``names``: one per line). An op, so that it runs at every step of the
    compiled graph, with the values of that step; it writes ``warned``, so it is never pruned."""
    if warned.item() or not bad.any().item():
        return
    warned.fill_(True)
    _warn(owner, key, [name for name, flag in zip(names.split("\n"), bad.tolist()) if flag])


@warn_nonfinite.register_fake
def _(warned, bad, owner, key, names) -> None:
    return None
