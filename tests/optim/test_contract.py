"""The torch.optim contract, for every blockopt optimizer and implementation.

The properties PyTorch checks for its own optimizers (``TestOptimRenewed`` in
``test/test_optim.py``), written here from what they check: a step without gradients changes
nothing; tensor learning rates of any shape; state dicts that are deterministic, survive
``weights_only`` loading, load between equivalent constructions (module, named, unnamed,
compiled) and from torch's older format; hooks; deepcopy; param groups and schedulers; mixed
dtypes; a compiled step equal to the eager one. Where blockopt deliberately differs (complex
parameters, non-finite gradients) the tests pin the documented behaviour (docs/contract.md).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.optim.state import NONFINITE_SKIPS

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> factory(params, **overrides); each builds a real torch.optim.Optimizer
OPTIMIZERS = {
    "adam-mini-reference": lambda p, **kw: blockopt.AdamMini(p, **{"lr": 1e-2, "implementation": "reference", **kw}),
    "adam-mini-batched": lambda p, **kw: blockopt.AdamMini(p, **{"lr": 1e-2, "implementation": "batched", **kw}),
    "adam-mini-fused": lambda p, **kw: blockopt.AdamMini(p, **{"lr": 1e-2, "implementation": "fused", **kw}),
    "adapm": lambda p, **kw: blockopt.AdaPM(p, **{"lr": 1e-2, "rank": 2, **kw}),
    "sgd-sai": lambda p, **kw: blockopt.SGDSaI(p, **{"lr": 1e-3, **kw}),
}
NAMES = sorted(OPTIMIZERS)


class MLP(nn.Module):
    """Plain layers, so every construction (module, named, unnamed) gives the same plan."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8).to(dtype), nn.Linear(8, 3).to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(n=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _train(model, opt, data, step=None):
    for batch in data:
        opt.zero_grad()
        _loss(model, batch).backward()
        (step or opt.step)()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, tol=0.0):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _assert_same_state(a: dict, b: dict) -> None:
    """Two ``state_dict()["state"]``: the same entries, keys and values, bit for bit."""
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]) if isinstance(value, torch.Tensor) else value == b[i][key], (i, key)


