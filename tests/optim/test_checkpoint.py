"""state_dict / load_state_dict: exact resume, atomic failure, exact float32 statistics."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import blockopt

from .conftest import batches, make_tiny, train


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(opt):
    """Every state tensor (cloned) and group setting, in parameter order."""
    return [
        ({k: v for k, v in g.items() if k != "params"}, [{k: v.clone() for k, v in opt.state[p].items()} for p in g["params"]])
        for g in opt.param_groups
    ]


def _same_state(a, b) -> bool:
    for (settings_a, states_a), (settings_b, states_b) in zip(a, b, strict=True):
        if settings_a != settings_b or len(states_a) != len(states_b):
            return False
        for sa, sb in zip(states_a, states_b):
            if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
                return False
    return True


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resume_in_a_fresh_optimizer_is_bit_identical(dtype):
    data = batches(12)
    straight = make_tiny(dtype)
    straight_opt = blockopt.AdamMini(straight, lr=1e-2, weight_decay=0.1)
    train(straight, straight_opt, data)

    first = make_tiny(dtype)
    first_opt = blockopt.AdamMini(first, lr=1e-2, weight_decay=0.1)
    train(first, first_opt, data[:5])
    model_sd, opt_sd = _roundtrip(first.state_dict()), _roundtrip(first_opt.state_dict())

    resumed = make_tiny(dtype, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_sd)
    resumed_opt = blockopt.AdamMini(resumed, lr=1e-2, weight_decay=0.1)
    resumed_opt.load_state_dict(opt_sd)
    for p in resumed.parameters():
        assert resumed_opt.state[p]["exp_avg_sq"].dtype == torch.promote_types(dtype, torch.float32)
    train(resumed, resumed_opt, data[5:])

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(straight_opt.state[p][key], resumed_opt.state[q][key])


def _trained(model, **kw):
    opt = blockopt.AdamMini(model, lr=1e-2, **kw)
    train(model, opt, batches(2))
    return opt


def test_state_dict_from_another_model_is_rejected_and_changes_nothing():
    model = make_tiny()
    opt = _trained(model)
    before = _snapshot(opt)
    other = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    other_opt = blockopt.AdamMini(other, lr=1e-2)
    other_opt.zero_grad()
    other(torch.tensor([[1, 2]])).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match="the state dict has 3 parameters, this optimizer has 16"):
        opt.load_state_dict(other_opt.state_dict())
    assert _same_state(before, _snapshot(opt))
    assert opt.param_groups[0]["lr"] == 1e-2
    train(model, opt, batches(1))  # control: the comparison does see a change
    assert not _same_state(before, _snapshot(opt))


def test_state_dict_from_another_plan_is_rejected_and_changes_nothing():
    opt = _trained(make_tiny())
    before = _snapshot(opt)
    other = _trained(make_tiny(), rules={"*": "coordinate"})
    with pytest.raises(ValueError, match="partitioned it differently or it comes from another model"):
        opt.load_state_dict(other.state_dict())
    assert _same_state(before, _snapshot(opt))


def test_state_of_an_id_no_group_lists_is_rejected_and_changes_nothing():
    """(torch keeps such an entry in ``opt.state`` under the bare id: state of no parameter.)"""
    opt = _trained(make_tiny())
    before = _snapshot(opt)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][999] = copy.deepcopy(saved["state"][0])
    with pytest.raises(ValueError, match="holds state for id 999, which none of its param groups lists"):
        opt.load_state_dict(saved)
    assert _same_state(before, _snapshot(opt)) and all(isinstance(key, torch.Tensor) for key in opt.state)


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM], ids=lambda c: c.__name__)
def test_a_load_keeps_the_live_implementation_and_trains_on(make):
    """``implementation`` is the machine's choice, like ``momentum_dtype`` the storage's: a checkpoint
    saved by a reference run resumes on the implementation the loader was built with (torch's
    load replaced it), and the other hyperparameters come from the checkpoint."""
    model = make_tiny()
    saver = make(model, lr=1e-2, implementation="reference")
    train(model, saver, batches(2))
    saved = saver.state_dict()
    saved["param_groups"][0]["lr"] = 3e-3
    loader = make(model, lr=1e-2, implementation="fused")
    loader.load_state_dict(saved)
    assert loader.param_groups[0]["implementation"] == "fused" and loader.param_groups[0]["lr"] == 3e-3
    train(model, loader, batches(1))
    assert all(int(loader.state[p]["step"]) == 3 for p in model.parameters() if loader.state[p])


def test_a_state_dict_split_into_other_groups_is_refused_and_changes_nothing():
    """The same names split otherwise (two same-shaped parameters swapped between groups): by
    position each would take the other's state, silently."""
    model = make_tiny()
    named = dict(model.named_parameters())
    a, b = "block.norm1.weight", "block.norm2.weight"
    rest = [n for n in named if n not in (a, b)]

    def build(first, second):
        return blockopt.AdamMini([{"params": [(n, named[n]) for n in rest + [first]]},
                                  {"params": [(second, named[second])], "lr": 3e-3}], lr=1e-2)

    saver = build(a, b)
    train(model, saver, batches(2))
    loader = build(b, a)
    train(model, loader, batches(1))
    before = _snapshot(loader)
    with pytest.raises(ValueError, match=rf"{b!r} is in param group 0 here but was saved in param group 1"):
        loader.load_state_dict(saver.state_dict())
    assert _same_state(before, _snapshot(loader))


