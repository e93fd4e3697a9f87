"""The fused CUDA (Triton) step computes what `reference_adam_mini` computes.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors:
the same kernel code, executed program by program with NumPy. Tests marked ``gpu`` run the
compiled kernels and skip without CUDA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import blockopt
from blockopt.kernels.adam_mini import cpu as _fused_cpu, cuda as _fused_cuda, fused as _fused
from blockopt.kernels.adam_mini.layout import kernel_layout
from blockopt.kernels.adam_mini import reference_adam_mini as _reference_adam_mini
from blockopt.partition import BlockSpec, Plan

from tests.optim.layouts import make_problem

KERNELS = f"{_fused_cuda.__package__}.triton_kernels"
HYPER = dict(lr=0.02, beta1=0.9, beta2=0.95, eps=1e-8)


def _fresh_kernels():
    sys.modules.pop(KERNELS, None)
    _fused_cuda.kernels.cache_clear()


@pytest.fixture
def interpreted():
    """The Triton kernels, interpreted on the CPU (tests/conftest.py turns the interpreter on
    where there is no GPU; with one, the compiled kernels are tested below instead)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present: the gpu tests run the kernels)")
    assert _fused_cuda.kernels() is not None


def _state(specs, params, dtype):
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return ([p.clone() for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros(s.n_blocks, dtype=stat, device=params[0].device) for s in specs], [torch.tensor(0.0) for _ in params])


def _steps(specs, params, grads_per_step, *, kernels, maximize=False, hyper=HYPER):
    """Runs every step with the Triton kernels (the reference for whatever they leave) or with
    the reference alone; returns (params, exp_avgs, exp_avg_sqs, positions left each step)."""
    ps, ms, vs, steps = _state(specs, params, params[0].dtype)
    weight_decays = [0.1 * (k % 3) for k in range(len(ps))]  # some tensors undecayed
    left_per_step = []
    for grads in grads_per_step:
        kw = dict(hyper, weight_decays=weight_decays, maximize=maximize)
        left = list(range(len(ps)))
        if kernels:
            left = _fused_cuda.step(ps, grads, ms, vs, steps, [kernel_layout(s) for s in specs], **kw)
            left_per_step.append(left)
        if left:
            def pick(xs):
                return [xs[i] for i in left]

            kw["weight_decays"] = pick(weight_decays)
            _reference_adam_mini(pick(ps), pick(grads), pick(ms), pick(vs), pick(steps), pick(specs), **kw)
    assert all(s.item() == len(grads_per_step) for s in steps)
    return ps, ms, vs, left_per_step


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("maximize", [False, True])
def test_float64_equals_reference_on_every_layout(interpreted, seed, maximize):
    specs, params, grads = make_problem(seed)
    ours = _steps(specs, params, grads[:3], kernels=True, maximize=maximize)
    ref = _steps(specs, params, grads[:3], kernels=False, maximize=maximize)
    # every layout but blocks over non-adjacent dims (the last) went through a kernel
    assert ours[3] == [[len(specs) - 1]] * 3
    for spec, *pairs in zip(specs, *(zip(a, b) for a, b in zip(ours[:3], ref[:3]))):
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14, msg=lambda m: f"{spec.shape} {spec.block_dims} {spec.segments}: {m}")
    assert min((a - p).abs().max().item() for a, p in zip(ours[0], params)) > 1e-3  # they went somewhere


def test_float32_matches_reference(interpreted):
    specs, params, grads = make_problem(3, torch.float32)
    ours = _steps(specs, params, grads[:2], kernels=True)
    ref = _steps(specs, params, grads[:2], kernels=False)
    for a, b in zip(ours[0] + ours[1] + ours[2], ref[0] + ref[1] + ref[2]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_once_like_the_reference(interpreted, dtype):
    """Math in float32, rounded once on store: the only difference from the reference is the
    order in which g^2 is summed, which can flip a rounding now and then, never by more than one
    step of the dtype."""
    specs, params, grads = make_problem(3, dtype)
    ours = _steps(specs, params, grads[:2], kernels=True)
    ref = _steps(specs, params, grads[:2], kernels=False)
    equal = total = 0
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        assert a.dtype == dtype
        spacing = torch.finfo(dtype).eps * b.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((a.float() - b.float()).abs() <= spacing).all()
        equal += (a == b).sum().item()
        total += a.numel()
    assert equal / total >= 0.99
    for v, v_ref in zip(ours[2], ref[2]):
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=0)