# ---- steps ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_changes_nothing(name):
    model = MLP()
    opt = OPTIMIZERS[name](model, weight_decay=0.1)
    before = _params(model)
    opt.step()
    _assert_same(_params(model), before)
    assert not opt.state


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sgd-sai"])
def test_zero_gradients_change_nothing_without_weight_decay(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    before = _params(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    _assert_same(_params(model), before)


@pytest.mark.parametrize("name", NAMES)
def test_steps_go_downhill(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    batch = _data(1)[0]
    first = _loss(model, batch).item()
    _train(model, opt, [batch] * 20)
    assert _loss(model, batch).item() < first


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-dim", "2-dim"])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr(name, shape):
    data = _data()
    ref, ours = MLP(), MLP()
    _train(ref, OPTIMIZERS[name](ref, lr=0.0078125), data)  # a power of two: exact as a tensor too
    _train(ours, OPTIMIZERS[name](ours, lr=torch.full(shape, 0.0078125, dtype=torch.float64)), data)
    _assert_same(_params(ours), _params(ref))


@pytest.mark.parametrize("name", NAMES)
def test_only_the_lr_may_be_a_tensor(name):
    """A tensor weight decay or eps would reach the step's float arithmetic: refused at once."""
    with pytest.raises(TypeError, match=r"weight_decay must be a number >= 0, got a tensor \(tensor\(0.1000\)\): pass a Python number"):
        OPTIMIZERS[name](MLP(), weight_decay=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"lr must be a number >= 0, got a tensor of shape \(2,\)"):
        OPTIMIZERS[name](MLP(), lr=torch.ones(2))
    key = "momentum" if name == "sgd-sai" else "betas"  # torch's Adam takes tensor betas
    value = torch.tensor(0.9) if key == "momentum" else (torch.tensor(0.9), 0.95)
    with pytest.raises(TypeError, match=rf"{key}(\[0\])? must be a number in \[0, 1\), got a tensor .*only lr may be a tensor"):
        OPTIMIZERS[name](MLP(), **{key: value})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_empty_param_groups_are_held_as_torch_holds_them(name, named):
    """A no-decay group of a model without biases or norms is empty: torch.optim keeps it."""
    data = _data()
    ref, ours = MLP(), MLP()
    params = (lambda m: list(m.named_parameters())) if named else (lambda m: list(m.parameters()))
    ref_opt = OPTIMIZERS[name](params(ref))
    _train(ref, ref_opt, data[:2])
    opt = OPTIMIZERS[name]([{"params": [], "weight_decay": 0.0}, {"params": params(ours)}])
    _train(ours, opt, data[:2])
    _assert_same(_params(ours), _params(ref))
    resumed = OPTIMIZERS[name]([{"params": [], "weight_decay": 0.0}, {"params": params(ours)}])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed.add_param_group({"params": []})
    _train(ours, resumed, data[2:])
    _train(ref, ref_opt, data[2:])
    _assert_same(_params(ours), _params(ref))
    assert len(resumed.param_groups) == 3 and resumed.param_groups[2]["params"] == []
    # an optimizer of empty groups only takes parameters later, as torch's does
    later = OPTIMIZERS[name]([{"params": []}])
    later.add_param_group({"params": params(MLP())})
    assert len(later.plan) == 4


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_a_scheduler(name):
    model = MLP()
    opt = OPTIMIZERS[name]([{"params": model.fc1.parameters()}, {"params": model.fc2.parameters(), "lr": 1e-3}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batch = _data(1)[0]
    first = _loss(model, batch).item()
    for _ in range(10):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.5**10)
    assert _loss(model, batch).item() < first


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_optimizer(name):
    """Each tensor steps in its own dtype: a float32 layer and a float64 layer, as two models would."""
    mixed = MLP()
    mixed.fc1.float()
    alone32, alone64 = MLP(), MLP()
    alone32.fc1.float()
    opt = OPTIMIZERS[name](mixed)
    x, y = _data(1)[0]
    mixed.zero_grad()
    ((mixed.fc2(torch.tanh(mixed.fc1(x.float())).double()) - y) ** 2).mean().backward()
    opt.step()
    assert mixed.fc1.weight.dtype == torch.float32 and mixed.fc2.weight.dtype == torch.float64
    assert all(torch.isfinite(p).all() for p in mixed.parameters())
    assert not torch.equal(mixed.fc1.weight.double(), alone64.fc1.weight)  # it moved


# ---- hooks and copies ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_run(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("loaded"))
    _train(model, opt, _data(1))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "state_dict", "loaded"]


@pytest.mark.parametrize("name", NAMES)
def test_load_pre_hooks_run_first_and_what_they_return_is_checked_and_loaded(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, _data(1))
    saved = copy.deepcopy(opt.state_dict())
    stat = type(opt)._STAT_KEYS[0]
    legacy = copy.deepcopy(saved)  # an older format, the statistic under another name
    for entry in legacy["state"].values():
        entry["old_" + stat] = entry.pop(stat)

    def upgrade(o, sd):  # torch's docs: adapt a loaded dict in a pre hook
        sd = copy.deepcopy(sd)
        for entry in sd["state"].values():
            entry[stat] = torch.full_like(entry.pop("old_" + stat), 7.0)
        return sd

    fresh = OPTIMIZERS[name](model)
    handle = fresh.register_load_state_dict_pre_hook(upgrade)
    fresh.load_state_dict(legacy)
    assert all((fresh.state[p][stat] == 7).all() for p in model.parameters())
    handle.remove()
    fresh.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "param_groups": [
        {**g, "lr": float("nan")} for g in sd["param_groups"]]})
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="lr"):  # a hook's dict is checked as any other
        fresh.load_state_dict(saved)
    _assert_same_state(fresh.state_dict()["state"], before["state"])
    assert fresh.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("name", NAMES)
