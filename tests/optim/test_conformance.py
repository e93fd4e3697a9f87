"""The torch.optim contract, checked once for every blockopt optimizer.

Each optimizer's own file tests its math against an independent reference; this file tests what a
user of *any* PyTorch optimizer relies on and what must therefore hold for all of them alike: clear
errors for bad input, every float dtype, param groups (per-group hyperparameters, `add_param_group`,
LR schedulers), `state_dict` round trips that continue bit for bit (and failed loads that change
nothing), deepcopy and pickle, closures, parameters without gradients, `maximize`, and
`blockopt.state_bytes`. A new optimizer joins by adding one entry to ``OPTIMIZERS``.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Callable

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.bench.models import CONFIGS, build_model

from .conftest import batches, lm_loss, make_tiny, max_param_diff, train

LR = 1e-2

# name -> factory(params, **overrides). Variants cover each optimizer's structurally different
# paths (Plan blocks vs tensor blocks, low-rank/none/full momentum, blockwise vs per-coordinate v).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamMini": lambda params, **kw: blockopt.AdamMini(params, **{"lr": LR, "weight_decay": 0.1, **kw}),
    "AdamMini-reference": lambda params, **kw: blockopt.AdamMini(
        params, **{"lr": LR, "weight_decay": 0.1, "implementation": "reference", **kw}),
    "SGDSaI": lambda params, **kw: blockopt.SGDSaI(params, **{"lr": LR, **kw}),
    "SGDSaI-plan": lambda params, **kw: blockopt.SGDSaI(params, **{"lr": 10 * LR, "blocks": "plan", "normalize": True, **kw}),
    "AdaPM": lambda params, **kw: blockopt.AdaPM(params, **{"lr": LR, "weight_decay": 0.1, "rank": 2, **kw}),
    "AdaPM-adam-v": lambda params, **kw: blockopt.AdaPM(
        params, **{"lr": LR, "rank": 2, "second_moment": "adam", **kw}),
}
NAMES = list(OPTIMIZERS)


@pytest.fixture(params=NAMES)
def make(request):
    return OPTIMIZERS[request.param]


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(dtype=torch.float64, seed: int = 0) -> nn.Module:
    """GQA attention, SwiGLU, RMSNorm, untied head: every Plan role the optimizers treat apart."""
    return build_model(CONFIGS["llama-tiny"], seed=seed).to(dtype)


def set_grads(model: nn.Module, seed: int, dtype=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype)


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Everything a load could change, copied."""
    return copy.deepcopy({"state": {id(p): s for p, s in opt.state.items()}, "groups": opt.param_groups})


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---- bad input ---------------------------------------------------------------------------------
BAD = [
    (dict(lr=-1e-3), ValueError, r"\blr\b"),
    (dict(lr="fast"), TypeError, r"\blr\b"),
    (dict(eps=-1e-8), ValueError, r"\beps\b"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD, ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values()))) for c in BAD])
def test_bad_hyperparameters_name_the_parameter(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make(llama(), **kwargs)


def test_bad_group_hyperparameters_are_refused_before_the_group_is_added(make):
    model = llama()
    opt = make([(n, p) for n, p in model.named_parameters() if n.startswith("layers.0.")])
    before = snapshot(opt)
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("layers.0.")]
    with pytest.raises(ValueError, match=r"\blr\b"):
        opt.add_param_group({"params": rest, "lr": -1.0})
    assert same(snapshot(opt), before)


def test_parameter_lists_that_cannot_be_optimized(make):
    with pytest.raises(ValueError, match="empty parameter list"):
        make([])
    with pytest.raises(ValueError, match="the model has no parameters"):
        make(nn.Module())
    w = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="given twice"):
        make([w, w])
    with pytest.raises(TypeError, match="single Tensor"):
        make(nn.Parameter(torch.zeros(3)))


def test_a_plan_from_another_model_is_refused(make):
    with pytest.raises(ValueError, match="plan"):
        make(llama(), plan=blockopt.partition(nn.Linear(3, 3)))


