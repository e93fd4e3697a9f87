"""A step that raises changes nothing (Note [a step that raises changes nothing] in optim/base.py).

Whichever param group refuses, and why (a sparse gradient, a ``momentum_dtype`` changed after
the state was made, a ``param_rounding`` its dtype can't take, one that is no setting at all),
every group is left as it was: no state entry created, no step or skip counted, no parameter
moved. And once the cause is fixed, the run goes on exactly as a run that never had the failed
step (SGD-SaI's gsnr is taken from the parameter's first gradient that is stepped).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import blockopt
from blockopt.optim import param_rounding
from blockopt.optim.state import GSNR, NONFINITE_SKIPS

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::blockopt.PartitionWarning"),  # bare named tensors have no module
]

OPTIMIZERS = {
    "adam_mini": lambda groups, **kw: blockopt.AdamMini(groups, lr=1e-2, **kw),
    "adapm": lambda groups, **kw: blockopt.AdaPM(groups, lr=1e-2, rank=2, **kw),  # (8, 16) weights: low rank
    "sgd_sai": lambda groups, **kw: blockopt.SGDSaI(groups, lr=1e-2, **kw),
}
NAMES = sorted(OPTIMIZERS)


def _tensors(dtypes: dict[str, torch.dtype]) -> dict[str, torch.nn.Parameter]:
    """(8, 16) weights and (16,) vectors (names starting with 'b'), the same for the same names."""
    out = {}
    for i, (name, dtype) in enumerate(dtypes.items()):
        shape = (16,) if name.startswith("b") else (8, 16)
        out[name] = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(i)).to(dtype))
    return out


def _grad(name: str, p: Tensor, t: int) -> Tensor:
    g = torch.Generator().manual_seed(1000 * t + sum(map(ord, name)))
    return torch.randn(p.shape, generator=g).to(p.dtype)


def _set_grads(params: dict[str, Tensor], t: int, names=None) -> None:
    for name, p in params.items():
        p.grad = _grad(name, p, t) if names is None or name in names else None


def _snapshot(opt) -> dict:
    """Everything a step may change: parameters, state (by name), group settings."""
    params, state = {}, {}
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            params[name] = p.detach().clone()
            if p in opt.state:
                state[name] = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in opt.state[p].items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"params": params, "state": state, "groups": groups}


def _assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        x, y = a["params"][name], b["params"][name]
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a["state"].keys() == b["state"].keys(), (sorted(a["state"]), sorted(b["state"]))
    for name, entry in a["state"].items():
        other = b["state"][name]
        assert entry.keys() == other.keys(), (name, sorted(entry), sorted(other))
        for key, value in entry.items():
            if isinstance(value, Tensor):
                assert value.dtype == other[key].dtype and torch.equal(value, other[key]), (name, key)
            else:
                assert value == other[key], (name, key)
    assert a["groups"] == b["groups"]


def _assert_step_refused(opt, match: str) -> None:
    """``opt.step()`` raises ValueError matching ``match`` and changes nothing."""
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_same(_snapshot(opt), before)


# ---- a later group refuses: the earlier ones are untouched --------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_later_group_refusing_its_param_rounding_leaves_every_group_as_it_was(name):
    """Group 0 (float32) comes first; group 1's float16 parameter can't take 'stochastic' (bf16
    only). The step used to update group 0 (and count its step) before group 1 refused."""
    make = OPTIMIZERS[name]
    params = _tensors({"a": torch.float32, "b": torch.float32, "h": torch.float16})
    groups = lambda: [{"params": [("a", params["a"]), ("b", params["b"])]}, {"params": [("h", params["h"])]}]
    opt = make(groups())
    opt.param_groups[1]["param_rounding"] = "stochastic"
    _set_grads(params, 0)
    _assert_step_refused(opt, r"stochastic rounding is implemented for bfloat16")
    assert len(opt.state) == 0

    # fixed: the run goes on as one that never had the failed step
    ref_params = _tensors({"a": torch.float32, "b": torch.float32, "h": torch.float16})
    ref = make([{"params": [("a", ref_params["a"]), ("b", ref_params["b"])]},
                {"params": [("h", ref_params["h"])], "param_rounding": "kahan"}])
    opt.param_groups[1]["param_rounding"] = "kahan"
    for t in range(3):
        _set_grads(params, t), _set_grads(ref_params, t)
        opt.step(), ref.step()
    _assert_same(_snapshot(opt), _snapshot(ref))

    # and with the state made: a refused step counts no step and moves nothing
    opt.param_groups[1]["param_rounding"] = "stochastic"
    _set_grads(params, 3)
    _assert_step_refused(opt, r"stochastic rounding is implemented for bfloat16")
    opt.param_groups[1]["param_rounding"] = "kahan"
    _set_grads(params, 3), _set_grads(ref_params, 3)
    opt.step(), ref.step()
    _assert_same(_snapshot(opt), _snapshot(ref))


@pytest.mark.parametrize("name", NAMES)
def test_a_compensation_made_for_an_earlier_group_goes_when_a_later_group_refuses(name):
    """Group 0 (bf16) turns to 'kahan' after its state was made, so this step makes its
    compensation; group 1 (float16) then refuses 'stochastic'."""
    make = OPTIMIZERS[name]
    params = _tensors({"a": torch.bfloat16, "h": torch.float16})
    opt = make([{"params": [("a", params["a"])]}, {"params": [("h", params["h"])]}])
    _set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["param_rounding"] = "kahan"
    opt.param_groups[1]["param_rounding"] = "stochastic"
    _set_grads(params, 1)
    _assert_step_refused(opt, r"stochastic rounding is implemented for bfloat16")
    assert param_rounding.PARAM_COMPENSATION not in opt.state[params["a"]]


@pytest.mark.parametrize("name", NAMES)
def test_a_later_group_refusing_a_changed_momentum_dtype_leaves_every_group_as_it_was(name):
    """'new' gets its first gradient in the step where group 1's kept momentum is refused (its
    momentum_dtype was changed after its state was made). SGD-SaI used to keep new's gsnr at the
    zeros it was created with, so new never moved again."""
    make = OPTIMIZERS[name]

    def build():
        params = _tensors({"old": torch.float32, "new": torch.float32, "other": torch.float32})
        return params, make([{"params": [("old", params["old"]), ("new", params["new"])]},
                             {"params": [("other", params["other"])], "momentum_dtype": "int8"}], weight_decay=0.0)

    params, opt = build()
    ref_params, ref = build()
    for ps, o in ((params, opt), (ref_params, ref)):
        _set_grads(ps, 0, names=("old", "other"))  # 'new' has no gradient yet
        o.step()
    _set_grads(params, 1)
    opt.param_groups[1]["momentum_dtype"] = "int4"
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"momentum_dtype"):
        opt.step()
    _assert_same(_snapshot(opt), before)
    assert not opt.state.get(params["new"]), "state made for 'new' in the failed step"
    opt.param_groups[1]["momentum_dtype"] = "int8"  # undone, as the message suggests
    for t in range(1, 5):
        _set_grads(params, t), _set_grads(ref_params, t)
        opt.step(), ref.step()
    _assert_same(_snapshot(opt), _snapshot(ref))
    if name == "sgd_sai":
        assert bool((opt.state[params["new"]][GSNR] > 0).all())


@pytest.mark.parametrize("where", ["same-group", "later-group"])
@pytest.mark.parametrize("name", NAMES)
def test_a_sparse_gradient_after_a_first_gradient_leaves_no_state(name, where):
    """'w' gets its first gradient, then 'emb' (after it: in its group or the next) has a sparse
    one. The step used to leave w's state made but unfilled (SGD-SaI: gsnr 0 for good, and a
    buffer that did not start at g)."""
    make = OPTIMIZERS[name]

    def build():
        params = _tensors({"w": torch.float32, "b": torch.float32, "emb": torch.float32})
        named = [(n, params[n]) for n in ("w", "b", "emb")]
        groups = [{"params": named}] if where == "same-group" else [{"params": named[:2]}, {"params": named[2:]}]
        return params, make(groups)

    params, opt = build()
    ref_params, ref = build()
    _set_grads(params, 0)
    params["emb"].grad = params["emb"].grad.to_sparse()
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(emb\): build the embedding with sparse=False"):
        opt.step()
    _assert_same(_snapshot(opt), before)
    assert len(opt.state) == 0
    params["emb"].grad = params["emb"].grad.to_dense()  # fixed (nn.Embedding(sparse=False))
    opt.step()
    _set_grads(ref_params, 0)
    ref.step()
    _assert_same(_snapshot(opt), _snapshot(ref))
    for t in range(1, 4):
        _set_grads(params, t), _set_grads(ref_params, t)
        opt.step(), ref.step()
    _assert_same(_snapshot(opt), _snapshot(ref))


@pytest.mark.parametrize("name", NAMES)
def test_skips_counted_before_a_refusal_are_undone(name):
    """nonfinite='skip_tensor' counts a skip before the groups are gathered: a step that then
    refuses must not leave the count."""
    make = OPTIMIZERS[name]
    params = _tensors({"a": torch.float32, "c": torch.float32, "emb": torch.float32})
    opt = make([{"params": [("a", params["a"]), ("c", params["c"])], "nonfinite": "skip_tensor"},
                {"params": [("emb", params["emb"])]}])
    _set_grads(params, 0)
    opt.step()
    _set_grads(params, 1)
    params["c"].grad[0, 0] = float("inf")
    opt.step()  # counted once
    assert opt.state[params["c"]][NONFINITE_SKIPS] == 1
    _set_grads(params, 2)
    params["a"].grad[0, 0] = params["c"].grad[0, 0] = float("nan")
    params["emb"].grad = params["emb"].grad.to_sparse()
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"sparse gradients \(emb\)"):
        opt.step()
    _assert_same(_snapshot(opt), before)


# ---- param_rounding: an unknown mode is refused, never read as another ---------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_param_rounding_on_a_live_group_is_refused_with_the_constructors_message(name, dtype):
    """'Kahan' set on a live group used to be read as 'kahan' in some places and 'nearest' in others."""
    make = OPTIMIZERS[name]
    with pytest.raises(ValueError) as constructor:
        make([("w", torch.nn.Parameter(torch.ones(8, 16)))], param_rounding="Kahan")
    params = _tensors({"a": torch.float32, "w": dtype})
    opt = make([{"params": [("a", params["a"])]}, {"params": [("w", params["w"])]}])
    _set_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.param_groups[1]["param_rounding"] = "Kahan"
    _set_grads(params, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError) as stepped:
        opt.step()
    assert str(stepped.value).startswith("param group 1: " + str(constructor.value))  # (base.py checks it first)
    _assert_same(_snapshot(opt), before)
    with pytest.raises(ValueError) as loaded:  # (the live setting decides what a loaded state keeps)
        opt.load_state_dict(saved)
    assert str(loaded.value) == str(constructor.value)
    _assert_same(_snapshot(opt), before)


def test_param_rounding_reads_each_mode_as_itself():
    """A 'nearest' batch is written as computed (it used to make a Kahan compensation); an
    unknown mode raises."""
    p = torch.nn.Parameter(torch.ones(8, 16).bfloat16())
    q = torch.nn.Parameter(torch.ones(8, 16).bfloat16())
    opt, ref = blockopt.AdamMini([("w", p)], lr=1e-3), blockopt.AdamMini([("w", q)], lr=1e-3)
    p.grad = q.grad = torch.full((8, 16), 0.5).bfloat16()
    batch = opt._gather(opt.param_groups[0])
    with torch.no_grad():  # (as in a step)
        param_rounding.apply(opt, batch, None, param_rounding.prepare(opt, batch))
    ref.step()
    assert torch.equal(p, q) and param_rounding.PARAM_COMPENSATION not in opt.state[p]
    batch.group = {**batch.group, "param_rounding": "Kahan"}
    with pytest.raises(ValueError, match=r"param_rounding must be one of 'nearest', 'stochastic', 'kahan', got 'Kahan'"), \
            torch.no_grad():
        param_rounding.prepare(opt, batch)