def test_load_post_hooks_see_the_loaded_state_and_their_changes_stay(name):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 300).to(torch.bfloat16))  # bf16: torch's load casts, blockopt restores
    options = {} if name.startswith("sgd") else {"momentum_dtype": "int8"}
    opt = OPTIMIZERS[name]([("w", w)], **options)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    stat = type(opt)._STAT_KEYS[0]
    seen = {}

    def post(o):
        seen.update({k: v.dtype for k, v in o.state[w].items() if isinstance(v, torch.Tensor)})
        o.state[w][stat].zero_()

    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(saved)
    assert seen == {k: v.dtype for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    assert seen[stat] == torch.float32
    assert (opt.state[w][stat] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_copies_every_public_attribute(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, _data(1))
    clone = copy.deepcopy(opt)
    for attr in (a for a in dir(opt) if not a.startswith("_") and not callable(getattr(opt, a))):
        assert hasattr(clone, attr), attr
    assert clone.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    assert set(clone.plan) == set(opt.plan)


# ---- state dicts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_deterministic_and_survives_weights_only_load(name):
    data = _data()
    a, b = MLP(), MLP()
    opt_a, opt_b = OPTIMIZERS[name](a), OPTIMIZERS[name](b)
    _train(a, opt_a, data[:2])
    _train(b, opt_b, data[:2])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    sb = opt_b.state_dict()
    assert loaded["param_groups"] == sb["param_groups"]
    for key, state in loaded["state"].items():
        for k, v in state.items():
            assert torch.equal(v, sb["state"][key][k]) if isinstance(v, torch.Tensor) else v == sb["state"][key][k]
    # resumed from the weights_only copy, the run continues exactly
    opt_b.load_state_dict(loaded)
    _train(a, opt_a, data[2:])
    _train(b, opt_b, data[2:])
    _assert_same(_params(b), _params(a))


def _constructions(model):
    """The same parameters, passed every way a user can."""
    return {
        "module": lambda: model,
        "named_parameters": lambda: model.named_parameters(),
        "parameters": lambda: model.parameters(),
        "groups": lambda: [{"params": list(model.parameters())}],
    }


@pytest.mark.parametrize("target", ["named_parameters", "parameters", "groups", "compiled-module"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_across_equivalent_constructions(name, target):
    """Saved from ``opt(model)``, loaded into the same parameters passed another way (or into the
    optimizer of ``torch.compile(model)``, whose names gain ``_orig_mod.``): the run continues exactly."""
    data = _data()
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, data[:2])
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unnamed parameters: blocks from shapes (the same here)
        if target == "compiled-module":
            other = OPTIMIZERS[name](torch.compile(twin))
        else:
            other = OPTIMIZERS[name](_constructions(twin)[target]())
    if name == "adapm" and target != "compiled-module":
        # AdaPM's momentum policy follows each layer's role, which only the module form knows:
        # bare parameters get other policies, and their state does not fit. Refused by name.
        with pytest.raises(ValueError, match=r"the state of '(fc1\.weight|param\.0)' holds 'lowrank' momentum, but its policy"):
            other.load_state_dict(opt.state_dict())
        return
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # (as torch's, a state dict holds the live tensors)
    _train(model, opt, data[2:])
    _train(twin, other, data[2:])
    _assert_same(_params(twin), _params(model))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", float("nan"), "lr must be"), ("betas", (1.5, 0.9), r"betas\[0\] must be"), ("eps", -1.0, "eps must be"),
    ("implementation", "bogus", "implementation must be one of"),
])
def test_a_state_dict_with_a_bad_hyperparameter_is_refused_and_changes_nothing(name, key, value, message):
    """The saved groups replace the live hyperparameters, so they are checked as the constructor
    checks them (a saved ``lr=nan`` loaded and trained to nan)."""
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, _data()[:1])
    saved = copy.deepcopy(opt.state_dict())
    if key not in saved["param_groups"][0]:
        pytest.skip(f"{name} has no {key}")
    saved["param_groups"][0][key] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=rf"param group 0 of the state dict: {message}"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, entry in before["state"].items() for k, v in entry.items()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", NAMES)
def test_older_state_dict_with_python_number_steps_loads(name):
    """torch's older format kept ``step`` as a Python number; it loads and the run continues."""
    data = _data()
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, data[:2])
    sd = opt.state_dict()
    old = copy.deepcopy({**sd, "state": {k: {**v, **({"step": float(v["step"].item())} if "step" in v else {})}
                                         for k, v in sd["state"].items()}})
    twin = copy.deepcopy(model)
    other = OPTIMIZERS[name](twin)
    other.load_state_dict(old)
    _train(model, opt, data[2:])
    _train(twin, other, data[2:])
    _assert_same(_params(twin), _params(model))


def test_an_adamw_state_dict_is_named_for_what_it_is():
    model = MLP()
    adamw = torch.optim.AdamW(model.parameters())
    _train(model, adamw, _data(1))
    with pytest.raises(ValueError, match=r"per-coordinate 'exp_avg_sq' .* as torch.optim.Adam/AdamW keep"):
        blockopt.AdamMini(model).load_state_dict(adamw.state_dict())


