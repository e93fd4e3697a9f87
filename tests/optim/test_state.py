"""state_bytes counts every state tensor once, for any optimizer."""

from __future__ import annotations

import torch

import blockopt

from .conftest import batches, make_tiny, train


def test_state_bytes_of_adamw_and_adam_mini():
    model = make_tiny(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))

    adamw = torch.optim.AdamW(model.parameters())
    assert blockopt.state_bytes(adamw) == 0
    train(model, adamw, batches(1))
    assert blockopt.state_bytes(adamw) == 2 * 4 * n + 4 * n_tensors  # m, v, float32 step

    mini = blockopt.AdamMini(model)
    train(model, mini, batches(1))
    blocks = mini.plan.summary().n_blocks
    assert blockopt.state_bytes(mini) == 4 * n + 4 * blocks + 4 * n_tensors
    assert blocks < n / 2


def test_state_bytes_counts_shared_tensors_once():
    model = make_tiny(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, batches(1))
    p, q = list(model.parameters())[:2]
    before = blockopt.state_bytes(opt)
    opt.state[q]["alias"] = opt.state[p]["momentum_buffer"]
    assert blockopt.state_bytes(opt) == before
