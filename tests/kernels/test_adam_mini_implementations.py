"""Every step implementation computes what `reference_adam_mini` computes, on every layout kind.

The fused CPU kernel is built once per session (the first build takes some seconds); tests that
need it skip when it can't be built here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import blockopt
from blockopt.kernels.adam_mini import IMPLEMENTATIONS, adam_mini, cpu as _fused_cpu, fused as _fused
from blockopt.partition import BlockSpec, Plan
from blockopt.partition.spec import make_spec

from tests.optim.conftest import ScalingCollectives
from tests.optim.layouts import make_problem as _make_problem


@pytest.fixture(scope="session")
def fused_kernel():
    if not _fused_cpu.available():
        pytest.skip("the fused CPU kernel could not be built here (no compiler or ninja)")
    return _fused_cpu.kernel()


@pytest.fixture(params=["batched", "fused", "auto"])
def implementation(request):
    if request.param != "batched":
        request.getfixturevalue("fused_kernel")
    return request.param


def _run(implementation, specs, params, grads_per_step, *, groups=2, maximize=False, lr=0.02, weight_decay=0.1):
    """Steps an AdamMini over ``params`` (split into ``groups`` groups with different lr and
    weight decay) with the given gradients; returns the parameters and the optimizer."""
    tensors = [p.clone().requires_grad_(True) for p in params]
    named = [(s.name, t) for s, t in zip(specs, tensors)]
    param_groups = [
        {"params": named[g::groups], "lr": lr * (g + 1), "weight_decay": weight_decay / (g + 1)} for g in range(groups)
    ]
    opt = blockopt.AdamMini(param_groups, betas=(0.9, 0.95), eps=1e-8, decay_1d=True, maximize=maximize,
                            plan=Plan(specs), implementation=implementation)
    for grads in grads_per_step:
        for t, g in zip(tensors, grads):
            t.grad = g.clone()
        opt.step()
    return tensors, opt


def _state(opt, tensors):
    return [(opt.state[t]["exp_avg"], opt.state[t]["exp_avg_sq"], opt.state[t]["step"]) for t in tensors]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("maximize", [False, True])
def test_float64_equals_reference(implementation, seed, maximize):
    specs, params, grads = _make_problem(seed)
    ours, opt = _run(implementation, specs, params, grads, maximize=maximize)
    ref, ref_opt = _run("reference", specs, params, grads, maximize=maximize)
    for spec, a, b in zip(specs, ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m: f"{spec.name} {spec.block_dims} {spec.segments}: {m}")
    for (m, v, step), (m_ref, v_ref, step_ref) in zip(_state(opt, ours), _state(ref_opt, ref)):
        torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=0)
        assert step.item() == step_ref.item() == len(grads)
    # the comparison is between two trajectories that went somewhere
    assert min((a - p).abs().max().item() for a, p in zip(ours, params)) > 1e-3


def test_fused_splits_large_tensors_across_threads(fused_kernel):
    """Tensors big enough to be cut into many tasks: column sums from several chunks of rows,
    contiguous blocks spread over threads, a long per-coordinate run."""
    layouts = [((20000, 37), (1,), ((37, 1),)), ((3000, 50), (0,), ((3000, 1),)), ((300, 400), (0, 1), ((120000, 1),)),
               ((6000, 24), (1,), ((8, 4), (16, 1)))]
    gen = torch.Generator().manual_seed(0)
    specs = [BlockSpec(name=f"p{k}", shape=s, rule="heads", reason="test", block_dims=d, segments=g) for k, (s, d, g) in enumerate(layouts)]
    params = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in specs]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        ours, _ = _run("fused", specs, params, grads, groups=1)
    finally:
        torch.set_num_threads(threads)
    ref, _ = _run("reference", specs, params, grads, groups=1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_batched_is_bit_equal_to_reference():
    """Batched runs the reference's ops in the same order, only grouped."""
    specs, params, grads = _make_problem(0, torch.float32)
    ours, _ = _run("batched", specs, params, grads, maximize=True)
    ref, _ = _run("reference", specs, params, grads, maximize=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference_to_the_last_bit(implementation, dtype):
    """Both compute in float32 and round once. The fused sums of g^2 (and sqrt) can differ from
    ATen's in the last float32 bit, which flips a bf16/fp16 rounding very rarely: so almost every
    element is bit-equal and none is more than one step of the dtype apart."""
    specs, params, grads = _make_problem(1, dtype)
    ours, opt = _run(implementation, specs, params, grads)
    ref, ref_opt = _run("reference", specs, params, grads)
    ulp = torch.finfo(dtype).eps
    equal = total = 0
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-6)
        equal += (a == b).sum().item()
        total += a.numel()
    assert equal / total >= 0.999
    for (m, v, _), (m_ref, v_ref, _) in zip(_state(opt, ours), _state(ref_opt, ref)):
        assert m.dtype == dtype and v.dtype == torch.float32
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=0)