# ---- compiled steps -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_eager_step(name):
    """``torch.compile(opt.step)`` (inductor) computes what the eager step computes. (SGDSaI used
    to compute a gsnr of 0 under compile and train nothing, silently.)"""
    torch._dynamo.reset()
    data = _data(3, dtype=torch.float32)
    eager, compiled = MLP(torch.float32), MLP(torch.float32)
    _train(eager, OPTIMIZERS[name](eager), data)
    opt = OPTIMIZERS[name](compiled)
    _train(compiled, opt, data, step=torch.compile(opt.step))
    _assert_same(_params(compiled), _params(eager), tol=1e-6)


# ---- where blockopt is stricter (docs/contract.md) --------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_refused_by_name(name):
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"does not support complex parameters \('w' is torch.complex64\)"):
        OPTIMIZERS[name]([("w", w)])
    opt = OPTIMIZERS[name]([("v", nn.Parameter(torch.randn(3)))])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [("w", w)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_mixing_named_and_unnamed_parameters_is_refused(name):
    """As torch.optim: within a group, across groups, and by add_param_group."""
    model = MLP()
    with pytest.raises(ValueError, match=r"mixes \(name, tensor\) pairs and bare tensors"):
        OPTIMIZERS[name]([("fc1.weight", model.fc1.weight), model.fc1.bias])
    with pytest.raises(ValueError, match=r"param groups mix named and unnamed parameters"):
        OPTIMIZERS[name]([{"params": [model.fc1.weight]}, {"params": [("fc2.weight", model.fc2.weight)]}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockopt.PartitionWarning)
        unnamed = OPTIMIZERS[name]([model.fc1.weight])
    with pytest.raises(ValueError, match=r"param groups mix named and unnamed parameters"):
        unnamed.add_param_group({"params": [("fc2.weight", model.fc2.weight)]})
    named = OPTIMIZERS[name]([("fc1.weight", model.fc1.weight)])
    with pytest.raises(ValueError, match=r"param groups mix named and unnamed parameters"):
        named.add_param_group({"params": [model.fc2.weight]})
    assert len(unnamed.param_groups) == len(named.param_groups) == 1


# ---- non-finite gradients (blockopt.optim.nonfinite) ------------------------------------------
def _poison(model):
    _loss(model, _data(1)[0]).backward()
    model.fc1.weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_block_statistic_warns_once_by_default(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _poison(model)
    with pytest.warns(RuntimeWarning, match=r"'fc1.weight' is inf or nan, so every coordinate of those blocks") as record:
        opt.step()
    assert record[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()  # once only


def test_the_warning_finds_a_bad_statistic_anywhere_within_its_rotation():
    """The watch looks at 64 statistics per step, in rotation: the last of 150 tensors is found
    within ceil(150 / 64) = 3 steps, and named."""
    layers = nn.Sequential(*(nn.Linear(2, 2, bias=False) for _ in range(150))).double()
    opt = blockopt.AdamMini(layers, lr=1e-3)
    for p in layers.parameters():
        p.grad = torch.ones_like(p)
    layers[149].weight.grad[0, 0] = float("nan")
    caught = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", RuntimeWarning)
            opt.step()
        caught += [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(caught) == 1 and "'149.weight' is inf or nan" in caught[0]


@pytest.mark.parametrize("name", NAMES)
def test_skip_tensor_leaves_only_that_tensor_and_counts(name):
    model = MLP()
    opt = OPTIMIZERS[name](model, nonfinite="skip_tensor")
    before = _params(model)
    _poison(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    after = dict(zip([n for n, _ in model.named_parameters()], _params(model)))
    assert torch.equal(after["fc1.weight"], before[0])
    assert not torch.equal(after["fc2.weight"], before[2])
    assert opt.state[model.fc1.weight][NONFINITE_SKIPS] == 1
    assert opt.state[model.fc2.weight][NONFINITE_SKIPS] == 0  # (held from the first step, for DCP)
    # the next finite gradient trains it, from a clean state
    opt.zero_grad()
    _loss(model, _data(1)[0]).backward()
    opt.step()
    assert torch.isfinite(model.fc1.weight).all() and not torch.equal(model.fc1.weight, before[0])


@pytest.mark.parametrize("name", NAMES)
def test_skip_counts_survive_a_dcp_checkpoint(name, tmp_path):
    """DCP loads the keys a fresh optimizer's state holds (torch's get_state_dict makes it with one
    zero-gradient step): every stepped entry of a skipping group holds its count from its first step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = MLP()
    opt = OPTIMIZERS[name](model, nonfinite="skip_tensor")
    _train(model, opt, _data(1))
    _poison(model)
    opt.step()
    counts = {k: v[NONFINITE_SKIPS] for k, v in opt.state_dict()["state"].items()}
    assert sorted(counts.values()) == [0, 0, 0, 1]
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    fresh = MLP()
    fresh_opt = OPTIMIZERS[name](fresh, nonfinite="skip_tensor")
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert {k: v[NONFINITE_SKIPS] for k, v in fresh_opt.state_dict()["state"].items()} == counts


@pytest.mark.parametrize("momentum_dtype", [None, "int8"])
@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_after_a_skipped_first_gradient_resumes_exactly(name, momentum_dtype):
    """A parameter whose only gradient so far was skipped holds just its count of skips: its
    checkpoint was refused as lacking the optimizer's state."""
    model = MLP()
    opt = OPTIMIZERS[name](model, nonfinite="skip_tensor", momentum_dtype=momentum_dtype)
    _poison(model)
    opt.step()
    assert list(opt.state[model.fc1.weight]) == [NONFINITE_SKIPS]
    twin = copy.deepcopy(model)
    other = OPTIMIZERS[name](twin, nonfinite="skip_tensor", momentum_dtype=momentum_dtype)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.state[twin.fc1.weight][NONFINITE_SKIPS] == 1
    _train(model, opt, _data(2))
    _train(twin, other, _data(2))
    _assert_same(_params(twin), _params(model))


@pytest.mark.parametrize("name", NAMES)
def test_skip_step_groups_stop_for_a_bad_gradient_in_a_skip_tensor_group(name):
    """As documented: every gradient the step checks decides for the skip_step groups."""
    model = MLP()
    opt = OPTIMIZERS[name]([{"params": list(model.fc1.named_parameters(prefix="fc1")), "nonfinite": "skip_tensor"},
                            {"params": list(model.fc2.named_parameters(prefix="fc2")), "nonfinite": "skip_step"}])
    before = _params(model)
    _poison(model)  # an inf in fc1.weight's gradient
    opt.step()
    after = _params(model)
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])  # fc1: the weight alone skipped
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])  # fc2: the whole group skipped
    assert opt.state[model.fc2.weight][NONFINITE_SKIPS] == 1


@pytest.mark.parametrize("name", NAMES)
def test_skip_step_leaves_every_tensor(name):
    model = MLP()
    opt = OPTIMIZERS[name](model, nonfinite="skip_step")
    before = _params(model)
    _poison(model)
    opt.step()
    _assert_same(_params(model), before)
    assert all(opt.state[p][NONFINITE_SKIPS] == 1 for p in model.parameters())


def test_bad_nonfinite_setting_is_refused():
    with pytest.raises(ValueError, match=r"nonfinite must be one of 'warn', 'skip_tensor', 'skip_step', 'ignore', got 'skip'"):
        blockopt.AdamMini(MLP(), nonfinite="skip")


# ---- frozen parameters (Note [frozen parameters] in optim/named_params.py) ---------------------
@pytest.mark.parametrize("name", NAMES)
def test_freeze_then_unfreeze_trains_the_unfrozen_layer_with_its_structural_blocks(name):
    """The module form holds every parameter, as torch's model.parameters() does: a layer frozen
    when the optimizer is built trains once unfrozen, with the blocks its structure gives."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    frozen = model.model.layers[0]
    frozen.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", blockopt.PartitionWarning)  # frozen tensors are planned quietly
        opt = OPTIMIZERS[name](model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert opt.plan[q].rule == "heads" and opt.plan[q].n_blocks == 4
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    before = frozen.self_attn.q_proj.weight.detach().clone()
    opt.step()  # frozen: no grad, no step, no state
    assert torch.equal(frozen.self_attn.q_proj.weight, before) and frozen.self_attn.q_proj.weight not in opt.state
    frozen.requires_grad_(True)
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()
    assert not torch.equal(frozen.self_attn.q_proj.weight, before)


def test_skip_verdicts_are_agreed_across_ranks():
    """A rank whose shard is finite still skips when another rank's shard is not: the verdicts
    pass through Collectives.max_ (here a stand-in for a peer that saw an inf in fc2.weight)."""
    from blockopt.distributed import Collectives

    class PeerSawInf(Collectives):
        def max_(self, values, layouts):
            values[2] = 1.0  # fc2.weight, the third tensor with a gradient

    model = MLP()
    opt = blockopt.AdamMini(model, nonfinite="skip_tensor")
    opt._collectives = lambda layouts: PeerSawInf()
    before = _params(model)
    _loss(model, _data(1)[0]).backward()
    opt.step()
    after = _params(model)
    assert torch.equal(after[2], before[2]) and opt.state[model.fc2.weight][NONFINITE_SKIPS] == 1
    assert not torch.equal(after[0], before[0])


# ---- settings changed by hand in a live param group ---------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", float("nan"), "lr must be a number >= 0, got nan"),
    ("weight_decay", -1.0, "weight_decay must be"),
    ("nonfinite", "Warn", "nonfinite must be one of"),
    ("param_rounding", "Kahan", "param_rounding must be one of"),
])
def test_a_setting_changed_by_hand_is_checked_at_the_next_step_before_anything_moves(name, key, value, message):
    """As torch's schedulers set ``lr``, a user may set any group setting between steps; an invalid
    one (it trained on silently: a nan lr to nan, ``"Kahan"`` as nearest rounding) is refused with
    the constructor's message, naming the group, and the step changes nothing."""
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, _data(1))
    params, state = _params(model), copy.deepcopy(opt.state_dict())
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param group 0: {message}"):
        _train(model, opt, _data(1))
    _assert_same(_params(model), params)
    assert all(int(opt.state[p]["step"]) == int(state["state"][i]["step"]) for i, p in enumerate(model.parameters())
               if "step" in opt.state[p])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("change", "message"), [
    (lambda lr: lr.fill_(float("nan")), r"lr must be a number >= 0, got tensor\(nan"),
    (lambda lr: lr.fill_(-1e-3), r"lr must be a number >= 0, got tensor\(-0.001"),  # a LambdaLR past its horizon
    (None, r"lr must be a number >= 0, got a tensor of shape \(2,\)"),
], ids=["nan", "negative", "two-elements"])
def test_a_tensor_lr_is_checked_at_every_step_before_anything_moves(name, change, message):
    """A tensor lr is changed in place (a scheduler's ``fill_``), so it is checked at every step,
    every group's before any group moves."""
    model = MLP()
    opt = OPTIMIZERS[name]([{"params": model.fc1.parameters(), "lr": torch.tensor(1e-2)},
                            {"params": model.fc2.parameters(), "lr": torch.tensor(1e-2)}])
    _train(model, opt, _data(1))
    params, state = _params(model), copy.deepcopy(opt.state_dict())
    if change is None:
        opt.param_groups[1]["lr"] = torch.full((2,), 1e-2)
    else:
        change(opt.param_groups[1]["lr"])
    with pytest.raises(ValueError, match=rf"param group 1: {message}"):
        _train(model, opt, _data(1))
    _assert_same(_params(model), params)
    _assert_same_state(opt.state_dict()["state"], state["state"])


