"""momentum_dtype=: compressed first moment storage (optim/momentum.py, Note [compressed momentum]).

Against a float64 loop of Adam-mini whose m is passed through the codec after every step; resume
bit-identical with every storage (AdamMini and SGDSaI); checkpoints that load across storages; true state bytes."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.kernels.codecs import codec, rounding_key
from blockopt.optim import momentum

from .conftest import TinyTransformer, batches, lm_loss, make_tiny, train

COMPRESSED = ["bfloat16", "int8", "int4"]
ALL = [None, "float32", *COMPRESSED]


def reference_run(model, data, *, dtype, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, seed=0):
    """Adam-mini written out in float64 (one block statistic per block of the plan), m stored
    through the codec between steps with the rounding key a step uses."""
    plan = blockopt.partition(model)
    params = dict(model.named_parameters())
    stored = {name: None for name in params}
    v = {name: torch.zeros(plan[name].n_blocks, dtype=torch.float64) for name in params}
    # int8/int4 keep bf16 where a code chunk would hold several blocks or codes take more bytes:
    # written out, not asked of kept_as
    kept = {name: _kept_by_brute_force(dtype, plan[name]) for name in params}
    for t, idx in enumerate(data, start=1):
        model.zero_grad()
        lm_loss(model, idx).backward()
        with torch.no_grad():
            for name, p in params.items():
                spec, g = plan[name], p.grad.double()
                m = torch.zeros_like(g) if stored[name] is None else codec(kept[name]).decode(stored[name], tuple(p.shape)).double()
                m = betas[0] * m + (1 - betas[0]) * g
                block_means = spec.block_sum(g * g) / spec.block_numel(v[name])
                v[name] = betas[1] * v[name] + (1 - betas[1]) * block_means
                denom = spec.expand((v[name] / (1 - betas[1] ** t)).sqrt() + eps)
                p -= lr / (1 - betas[0] ** t) * m / denom
                stored[name] = codec(kept[name]).encode(m, rounding_key(seed, t, momentum.salt(name)))


def _kept_by_brute_force(dtype, spec):
    """What `momentum.kept_as` should answer, from each chunk's block indices and the storage's bytes."""
    if dtype not in ("int8", "int4"):
        return dtype
    stored = codec(dtype).storage(tuple(spec.shape), "cpu")
    narrow = sum(t.nbytes for t in stored) >= 2 * math.prod(spec.shape) > 0  # no smaller than bf16's 2 bytes an element
    return "bfloat16" if narrow or _chunks_cross_blocks(spec) else dtype


def _chunks_cross_blocks(spec, chunk: int = 256) -> bool:
    """Whether some chunk of 256 elements of a row holds elements of two blocks, by brute force."""
    index = spec.block_index().reshape(spec.shape[0] if len(spec.shape) >= 2 else 1, -1)
    width = index.shape[1]
    for start in range(0, width, chunk):
        part = index[:, start:start + chunk]
        if (part != part[:, :1]).any():
            return True
    return False


@pytest.mark.parametrize("seed", [0, 2**32 - 5])
@pytest.mark.parametrize("implementation", ["reference", "batched", "fused"])
@pytest.mark.parametrize("dtype", COMPRESSED)
def test_compressed_momentum_matches_a_float64_loop(dtype, implementation, seed):
    data = batches(8)
    # no attention biases: the key bias's true gradient is zero, its computed one rounding noise
    # that Adam divides by ~eps (see test_adam_mini_math.py)
    ours_model, ref_model = make_tiny(bias=False), make_tiny(bias=False)
    opt = blockopt.AdamMini(ours_model, lr=1e-2, betas=(0.9, 0.95), momentum_dtype=dtype, implementation=implementation,
                            seed=seed)
    train(ours_model, opt, data)
    reference_run(ref_model, data, dtype=dtype, seed=seed)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert max((a - b).abs().max() for a, b in zip(ours_model.parameters(), make_tiny(bias=False).parameters())) > 1e-3


@pytest.mark.parametrize("dtype", ALL)
def test_storage_and_true_state_bytes(dtype):
    model = make_tiny(torch.float32)
    opt = blockopt.AdamMini(model, momentum_dtype=dtype)
    train(model, opt, batches(2))
    w = model.head.weight
    state = opt.state[w]
    rows, width = w.shape
    n_chunks = rows * -(-width // 256)  # chunks never cross a row
    expected = {
        None: {"exp_avg": (torch.float32, w.numel() * 4)},
        "float32": {"exp_avg": (torch.float32, w.numel() * 4)},
        "bfloat16": {"exp_avg": (torch.bfloat16, w.numel() * 2)},
        "int8": {"exp_avg_codes": (torch.int8, w.numel()), "exp_avg_scales": (torch.float32, 4 * n_chunks)},
        "int4": {"exp_avg_codes": (torch.uint8, rows * -(-width // 2)), "exp_avg_scales": (torch.float32, 4 * n_chunks)},
    }[dtype]
    for key, (tensor_dtype, nbytes) in expected.items():
        assert state[key].dtype == tensor_dtype and state[key].numel() * state[key].element_size() == nbytes
    assert set(state) == {"step", "exp_avg_sq", *expected}
    # state_bytes is the sum of what each parameter keeps, written out from the shapes
    total = 0
    for name, p in model.named_parameters():
        r, n = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (1, p.numel())  # rows of n elements
        kept = "bfloat16" if dtype in ("int8", "int4") and _chunks_cross_blocks(opt.plan[name]) else dtype
        momentum_bytes = {None: 4 * p.numel(), "float32": 4 * p.numel(), "bfloat16": 2 * p.numel(),
                          "int8": p.numel() + 4 * r * -(-n // 256),
                          "int4": r * -(-n // 2) + 4 * r * -(-n // 256)}[kept]
        total += 4 + 4 * opt.plan[name].n_blocks + momentum_bytes
    assert blockopt.state_bytes(opt) == total


def test_int8_state_is_under_014x_adamw_and_int4_under_008x():
    """The issue's memory targets, on a model whose tensors are not tiny (scales and per-tensor
    counters are a fixed cost)."""
    ratios = {}
    for dtype in ("int8", "int4"):
        torch.manual_seed(0)
        model = TinyTransformer(width=128)
        opt = blockopt.AdamMini(model, momentum_dtype=dtype)
        train(model, opt, batches(1))
        adamw_model = TinyTransformer(width=128)
        adamw = torch.optim.AdamW(adamw_model.parameters())
        train(adamw_model, adamw, batches(1))
        ratios[dtype] = blockopt.state_bytes(opt) / blockopt.state_bytes(adamw)
    assert ratios["int8"] <= 0.14 and ratios["int4"] <= 0.08, ratios


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(("optimizer", "lr"), [(blockopt.AdamMini, 1e-2), (blockopt.SGDSaI, 1e-3)], ids=["AdamMini", "SGDSaI"])
def test_resume_is_bit_identical(optimizer, lr, dtype):
    data = batches(8)
    full_model = make_tiny(torch.float32)
    train(full_model, optimizer(full_model, lr=lr, momentum_dtype=dtype, seed=3), data)

    model = make_tiny(torch.float32)
    first = optimizer(model, lr=lr, momentum_dtype=dtype, seed=3)
    train(model, first, data[:4])
    resumed = optimizer(model, lr=lr, momentum_dtype=dtype, seed=3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for p in model.parameters():  # the storage comes back exactly, dtypes included
        assert set(resumed.state[p]) == set(first.state[p])
        for key, value in first.state[p].items():
            assert resumed.state[p][key].dtype == value.dtype and torch.equal(resumed.state[p][key], value), key
    train(model, resumed, data[4:])
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("source", ALL)
@pytest.mark.parametrize("target", ALL)
def test_checkpoints_load_across_storages(source, target):
    model = make_tiny(torch.float32)
    saver = blockopt.AdamMini(model, momentum_dtype=source)
    train(model, saver, batches(3))
    saved = saver.state_dict()
    before = copy.deepcopy(saved)
    loader = blockopt.AdamMini(model, momentum_dtype=target)
    loader.load_state_dict(saved)
    assert loader.param_groups[0]["momentum_dtype"] == target  # the live storage stays
    for name, p in model.named_parameters():
        src, dst = saver.state[p], loader.state[p]
        kept_source, kept_target = (momentum.kept_as(d, loader.plan[name]) for d in (source, target))
        assert set(dst) == {"step", "exp_avg_sq", *momentum.state_shapes(kept_target, tuple(p.shape))}
        m_src = momentum.read(kept_source, src, tuple(p.shape)).float()
        m_dst = momentum.read(kept_target, dst, tuple(p.shape)).float()
        # what the target can hold of the source's m: within the target codec's rounding
        scale = m_src.abs().max().clamp_min(1e-30)
        tolerance = {None: 0, "float32": 0, "bfloat16": 2**-7, "int8": 2 / 127, "int4": 2 / 7 * 2}[kept_target]
        assert float((m_dst - m_src).abs().max() / scale) <= tolerance + 1e-7, name
        assert torch.equal(dst["exp_avg_sq"], src["exp_avg_sq"])
    # the caller's dict is untouched (a failed or converting load changes nothing of it)
    assert before["param_groups"] == saved["param_groups"]
    for k, v in before["state"].items():
        assert all(torch.equal(v[key], saved["state"][k][key]) for key in v)
    train(model, loader, batches(2, seed=1))  # and it steps on


def test_momentum_dtype_per_group_and_bad_values():
    model = make_tiny(torch.float32)
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    vectors = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    opt = blockopt.AdamMini([{"params": matrices, "momentum_dtype": "int8"}, {"params": vectors}], momentum_dtype="bfloat16")
    train(model, opt, batches(2))
    assert all("exp_avg_codes" in opt.state[p] for _, p in matrices)
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for _, p in vectors)
    with pytest.raises(ValueError, match="momentum_dtype must be one of .*'int8'.*, got 'fp8'"):
        blockopt.AdamMini(model, momentum_dtype="fp8")
    with pytest.raises(ValueError, match="momentum_dtype"):
        opt.add_param_group({"params": [("extra", torch.nn.Parameter(torch.zeros(3)))], "momentum_dtype": "int2"})


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_seed_chooses_the_rounding_bits(make, dtype, monkeypatch):
    """Runs that share a ``seed`` draw the same rounding bits, other seeds other bits: the same
    gradient step, stored with seeds 0, 0 and 1, writes codes equal, then different, in every
    compressed tensor (AdaPM's low-rank factors included); the seed survives a pickle."""
    if make is blockopt.AdaPM:  # its seed also draws the initial factors: hold those, so only the rounding differs
        draw = blockopt.AdaPM._initial_right_factor

        def seed_zero_draw(self, *args):
            seed, self.seed = self.seed, 0
            try:
                return draw(self, *args)
            finally:
                self.seed = seed

        monkeypatch.setattr(blockopt.AdaPM, "_initial_right_factor", seed_zero_draw)
    stored = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = make_tiny(torch.float32)
        opt = make(model, lr=1e-2, momentum_dtype=dtype, seed=seed)
        train(model, opt, batches(1))
        stored[run] = {(name, key): v.clone() for name, p in model.named_parameters() for key, v in opt.state[p].items()
                       if v.dtype in (torch.bfloat16, torch.int8)}
    assert stored["a"] and stored["a"].keys() == stored["c"].keys()
    assert all(torch.equal(stored["a"][k], stored["b"][k]) for k in stored["a"])
    large = [k for k, v in stored["a"].items() if v.numel() >= 64]
    assert large and all(not torch.equal(stored["a"][k], stored["c"][k]) for k in large), large
    assert pickle.loads(pickle.dumps(opt)).seed == 1
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises((TypeError, ValueError), match=r"seed must be an int in \[0, 4294967295\], got"):
            make(model, seed=bad)


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
def test_a_torch_dtype_stands_for_its_name(make):
    """momentum_dtype=torch.bfloat16 is "bfloat16": groups, and so state dicts, keep the name."""
    model = make_tiny(torch.float32)
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    vectors = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    opt = make(matrices, momentum_dtype=torch.bfloat16)
    opt.add_param_group({"params": vectors, "momentum_dtype": torch.float32})
    assert [g["momentum_dtype"] for g in opt.param_groups] == ["bfloat16", "float32"]
    train(model, opt, batches(1))
    assert [g["momentum_dtype"] for g in opt.state_dict()["param_groups"]] == ["bfloat16", "float32"]
    key = "momentum_buffer" if make is blockopt.SGDSaI else "exp_avg"
    assert {opt.state[p][key].dtype for _, p in vectors} == {torch.float32}
    assert opt.defaults["momentum_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"momentum_dtype must be .*torch.bfloat16 for 'bfloat16'.*got torch.float16"):
        make(model, momentum_dtype=torch.float16)


# ---- AdaPM: its full momenta take the same storage ----------------------------------------
def test_adapm_with_full_momentum_everywhere_is_adam_mini_with_the_same_storage():
    data = batches(6)
    a_model, b_model = make_tiny(torch.float32), make_tiny(torch.float32)
    a = blockopt.AdaPM(a_model, lr=1e-2, momentum="full", momentum_dtype="int8")
    b = blockopt.AdamMini(b_model, lr=1e-2, momentum_dtype="int8")
    train(a_model, a, data)
    train(b_model, b, data)
    for x, y in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_adapm_compressed_full_momenta_resume_exactly_and_convert(dtype):
    data = batches(6)
    full_model = make_tiny(torch.float32)
    full = blockopt.AdaPM(full_model, lr=1e-2, rank=2, momentum_dtype=dtype)
    train(full_model, full, data)
    policies = set(full.policies.values())
    assert policies == {"none", "full", "lowrank"}  # every kind of tensor is in the run
    for name, p in full_model.named_parameters():
        keys = set(full.state[p])
        if full.policy(name) == "full":
            kept = "bfloat16" if dtype in ("int8", "int4") and _chunks_cross_blocks(full.plan[name]) else dtype
            assert keys >= set(momentum.state_shapes(kept, tuple(p.shape)))
        if full.policy(name) == "lowrank":  # Note [compressed low-rank factors]
            assert {full.state[p][k].dtype for k in ("exp_avg_l", "exp_avg_r")} == {torch.bfloat16}

    model = make_tiny(torch.float32)
    first = blockopt.AdaPM(model, lr=1e-2, rank=2, momentum_dtype=dtype)
    train(model, first, data[:3])
    saved = copy.deepcopy(first.state_dict())
    resumed = blockopt.AdaPM(model, lr=1e-2, rank=2, momentum_dtype=dtype)
    resumed.load_state_dict(saved)
    train(model, resumed, data[3:])
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    other = blockopt.AdaPM(model, lr=1e-2, rank=2, momentum_dtype=None)
    other.load_state_dict(saved)  # across storages, as for AdamMini
    assert all("exp_avg" in other.state[p] for n, p in model.named_parameters() if other.policy(n) == "full")
    lowrank = [p for n, p in model.named_parameters() if other.policy(n) == "lowrank"]
    back = blockopt.AdaPM(model, lr=1e-2, rank=2, momentum_dtype=dtype)
    back.load_state_dict(copy.deepcopy(other.state_dict()))
    for p in lowrank:  # bf16 factors (what `first` saved) load exactly into float32 ones, and back
        for key in ("exp_avg_l", "exp_avg_r"):
            assert other.state[p][key].dtype == torch.float32 and back.state[p][key].dtype == torch.bfloat16
            assert torch.equal(other.state[p][key], first.state[p][key].float())
            assert torch.equal(back.state[p][key], first.state[p][key])


def test_adapm_int8_state_is_under_003x_adamw_on_the_default_comparison_model():
    """The issue's target for AdaPM + int8 (full momenta in int8, bf16 low-rank factors), on the
    model `blockopt compare` runs by default (demo Llama, rank 8 factors)."""
    from blockopt.bench.models import build_model

    ratios = []
    for make in (lambda m: blockopt.AdaPM(m, momentum_dtype="int8"), lambda m: torch.optim.AdamW(m.parameters())):
        model = build_model("demo")
        opt = make(model)
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        ratios.append(blockopt.state_bytes(opt))
    assert ratios[0] / ratios[1] <= 0.03, ratios

def test_float32_momentum_with_float64_parameters_steps_alike_in_every_implementation():
    """m kept in float32 for float64 parameters: the batched step computes in float64 on a copy of m
    (it once lerped float32 m with float64 gradients and failed)."""
    data = batches(3)
    results = {}
    for implementation in ("reference", "batched", "fused"):
        model = make_tiny(torch.float64)
        opt = blockopt.AdamMini(model, lr=1e-2, momentum_dtype="float32", implementation=implementation)
        train(model, opt, data)
        assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())
        results[implementation] = [p.detach().clone() for p in model.parameters()]
    for implementation in ("batched", "fused"):
        for a, b in zip(results[implementation], results["reference"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("before", "after"), [("int8", "int4"), ("int8", None), (None, "int8"), ("float32", "bfloat16"),
                                               ("bfloat16", "int8")])
def test_a_group_setting_changed_after_state_exists_raises_instead_of_misreading(before, after):
    model = make_tiny(torch.float32)
    opt = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=before)
    train(model, opt, batches(1))
    snapshot = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["momentum_dtype"] = after
    with pytest.raises(ValueError, match=rf"momentum_dtype={after!r}.*state holds.*load it into an optimizer"):
        train(model, opt, batches(1))
    opt.param_groups[0]["momentum_dtype"] = before  # nothing was half-stepped: the state is as it was
    for (_, a), (_, b) in zip(opt.state_dict()["state"].items(), snapshot["state"].items()):
        assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("param_dtype", "before", "after"), [
    (torch.float32, "bfloat16", "float32"), (torch.float32, "bfloat16", None),
    (torch.bfloat16, None, "float32"), (torch.bfloat16, "float32", None), (torch.float32, None, "int8"),
])
def test_a_plain_momentum_of_another_dtype_than_the_new_setting_raises_too(make, param_dtype, before, after):
    """A float momentum in the wrong dtype once passed the every-step fast path: a bf16 m went on
    being rounded (to nearest) under a setting that now said float32; AdaPM's low-rank factors
    stayed in whatever dtype they were made in."""
    model = make_tiny(param_dtype)
    opt = make(model, lr=1e-2, momentum_dtype=before)
    train(model, opt, batches(1))
    snapshot = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["momentum_dtype"] = after
    with pytest.raises(ValueError, match=rf"momentum_dtype={after!r}.*state holds.*load it into an optimizer"):
        train(model, opt, batches(1))
    opt.param_groups[0]["momentum_dtype"] = before
    for (_, a), (_, b) in zip(opt.state_dict()["state"].items(), snapshot["state"].items()):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_an_adapm_rank_changed_after_its_factors_exist_raises_and_changes_nothing():
    """The factors keep the rank they were made at: a rank set by hand was silently ignored."""
    model = make_tiny(torch.float32)
    opt = blockopt.AdaPM(model, lr=1e-2, rank=2)
    train(model, opt, batches(1))
    snapshot = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["rank"] = 4
    with pytest.raises(ValueError, match=r"now says rank=4, but its low-rank momentum has rank 2"):
        train(model, opt, batches(1))
    for (_, a), (_, b) in zip(opt.state_dict()["state"].items(), snapshot["state"].items()):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_same_storage_under_another_name_is_no_change():
    # float32 parameters: None and "float32" keep the same float32 exp_avg, so switching is allowed
    model = make_tiny(torch.float32)
    opt = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=None)
    train(model, opt, batches(1))
    opt.param_groups[0]["momentum_dtype"] = "float32"
    train(model, opt, batches(1))
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.SGDSaI, blockopt.AdaPM], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("saved", "live"), [(None, "int8"), ("bfloat16", "int4"), ("float32", "int8"), ("int8", None),
                                             ("int8", "bfloat16")])
