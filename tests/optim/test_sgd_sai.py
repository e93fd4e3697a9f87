"""SGDSaI: equals the sgd-sai 1.0.3 package by default, a plain float64 loop in every mode, and
does better than the package where it breaks (1-element blocks, momentum=0, late gradients)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.distributed import AllReduceCounter, Collectives
from blockopt.optim.sgd_sai import gsnr_block_stats, gsnr_from_stats, sgd_sai
from blockopt.optim.state import GSNR, MOMENTUM_BUFFER
from blockopt.partition.spec import make_spec

from .conftest import batches, lm_loss, make_tiny, max_param_diff, train

sgd_sai_package = pytest.importorskip("sgd_sai")

# The tiny model has no adapter, so blocks="plan" reports its fallback; the package warns on std().
pytestmark = [
    pytest.mark.filterwarnings("ignore::blockopt.PartitionWarning"),
    pytest.mark.filterwarnings("ignore:std:UserWarning"),
]

TOL = 1e-12


# ---- references ---------------------------------------------------------------------------
def quiet(fn, *args):
    """Run ``fn`` with stdout swallowed (the package prints at its first step)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def ref_gsnr(g: torch.Tensor, spec, eps: float) -> torch.Tensor:
    """Per-block ||g_b|| / (std(g_b) + eps) by masks and torch.std, in float64; sqrt(size) for
    a block with nothing to measure (one element, or an all-zero gradient)."""
    idx = spec.block_index()
    g = g.double()
    out = []
    for b in range(spec.n_blocks):
        x = g[idx == b]
        measurable = x.numel() > 1 and bool((x != 0).any())
        out.append((x.norm() / (x.std() + eps)).item() if measurable else math.sqrt(x.numel()))
    return torch.tensor(out, dtype=torch.float64)


class Reference:
    """SGD-SaI as a plain float64 loop over (name, param) groups; blocks given by ``spec_of``."""

    def __init__(self, groups, spec_of, *, normalize=False, maximize=False):
        self.groups = groups  # [(list of (name, param), dict(lr, momentum, eps, weight_decay))]
        self.spec_of, self.normalize, self.maximize = spec_of, normalize, maximize
        self.m, self.gsnr, self.gmax = {}, {}, [None] * len(groups)

    @torch.no_grad()
    def step(self):
        for gi, (pairs, h) in enumerate(self.groups):
            for name, p in pairs:
                if p.grad is not None and name not in self.gsnr:
                    self.gsnr[name] = ref_gsnr(p.grad, self.spec_of(name), h["eps"])
            if self.normalize and self.gmax[gi] is None:
                self.gmax[gi] = max(self.gsnr[n].max().item() for n, _ in pairs if n in self.gsnr)
            for name, p in pairs:
                if p.grad is None:
                    continue
                g = -p.grad if self.maximize else p.grad
                if h["momentum"] == 0:
                    m = g
                elif name not in self.m:
                    m = self.m[name] = g.clone()
                else:
                    m = self.m[name] = h["momentum"] * self.m[name] + (1 - h["momentum"]) * g
                scale = self.gsnr[name] / (self.gmax[gi] if self.normalize else 1.0)
                spec = self.spec_of(name)
                per_entry = scale[spec.block_index()].to(p.dtype)
                p.copy_(p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * per_entry * m)

    def zero_grad(self):
        for pairs, _ in self.groups:
            for _, p in pairs:
                p.grad = None


def two_groups(model, lr=(0.05, 0.02), wd=(0.1, 0.0), momentum=(0.9, 0.8), eps=1e-8):
    """Matrices in one group, vectors in another, each with its own hyperparameters."""
    named = list(model.named_parameters())
    picks = [[(n, p) for n, p in named if p.ndim >= 2], [(n, p) for n, p in named if p.ndim < 2]]
    return [
        ({"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs], "lr": lr[i], "weight_decay": wd[i],
          "momentum": momentum[i], "eps": eps}, pairs)
        for i, pairs in enumerate(picks)
    ]


def whole(name_shape):
    return make_spec("x", tuple(name_shape), "whole", "test")