@pytest.mark.parametrize(("saving", "loading", "missing"), [
    ("adam-mini-fused", "sgd-sai", "'momentum'"), ("sgd-sai", "adam-mini-fused", "'betas'"), ("sgd-sai", "adapm", "'betas'"),
])
def test_the_state_of_another_optimizer_is_refused_by_its_groups_changing_nothing(saving, loading, missing):
    """SGDSaI read the saved groups' ``momentum`` before any check (a bare KeyError); under ZeRO
    an SGD-SaI checkpoint loaded into AdamMini failed at the next step (KeyError 'betas')."""
    model = MLP()
    saved = OPTIMIZERS[saving](model)
    _train(model, saved, _data(1))
    opt = OPTIMIZERS[loading](model)
    _train(model, opt, _data(1))
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"param group 0 of the state dict has no {missing} .*saved by another optimizer"):
        opt.load_state_dict(copy.deepcopy(saved.state_dict()))
    assert opt.state_dict()["param_groups"] == state["param_groups"]
    _assert_same_state(opt.state_dict()["state"], state["state"])


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_lr_is_read_once_a_step(name, monkeypatch):
    """Reading a tensor lr is a host sync on CUDA: the step reads each group's once, where it
    checks it, and updates with that value (a scheduler's in-place change is seen the next step)."""
    model = MLP()
    lrs = [torch.tensor(1e-2), torch.tensor(1e-2)]
    opt = OPTIMIZERS[name]([{"params": [model.fc1.weight, model.fc2.weight, model.fc2.bias], "lr": lrs[0]},
                            {"params": [model.fc1.bias], "lr": lrs[1]}])
    reads, item = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (reads.append(id(self)), item(self))[1])
    _train(model, opt, _data(2))
    assert sorted(r for r in reads if r in map(id, lrs)) == sorted([id(lrs[0]), id(lrs[1])] * 2)  # two steps
    monkeypatch.undo()
    lrs[1].fill_(0.0)  # as a scheduler changes it: the next step reads the new value
    bias = model.fc1.bias.detach().clone()
    _train(model, opt, _data(1, seed=3))
    _assert_same([model.fc1.bias.detach()], [bias])