def test_set_state_dict_of_a_full_state_dict_converts_as_load_state_dict_does(make, saved, live):
    if make is blockopt.SGDSaI and live is None and saved in COMPRESSED:
        pytest.skip("torch's set_state_dict raises KeyError on a saved key the live state lacks (SGD-SaI keeps no "
                    "step without rounding): loud, torch's own; load_state_dict converts it")
    """torch's ``set_state_dict(..., full_state_dict=True)`` fills the keys a saved entry lacks
    with the live optimizer's zero state: a plain m saved into int8 storage arrived holding both,
    was read as int8 (the zeros) and its momentum was lost, silently. SGD-SaI also got a step
    count its saved settings keep none of, which keyed the conversion's rounding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    full = StateDictOptions(full_state_dict=True)
    model = make_tiny(torch.float32)
    opt = make(model, lr=1e-2, momentum_dtype=saved)
    train(model, opt, batches(2))
    _, optim_sd = get_state_dict(model, opt, options=full)
    reference = make(model, lr=1e-2, momentum_dtype=live)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))
    loaded = make(model, lr=1e-2, momentum_dtype=live)
    model.zero_grad(set_to_none=True)  # (as at a resume: torch makes the live state only without gradients)
    set_state_dict(model, loaded, model_state_dict=model.state_dict(), optim_state_dict=copy.deepcopy(optim_sd), options=full)
    for p in model.parameters():
        assert loaded.state[p].keys() == reference.state[p].keys()
        for key, value in reference.state[p].items():
            assert torch.equal(loaded.state[p][key], value), key


# ---- a saved momentum that does not fit is refused before it is converted --------------------
def _one_tensor_optimizer(make, shape, momentum_dtype):
    """An optimizer over one parameter ``conv.weight`` of ``shape`` (one block), after one step."""
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = make([("conv.weight", p)], lr=1e-2, momentum_dtype=momentum_dtype, rules={"conv.weight": "whole"})
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    return p, opt


def _assert_refused_and_unchanged(opt, saved, match):
    """Loading ``saved`` raises ValueError matching ``match`` and leaves ``opt`` exactly as it was."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            got = after["state"][i][key]
            assert got.dtype == value.dtype and torch.equal(got, value), key