# ---- the package -------------------------------------------------------------------------
@pytest.mark.parametrize("use_groups", [False, True])
def test_defaults_follow_the_package_trajectory(use_groups):
    ours_model = make_tiny()
    theirs_model = copy.deepcopy(ours_model)
    if use_groups:
        groups = [g for g, _ in two_groups(ours_model)]
        ours = blockopt.SGDSaI(groups)
        theirs_groups = [{**{k: v for k, v in g.items() if k != "param_names"}, "params": list(q)}
                         for g, q in zip(groups, _split_like(theirs_model))]
        theirs = sgd_sai_package.SGD_sai(theirs_groups)
    else:
        ours = blockopt.SGDSaI(ours_model, lr=0.05, momentum=0.9, weight_decay=0.1)
        theirs = sgd_sai_package.SGD_sai(theirs_model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    data = batches(6)
    ours_losses = train(ours_model, ours, data)
    theirs_losses = quiet(train, theirs_model, theirs, data)
    assert max_param_diff(ours_model, theirs_model) <= TOL
    assert max(abs(a - b) for a, b in zip(ours_losses, theirs_losses)) <= TOL
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), make_tiny().parameters()))
    assert moved > 1e-3  # the comparison is not between two models that stood still
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        assert ours.state[p][GSNR].shape == (1,) and ours.state[p][GSNR].dtype == torch.float64
        assert abs(ours.state[p][GSNR].item() - theirs.state[q]["gsnr"].item()) <= TOL * theirs.state[q]["gsnr"].item()
        assert torch.allclose(ours.state[p][MOMENTUM_BUFFER], theirs.state[q]["momentum_buffer"], rtol=0, atol=TOL)


def _split_like(model):
    named = list(model.named_parameters())
    return [[p for _, p in named if p.ndim >= 2], [p for _, p in named if p.ndim < 2]]


def test_gsnr_is_the_unbiased_snr_of_the_first_gradient():
    model = make_tiny()
    opt = blockopt.SGDSaI(model, eps=1e-8)
    loss = lm_loss(model, batches(1)[0])
    loss.backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    train(model, opt, batches(2, seed=1))  # later gradients do not change it
    for n, p in model.named_parameters():
        g = first[n]
        expected = g.norm() / (g.std(unbiased=True) + 1e-8)
        assert torch.allclose(opt.state[p][GSNR], expected.reshape(1), rtol=1e-13, atol=0)
        assert not torch.allclose(g.norm() / (g.std(unbiased=False) + 1e-8), expected, rtol=1e-6)  # unbiased matters