@pytest.mark.parametrize("name", NAMES)
def test_valid_settings_changed_by_hand_take_effect_and_aliases_are_normalised(name):
    model = MLP()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, _data(1))
    opt.param_groups[0]["lr"] = 0.0  # valid: the next step moves nothing
    params = _params(model)
    _train(model, opt, _data(1, seed=2))
    _assert_same(_params(model), params)
    if "momentum_dtype" in opt.param_groups[0]:
        opt.param_groups[0]["momentum_dtype"] = torch.float32  # an alias, read as its name; float64
        with pytest.raises(ValueError, match="now says momentum_dtype='float32'"):  # parameters: new storage
            _train(model, opt, _data(1))


@pytest.mark.parametrize("name", NAMES)
def test_the_group_of_a_parameter_follows_the_live_groups(name):
    """The identity index behind per-parameter group lookups (used by loads) answers the group
    that holds the parameter now: after groups are added, edited in place, or replaced by a load."""
    model = MLP()
    opt = OPTIMIZERS[name]([{"params": [model.fc1.weight, model.fc1.bias]}, {"params": [model.fc2.weight]}])
    w1, b1, w2 = model.fc1.weight, model.fc1.bias, model.fc2.weight
    assert opt._group_of(b1) is opt.param_groups[0] and opt._group_of(w2) is opt.param_groups[1]
    opt.add_param_group({"params": [model.fc2.bias]})
    assert opt._group_of(model.fc2.bias) is opt.param_groups[2]
    g0, g1 = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    g0[1], g1[0] = g1[0], g0[1]  # two parameters swap groups by hand
    assert opt._group_of(w2) is opt.param_groups[0] and opt._group_of(b1) is opt.param_groups[1]
    old = list(opt.param_groups)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load builds new group dicts
    assert all(opt._group_of(p) is g for g in opt.param_groups for p in g["params"])
    assert not any(opt._group_of(w1) is g for g in old)
    with pytest.raises(KeyError, match="holds no such parameter"):
        opt._group_of(torch.zeros(2))