def test_coordinate_rule_in_float32_is_adamw(implementation):
    """Every block of size one is AdamW; in float32 the kernel's plain-Adam path agrees to rounding."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(33, 70, generator=gen).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    ours = blockopt.AdamMini([("w", a)], lr=1e-2, weight_decay=0.1, rules={"*": "coordinate"}, implementation=implementation)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(a.shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a, torch.randn(33, 70, generator=torch.Generator().manual_seed(0)))


def test_grad_scaler_skips_inf_steps_and_unscales(implementation):
    specs, params, grads = _make_problem(2, torch.float32)
    results = {}
    for impl in (implementation, "reference"):
        tensors = [p.clone().requires_grad_(True) for p in params]
        opt = blockopt.AdamMini(list(zip([s.name for s in specs], tensors)), lr=1e-2, plan=Plan(specs), implementation=impl)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step, step_grads in enumerate(grads):
            opt.zero_grad()
            loss = sum((t * g).sum() for t, g in zip(tensors, step_grads))
            if step == 1:
                loss = loss * float("inf")  # an overflow: this step must change nothing
            before = [t.detach().clone() for t in tensors]
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step == 1:
                assert all(torch.equal(t, b) for t, b in zip(tensors, before))
        results[impl] = tensors
        assert opt.state[tensors[0]]["step"].item() == len(grads) - 1
    for a, b in zip(results[implementation], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- the fused implementation's plumbing ------------------------------------------------------
def test_fused_runs_the_kernel_on_everything_it_supports(fused_kernel, monkeypatch):
    """Only tensors the kernel can't take reach the batched path: a layout over non-adjacent
    dims. A non-contiguous gradient is stepped by the kernel through a contiguous copy (what the
    kernel takes depends on dtypes, devices and layouts only: a compiled step decides it while
    tracing), with the same result as the contiguous one."""
    specs, params, grads = _make_problem(0, torch.float32)
    handed_over = []
    batched = _fused.batched_adam_mini

    def spy(params, *args, **kwargs):
        handed_over.extend(p.shape for p in params)
        batched(params, *args, **kwargs)

    monkeypatch.setattr(_fused, "batched_adam_mini", spy)
    tensors = [p.clone().requires_grad_(True) for p in params]
    opt = blockopt.AdamMini(list(zip([s.name for s in specs], tensors)), plan=Plan(specs), implementation="fused")
    for t, g in zip(tensors, grads[0]):
        t.grad = g.clone()
    tensors[0].grad = torch.empty(grads[0][0].shape[::-1]).t().copy_(grads[0][0])  # same values, column-major
    opt.step()
    assert handed_over == [specs[-1].shape]
    contiguous = params[0].clone().requires_grad_(True)
    contiguous.grad = grads[0][0].clone()
    blockopt.AdamMini([(specs[0].name, contiguous)], plan=Plan(specs[:1]), implementation="fused").step()
    assert torch.equal(tensors[0], contiguous)


def test_cut_blocks_are_summed_once_before_the_update(fused_kernel):
    """With collectives that report cut blocks, the functional sums every tensor's block sums
    with one call, before any update, whatever the implementation asked for."""
    specs, params, grads = _make_problem(1)
    two_ranks = ScalingCollectives(2)  # as if a second rank held the same gradient
    calls = two_ranks.calls

    def step(collectives, implementation):
        v = [torch.zeros(s.n_blocks, dtype=torch.float64) for s in specs]
        adam_mini([p.clone() for p in params], grads[0], [torch.zeros_like(p) for p in params], v,
                  [torch.tensor(0.0) for _ in params], specs, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decays=[0.0] * len(params), maximize=False, collectives=collectives,
                  implementation=implementation)
        return v

    v = step(two_ranks, "fused")
    v_ref = step(None, "reference")
    assert len(calls) == 1
    for sums, spec, g in zip(calls[0], specs, grads[0]):
        torch.testing.assert_close(sums, spec.block_sum(g * g), rtol=1e-12, atol=0)
    for a, b in zip(v, v_ref):  # doubled sums, doubled second moments
        torch.testing.assert_close(a, 2 * b, rtol=1e-12, atol=0)


def test_fused_bumps_version_counters(fused_kernel):
    """The kernel writes through raw pointers; autograd must still see the in-place update."""
    w = torch.randn(8, 8, requires_grad=True)
    opt = blockopt.AdamMini([("w", w)], plan=Plan([make_spec("w", (8, 8), "rows", "test")]), implementation="fused")
    w.grad = torch.randn(8, 8)
    before = w._version
    opt.step()
    assert w._version > before


def test_a_failed_build_warns_once_and_falls_back_to_batched(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'x':\nfoo.cpp:1: error: no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    _fused_cpu.kernel.cache_clear()
    try:
        specs, params, grads = _make_problem(0)
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            ours, _ = _run("fused", specs, params, grads[:1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _run("auto", specs, params, grads[:1])  # once is enough
    finally:
        _fused_cpu.kernel.cache_clear()  # the next caller loads the real kernel again
    ref, _ = _run("batched", specs, params, grads[:1])
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_default_implementation_is_auto():
    assert IMPLEMENTATIONS == ("auto", "reference", "batched", "fused")
    opt = blockopt.AdamMini([("w", torch.zeros(2, 2, requires_grad=True))], plan=Plan([make_spec("w", (2, 2), "rows", "test")]))
    assert opt.param_groups[0]["implementation"] == "auto"


def test_a_non_contiguous_parameter_is_stepped_through_a_copy_and_written_back(fused_kernel):
    """A transposed parameter (and its first moment, made like it) is stepped by the kernel on
    contiguous copies and written back: the same values as the same parameter stored contiguously."""
    spec = make_spec("w", (6, 5), "rows", "test")
    values, grad = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    transposed = torch.nn.Parameter(torch.empty(5, 6, dtype=torch.float64).t().copy_(values))
    plain = torch.nn.Parameter(values.clone())
    assert not transposed.is_contiguous()
    for p in (transposed, plain):
        opt = blockopt.AdamMini([("w", p)], plan=Plan([spec]), implementation="fused")
        for _ in range(2):
            p.grad = grad.clone()
            opt.step()
        assert opt.state[p]["step"].item() == 2
    assert torch.equal(transposed, plain) and not torch.equal(plain, values)