def test_lerp_from_the_nearer_end_for_large_weights(interpreted):
    """beta1 < 0.5 takes torch.lerp's other formula (weight 1 - beta1 >= 0.5)."""
    specs, params, grads = make_problem(4)
    hyper = dict(HYPER, beta1=0.2)
    ours = _steps(specs, params, grads[:2], kernels=True, hyper=hyper)
    ref = _steps(specs, params, grads[:2], kernels=False, hyper=hyper)
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_coordinate_rule_is_adamw(interpreted):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(33, 70, generator=gen)
    b = a.clone().requires_grad_(True)
    spec = BlockSpec(name="w", shape=(33, 70), rule="coordinate", reason="test", block_dims=(0, 1), segments=((33 * 70, 1),))
    m, v, step = torch.zeros_like(a), torch.zeros(33 * 70), torch.tensor(0.0)
    adamw = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(a.shape, generator=gen)
        b.grad = g.clone()
        adamw.step()
        assert _fused_cuda.step([a], [g], [m], [v], [step], [kernel_layout(spec)], lr=1e-2, beta1=0.9, beta2=0.999,
                                eps=1e-8, weight_decays=[0.1], maximize=False) == []
    torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


def test_wide_column_tiles_and_what_the_kernels_leave(interpreted, monkeypatch):
    """A column block wider than a tile gets a tile of its own; one wider than MAX_TILE_COLUMNS,
    a contiguous block over MAX_BLOCK_ELEMENTS, a non-contiguous gradient and a second moment of
    the wrong dtype are left to the caller."""
    wide = _fused_cuda.MAX_TILE_COLUMNS + 8
    layouts = [((5, 100), (1,), ((80, 80), (20, 1))), ((3, wide), (1,), ((wide, wide),)), ((6, 10), (0,), ((6, 1),))]
    specs = [BlockSpec(name=f"p{k}", shape=s, rule="heads", reason="test", block_dims=d, segments=g) for k, (s, d, g) in enumerate(layouts)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in specs]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(2)]
    ours = _steps(specs, params, grads, kernels=True)
    ref = _steps(specs, params, grads, kernels=False)
    assert ours[3] == [[1], [1]]
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)

    p, g = torch.randn(6, 10, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64).t()
    m, step = torch.zeros_like(p), torch.tensor(0.0)
    layout = kernel_layout(specs[2])
    left = _fused_cuda.step([p, p.clone()], [g, g.contiguous()], [m, m.clone()], [torch.zeros(6, dtype=torch.float64), torch.zeros(6)],
                            [step, step.clone()], [layout, layout], weight_decays=[0.0, 0.0], maximize=False, **HYPER)
    assert left == [0, 1]
    assert step.item() == 0  # nothing was stepped

    v = torch.zeros(6, dtype=torch.float64)
    monkeypatch.setattr(_fused_cuda, "MAX_BLOCK_ELEMENTS", 10)
    assert _fused_cuda._fits(p, g.contiguous(), m, v, layout)
    monkeypatch.setattr(_fused_cuda, "MAX_BLOCK_ELEMENTS", 9)  # rows of 10 elements are now too long
    assert not _fused_cuda._fits(p, g.contiguous(), m, v, layout)