def test_state_dict_with_other_names_loads_by_position():
    """Note [which saved entry is which parameter]: a prefix (torch.compile's _orig_mod., DDP's
    module.) or unnamed parameters do not stop a state dict that fits from loading, as in torch."""
    model = make_tiny()
    opt = _trained(model)
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"] = ["_orig_mod." + n for n in sd["param_groups"][0]["param_names"]]
    fresh = blockopt.AdamMini(model, lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]  # the live names stay
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_state_dict_with_reordered_names_loads_by_name():
    model = make_tiny()
    opt = _trained(model)
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    order = list(range(len(group["params"])))[::-1]
    sd = {**sd, "param_groups": [{**group, "params": [group["params"][i] for i in order],
                                  "param_names": [group["param_names"][i] for i in order]}]}
    fresh = blockopt.AdamMini(model, lr=1e-2)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_state_dict_of_another_optimizer_is_rejected():
    model = make_tiny()
    opt = _trained(model)
    adamw = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    train(model, adamw, batches(1))
    with pytest.raises(ValueError, match=r"param group 0 of the state dict has no 'betas', 'eps' .*saved by another "
                                         r"optimizer than AdamMini"):  # (torch's SGD keeps no betas)
        opt.load_state_dict(adamw.state_dict())
    groups = [{**g, "betas": (0.9, 0.999), "eps": 1e-8} for g in adamw.state_dict()["param_groups"]]
    with pytest.raises(ValueError, match=r"the state of 'embed.weight' has no 'step' .*saved by another optimizer"):
        opt.load_state_dict({**adamw.state_dict(), "param_groups": groups})  # groups that pass: its state does not


@pytest.mark.parametrize("garbage", [{"foo": 1}, [1, 2], {"state": {}, "param_groups": 3},
                                     {"state": [], "param_groups": []}, {"state": {}, "param_groups": [{"lr": 1.0}]}],
                         ids=["keys", "list", "groups-not-a-list", "state-not-a-mapping", "group-without-params"])
def test_garbage_is_rejected_and_changes_nothing(garbage):
    opt = _trained(make_tiny())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt.load_state_dict(garbage)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(a[k], before["state"][i][k]) for i, a in after["state"].items() for k in a)


def test_load_state_dict_keeps_partition_options_for_new_groups():
    """After a load, parameters added later are still partitioned with the optimizer's options."""
    import blockopt

    torch.manual_seed(0)
    attn = torch.nn.Linear(8, 8, bias=False)
    extra = torch.nn.Linear(8, 8, bias=False)
    opt = blockopt.AdamMini([("q_proj.weight", attn.weight)], lr=1e-3, n_heads=2, rules={"*q_proj*": "heads"})
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": [("k_proj.q_proj.weight", extra.weight)]})
    assert opt.plan["k_proj.q_proj.weight"].rule == "heads"
    assert opt.plan["k_proj.q_proj.weight"].n_blocks == 2