def test_a_package_checkpoint_resumes_in_sgdsai():
    theirs_model = make_tiny()
    theirs = sgd_sai_package.SGD_sai(theirs_model.parameters(), lr=0.05, weight_decay=0.1)
    data = batches(6)
    quiet(train, theirs_model, theirs, data[:3])
    ours_model = copy.deepcopy(theirs_model)
    ours = blockopt.SGDSaI(ours_model, lr=0.05, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    quiet(train, theirs_model, theirs, data[3:])
    train(ours_model, ours, data[3:])
    assert max_param_diff(ours_model, theirs_model) <= TOL


# ---- blocks from the plan, normalisation ---------------------------------------------------
@pytest.mark.parametrize("blocks, normalize", [("tensor", True), ("plan", False), ("plan", True)])
def test_modes_follow_a_plain_float64_loop(blocks, normalize):
    model = make_tiny()
    ref_model = copy.deepcopy(model)
    groups = two_groups(model)
    opt = blockopt.SGDSaI([g for g, _ in groups], blocks=blocks, normalize=normalize)
    ref_pairs = dict(ref_model.named_parameters())
    ref = Reference([([(n, ref_pairs[n]) for n, _ in pairs], g) for g, pairs in groups], opt.block_spec, normalize=normalize)
    data = batches(5)
    train(model, opt, data)
    train(ref_model, ref, data)
    assert max_param_diff(model, ref_model) <= TOL
    if normalize:  # one maximum per group, each group's largest block gets exactly 1
        maxima = [g["gsnr_max"] for g in opt.param_groups]
        assert maxima[0] != maxima[1]
        for group, top in zip(opt.param_groups, maxima):
            assert max(opt.state[p][GSNR].max().item() for p in group["params"]) == top
        assert all(abs(a - b) <= 1e-12 * b for a, b in zip(maxima, ref.gmax))


def test_plan_blocks_have_one_gsnr_per_plan_block():
    model = make_tiny()
    opt = blockopt.SGDSaI(model, blocks="plan")
    train(model, opt, batches(1))
    for name, p in model.named_parameters():
        spec = opt.plan[name]
        assert opt.block_spec(name) is spec
        assert opt.state[p][GSNR].shape == (spec.n_blocks,)
    heads = opt.state[model.block.self_attn.in_proj_weight][GSNR]
    assert heads.numel() == opt.plan["block.self_attn.in_proj_weight"].n_blocks > 1
    assert heads.unique().numel() == heads.numel()  # really per block, not one value repeated
    tensor_opt = blockopt.SGDSaI(make_tiny())
    assert all(tensor_opt.block_spec(n).n_blocks == 1 for n in tensor_opt.plan)
    assert "one block per tensor" in tensor_opt.block_spec("block.linear1.weight").reason


def test_tensor_blocks_do_not_warn_about_the_partition():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blockopt.SGDSaI(make_tiny().parameters())  # unnamed parameters: fine, every tensor is a block
    with pytest.warns(blockopt.PartitionWarning):
        blockopt.SGDSaI(make_tiny().parameters(), blocks="plan")


# ---- where the package breaks ----------------------------------------------------------------
class WithScalars(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3).double()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))  # 0-d
        self.shift = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))  # one element

    def forward(self, x):
        return (self.scale * self.lin(x) + self.shift).pow(2).mean()


