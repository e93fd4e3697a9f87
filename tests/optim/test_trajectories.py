"""Pinned trajectories: every optimizer's weights after a few steps on a fixed problem.

The file ``data/trajectories.pt`` was written by `record` before the optimizers were restructured
around one step template (issue 25), and checked bit for bit on the machine that wrote it. Here
it is compared to 1e-12 (float64) and 1e-5 (float32): another CPU may round a reduction
differently, but any change to the math shows up far above those tolerances. (Except the
attention's key bias, whose gradient is rounding noise: `without_key_bias`.)

Regenerate (only when the math changes on purpose, and say so in the commit)::

    python -m tests.optim.test_trajectories
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockopt
from tests.optim.conftest import batches, lm_loss, make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "trajectories.pt"
STEPS = 6


def _groups(model):
    """Two param groups with different learning rates (matrices, then the rest)."""
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if p.ndim >= 2], "param_names": [n for n, p in named if p.ndim >= 2]},
        {"params": [p for _, p in named if p.ndim < 2], "param_names": [n for n, p in named if p.ndim < 2], "lr": 3e-3},
    ]


# name -> (dtype, optimizer factory)
CASES = {
    **{
        f"adam_mini_{impl}": (torch.float64, lambda m, impl=impl: blockopt.AdamMini(
            m, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, implementation=impl))
        for impl in ("reference", "batched", "fused")
    },
    "adam_mini_fused_float32": (torch.float32, lambda m: blockopt.AdamMini(m, lr=1e-2, weight_decay=0.1)),
    "adam_mini_groups_maximize": (torch.float64, lambda m: blockopt.AdamMini(
        _groups(m), lr=1e-2, weight_decay=0.1, maximize=True, decay_1d=True, implementation="batched")),
    "adapm": (torch.float64, lambda m: blockopt.AdaPM(m, lr=1e-2, weight_decay=0.1, rank=2)),
    "adapm_adam_second_moment": (torch.float64, lambda m: blockopt.AdaPM(
        m, lr=1e-2, rank=3, second_moment="adam", fit_lr=0.5, residual_clip=None)),
    "sgd_sai": (torch.float64, lambda m: blockopt.SGDSaI(m, lr=1e-3)),
    "sgd_sai_plan_normalize": (torch.float64, lambda m: blockopt.SGDSaI(
        m, lr=1e-1, blocks="plan", normalize=True, weight_decay=1e-3)),
}


def trajectory(case: str) -> dict[str, torch.Tensor]:
    dtype, make = CASES[case]
    model = make_tiny(dtype)
    opt = make(model)
    losses = []
    for idx in batches(STEPS, seed=1):
        opt.zero_grad()
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), **{n: p.detach().clone() for n, p in model.named_parameters()}}


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` less the attention's key bias (the middle third of ``in_proj_bias``). Softmax ignores
    a key bias, so its gradient is zero up to rounding, and an Adam-type step (m / sqrt(v))
    turns that noise into steps of ~lr: CPU-dependent (another machine's reductions round
    otherwise: 4e-12 in float64, 4e-3 in float32), not the math."""
    if not name.endswith("in_proj_bias"):
        return t
    third = t.numel() // 3
    return torch.cat([t[:third], t[2 * third:]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_unchanged(case):
    expected = torch.load(DATA)[case]
    got = trajectory(case)
    assert got.keys() == expected.keys()
    tol = 1e-12 if expected["losses"].dtype == torch.float64 else 1e-5
    for name in expected:
        torch.testing.assert_close(without_key_bias(name, got[name]), without_key_bias(name, expected[name]),
                                   rtol=tol, atol=tol, msg=lambda m: f"{case}/{name}: {m}")


def record() -> None:
    """Write ``data/trajectories.pt`` from the current code (single-threaded, like the test)."""
    torch.set_num_threads(1)
    DATA.parent.mkdir(exist_ok=True)
    torch.save({case: trajectory(case) for case in CASES}, DATA)


if __name__ == "__main__":
    record()
