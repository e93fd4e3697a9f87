"""param_rounding=: bf16/fp16 parameters written stochastically or with Kahan compensation
(optim/param_rounding.py), the same mechanism for AdamMini, AdaPM and SGDSaI.

Against a float32-master-weights run (the usual mixed precision: float32 weights stepped with the
gradients of their bf16 copy): one step written exactly as the float32 result rounded, many tiny
steps tracked where rounding to nearest stalls; stochastic rounding unbiased; resume
bit-identical; checkpoints with and without the compensation; float32 parameters untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.kernels.codecs import ROUNDING_SEED, BFloat16Rounding, rounding_key
from blockopt.optim import param_rounding

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::blockopt.PartitionWarning"),  # an MLP has no adapter
]

OPTIMIZERS = {
    "adam_mini": lambda params, **kw: blockopt.AdamMini(params, lr=kw.pop("lr", 1e-4), **kw),
    "adapm": lambda params, **kw: blockopt.AdaPM(params, lr=kw.pop("lr", 1e-4), rank=2, **kw),  # low-rank MLP weights
    "sgd_sai": lambda params, **kw: blockopt.SGDSaI(params, lr=kw.pop("lr", 1e-4), **kw),
}
LOW = ["stochastic", "kahan"]


class MLP(nn.Module):
    """Parameters in any dtype, arithmetic in float32: only the parameters' precision differs
    between runs (and the CPU's bf16 matmuls are slow)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.to(dtype)

    def forward(self, x):
        f = nn.functional
        h = torch.tanh(f.linear(x, self.fc1.weight.float(), self.fc1.bias.float()))
        return f.linear(h, self.fc2.weight.float(), self.fc2.bias.float())


_data = torch.Generator().manual_seed(1)
X, Y = torch.randn(32, 8, generator=_data), torch.randn(32, 4, generator=_data)


def loss(model):
    return ((model(X) - Y) ** 2).mean()


def pure_run(make, steps, dtype=torch.bfloat16, model=None, opt=None, **options):
    """Train low-precision parameters directly; returns (model, optimizer)."""
    model = MLP(dtype) if model is None else model
    opt = make(model, **options) if opt is None else opt
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    return model, opt


def master_run(make, steps, dtype=torch.bfloat16):
    """float32 master weights (from the low-precision initial values), stepped with the gradients
    of their copy in ``dtype``."""
    master, work = MLP(dtype).float(), MLP(dtype)
    opt = make(master)
    for _ in range(steps):
        with torch.no_grad():
            for w, p in zip(work.parameters(), master.parameters()):
                w.copy_(p)
        work.zero_grad()
        loss(work).backward()
        for w, p in zip(work.parameters(), master.parameters()):
            p.grad = w.grad.float()
        opt.step()
    return master


@torch.no_grad()
def distance(model, master, init) -> float:
    """How far ``model`` ended from ``master``, relative to how far ``master`` moved from ``init``."""
    apart = sum((p.float() - q).abs().sum() for p, q in zip(model.parameters(), master.parameters()))
    moved = sum((p - q).abs().sum() for p, q in zip(master.parameters(), init.parameters()))
    return float(apart / moved)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_step_writes_the_float32_result_rounded(optimizer):
    """The update is the master's float32 one: "kahan" writes it rounded to nearest (what
    "nearest" writes) and keeps the rest in the compensation; "stochastic" rounds it with the
    parameter's own key (seed, step 1, crc32("param:" + name)), at the default seed and another."""
    make = OPTIMIZERS[optimizer]
    master = dict(master_run(make, 1).named_parameters())
    nearest, _ = pure_run(make, 1, param_rounding="nearest")
    kahan, kahan_opt = pure_run(make, 1, param_rounding="kahan")
    stochastic, _ = pure_run(make, 1, param_rounding="stochastic")
    init = dict(MLP(torch.bfloat16).named_parameters())
    for (name, p), q, r in zip(kahan.named_parameters(), nearest.parameters(), stochastic.parameters()):
        w = master[name].detach()
        c = kahan_opt.state[p][param_rounding.PARAM_COMPENSATION]
        assert c.dtype == torch.bfloat16
        assert torch.equal(p, w.bfloat16()) and torch.equal(p, q), name
        assert torch.equal(c, (w - p.float()).bfloat16()), name
        assert ((p.float() + c.float()) - w).abs().max() <= w.abs().max() * 2.0**-15, name
        key = rounding_key(ROUNDING_SEED, 1, param_rounding.salt(name))
        assert torch.equal(r, BFloat16Rounding().encode(w, key)[0]), name
        assert not torch.equal(w, init[name].float()), name  # the step moved it
    # another seed: the same step, rounded with the bits of that seed's keys
    seed = 2**32 - 3
    master = dict(master_run(lambda params: make(params, seed=seed), 1).named_parameters())
    seeded, _ = pure_run(make, 1, param_rounding="stochastic", seed=seed)
    differs = 0
    for (name, r), before in zip(seeded.named_parameters(), stochastic.parameters()):
        w = master[name].detach()
        assert torch.equal(r, BFloat16Rounding().encode(w, rounding_key(seed, 1, param_rounding.salt(name)))[0]), name
        differs += not torch.equal(r, before)
    assert differs


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_tiny_updates_track_float32_master_weights_where_nearest_stalls(optimizer):
    """200 steps of about a tenth of bf16's spacing: rounded to nearest most weights never move,
    while stochastic rounding and Kahan compensation follow the float32 master run."""
    make = OPTIMIZERS[optimizer]
    init, master = MLP(torch.bfloat16).float(), master_run(make, 200)
    error = {mode: distance(pure_run(make, 200, param_rounding=mode)[0], master, init) for mode in ("nearest", *LOW)}
    assert error["nearest"] > 0.8, error  # the problem is there
    assert error["stochastic"] < error["nearest"] / 2.5 and error["kahan"] < error["nearest"] / 10, error


def test_kahan_tracks_float16_too_and_float16_refuses_stochastic():
    make = OPTIMIZERS["adam_mini"]
    init, master = MLP(torch.float16).float(), master_run(make, 100, dtype=torch.float16)
    error = {}
    for mode in ("nearest", "kahan"):
        model, opt = pure_run(make, 100, dtype=torch.float16, param_rounding=mode)
        error[mode] = distance(model, master, init)
    assert all(s[param_rounding.PARAM_COMPENSATION].dtype == torch.float16 for s in opt.state.values())
    assert error["kahan"] < error["nearest"] / 10, error
    with pytest.raises(ValueError, match="param_rounding must be 'nearest' or 'kahan' for torch.float16 parameters, "
                                         "got 'stochastic' \\(fc1.weight\\).*use param_rounding='kahan'"):
        pure_run(make, 1, dtype=torch.float16, param_rounding="stochastic")


def test_stochastic_rounding_is_unbiased():
    """4096 weights at 1.0, each step moving them by a tenth of bf16's spacing below 1 (Adam-mini
    with a constant gradient steps by lr): the mean lands where float32 would, to a fraction of
    a spacing; rounded to nearest they never move; with Kahan every weight lands there."""
    spacing = 2.0**-8  # of bf16 values in [0.5, 1)
    steps, lr = 30, spacing / 10
    expected = 1.0 - steps * lr
    result = {}
    for mode in ("nearest", *LOW):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = blockopt.AdamMini([("w", p)], lr=lr, param_rounding=mode)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        total = p.float() + opt.state[p][param_rounding.PARAM_COMPENSATION].float() if mode == "kahan" else p.float()
        result[mode] = total
    assert torch.equal(result["nearest"], torch.ones(4096))
    assert abs(result["stochastic"].mean().item() - expected) < 0.15 * spacing  # about 5 standard errors
    assert result["stochastic"].unique().numel() > 1  # rounded up and down
    assert (result["kahan"] - expected).abs().max().item() < spacing / 64


@pytest.mark.parametrize("mode", LOW)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_is_bit_identical(optimizer, mode):
    make = OPTIMIZERS[optimizer]
    straight, _ = pure_run(make, 8, param_rounding=mode, lr=1e-3)
    model, first = pure_run(make, 4, param_rounding=mode, lr=1e-3)
    resumed = make(model, param_rounding=mode, lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for p in model.parameters():
        assert set(resumed.state[p]) == set(first.state[p])
        for key, value in first.state[p].items():
            if isinstance(value, torch.Tensor):
                assert resumed.state[p][key].dtype == value.dtype and torch.equal(resumed.state[p][key], value), key
    pure_run(make, 4, model=model, opt=resumed)
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", LOW)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_float32_parameters_are_written_as_before(optimizer, mode):
    make = OPTIMIZERS[optimizer]
    plain, plain_opt = pure_run(make, 3, dtype=torch.float32, lr=1e-3)
    rounded, opt = pure_run(make, 3, dtype=torch.float32, lr=1e-3, param_rounding=mode)
    for p, q in zip(plain.parameters(), rounded.parameters()):
        assert torch.equal(p, q)
        assert set(plain_opt.state[p]) == set(opt.state[q])  # no compensation, no step counter
    assert blockopt.state_bytes(opt) == blockopt.state_bytes(plain_opt)


def test_compensation_is_state_and_checkpoints_carry_it_or_start_it_at_zero():
    make = OPTIMIZERS["adam_mini"]
    _, nearest = pure_run(make, 2)
    model, kahan = pure_run(make, 2, param_rounding="kahan")
    assert blockopt.state_bytes(kahan) - blockopt.state_bytes(nearest) == sum(2 * p.numel() for p in model.parameters())
    saved = copy.deepcopy(kahan.state_dict())
    assert all(param_rounding.PARAM_COMPENSATION in entry for entry in saved["state"].values())

    # into "nearest": the compensation is dropped (and not counted)
    into_nearest = make(model, param_rounding="nearest")
    into_nearest.load_state_dict(copy.deepcopy(saved))
    assert into_nearest.param_groups[0]["param_rounding"] == "nearest"  # the live setting stays
    assert all(param_rounding.PARAM_COMPENSATION not in s for s in into_nearest.state.values())

    # a checkpoint without it into "kahan": starts at zero, so the next step writes what "nearest" writes
    plain_model, plain_opt = pure_run(make, 2)
    twin = copy.deepcopy(plain_model)
    resumed = make(twin, param_rounding="kahan")
    resumed.load_state_dict(copy.deepcopy(plain_opt.state_dict()))
    pure_run(make, 1, model=plain_model, opt=plain_opt)
    pure_run(make, 1, model=twin, opt=resumed)
    for p, q in zip(plain_model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert resumed.state[q][param_rounding.PARAM_COMPENSATION].abs().max() > 0  # and kept what it dropped

    # one from another model is refused, and nothing changes
    bad = copy.deepcopy(saved)
    bad["state"][0][param_rounding.PARAM_COMPENSATION] = torch.zeros(3, dtype=torch.bfloat16)
    before = copy.deepcopy(resumed.state_dict())
    with pytest.raises(ValueError, match="'param_compensation' of 'fc1.weight' has shape \\(3,\\), expected \\(16, 8\\)"):
        resumed.load_state_dict(bad)
    after = resumed.state_dict()
    assert all(torch.equal(v, after["state"][i][k]) for i, entry in before["state"].items() for k, v in entry.items())


def test_stochastic_sgd_sai_counts_steps_only_for_low_precision_parameters():
    model = MLP(torch.bfloat16)
    model.fc2.float()
    opt = blockopt.SGDSaI(model, lr=1e-4, param_rounding="stochastic")
    pure_run(None, 3, model=model, opt=opt)
    assert [float(opt.state[p]["step"]) for p in model.fc1.parameters()] == [3.0, 3.0]
    assert all("step" not in opt.state[p] for p in model.fc2.parameters())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bad_values_are_refused_everywhere(optimizer):
    make = OPTIMIZERS[optimizer]
    model = MLP(torch.bfloat16)
    with pytest.raises(ValueError, match="param_rounding must be one of 'nearest', 'stochastic', 'kahan', got 'sr'"):
        make(model, param_rounding="sr")
    opt = make(model)
    with pytest.raises(ValueError, match="param_rounding must be one of"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(3)))], "param_rounding": None})


