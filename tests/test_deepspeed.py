"""`blockopt.deepspeed` without DeepSpeed running: what `load_state` refuses before it reads an
engine (the ZeRO runs themselves are in tests/distributed/test_zero.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import blockopt
import blockopt.deepspeed


def test_load_state_of_a_torch_optimizer_state_dict_says_what_it_takes():
    """It raised a bare KeyError: 'param_names'."""
    model = torch.nn.Linear(3, 2)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    for state_dict in (adamw.state_dict(), {"state": {}}, "not a dict"):
        with pytest.raises(ValueError, match=r"load_state takes a blockopt state dict with parameter names .*zero-to-state"):
            blockopt.deepspeed.load_state(SimpleNamespace(), state_dict)


def test_load_state_takes_a_blockopt_state_dict_past_its_check():
    """A blockopt one-process state dict passes the check and reaches the engine (here a stub without one)."""
    model = torch.nn.Linear(3, 2)
    opt = blockopt.AdamMini(model, lr=1e-2)
    with pytest.raises(AttributeError, match="optimizer"):
        blockopt.deepspeed.load_state(SimpleNamespace(), opt.state_dict())