def _scalar_data(n=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def _fit(model, opt, data):
    for x in data:
        opt.zero_grad()
        model(x).backward()
        opt.step()


def test_one_element_blocks_get_gsnr_one():
    model = WithScalars()
    ref_model = copy.deepcopy(model)
    opt = blockopt.SGDSaI(model, lr=0.05, weight_decay=0.1)
    ref = Reference([(list(ref_model.named_parameters()), dict(lr=0.05, momentum=0.9, eps=1e-8, weight_decay=0.1))],
                    opt.block_spec)
    data = _scalar_data()
    _fit(model, opt, data)
    _fit(ref_model, ref, data)
    assert max_param_diff(model, ref_model) <= TOL
    assert opt.state[model.scale][GSNR].item() == 1.0 and opt.state[model.shift][GSNR].item() == 1.0
    assert abs(model.scale.item() - 1.5) < 1.0 and abs(model.shift.item()) < 1.0

    # the package: std of one element is NaN -> 0, so the step is |g| / 1e-8: a blow-up
    pkg_model = WithScalars()
    pkg = sgd_sai_package.SGD_sai(pkg_model.parameters(), lr=0.05, weight_decay=0.1)
    quiet(_fit, pkg_model, pkg, data[:1])
    assert abs(pkg_model.shift.item()) > 1e4


class LoRALike(nn.Module):
    """An embedding and a low-rank adapter whose B starts at zero: at the first step the rows of
    absent tokens and the whole of A have exactly zero gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(40, 8).double()
        self.lora_A = nn.Parameter(torch.randn(4, 8, dtype=torch.float64) / 8)
        self.lora_B = nn.Parameter(torch.zeros(8, 4, dtype=torch.float64))

    def forward(self, tokens):
        h = self.embed(tokens)
        return (h + h @ self.lora_A.T @ self.lora_B.T).square().mean()


def test_blocks_with_an_all_zero_first_gradient_get_sqrt_block_size_and_keep_training():
    first = torch.tensor([[1, 2, 3, 1]])  # rows 0 and 4-39 see no token at the first step
    later = torch.tensor([[0, 5, 6, 7]])
    for blocks in ("tensor", "plan"):
        model = LoRALike()
        before = copy.deepcopy(model)
        opt = blockopt.SGDSaI(model, lr=0.1, blocks=blocks, weight_decay=0.0)
        for tokens in (first, later, later):
            opt.zero_grad()
            model(tokens).backward()
            opt.step()
        spec = opt.block_spec("embed.weight")
        a_spec = opt.block_spec("lora_A")
        assert opt.state[model.lora_A][GSNR].tolist() == [math.sqrt(32 / a_spec.n_blocks)] * a_spec.n_blocks, blocks
        assert not torch.equal(model.lora_A, before.lora_A), blocks  # the package freezes A for good
        if blocks == "plan":
            gsnr = opt.state[model.embed.weight][GSNR]
            assert spec.n_blocks == 40 and gsnr[0].item() == math.sqrt(8) and gsnr[4].item() == math.sqrt(8)
            assert 1.0 < gsnr[2].item() < math.sqrt(8) + 1e-6 and gsnr[2].item() != math.sqrt(8)
            for row in (0, 5):  # absent at step 1, present later: they train
                assert not torch.equal(model.embed.weight[row], before.embed.weight[row]), row

    pkg_model = LoRALike()
    a0 = pkg_model.lora_A.detach().clone()
    pkg = sgd_sai_package.SGD_sai(pkg_model.parameters(), lr=0.1, weight_decay=0.0)
    for tokens in (first, later, later):
        pkg.zero_grad()
        pkg_model(tokens).backward()
        quiet(pkg.step)
    assert torch.equal(pkg_model.lora_A, a0)  # gsnr 0: A never moves


def test_momentum_zero_is_plain_scaled_sgd_and_keeps_no_buffer():
    model = make_tiny()
    ref_model = copy.deepcopy(model)
    opt = blockopt.SGDSaI(model, lr=0.05, momentum=0.0, weight_decay=0.1)
    ref = Reference([(list(ref_model.named_parameters()), dict(lr=0.05, momentum=0.0, eps=1e-8, weight_decay=0.1))],
                    opt.block_spec)
    data = batches(4)
    train(model, opt, data)
    train(ref_model, ref, data)
    assert max_param_diff(model, ref_model) <= TOL
    assert all(MOMENTUM_BUFFER not in s for s in opt.state.values())
    n_blocks = sum(1 for _ in model.parameters())
    assert blockopt.state_bytes(opt) == 8 * n_blocks  # one float64 gsnr per tensor, nothing else

    pkg_model = make_tiny()
    pkg = sgd_sai_package.SGD_sai(pkg_model.parameters(), momentum=0.0)
    with pytest.raises(UnboundLocalError):
        quiet(train, pkg_model, pkg, data[:1])


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
        self.use_b = False

    def forward(self, x):
        out = self.a(x)
        return (out + self.b(x) if self.use_b else out).pow(2).mean()


def test_gsnr_comes_from_a_parameters_first_gradient_even_if_late():
    model = TwoHeads()
    ref_model = copy.deepcopy(model)
    opt = blockopt.SGDSaI(model, lr=0.05)
    ref = Reference([(list(ref_model.named_parameters()), dict(lr=0.05, momentum=0.9, eps=1e-8, weight_decay=1e-2))],
                    opt.block_spec)
    data = _scalar_data(5)
    for i, x in enumerate(data):
        for m, o in ((model, opt), (ref_model, ref)):
            m.use_b = i >= 2
            o.zero_grad()
            m(x).backward()
            if i == 2 and m is model:
                late_grad = m.b.weight.grad.clone()
            o.step()
        if i < 2:
            assert model.b.weight not in opt.state
    assert max_param_diff(model, ref_model) <= TOL
    expected = late_grad.norm() / (late_grad.std() + 1e-8)
    assert torch.allclose(opt.state[model.b.weight][GSNR], expected.reshape(1), rtol=1e-13, atol=0)

    pkg_model = TwoHeads()
    pkg = sgd_sai_package.SGD_sai(pkg_model.parameters())
    quiet(_fit, pkg_model, pkg, data[:1])
    pkg_model.use_b = True
    with pytest.raises(KeyError, match="gsnr"):
        _fit(pkg_model, pkg, data[1:2])


def test_add_param_group_gets_gsnr_at_its_first_gradient():
    model = TwoHeads()
    model.use_b = True
    ref_model = copy.deepcopy(model)
    opt = blockopt.SGDSaI(list(model.a.named_parameters(prefix="a")), lr=0.05)
    hyper = dict(lr=0.05, momentum=0.9, eps=1e-8, weight_decay=1e-2)
    ref = Reference([(list(ref_model.a.named_parameters(prefix="a")), hyper), ([], dict(hyper, lr=0.02, momentum=0.5))],
                    lambda n: whole(dict(ref_model.named_parameters())[n].shape))
    data = _scalar_data(4)
    _fit(model, opt, data[:2])
    _fit(ref_model, ref, data[:2])
    opt.add_param_group({"params": list(model.b.named_parameters(prefix="b")), "lr": 0.02, "momentum": 0.5})
    ref.groups[1] = (list(ref_model.b.named_parameters(prefix="b")), ref.groups[1][1])
    _fit(model, opt, data[2:])
    _fit(ref_model, ref, data[2:])
    assert max_param_diff(model, ref_model) <= TOL
    assert opt.param_groups[1]["eps"] == 1e-8 and opt.param_groups[1]["weight_decay"] == 1e-2  # defaults filled
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1.5: use e.g. momentum=0.9"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum": 1.5})
    assert len(opt.param_groups) == 2


# ---- the torch.optim contract ----------------------------------------------------------------
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype, blocks, normalize", [(torch.float64, "tensor", False), (torch.float64, "plan", True),
                                                      (torch.bfloat16, "plan", True)])
def test_state_dict_resume_in_a_fresh_optimizer_is_bit_identical(dtype, blocks, normalize):
    kw = dict(lr=0.03, weight_decay=0.1, blocks=blocks, normalize=normalize)
    data = batches(8)
    straight = make_tiny(dtype)
    straight_opt = blockopt.SGDSaI(straight, **kw)
    train(straight, straight_opt, data)

    first = make_tiny(dtype)
    first_opt = blockopt.SGDSaI(first, **kw)
    train(first, first_opt, data[:3])
    model_sd, opt_sd = _roundtrip(first.state_dict()), _roundtrip(first_opt.state_dict())
    resumed = make_tiny(dtype, seed=7)
    resumed.load_state_dict(model_sd)
    resumed_opt = blockopt.SGDSaI(resumed, **kw)
    resumed_opt.load_state_dict(opt_sd)
    assert resumed_opt.param_groups[0]["gsnr_max"] == first_opt.param_groups[0]["gsnr_max"]
    for p in resumed.parameters():
        assert resumed_opt.state[p][GSNR].dtype == torch.promote_types(dtype, torch.float32)
    train(resumed, resumed_opt, data[3:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(straight_opt.state[p][GSNR], resumed_opt.state[q][GSNR])
        assert torch.equal(straight_opt.state[p][MOMENTUM_BUFFER], resumed_opt.state[q][MOMENTUM_BUFFER])


def test_state_dict_of_another_block_layout_is_rejected_and_changes_nothing():
    model = make_tiny()
    opt = blockopt.SGDSaI(model)
    train(model, opt, batches(1))
    other_model = make_tiny()
    other = blockopt.SGDSaI(other_model, blocks="plan")
    train(other_model, other, batches(1))
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match="'gsnr' of 'embed.weight' has shape \\(50,\\), this optimizer expects \\(1,\\) \\(whole, 1 blocks\\)"):
        opt.load_state_dict(other.state_dict())
    assert all(torch.equal(opt.state[p][k], v) for p, s in before.items() for k, v in s.items())
    sd = opt.state_dict()
    sd["state"][0][MOMENTUM_BUFFER] = torch.zeros(3)
    with pytest.raises(ValueError, match="'momentum_buffer' of 'embed.weight' has shape \\(3,\\)"):
        opt.load_state_dict(sd)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, batches(1))
    with pytest.raises(ValueError, match="param group 0 of the state dict has no 'eps' .*another optimizer than SGDSaI"):
        opt.load_state_dict(sgd.state_dict())  # (torch's SGD keeps no eps)
    groups = [{**g, "eps": 1e-8} for g in sgd.state_dict()["param_groups"]]
    with pytest.raises(ValueError, match="has no 'gsnr'"):
        opt.load_state_dict({**sgd.state_dict(), "param_groups": groups})  # groups that pass: its state does not


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(how):
    model = make_tiny()
    opt = blockopt.SGDSaI(model, lr=0.03, blocks="plan", normalize=True)
    train(model, opt, batches(2))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.blocks == "plan" and opt2.param_groups[0]["gsnr_max"] == opt.param_groups[0]["gsnr_max"]
    data = batches(3, seed=5)
    train(model, opt, data)
    train(model2, opt2, data)
    assert max_param_diff(model, model2) == 0.0
    assert max_param_diff(model, make_tiny()) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_statistics(dtype):
    model = make_tiny(dtype)
    opt = blockopt.SGDSaI(model, lr=0.05, weight_decay=0.1, blocks="plan")
    before = [p.detach().clone() for p in model.parameters()]
    loss0 = lm_loss(model, batches(1)[0]).item()
    lm_loss(model, batches(1)[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for (name, p), p0, g in zip(model.named_parameters(), before, grads):
        gsnr = opt.state[p][GSNR]
        assert gsnr.dtype == torch.float32 and p.dtype == dtype and opt.state[p][MOMENTUM_BUFFER].dtype == dtype
        spec = opt.block_spec(name)
        assert torch.allclose(gsnr.double(), ref_gsnr(g.float(), spec, 1e-8), rtol=1e-5, atol=0)
        # the update is computed in float32 and rounded once
        expected = (p0.float() * (1 - 0.05 * 0.1) - 0.05 * gsnr[spec.block_index()] * g.float()).to(dtype)
        assert torch.equal(p, expected)
    train(model, opt, batches(6, seed=2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert lm_loss(model, batches(1)[0]).item() < loss0


BAD = [
    (dict(lr=-1e-3), ValueError, r"lr must be a number >= 0, got -0.001: pass a non-negative learning rate"),
    (dict(lr="fast"), TypeError, r"lr must be a number >= 0, got 'fast' \(str\): pass a non-negative"),
    (dict(momentum=1.0), ValueError, r"momentum must be a number in \[0, 1\), got 1.0: use e.g. momentum=0.9, or 0 for no"),
    (dict(momentum=-0.1), ValueError, r"momentum must be a number in \[0, 1\), got -0.1"),
    (dict(eps=0.0), ValueError, r"eps must be a number > 0, got 0.0: .*default 1e-8"),
    (dict(eps=-1e-8), ValueError, r"eps must be a number > 0, got -1e-08: .*use a small positive"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a number >= 0, got -0.1: pass weight_decay >= 0"),
    (dict(blocks="rows"), ValueError, r"blocks must be one of 'tensor', 'plan', got 'rows': 'tensor' is one block per parameter tensor"),
    (dict(normalize="yes"), TypeError, r"normalize must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD, ids=[str(c[0]) for c in BAD])
def test_bad_hyperparameters_are_refused_with_the_fix(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        blockopt.SGDSaI(make_tiny(), **kwargs)


# ---- numerics and the distributed contract --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gsnr_keeps_its_digits_when_the_mean_dominates(dtype):
    g = torch.Generator().manual_seed(0)
    grad = (300.0 + torch.randn(64, 33, generator=g, dtype=torch.float64))
    spec = make_spec("w", grad.shape, "rows", "test")
    exact = ref_gsnr(grad, spec, 1e-8)
    stats = gsnr_block_stats([grad.to(dtype)], [dtype], [spec])[0]
    got = gsnr_from_stats(stats, spec, eps=1e-8).double()
    rtol = 2e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, exact, rtol=rtol, atol=0)
    # control: the one-pass formula from sum(g) and sum(g^2) loses them in float32
    x = grad.to(dtype)
    n = x.shape[1]
    naive_var = (spec.block_sum(x * x) - spec.block_sum(x) ** 2 / n) / (n - 1)
    naive = (spec.block_sum(x * x).sqrt() / (naive_var.clamp_min(0).sqrt() + 1e-8)).double()
    if dtype == torch.float32:
        assert not torch.allclose(naive, exact, rtol=1e-2, atol=0)


class Recording(Collectives):
    """Says every block is cut, and records the shapes of what it is asked to sum."""

    def __init__(self, calls):
        self.calls = calls

    def cuts_blocks(self, layouts):
        return True

    def sum_blocks(self, sums, layouts):
        self.calls.append([tuple(s.shape) for s in sums])


def test_functional_calls_the_reducer_once_and_only_at_gsnr_steps():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g)]
    specs = [make_spec("a", (4, 3), "rows", "t"), make_spec("b", (5,), "whole", "t")]
    gsnrs = [torch.zeros(s.n_blocks, dtype=torch.float64) for s in specs]
    bufs = [torch.empty_like(p) for p in params]
    calls = []
    for step in range(3):
        grads = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params]
        new = [step == 0, step == 1]  # the second parameter meets its first gradient at step 1
        sgd_sai(params, grads, bufs, gsnrs, specs, lr=0.1, momentum=0.9, eps=1e-8, weight_decays=[0.0, 0.0],
                new_gsnr=new, new_momentum=new, collectives=Recording(calls))
        if step == 1:
            assert torch.allclose(gsnrs[1], ref_gsnr(grads[1], specs[1], 1e-8), rtol=1e-13, atol=0)
    assert calls == [[(4, 3)], [(1, 3)]]


class FakeWorld(Collectives):
    """Threads as ranks: an in-place SUM over the shared pieces of ShardViews, and a MAX."""

    def __init__(self, world):
        self.barrier, self.lock, self.world = threading.Barrier(world), threading.Lock(), world
        self.box, self.calls = {}, []

    def cuts_blocks(self, layouts):
        return True

    def sum_blocks(self, sums, views):
        self.calls.append("sum")
        entries = [(j, k, int(gid)) for j, v in enumerate(views) for k, gid in zip(v.shared.tolist(), v.shared_ids)]
        with self.lock:
            for j, k, gid in entries:
                self.box[j, gid] = self.box.get((j, gid), 0) + sums[j][k].clone()
        self.barrier.wait()
        for j, k, gid in entries:
            sums[j][k] = self.box[j, gid]
        self.barrier.wait()

    def max_(self, values, layouts):
        with self.lock:
            self.box["max"] = torch.maximum(self.box.get("max", values), values)
        self.barrier.wait()
        values.copy_(self.box["max"])
        self.barrier.wait()


@pytest.mark.parametrize("blocks", ["tensor", "plan"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_steps_equal_one_process(blocks, world):
    """Each parameter cut into row shards (torch.chunk, as FSDP2), one thread per rank, with
    partial block sums and global block sizes: the result equals the unsharded step."""
    shard = pytest.importorskip("blockopt.distributed.shard")
    from torch.distributed.tensor import Shard

    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (7, 3), (5,)]
    specs = [make_spec("q", shapes[0], "heads", "t", n_heads=3), make_spec("w", shapes[1], "rows", "t"),
             make_spec("n", shapes[2], "whole", "t")]
    if blocks == "tensor":
        specs = [s.with_rule("whole", reason="t") for s in specs]
    params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(3)]
    hyper = dict(lr=0.1, momentum=0.9, eps=1e-8, weight_decays=[0.1, 0.1, 0.0], normalize=True)

    # one process
    full = [p.clone() for p in params]
    full_gsnrs = [torch.zeros(s.n_blocks, dtype=torch.float64) for s in specs]
    full_bufs = [torch.empty_like(p) for p in full]
    gmax = None
    for step, gs in enumerate(grads):
        gmax = sgd_sai(full, gs, full_bufs, full_gsnrs, specs, new_gsnr=[step == 0] * 3, new_momentum=[step == 0] * 3,
                       gsnr_max=gmax, **hyper)

    # sharded
    fake = FakeWorld(world)
    results = {}

    def rank(r):
        views = [shard._shard_view(s, (Shard(0),), (r,), (world,), None, tuple(p.chunk(world)[r].shape))
                 for s, p in zip(specs, params)]
        local = [p.chunk(world)[r].clone() for p in params]
        gsnrs = [torch.zeros(v.n_blocks, dtype=torch.float64) for v in views]
        bufs = [torch.empty_like(p) for p in local]
        top = None
        for step, gs in enumerate(grads):
            lg = [g.chunk(world)[r] for g in gs]
            top = sgd_sai(local, lg, bufs, gsnrs, views, new_gsnr=[step == 0] * 3, new_momentum=[step == 0] * 3,
                          gsnr_max=top, collectives=fake, **hyper)
        results[r] = (local, gsnrs, views, top)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == world
    assert fake.calls == ["sum"] * world  # one reduction per rank, at the gsnr step only
    for i in range(3):
        joined = torch.cat([results[r][0][i] for r in range(world)])
        assert torch.allclose(joined, full[i], rtol=0, atol=TOL)
        for r in range(world):
            local, gsnrs, views, top = results[r]
            assert torch.allclose(gsnrs[i], views[i].to_local(full_gsnrs[i]), rtol=1e-13, atol=0)
            assert top == pytest.approx(gmax, rel=1e-14)
    assert max((a - b).abs().max().item() for a, b in zip(full, params)) > 1e-3


# ---- FSDP2 (gloo, CPU processes) -------------------------------------------------------------
FSDP_STEPS = 4
FSDP_SETTINGS = {"tensor": dict(blocks="tensor"), "plan": dict(blocks="plan", normalize=True)}


def _fsdp_run(world: int | None, settings: dict) -> dict:
    """Train the distributed tests' small Llama with SGDSaI (under FSDP2 when ``world``)."""
    from tests.distributed import _worker

    rank = torch.distributed.get_rank() if world else 0
    model = _worker.llama()
    model = _worker.fsdp(model, world) if world else model
    opt = blockopt.SGDSaI(model, lr=0.02, weight_decay=0.1, **settings)
    calls = []
    for window in _worker.batches(FSDP_STEPS):
        opt.zero_grad(set_to_none=True)
        _worker.loss_of(model, _worker.local_rows(window, rank, world or 1)).backward()
        with AllReduceCounter() as counter:
            opt.step()
        calls.append(counter.calls)
    gsnr = {k: v[GSNR] for k, v in opt.state_dict()["state"].items()}  # global form (a collective)
    return {"params": _worker.full_params(model), "calls": calls, "gsnr": gsnr,
            "gsnr_max": [g["gsnr_max"] for g in opt.param_groups]}


def _fsdp_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name, settings in FSDP_SETTINGS.items():
            torch.save(_fsdp_run(world, settings), f"{out}/{name}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_equals_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    world = 2
    torch.multiprocessing.start_processes(
        _fsdp_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True, start_method="spawn"
    )
    for name, settings in FSDP_SETTINGS.items():
        ref = _fsdp_run(None, settings)
        for rank in range(world):
            got = torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=False)
            assert max((got["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"]) <= TOL
            assert got["gsnr"].keys() == ref["gsnr"].keys()
            assert all(torch.allclose(got["gsnr"][k], ref["gsnr"][k], rtol=1e-12, atol=0) for k in ref["gsnr"])
            if settings.get("normalize"):
                assert got["gsnr_max"] == pytest.approx(ref["gsnr_max"], rel=1e-12)
            else:
                assert got["gsnr_max"] == ref["gsnr_max"] == [None]
            # the statistics travel at the first step only: one SUM (+ one MAX when normalising)
            assert got["calls"] == [1 + settings.get("normalize", False)] + [0] * (FSDP_STEPS - 1)
        assert ref["calls"] == [0] * FSDP_STEPS
