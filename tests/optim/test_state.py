"""state_bytes counts every state tensor once, for any optimizer."""

from __future__ import annotations

import pytest
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


class Packed(torch.Tensor):
    """A float tensor stored as int8 codes and a scale, as torchao's low-bit optimizer state is:
    a wrapper subclass whose data lives in its inner tensors."""

    @staticmethod
    def __new__(cls, codes, scale):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)
        wrapper.codes, wrapper.scale = codes, scale
        return wrapper

    def __init__(self, codes, scale):
        pass

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} is not needed to count bytes")


def test_state_bytes_counts_a_wrapper_subclass_by_its_inner_tensors():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["exp_avg"] = Packed(torch.zeros(100, dtype=torch.int8), torch.ones(1))
    assert opt.state[p]["exp_avg"].element_size() == 4  # what a plain count would use: 400 bytes
    assert blockopt.state_bytes(opt) == 100 + 4


def test_state_bytes_of_a_state_dict_or_a_model_says_what_it_takes():
    """A state dict (it has a "state" key) or a model raised a bare AttributeError."""
    import blockopt

    model = torch.nn.Linear(3, 3)
    opt = blockopt.AdamMini(model)
    with pytest.raises(TypeError, match=r"state_bytes takes an optimizer .*got dict: pass the optimizer, not its state_dict\(\)"):
        blockopt.state_bytes(opt.state_dict())
    with pytest.raises(TypeError, match="state_bytes takes an optimizer .*got Linear"):
        blockopt.state_bytes(model)
    with pytest.raises(TypeError, match=r"got str \(a dict of named parameters\? pass its \.items\(\)\)"):
        blockopt.AdamMini(dict(model.named_parameters()))
