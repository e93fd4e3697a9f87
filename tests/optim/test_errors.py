"""Bad input: a clear error naming the parameter and the fix, raised before anything is applied."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import blockopt

from .conftest import make_tiny


class TwoHeadAttention(nn.Module):
    """Attention-shaped module with explicit head attributes: q width 8, 2 heads."""

    def __init__(self):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = 2, 2, 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8, bias=False) for _ in range(4))


CASES = [
    (dict(lr=-1e-3), ValueError, r"lr must be a number >= 0, got -0.001"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be a number in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be a number in \[0, 1\), got -0.1"),
    (dict(betas=(0.9,)), ValueError, r"betas must be a pair, each a number in \[0, 1\), got \(0.9,\)"),
    (dict(eps=-1e-8), ValueError, r"eps must be"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be"),
    (dict(lr="fast"), TypeError, r"lr must be a number"),
    (dict(rules={"*": "diagonal"}), ValueError, r"'diagonal' is not a rule"),
    (dict(rules={"nothing.*": "rows"}), ValueError, r"\['nothing\.\*'\] match no trainable parameter"),
    (dict(value="columns"), ValueError, r"value must be one of"),
    (dict(implementation="magic"), ValueError, r"implementation must be one of"),
    (dict(n_heads=0), ValueError, r"n_heads must be (a positive int|an int >= 1)"),
]


@pytest.mark.parametrize("kwargs, exc, match", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        blockopt.AdamMini(make_tiny(), **kwargs)


def test_n_heads_not_dividing_the_width_names_the_parameter():
    with pytest.raises(ValueError, match=r"attn\.q_proj\.weight: n_heads=3 does not divide the query width 8"):
        blockopt.AdamMini(nn.ModuleDict({"attn": TwoHeadAttention()}), n_heads=3)


def test_n_kv_heads_not_dividing_n_heads():
    with pytest.raises(ValueError, match=r"n_kv_heads=3 must divide n_heads=4"):
        blockopt.AdamMini(make_tiny(), n_heads=4, n_kv_heads=3)


def test_n_heads_not_dividing_width_with_named_parameters():
    model = nn.ModuleDict({"attn": TwoHeadAttention()})
    with pytest.raises(ValueError, match=r"n_heads=3 does not divide the width 8 of attn\.q_proj\.weight"):
        blockopt.AdamMini(model.named_parameters(), n_heads=3)


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        blockopt.AdamMini([])


def test_a_model_frozen_whole_is_held_and_trains_once_unfrozen():
    """As torch.optim.AdamW(model.parameters()): every parameter is held (Note [frozen parameters])."""
    layer = nn.Linear(2, 2).requires_grad_(False)
    opt = blockopt.AdamMini(layer)
    opt.step()  # nothing has a gradient: nothing happens
    assert not opt.state
    layer.requires_grad_(True)
    layer(torch.ones(1, 2)).sum().backward()
    before = layer.weight.detach().clone()
    opt.step()
    assert not torch.equal(layer.weight, before)


def test_a_module_without_parameters_is_refused():
    with pytest.raises(ValueError, match="the model has no parameters"):
        blockopt.AdamMini(nn.ReLU())


def test_parameter_given_twice_in_one_group():
    w = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="given twice"):
        blockopt.AdamMini([w, w])


def test_parameter_given_twice_across_groups():
    model = make_tiny()
    with pytest.raises(ValueError, match=r"'head\.weight' is given twice"):
        blockopt.AdamMini([{"params": list(model.named_parameters())}, {"params": [("head.weight", model.head.weight)]}])


def test_group_hyperparameters_are_checked_too():
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        blockopt.AdamMini([{"params": [nn.Parameter(torch.zeros(2))], "betas": (0.9, 1.0)}])


@pytest.mark.parametrize(("make", "key", "value"), [(blockopt.AdamMini, "seed", 3), (blockopt.SGDSaI, "seed", 3),
                                                     (blockopt.AdaPM, "second_moment", "adam"), (blockopt.AdaPM, "momentum", "none")])
def test_an_optimizer_wide_setting_in_a_param_group_is_refused_not_ignored(make, key, value):
    """``seed`` (and AdaPM's ``second_moment``) hold for the whole optimizer: in a group they would
    be kept and never read, so the group is refused, pointing at the constructor; a group added
    later too, leaving the optimizer as it was."""
    model = make_tiny()
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    with pytest.raises(ValueError, match=rf"{key} is a setting of the whole optimizer, not of a param group: "
                                         rf"pass {make.__name__}\(\.\.\., {key}={value!r}\) instead"):
        make([{"params": matrices, key: value}])
    opt = make(matrices)
    vectors = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    with pytest.raises(ValueError, match=f"{key} is a setting of the whole optimizer"):
        opt.add_param_group({"params": vectors, key: value})
    assert len(opt.param_groups) == 1


def test_plan_from_another_model():
    plan = blockopt.partition(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="plan has parameters the model lacks|not in the plan|shape"):
        blockopt.AdamMini(make_tiny(), plan=plan)


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
def test_a_plan_that_leaves_out_parameters_of_the_module_is_refused(make):
    """A plan of the trainable parameters (blockopt.partition's default) left a frozen embedding
    out of the optimizer silently: unfrozen later, it never trained; partition options given with
    a plan were dropped silently."""
    model = make_tiny()
    model.embed.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"plan lacks 1 of the model's parameters \(embed\.weight\).*partition\(model, frozen=True\)"):
        make(model, plan=blockopt.partition(model))
    with pytest.raises(ValueError, match=r"got plan= and partition options \(rules\)"):
        make(model, plan=blockopt.partition(model, frozen=True), rules={"*": "coordinate"})
    opt = make(model, plan=blockopt.partition(model, frozen=True))
    assert any(p is model.embed.weight for p in opt.param_groups[0]["params"])


def test_a_single_tensor_is_not_an_iterable_of_parameters():
    with pytest.raises(TypeError, match="single Tensor"):
        blockopt.AdamMini(nn.Parameter(torch.zeros(3)))
