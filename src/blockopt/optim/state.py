"""State keys and state accounting shared by every blockopt optimizer."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..kernels import stat_dtype  # noqa: F401  (re-exported: every optimizer keeps its statistics in it)

# Per-parameter state keys (kept equal to torch.optim.AdamW's so stock tools recognise them).
STEP = "step"  # float32 scalar tensor, as in torch.optim
EXP_AVG = "exp_avg"  # first moment m: like the parameter, in its dtype or momentum_dtype (compressed: momentum.keys)
EXP_AVG_SQ = "exp_avg_sq"  # Adam-mini: one value per block, shape (n_blocks,), float32 (float64 for float64 params)
MOMENTUM_BUFFER = "momentum_buffer"  # SGD-SaI: momentum m, like the parameter (torch.optim.SGD's and sgd-sai's key)
GSNR = "gsnr"  # SGD-SaI: per-block gradient signal-to-noise ratio, shape (n_blocks,), stat_dtype (sgd-sai's key)
EXP_AVG_L = "exp_avg_l"  # AdaPM: left factor L of the low-rank first moment L @ R, (m, rank), stat_dtype
EXP_AVG_R = "exp_avg_r"  # AdaPM: right factor R of the low-rank first moment L @ R, (rank, n), stat_dtype
NONFINITE_SKIPS = "nonfinite_skips"  # nonfinite='skip_tensor'/'skip_step': steps this parameter skipped (an int)


def holds_state(entry) -> bool:
    """Whether a saved state entry holds what a step keeps: a parameter whose every gradient so
    far was skipped as non-finite has only its count of skips, and loads as one with no state."""
    return bool(entry) and any(key != NONFINITE_SKIPS for key in entry)


def _tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # DTensor: count this rank's shard
    if type(local) is not torch.Tensor and hasattr(local, "__tensor_flatten__"):
        # a wrapper subclass (torchao's quantized state: codes, scales, code map) holds no data of
        # its own: its bytes are its inner tensors'
        names, _ = local.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(local, name)) for name in names)
    return local.numel() * local.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by ``optimizer`` (any torch optimizer), every tensor in its
    per-parameter state counted once (step counters included)."""
    if not isinstance(getattr(optimizer, "state", None), Mapping) or isinstance(optimizer, Mapping):
        raise TypeError(f"state_bytes takes an optimizer (its live state), got {type(optimizer).__name__}"
                        + (": pass the optimizer, not its state_dict()" if isinstance(optimizer, Mapping) else ""))
    seen: set[int] = set()
    total = 0

    def visit(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += _tensor_bytes(value)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for per_param in optimizer.state.values():
        visit(per_param)
    return total