def _shape_pattern(shape):
    return "\\(" + ", ".join(map(str, shape)) + (",\\)" if len(shape) == 1 else "\\)")


# the conversions that read a misfit momentum into one of the right shape (decoding codes, or
# encoding bf16): each loaded silently with scales on the wrong chunks before it was checked first
CONVERTING = [(s, t) for s in ("int8", "int4") for t in ALL if t != s] + [(None, "bfloat16"), ("float32", "bfloat16")]


@pytest.mark.parametrize(("source", "target"), CONVERTING)
def test_a_momentum_saved_for_another_shape_is_refused_when_the_load_converts(source, target):
    """A (4, 3, 5, 5) conv weight's momentum loaded for a (2, 6, 5, 5) one (same numel, one block):
    refused naming the parameter, the key and both shapes, whether or not the load converts."""
    _, saver = _one_tensor_optimizer(blockopt.AdamMini, (4, 3, 5, 5), source)
    _, loader = _one_tensor_optimizer(blockopt.AdamMini, (2, 6, 5, 5), target)
    key, saved_shape = next(iter(momentum.state_shapes(source, (4, 3, 5, 5)).items()))
    expected = momentum.state_shapes(source, (2, 6, 5, 5))[key]
    _assert_refused_and_unchanged(
        loader, saver.state_dict(),
        rf"state '{key}' of 'conv.weight' has shape {_shape_pattern(saved_shape)}, expected {_shape_pattern(expected)}")