def test_kahan_on_sharded_parameters_keeps_a_sharded_compensation(world_of_one):
    """The compensation is placed like a DTensor parameter and stepped on the local shard (one
    rank here: the same as the plain tensors); stochastic rounding writes what it writes unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = MLP(torch.bfloat16)
    plan = blockopt.partition(model)
    named = [(n, nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))) for n, p in model.named_parameters()]
    sharded = blockopt.AdamMini(named, plan=plan, lr=1e-3, param_rounding="kahan")
    plain = blockopt.AdamMini(model, lr=1e-3, param_rounding="kahan")
    for _ in range(3):
        plain.zero_grad()
        loss(model).backward()
        for (_, p), q in zip(named, model.parameters()):
            p.grad = distribute_tensor(q.grad, mesh, [Shard(0)])
        sharded.step()
        plain.step()
    for (_, p), q in zip(named, model.parameters()):
        compensation = sharded.state[p][param_rounding.PARAM_COMPENSATION]
        assert isinstance(compensation, DTensor) and torch.equal(p.full_tensor(), q.detach())
        assert torch.equal(compensation.full_tensor(), plain.state[q][param_rounding.PARAM_COMPENSATION])
    # stochastic rounding of a shard draws the bits of its place in the whole (one rank: the plain bits);
    # at 2 and 3 ranks: tests/distributed/test_fsdp_codecs.py
    sharded = blockopt.AdamMini(named, plan=plan, lr=1e-3, param_rounding="stochastic")
    plain = blockopt.AdamMini(model, lr=1e-3, param_rounding="stochastic")
    for (_, p), q in zip(named, model.parameters()):
        p.grad = distribute_tensor(q.grad, mesh, [Shard(0)])
    sharded.step()
    plain.step()
    assert all(torch.equal(p.full_tensor(), q.detach()) for (_, p), q in zip(named, model.parameters()))


def test_compiled_steps_equal_eager_ones_and_float32_groups_compile_whole():
    """The rounding of low-precision parameters runs eagerly inside a compiled step (a graph
    break) and writes what an eager step writes; float32 parameters never reach it."""
    make = OPTIMIZERS["adam_mini"]
    for mode in LOW:
        eager, compiled = MLP(torch.bfloat16), MLP(torch.bfloat16)
        eager_opt, compiled_opt = make(eager, lr=1e-3, param_rounding=mode), make(compiled, lr=1e-3, param_rounding=mode)
        compiled_opt.step = torch.compile(compiled_opt.step, backend="aot_eager")
        pure_run(None, 2, model=eager, opt=eager_opt)
        pure_run(None, 2, model=compiled, opt=compiled_opt)
        assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), compiled.parameters())), mode
    model, opt = pure_run(make, 1, dtype=torch.float32, param_rounding="kahan")
    loss(model).backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