def test_the_optimizer_routes_cuda_tensors_to_the_kernels(interpreted, monkeypatch):
    """End to end through AdamMini, with the CPU standing in for CUDA: the Triton backend gets
    the tensors, param groups keep their own hyperparameters, and the result is the reference's."""
    monkeypatch.setattr(_fused_cpu, "handles", lambda p: False)
    monkeypatch.setattr(_fused_cuda, "handles", lambda p: True)
    calls = []
    real_step = _fused_cuda.step
    monkeypatch.setattr(_fused_cuda, "step", lambda *a, **k: calls.append(len(a[0])) or real_step(*a, **k))
    specs, params, grads = make_problem(1)

    def run(implementation):
        tensors = [p.clone().requires_grad_(True) for p in params]
        named = [(s.name, t) for s, t in zip(specs, tensors)]
        opt = blockopt.AdamMini([{"params": named[::2]}, {"params": named[1::2], "lr": 0.03, "weight_decay": 0.05}],
                                lr=0.01, weight_decay=0.1, decay_1d=True, plan=Plan(specs), implementation=implementation)
        for step_grads in grads[:2]:
            for t, g in zip(tensors, step_grads):
                t.grad = g.clone()
            before = tensors[0]._version
            opt.step()
            assert tensors[0]._version > before
        return tensors

    ours, ref = run("fused"), run("reference")
    assert calls == [7, 6, 7, 6]  # both groups, both steps; blocks over non-adjacent dims go batched
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_without_triton_one_warning_then_batched(monkeypatch):
    real_import = importlib.import_module

    def no_triton(name, *args, **kwargs):
        if name == KERNELS:
            raise ModuleNotFoundError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_triton)
    _fresh_kernels()
    try:
        specs, params, grads = make_problem(0)
        layouts = [kernel_layout(s) for s in specs]
        state = _state(specs, params, torch.float64)
        with pytest.warns(RuntimeWarning, match="needs Triton"):
            left = _fused_cuda.step(state[0], grads[0], *state[1:], layouts, weight_decays=[0.0] * len(specs), maximize=False, **HYPER)
        assert left == list(range(len(specs)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _fused_cuda.step(state[0], grads[0], *state[1:], layouts, weight_decays=[0.0] * len(specs), maximize=False, **HYPER)
    finally:
        _fresh_kernels()
    assert all(torch.equal(a, p) for a, p in zip(state[0], params))  # nothing half-applied


def test_the_cpu_never_reaches_the_cuda_kernels(monkeypatch):
    """CPU tensors take the C++ kernel or the batched path; only CUDA tensors go to Triton."""
    monkeypatch.setattr(_fused_cuda, "step", lambda *a, **k: pytest.fail("CPU tensors reached the CUDA kernels"))
    specs, params, grads = make_problem(0)
    state = _state(specs, params, torch.float64)
    _fused.fused_adam_mini(state[0], grads[0], *state[1:], specs, weight_decays=[0.0] * len(specs), maximize=False,
                           **HYPER)


# ---- compiled ------------------------------------------------------------------------------------
_COMPILE_SCRIPT = """
import re
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blockopt.kernels.adam_mini import cuda as _fused_cuda, triton_kernels as k
from blockopt.kernels.codecs import CODECS

arch, dtype = int(sys.argv[1]), getattr(tl, sys.argv[2])
math_dtype = tl.float64 if dtype == tl.float64 else tl.float32
coeffs = "*fp64" if math_dtype == tl.float64 else "*fp32"
common = dict(DTYPE=dtype, MATH=math_dtype, MAXIMIZE=True)
cols = _fused_cuda.MAX_TILE_COLUMNS
kernels = [
    (k.blocks_kernel, ["ptrs", "coeffs", "items"], dict(common, BLOCK=_fused_cuda.BLOCK, UPDATE=True), 4),
    (k.columns_kernel, ["ptrs", "coeffs", "items", "column_blocks"], dict(common, ROWS=4096 // cols, COLS=cols, UPDATE=True), 8),
    (k.coordinates_kernel, ["ptrs", "coeffs", "items"], dict(common, BLOCK=_fused_cuda.BLOCK), 4),
] + [  # a compressed m: bf16, int8, int4
    (k.codec_kernel, ["ptrs", "coeffs", "items", "tensors", "segments"], dict(common, BITS=bits, POWER=2, CHUNK=chunk), 4)
    for bits, chunk in [(16, _fused_cuda.BFLOAT16_CHUNK), (8, CODECS["int8"].chunk), (4, CODECS["int4"].chunk)]
]
for fn, pointers, constexprs, warps in kernels:
    signature = {name: coeffs if name == "coeffs" else "*i64" for name in pointers}
    signature.update({name: "constexpr" for name in constexprs})
    options = {"num_warps": warps, "enable_fp_fusion": fn is not k.codec_kernel}
    binary = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    assert binary.asm["cubin"] and "st.local" not in binary.asm["ptx"], fn  # built, no register spills
    if fn is k.codec_kernel:  # (Note [compressed m in the kernels]) no approximate division or root, and no
        # contraction: every f32 add and multiply rounds (.rn), every fma is one the kernel asks for (m's lerp)
        ptx = binary.asm["ptx"]
        assert not re.search(r"\\.approx|div\\.full|\\b(add|sub|mul)\\.f(32|64)\\b", ptx), constexprs
print("compiled")
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_kernels_compile_for_a_gpu_without_one(dtype):
    """Triton compiles the kernels ahead of time to an H100's machine code (sm_90) with no GPU
    present: what the interpreter can't check (types, the barrier, register pressure) is checked
    by the real compiler here. Runs in a fresh interpreter, as this one has Triton interpreting."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, "90", dtype], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- compiled, on a real GPU ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_equals_reference(dtype):
    pytest.importorskip("triton")
    specs, params, grads = make_problem(2, dtype)
    params = [p.cuda() for p in params]
    grads = [[g.cuda() for g in step] for step in grads]
    ours = _steps(specs, params, grads, kernels=True)
    ref = _steps(specs, params, grads, kernels=False)
    assert ours[3] == [[len(specs) - 1]] * len(grads)
    tol = dict(rtol=1e-13, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        tol = dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, **tol)


def test_the_kernels_are_one_op_that_torch_compile_captures(interpreted):
    """The Triton launches are a custom op (their writes declared), so a compiled step holds
    them with no graph break and computes what the eager call does, bit for bit."""
    specs, params, grads = make_problem(0)
    layouts = [kernel_layout(s) for s in specs]

    def step(ps, ms, vs, steps):
        return _fused_cuda.step(ps, grads[0], ms, vs, steps, layouts, weight_decays=[0.1] * len(ps), maximize=False, **HYPER)

    eager, compiled = _state(specs, params, params[0].dtype), _state(specs, params, params[0].dtype)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*compiled)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert step(*eager) == [len(specs) - 1]  # blocks over non-adjacent dims are left to the caller
    for a, b in zip(eager, compiled):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    again = torch.compile(step, backend="aot_eager")
    assert again(*compiled) == step(*eager)
    assert all(torch.equal(x, y) for a, b in zip(eager, compiled) for x, y in zip(a, b))