@pytest.mark.parametrize("make", [
    blockopt.AdamMini,
    lambda params, **kw: blockopt.AdaPM(params, momentum="full", **kw),
    lambda params, **kw: blockopt.SGDSaI(params, momentum=0.9, **kw),
], ids=["AdamMini", "AdaPM", "SGDSaI"])
def test_int8_scales_of_another_shape_are_refused_by_every_optimizer_when_the_load_converts(make):
    p, saver = _one_tensor_optimizer(make, (3, 7), "int8")
    saved = copy.deepcopy(saver.state_dict())
    key = next(k for k in saved["state"][0] if k.endswith("_scales"))  # exp_avg_scales, momentum_buffer_scales
    saved["state"][0][key] = torch.ones(3, 2)
    for target in ("float32", "bfloat16", "int4"):
        _, loader = _one_tensor_optimizer(make, (3, 7), target)
        _assert_refused_and_unchanged(loader, saved, rf"state '{key}' of 'conv.weight' has shape \(3, 2\), expected \(3, 1\)")


def test_codes_of_another_size_and_missing_scales_are_refused_naming_the_parameter_and_key():
    _, saver = _one_tensor_optimizer(blockopt.AdamMini, (3, 7), "int8")
    _, loader = _one_tensor_optimizer(blockopt.AdamMini, (3, 7), "float32")
    saved = copy.deepcopy(saver.state_dict())
    saved["state"][0]["exp_avg_codes"] = torch.zeros(3, 8, dtype=torch.int8)  # (it raised a bare reshape error)
    _assert_refused_and_unchanged(loader, saved, r"state 'exp_avg_codes' of 'conv.weight' has shape \(3, 8\), expected \(3, 7\)")
    saved = copy.deepcopy(saver.state_dict())
    del saved["state"][0]["exp_avg_scales"]  # (it raised a bare KeyError)
    _, loader = _one_tensor_optimizer(blockopt.AdamMini, (3, 7), "int4")
    _assert_refused_and_unchanged(
        loader, saved, r"the state of 'conv.weight' has no 'exp_avg_scales' tensor .*momentum_dtype='int8', as saved, "
                       r"keeps exp_avg_codes \(3, 7\) and exp_avg_scales \(3, 1\)")


