"""Optimizer-state memory implied by a Plan, AdamW vs Adam-mini (the paper's Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan


@dataclass(frozen=True)
class StateMemory:
    state_dtype: str
    adamw_bytes: int
    adam_mini_bytes: int

    @property
    def ratio(self) -> float:
        return self.adam_mini_bytes / self.adamw_bytes


def state_memory(plan: Plan, state_dtype: torch.dtype = torch.float32) -> StateMemory:
    """State bytes for every parameter in ``plan`` (step counters left out).

    AdamW keeps ``m`` and ``v`` per parameter in ``state_dtype``; Adam-mini keeps ``m`` per
    parameter in ``state_dtype`` and one float32 ``v`` per block (float32 even for bf16 state).
    """
    s = plan.summary()
    size = torch.tensor([], dtype=state_dtype).element_size()
    return StateMemory(str(state_dtype).removeprefix("torch."), 2 * size * s.n_params, size * s.n_params + 4 * s.n_blocks)


def memory_table(plan: Plan) -> str:
    rows = [state_memory(plan, torch.float32), state_memory(plan, torch.bfloat16)]
    lines = [f"{'state dtype':<12}{'AdamW GB':>10}{'Adam-mini GB':>14}{'ratio':>8}"]
    for r in rows:
        lines.append(f"{r.state_dtype:<12}{r.adamw_bytes / 1e9:>10.2f}{r.adam_mini_bytes / 1e9:>14.2f}{r.ratio:>8.4f}")
    return "\n".join(lines)
