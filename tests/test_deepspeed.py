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


@pytest.mark.parametrize("saved_dtype", ["int8", "int4", "bfloat16", None])
@pytest.mark.parametrize("target", ["float32", "bfloat16"])
def test_a_saved_first_moment_is_put_in_the_storage_a_zero_piece_keeps(saved_dtype, target):
    """What `load_state` hands each piece: the saved momentum as a one-process optimizer with the
    target storage loads it (int codes decoded, float32 rounded with the step's bits)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    saved_opt = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=saved_dtype, seed=3)
    for _ in range(2):
        model(torch.randn(4, 64)).square().sum().backward()
        saved_opt.step()
        saved_opt.zero_grad()
    state = saved_opt.state_dict()
    group = state["param_groups"][0]
    index = group["param_names"].index("weight")
    piece = SimpleNamespace(name="weight", spec=saved_opt.plan["weight"])

    kept = blockopt.deepspeed._as_kept(SimpleNamespace(seed=3), piece, state["state"][index], group, target)

    one_process = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=target, seed=3)
    one_process.load_state_dict(state)
    expected = one_process.state[model.weight]["exp_avg"]
    assert kept["exp_avg"].dtype == expected.dtype == getattr(torch, target)
    assert torch.equal(kept["exp_avg"], expected)
    assert not {"exp_avg_codes", "exp_avg_scales"} & kept.keys()