def test_sparse_gradients_are_refused_naming_the_parameter(make):
    model = nn.Embedding(10, 4, sparse=True).double()
    opt = make(model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ---- it optimizes, in every dtype ----------------------------------------------------------------
@pytest.mark.parametrize("build", [llama, make_tiny], ids=["llama-gqa", "packed-mha"])
def test_training_lowers_the_loss(make, build):
    model = build()
    data = batches(1, seed=1) * 15  # one batch, repeated: the loss must fall
    losses = train(model, make(model), data)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_stays_in_the_parameters_dtype_family(make, dtype):
    model = llama(dtype)
    opt = make(model)
    set_grads(model, 0)
    opt.step()
    for p in model.parameters():
        assert p.dtype == dtype
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                assert value.dtype == dtype, (key, value.dtype)
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps_match_float32_within_rounding(make, dtype):
    model_lp = llama(torch.float32).to(dtype)
    model32 = copy.deepcopy(model_lp).float()  # the same rounded start
    opt_lp, opt32 = make(model_lp), make(model32)
    starts = [p.detach().clone() for p in model32.parameters()]
    for seed in range(3):
        set_grads(model_lp, seed, dtype)
        for p32, p_lp in zip(model32.parameters(), model_lp.parameters()):
            p32.grad = p_lp.grad.float()
        opt_lp.step()
        opt32.step()
    eps = torch.finfo(dtype).eps
    for (name, p_lp), p32, start in zip(model_lp.named_parameters(), model32.parameters(), starts):
        assert p_lp.dtype == dtype
        # each of the three steps rounds the parameter once (<= eps/2 of it) and computes its
        # update from state stored in the low dtype (a few eps of the update)
        err = (p_lp.float() - p32).abs()
        bound = 2 * eps * p32.abs() + 8 * eps * (p32 - start).abs().max() + 1e-30
        assert (err <= bound).all(), (name, (err - bound).max().item())
        for key, value in opt_lp.state[p_lp].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), (name, key)
                if key in type(opt_lp)._STAT_KEYS:  # block statistics are never kept in 16 bits
                    assert value.dtype == torch.float32, (name, key, value.dtype)


# ---- param groups and schedulers ---------------------------------------------------------------
def named_groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.ndim >= 2], "lr": LR},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "lr": 0.0, "weight_decay": 0.0},
    ]


def test_each_group_steps_with_its_own_hyperparameters(make):
    model = llama()
    opt = make(named_groups(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_grads(model, 0)
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.ndim >= 2), n  # the lr-0 group (norm scales) is untouched


def test_add_param_group_steps_the_new_parameters(make):
    model = llama()
    first = [(n, p) for n, p in model.named_parameters() if not n.startswith("layers.1.")]
    later = [(n, p) for n, p in model.named_parameters() if n.startswith("layers.1.")]
    opt = make(first)
    set_grads(model, 0)
    opt.step()
    opt.add_param_group({"params": later, "lr": 2 * LR})
    assert opt.param_groups[-1]["lr"] == 2 * LR
    before = [p.detach().clone() for _, p in later]
    set_grads(model, 1)
    opt.step()
    assert all(not torch.equal(p, b) for (_, p), b in zip(later, before))
    assert all(p in opt.state for _, p in later)


def test_a_scheduler_drives_every_groups_lr(make):
    model = llama()
    opt = make(named_groups(model))
    peaks = [g["lr"] for g in opt.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    set_grads(model, 0)
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(peaks)
    assert [g["initial_lr"] for g in opt.param_groups] == peaks
    frozen = [p.detach().clone() for p in model.parameters()]
    set_grads(model, 1)
    opt.step()  # lr 0: nothing moves, weight decay included (it is scaled by lr)
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), frozen))


# ---- checkpoints, copies -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_dict_resume_in_a_fresh_optimizer_is_bit_identical(make, dtype):
    model = llama(torch.float32).to(dtype)
    opt = make(named_groups(model))
    data = batches(6, seed=2)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = llama(torch.float32, seed=7).to(dtype)  # different init: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = make(named_groups(resumed))
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[3:])
    assert max_param_diff(model, resumed) == 0.0


def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(make):
    model = llama()
    opt = make(model)
    train(model, opt, batches(2))
    before = snapshot(opt)

    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    other_opt = make(other)
    train_other = other(torch.randn(5, 3, dtype=torch.float64)).sum()
    train_other.backward()
    other_opt.step()
    with pytest.raises(ValueError):
        opt.load_state_dict(other_opt.state_dict())
    assert same(snapshot(opt), before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(make, how):
    model = llama()
    opt = make(model)
    data = batches(4, seed=4)
    train(model, opt, data[:2])
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    train(model, opt, data[2:])
    train(model2, opt2, data[2:])
    assert max_param_diff(model, model2) == 0.0


# ---- step() details ----------------------------------------------------------------------------
def test_closure_is_called_once_and_its_loss_returned(make):
    model = llama()
    opt = make(model)
    idx = batches(1)[0]
    calls = []

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, idx)
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss.item() == calls[0]


def test_parameters_without_a_gradient_are_skipped_until_they_get_one(make):
    model = llama()
    opt = make(model)
    frozen = model.lm_head.weight
    before = frozen.detach().clone()
    set_grads(model, 0)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert not opt.state.get(frozen)
    set_grads(model, 1)
    opt.step()
    assert not torch.equal(frozen, before) and opt.state[frozen]


def test_maximize_equals_minimizing_the_negated_gradient(make):
    a = llama()
    b = copy.deepcopy(a)
    opt_a, opt_b = make(a, maximize=True), make(b)
    for seed in range(3):
        set_grads(a, seed)
        set_grads(b, seed)
        for p in b.parameters():
            p.grad.neg_()
        opt_a.step()
        opt_b.step()
    assert max_param_diff(a, b) <= 1e-15


def test_state_bytes_is_at_most_adamws(make):
    model = llama()
    opt = make(model)
    set_grads(model, 0)
    opt.step()
    ours = blockopt.state_bytes(opt)
    adamw = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < ours <= adamw
