"""kernels/adam_mini/decoded.py: compressed first moments for the implementations that update
float tensors (Note [compressed momentum in a step])."""

from __future__ import annotations

import copy

import pytest
import torch

from blockopt.kernels.adam_mini import batched_adam_mini, reference_adam_mini
from blockopt.kernels.adam_mini import decoded
from blockopt.kernels.codecs import StoredMomentum, codec

HYPER = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, maximize=False)


def _tensor(shape, seed, compressed: str | None):
    g = torch.Generator().manual_seed(seed)
    p, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    m0 = torch.randn(shape, generator=g) * 0.1
    if compressed is None:
        m = m0.clone()
    else:
        m = StoredMomentum(compressed, codec(compressed).encode(m0, 7), salt=seed)
    return p, grad, m, None


def _specs(shapes):
    from blockopt.partition import partition

    return [partition([(f"t{i}.weight", torch.nn.Parameter(torch.zeros(s)))], rules={"*": "rows"})[f"t{i}.weight"]
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("step", [reference_adam_mini, batched_adam_mini])
def test_each_tensor_gets_its_own_weight_decay_whatever_the_slices(step, monkeypatch):
    """Plain and compressed momenta in one call, the compressed ones over several slices: every
    tensor ends as when stepped alone (its own weight decay, its own momentum)."""
    monkeypatch.setattr(decoded, "SLICE_ELEMENTS", 30)
    shapes, kinds, decays = [(4, 8), (5, 6), (3, 10), (6, 4)], [None, "int8", "bfloat16", "int4"], [0.0, 0.5, 0.1, 0.3]
    tensors = [_tensor(s, i, k) for i, (s, k) in enumerate(zip(shapes, kinds))]
    specs = _specs(shapes)
    alone = copy.deepcopy(tensors)

    params, grads, momenta = ([t[j] for t in tensors] for j in range(3))
    vs, steps = [torch.zeros(s[0]) for s in shapes], [torch.tensor(0.0) for _ in shapes]
    decoded.step_with_decoded(step, params, grads, momenta, vs, steps, specs, weight_decays=decays, **HYPER)
    assert all(step_t.item() == 1 for step_t in steps)

    for i, (p, g, m, _) in enumerate(alone):
        v, step_t = torch.zeros(shapes[i][0]), torch.tensor(0.0)
        decoded.step_with_decoded(step, [p], [g], [m], [v], [step_t], [specs[i]], weight_decays=[decays[i]], **HYPER)
        assert torch.equal(p, params[i]) and torch.equal(v, vs[i])
        if kinds[i] is None:
            assert torch.equal(m, momenta[i])
        else:
            assert all(torch.equal(a, b) for a, b in zip(m.stored, momenta[i].stored))


def test_slices_bound_the_decoded_momentum():
    assert decoded.slices([5, 5, 5], budget=10) == [[0, 1], [2]]
    assert decoded.slices([30, 5, 5], budget=10) == [[0], [1, 2]]  # the largest tensor sets the floor
    assert decoded.slices([]) == []