@pytest.mark.parametrize(("momentum_dtype", "key", "dtype", "expected"), [
    ("float32", "exp_avg", torch.int32, "a floating dtype"),  # (it loaded, and rounded m at every step)
    (None, "exp_avg", torch.int64, "a floating dtype"),
    ("int8", "exp_avg_codes", torch.uint8, "torch.int8"),  # (these loaded, and failed at the next step)
    ("int8", "exp_avg_codes", torch.int16, "torch.int8"),
    ("int8", "exp_avg_codes", torch.float32, "torch.int8"),
    ("int4", "exp_avg_codes", torch.int8, "torch.uint8"),
    ("int8", "exp_avg_scales", torch.float64, "torch.float32"),
])
def test_a_momentum_of_the_wrong_dtype_is_refused_at_load(momentum_dtype, key, dtype, expected):
    _, saver = _one_tensor_optimizer(blockopt.AdamMini, (3, 7), momentum_dtype)
    saved = copy.deepcopy(saver.state_dict())
    saved["state"][0][key] = saved["state"][0][key].to(dtype)
    _, loader = _one_tensor_optimizer(blockopt.AdamMini, (3, 7), momentum_dtype)
    _assert_refused_and_unchanged(loader, saved, rf"state '{key}' of 'conv.weight' is {dtype}, expected {expected}")