@pytest.mark.parametrize("name", NAMES)
def test_an_optimizer_left_holding_parameters_nobody_trains_says_so_once(name):
    """After a resume that replaced the model's parameters (PEFT adapters reloaded by the
    Trainer), the optimizer built before holds tensors that never get a gradient again: every
    step changed nothing, silently. A first step before any backward stays quiet, as in torch."""
    model = MLP()
    opt = OPTIMIZERS[name](model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # nothing yet: no state, no warning
    _train(model, opt, _data(1))
    for p in model.parameters():
        p.grad = None
    before = _params(model)
    with pytest.warns(UserWarning, match=r"none of its 4 parameters has a gradient, though it holds state") as record:
        opt.step()
    assert record[0].filename == __file__  # the user's line, past torch's wrappers of step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # said once
    _assert_same(_params(model), before)


@pytest.mark.parametrize("name", NAMES)
def test_the_lr_read_at_a_check_is_not_used_once_the_tensor_changed(name):
    """The value a step's check read is kept for that step's updates only while the tensor is
    unchanged: an update that runs without a check (eagerly, inside a compiled step) reads the
    tensor as it is, never an earlier step's value."""
    model = MLP()
    opt = OPTIMIZERS[name]([{"params": model.parameters(), "lr": torch.tensor(1e-2)}])
    _train(model, opt, _data(1))
    group = opt.param_groups[0]
    assert opt._lr(group) == pytest.approx(1e-2)
    group["lr"].fill_(3e-3)  # (a scheduler, after the step)
    assert opt._lr(group) == pytest.approx(3e-3)
    group["lr"] = torch.tensor(5e-4)  # (a new tensor)
    assert opt._lr(group) == pytest.approx(5e-4)