@pytest.mark.parametrize("implementation", ["reference", "batched", "fused"])
@pytest.mark.parametrize("dtype", COMPRESSED)
def test_an_inf_gradient_costs_what_it_costs_with_float32_momentum(dtype, implementation):
    """One inf in a gradient: the parameters that end non-finite are the float32-momentum run's,
    in every storage (an int chunk holds 256 elements of many blocks; Note [non-finite momenta])."""
    if implementation == "fused" and not blockopt.kernels.adam_mini.cpu.available():
        pytest.skip("the fused CPU kernel could not be built here")

    def run(momentum_dtype):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(40, 300))]
        names = ["bias", "weight"]  # per coordinate, and rows of 300 (two chunks a row)
        opt = blockopt.AdamMini(list(zip(names, params)), lr=1e-2, momentum_dtype=momentum_dtype,
                                implementation=implementation, nonfinite="ignore")
        for t in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
                if t == 0:
                    p.grad.view(-1)[5] = float("inf")
            opt.step()
        return [~torch.isfinite(p) for p in params]

    expected = run("float32")
    assert [int(bad.sum()) for bad in expected] == [1, 1]  # inf / inf; the rest of its block is frozen (m / inf)
    assert all(torch.equal(a, b) for a, b in zip(run(dtype), expected))


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
def test_a_model_cast_after_the_first_step_is_named_as_the_cause(make):
    """``model.to(torch.bfloat16)`` between steps: the refusal said the setting changed, which the
    user never touched."""
    model = make_tiny(torch.float32)
    opt = make(model, lr=1e-2)
    train(model, opt, batches(1))
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"now torch.bfloat16\), but its state holds torch.float32 .*was cast after"):
        train(model, opt, batches(1))


def test_a_cast_after_the_first_step_is_named_for_adapm_low_rank_factors():
    """AdaPM's low-rank factors said the momentum_dtype had changed, which the user never touched."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    opt = blockopt.AdaPM(model, lr=1e-2, rank=2)
    assert opt.policy("0.weight") == "lowrank"
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    model.double()
    model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match=r"for a torch.float64 parameter are torch.float64, but its state holds "
                                         r"torch.float32 factors: the parameter was cast after"):
        opt.step()


# ---- Note [int codes only where a chunk lies in one block] --------------------------------
def _layouts():
    from blockopt.partition import make_spec
    specs = [make_spec("v", (300,), rule, "") for rule in ("coordinate", "whole")]
    specs += [make_spec("w", shape, rule, "") for shape in ((8, 300), (300, 8), (1, 1), (5, 1), (4, 512))
              for rule in ("rows", "cols", "coordinate", "whole")]
    specs += [make_spec("n", shape, "rows", "") for shape in ((), (2,), (3,), (9, 2), (9, 3), (9, 4), (9, 5))]  # narrow rows
    specs += [make_spec("q", (64, 48), "heads", "", n_heads=4), make_spec("c", (48, 64), "heads", "", n_heads=4, neuron_dim=1)]
    specs += [make_spec("e", (4, 6, shape), "rows", "") for shape in (200, 256)]  # 3-D: rows of each expert
    model = TinyTransformer()
    specs += list(blockopt.partition(model).values())
    return specs


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_int_codes_only_where_every_chunk_lies_in_one_block(dtype):
    """`kept_as` against a brute-force look at each chunk's block indices, over rules and shapes."""
    seen = set()
    for spec in _layouts():
        expected = _kept_by_brute_force(dtype, spec)
        assert momentum.kept_as(dtype, spec) == expected, (spec.name, spec.shape, spec.rule)
        seen.add(expected)
    assert seen == {dtype, "bfloat16"}
    assert momentum.kept_as(None, _layouts()[0]) is None and momentum.kept_as("float32", _layouts()[0]) == "float32"


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM], ids=lambda c: c.__name__)
def test_a_group_whose_momentum_mostly_stays_bf16_under_int_codes_says_so(make):
    """GPT-2's Conv1D weights have per-column blocks: under int codes their m stays bf16, which
    the user who asked for int8 hears (where only biases do, a small share, nothing is said)."""
    torch.manual_seed(0)
    conv1d = [("h.0.mlp.c_fc.weight", nn.Parameter(torch.randn(64, 256))), ("h.0.mlp.c_fc.bias", nn.Parameter(torch.zeros(256))),
              ("h.1.mlp.c_fc.weight", nn.Parameter(torch.randn(64, 256)))]
    rules = {"*.weight": "cols"}
    momentum_policy = {} if make is blockopt.AdamMini else {"momentum": "full"}
    with pytest.warns(UserWarning, match=r"momentum_dtype='int8': 100% of param group 0's momentum stays bfloat16 "
                                         r"\(h\.\*\.mlp\.c_fc\.weight \(x2\), h\.0\.mlp\.c_fc\.bias\): a code chunk"):
        make(conv1d, rules=rules, momentum_dtype="int8", **momentum_policy)
    linear = [("mlp.up_proj.weight", nn.Parameter(torch.randn(256, 64))), ("mlp.up_proj.bias", nn.Parameter(torch.zeros(256)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = make(linear, momentum_dtype="int8", **momentum_policy)  # the bias alone keeps bf16: 1.5%
        with pytest.warns(UserWarning, match=r"param group 1's momentum stays bfloat16 \(h\.1\.scale\)"):
            opt.add_param_group({"params": [("h.1.scale", nn.Parameter(torch.ones(4096)))]})  # per coordinate


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_per_coordinate_tensor_steps_as_adam_does_under_int_codes(make, dtype):
    """One gradient a million times the others in a bias (one block per coordinate): rounded in
    a chunk scaled by the large one, the small m were divided by their own tiny sqrt(v) (steps of
    55 lr with int8; int4 rounded them to 0). Each coordinate's step stays about lr, as Adam's."""
    g = torch.full((256,), 1e-6)
    g[0] = 1.0
    bias = torch.nn.Parameter(torch.zeros(256))
    opt = make([("fc.bias", bias)], lr=1e-3, momentum_dtype=dtype)
    assert opt.plan["fc.bias"].rule == "coordinate"
    for _ in range(20):
        before = bias.detach().clone()
        bias.grad = g.clone()
        opt.step()
        assert float((bias - before).abs().max()) <= 1.05e-3
    assert float(bias[1:].abs().min()) >= 0.9 * 20 * 1e-3  # every small coordinate moved as Adam moves it
    assert opt.state[bias]["exp_avg"].dtype == torch.bfloat16 and blockopt.state_bytes(opt) == 4 + 4 * 256 + 2 * 256


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_narrow_rows_keep_bf16_where_codes_would_take_more_bytes(dtype):
    """A (9, 2) weight as int8 codes is 9 scales of 4 bytes for 18 one-byte codes: 3 bytes an
    element against bf16's 2. It keeps bf16, which state_bytes counts; a wide weight keeps codes."""
    narrow, wide = nn.Parameter(torch.randn(9, 2)), nn.Parameter(torch.randn(9, 256))
    opt = blockopt.AdamMini([("a.weight", narrow), ("b.weight", wide)], lr=1e-2, momentum_dtype=dtype)
    for p in (narrow, wide):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[narrow]["exp_avg"].dtype == torch.bfloat16 and "exp_avg_codes" not in opt.state[narrow]
    assert "exp_avg_codes" in opt.state[wide]
    code_bytes = opt.state[wide]["exp_avg_codes"].nbytes + opt.state[wide]["exp_avg_scales"].nbytes
    v_bytes = sum(opt.state[p]["exp_avg_sq"].nbytes for p in (narrow, wide))
    assert blockopt.state_bytes(opt) == 2 * 18 + code_bytes + v_bytes + sum(opt.state[p]["step"].nbytes for p in (narrow, wide))


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.SGDSaI], ids=lambda c: c.__name__)
def test_a_checkpoint_with_int_codes_on_a_per_coordinate_tensor_loads_converted(make, monkeypatch):
    """Checkpoints from before `kept_as` hold int codes for every tensor: those of tensors that
    now keep bf16 are decoded and kept as bf16, and the run steps on."""
    model = make_tiny(torch.float32)
    with monkeypatch.context() as patch:
        patch.setattr(momentum, "kept_as", lambda dtype, spec: dtype)  # as it was saved
        old = make(model, lr=1e-2, momentum_dtype="int8", **({"blocks": "plan"} if make is blockopt.SGDSaI else {}))
        train(model, old, batches(2))
    saved = copy.deepcopy(old.state_dict())
    key = "momentum_buffer" if make is blockopt.SGDSaI else "exp_avg"
    new = make(model, lr=1e-2, momentum_dtype="int8", **({"blocks": "plan"} if make is blockopt.SGDSaI else {}))
    new.load_state_dict(saved)
    moved = [name for name, p in model.named_parameters() if momentum.kept_as("int8", new.block_spec(name)) == "bfloat16"]
    assert moved
    for name, p in model.named_parameters():
        if name in moved:
            m_old = momentum.read("int8", old.state[p], tuple(p.shape), key)
            assert new.state[p][key].dtype == torch.bfloat16
            torch.testing.assert_close(new.state[p][key].float(), m_old.float(), rtol=2**-7, atol=0)
    train(model, new, batches(1, seed=1))
