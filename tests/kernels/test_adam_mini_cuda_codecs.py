"""The Triton step of a compressed first moment (`StoredMomentum`) writes the codes that
`step_with_decoded(reference_adam_mini, ...)` writes: bf16 values, int8/int4 codes and their
scales equal bit for bit, p and v to rounding.

Interpreted on the CPU as in tests/kernels/test_adam_mini_cuda.py, which also compiles
`codec_kernel` for an H100 and checks its PTX for approximate or contracted arithmetic (what the
interpreter can't show); the ``gpu`` test at the end runs it on a real one.
"""

from __future__ import annotations

import os

import pytest
import torch

import blockopt
from blockopt.kernels import codecs
from blockopt.kernels.adam_mini import cpu as _fused_cpu, cuda as _fused_cuda
from blockopt.kernels.adam_mini import reference_adam_mini as _reference_adam_mini
from blockopt.kernels.adam_mini.decoded import step_with_decoded
from blockopt.kernels.adam_mini.layout import kernel_layout
from blockopt.kernels.codecs import ChunkQuantized, StoredMomentum
from blockopt.optim.momentum import EXP_AVG_CODES, EXP_AVG_SCALES
from blockopt.partition import BlockSpec, Plan

HYPER = dict(lr=0.02, beta1=0.9, beta2=0.95, eps=1e-8)

# (shape, block_dims, segments): rows wider than a chunk and not a multiple of it, so rows end in
# a short chunk; blocks of whole chunks (stepped in one pass) and chunks that cross blocks (whose v
# is updated first); per coordinate; 1-D tensors
LAYOUTS = [
    ((4, 300), (0,), ((4, 1),)),  # rows
    ((2, 1024), (0,), ((2, 1),)),  # rows of whole bf16 "chunks" too
    ((6, 300), (0,), ((6, 3),)),  # heads
    ((3, 300), (1,), ((300, 1),)),  # columns: neurons of an (in, out) Conv1D weight
    ((3, 264), (1,), ((8, 4), (256, 1))),  # grouped columns, then a block per column
    ((2, 5, 61), (0, 1), ((10, 1),)),  # experts: a block per row of 61, chunks of a row of 305 cross them
    ((2, 5, 61), (1,), ((5, 1),)),  # a middle block dim
    ((5, 37), (), ((1, 1),)),  # whole
    ((5, 301), (0, 1), ((5 * 301, 1),)),  # per coordinate
    ((601,), (0,), ((601, 1),)),  # 1-D per coordinate (a bias)
    ((7,), (), ((1, 1),)),  # 1-D whole (a norm's scale)
]


@pytest.fixture
def interpreted():
    """The Triton kernels, interpreted on the CPU (tests/conftest.py turns the interpreter on
    where there is no GPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present: the gpu test runs the kernels)")
    assert _fused_cuda.kernels() is not None


def _specs(layouts=LAYOUTS):
    return [BlockSpec(name=f"p{k}", shape=s, rule="heads", reason="test", block_dims=d, segments=g)
            for k, (s, d, g) in enumerate(layouts)]


def _problem(specs, dtype, n_steps, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def gradient(shape):  # rows on scales of their own, so chunks get scales of their own
        row_scales = 4 * torch.rand(shape[:1], generator=gen, dtype=torch.float64)
        return randn(shape) * row_scales.reshape(-1, *[1] * (len(shape) - 1))

    params = [randn(s.shape).to(device, dtype) for s in specs]
    grads = [[gradient(s.shape).to(device, dtype) for s in specs] for _ in range(n_steps)]
    return params, grads


def _state(specs, params, names, first_step):
    """Parameters, momenta (plain where ``names`` has None), second moments, step counts."""
    stat = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    momenta = [torch.zeros_like(p) if name is None else
               StoredMomentum(name, codecs.codec(name).storage(tuple(p.shape), p.device), salt=1000 + k, offset=7 * k)
               for k, (p, name) in enumerate(zip(params, names))]
    second_moments = [torch.zeros(s.n_blocks, dtype=stat, device=p.device) for s, p in zip(specs, params)]
    return [p.clone() for p in params], momenta, second_moments, [torch.tensor(float(first_step)) for _ in params]


def _stored(m):
    return (m,) if isinstance(m, torch.Tensor) else m.stored


def _run(specs, params, grads, names, *, kernels, first_step=0, maximize=False, hyper=HYPER):
    """Every step through the Triton kernels (asserting they take every tensor), or through the
    decoded reference; the state (p, stored m, v) after each step."""
    ps, ms, vs, steps = _state(specs, params, names, first_step)
    weight_decays = [0.1 * (k % 3) for k in range(len(ps))]
    states = []
    for step_grads in grads:
        if kernels:
            assert _fused_cuda.step(ps, step_grads, ms, vs, steps, [kernel_layout(s) for s in specs],
                                    weight_decays=weight_decays, maximize=maximize, **hyper) == []
        else:
            for one in zip(ps, step_grads, ms, vs, steps, specs, weight_decays):  # tensor by tensor
                *tensors, weight_decay = ([x] for x in one)
                step_with_decoded(_reference_adam_mini, *tensors, weight_decays=weight_decay, maximize=maximize, **hyper)
        states.append(([p.clone() for p in ps], [tuple(t.clone() for t in _stored(m)) for m in ms], [v.clone() for v in vs]))
    return states


def _assert_same_steps(specs, ours, ref, dtype):
    for n, ((p, m, v), (p_ref, m_ref, v_ref)) in enumerate(zip(ours, ref, strict=True)):
        for spec, a, b in zip(specs, m, m_ref):
            for x, y in zip(a, b):  # codes, scales, bf16 values: the same bits
                assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), \
                    f"step {n + 1}, {spec.shape} {spec.block_dims} {spec.segments}: {x.dtype} differs"
        for a, b in zip(p, p_ref):  # a rounding or two apart: v's sums run in another order, ATen's addcdiv fuses
            spacing = torch.finfo(dtype).eps * b.double().abs().clamp_min(1)
            assert ((a.double() - b.double()).abs() <= 2 * spacing).all()
        for a, b in zip(v, v_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.float32),
                                         ("int4", torch.bfloat16)])
def test_codes_are_the_decoded_references(interpreted, name, dtype):
    """(int8 with bf16 parameters and int4 with float32 ones: test_plain_and_compressed_momenta_in_one_call.)"""
    specs = _specs()
    params, grads = _problem(specs, dtype, 2)
    names = [name] * len(specs)
    ours, ref = _run(specs, params, grads, names, kernels=True), _run(specs, params, grads, names, kernels=False)
    _assert_same_steps(specs, ours, ref, dtype)


def test_float64_parameters_round_m_to_float32_before_encoding(interpreted):
    """(The decoded step updates m in float64 and encodes it as float32, and so do the kernels.)
    Here maximize, resumed at step 41, and beta1 < 0.5 (ATen's other lerp formula) too."""
    specs = _specs(LAYOUTS[::3])
    params, grads = _problem(specs, torch.float64, 2, seed=1)
    names = ["int8", "int4", "bfloat16", "int8"]
    kw = dict(first_step=40, maximize=True, hyper=dict(HYPER, beta1=0.3))
    ours, ref = _run(specs, params, grads, names, kernels=True, **kw), _run(specs, params, grads, names, kernels=False, **kw)
    _assert_same_steps(specs, ours, ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_and_compressed_momenta_in_one_call(interpreted, dtype):
    """Tensors of every codec and plain ones, stepped in one call (a launch set per codec); a
    plain m is the reference's bit for bit too (the same lerp)."""
    specs = _specs()
    params, grads = _problem(specs, dtype, 2, seed=2)
    names = ([None, "int4", "int8", "bfloat16"] * 3)[:len(specs)]
    ours, ref = _run(specs, params, grads, names, kernels=True), _run(specs, params, grads, names, kernels=False)
    _assert_same_steps(specs, ours, ref, dtype)


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_blocks_of_whole_chunks_are_stepped_in_one_pass(name):
    """A block made of whole codec chunks is one program of the codec kernel, which updates its
    v itself; the other blocks' v are updated by a launch before."""
    specs = _specs()
    m_codec = codecs.codec(name)
    work = _fused_cuda._codec_items(tuple(kernel_layout(s) for s in specs), tuple(s.shape for s in specs), m_codec, "cpu")
    # rows and heads: int8 chunks run along rows; a bf16 m is one row of chunks of 1024, which rows of 1024 fill
    one_pass = {(4, 300): name == "int8", (6, 300): name == "int8", (2, 1024): True}
    for spec, before in zip(specs, work.statistics_first, strict=True):
        per_coordinate = kernel_layout(spec).segments is None
        assert before == (not per_coordinate and not one_pass.get(spec.shape, False)), (spec.shape, spec.block_dims)


def test_what_the_codec_kernel_leaves(interpreted, monkeypatch):
    """Storage laid out otherwise than the codec's own (not contiguous, another shape), and
    codecs it can't reproduce (round to nearest, a chunk that isn't a power of two) are left
    to the decoded path, untouched."""
    spec = _specs(LAYOUTS[:1])[0]
    p, g = torch.randn(spec.shape), torch.randn(spec.shape)
    layout = kernel_layout(spec)

    def left(m):
        step = torch.tensor(0.0)
        out = _fused_cuda.step([p.clone()], [g], [m], [torch.zeros(spec.n_blocks)], [step], [layout],
                               weight_decays=[0.0], maximize=False, **HYPER)
        assert out == [] or step.item() == 0  # nothing stepped
        return out

    int8 = codecs.codec("int8")
    codes, scales = int8.storage(spec.shape, "cpu")
    assert left(StoredMomentum("int8", (codes, scales), salt=1)) == []
    assert left(StoredMomentum("int8", (codes.t().contiguous().t(), scales), salt=1)) == [0]
    assert left(StoredMomentum("int8", (codes, scales.reshape(-1)), salt=1)) == [0]
    assert left(StoredMomentum("bfloat16", (torch.zeros(spec.shape[::-1], dtype=torch.bfloat16).t(),), salt=1)) == [0]
    for other in (ChunkQuantized(bits=8, stochastic=False), ChunkQuantized(bits=8, chunk=200)):
        monkeypatch.setitem(codecs.CODECS, "int8", other)
        codes, scales = other.storage(spec.shape, "cpu")
        assert left(StoredMomentum("int8", (codes, scales), salt=1)) == [0]


def test_adam_mini_with_compressed_momentum_routes_cuda_tensors_to_the_kernels(interpreted, monkeypatch):
    """End to end, the CPU standing in for CUDA: AdamMini's fused step hands the compressed
    momenta to the Triton kernels and stores what its reference step stores."""
    monkeypatch.setattr(_fused_cpu, "handles", lambda p: False)
    monkeypatch.setattr(_fused_cuda, "handles", lambda p: True)
    real_step, taken = _fused_cuda.step, []

    def counted_step(params, *args, **kwargs):
        left = real_step(params, *args, **kwargs)
        taken.append(len(params) - len(left))
        return left

    monkeypatch.setattr(_fused_cuda, "step", counted_step)
    specs = _specs(LAYOUTS[:1] + LAYOUTS[2:4])  # rows, heads, columns
    params, grads = _problem(specs, torch.float32, 2, seed=3)

    def run(implementation):
        tensors = [p.clone().requires_grad_(True) for p in params]
        opt = blockopt.AdamMini([(s.name, t) for s, t in zip(specs, tensors)], lr=0.01, weight_decay=0.1,
                                plan=Plan(specs), implementation=implementation, momentum_dtype="int4")
        for step_grads in grads:
            for t, g in zip(tensors, step_grads):
                t.grad = g.clone()
            opt.step()
        return tensors, opt.state_dict()["state"]

    (ours, our_state), (ref, ref_state) = run("fused"), run("reference")
    assert taken == [len(specs)] * len(grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    kinds = set()
    for k, state in ref_state.items():  # (the columns layout keeps bf16: Note [int codes only where a chunk lies in one block])
        kept = [key for key in (EXP_AVG_CODES, EXP_AVG_SCALES, "exp_avg") if key in state]
        kinds.add(tuple(kept))
        for key in kept:
            assert torch.equal(our_state[k][key], state[key]), key
    assert (EXP_AVG_CODES, EXP_AVG_SCALES) in kinds


def test_a_compiled_step_holds_the_op_and_matches_eager(interpreted):
    """With compressed momenta too, the launches are one custom op in one graph (the rounding keys
    are made inside it from the step counts), and a compiled step writes the eager codes (with
    aot_eager, which functionalizes the op: every tensor it writes must be declared)."""
    specs = _specs(LAYOUTS[:1] + LAYOUTS[3:4] + LAYOUTS[8:9])  # rows, columns, per coordinate
    params, grads = _problem(specs, torch.float32, 1, seed=4)
    names = ["int8", "bfloat16", "int4"]
    layouts = [kernel_layout(s) for s in specs]

    def step(ps, ms, vs, steps):
        return _fused_cuda.step(ps, grads[0], ms, vs, steps, layouts, weight_decays=[0.1] * len(ps), maximize=False, **HYPER)

    eager, compiled = _state(specs, params, names, 3), _state(specs, params, names, 3)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*compiled)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert step(*eager) == []

    def assert_same():
        for a, b in zip(eager, compiled):
            for x, y in zip(a, b):
                assert all(torch.equal(s, t) for s, t in zip(_stored(x), _stored(y)))

    assert_same()
    again = torch.compile(step, backend="aot_eager")
    assert again(*compiled) == step(*eager) == []
    assert_same()


# ---- compiled, on a real GPU ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_codes_are_the_decoded_references(dtype):
    """On a GPU, against the decoded reference run by ATen's CUDA kernels: the codes are equal
    only if the compiled kernel rounds as the Note says (no approximate division or root, no
    contraction but m's explicit fma)."""
    pytest.importorskip("triton")
    specs = _specs()
    params, grads = _problem(specs, dtype, 3, device="cuda")
    for names in (["bfloat16"] * len(specs), ["int8"] * len(specs), ["int4"] * len(specs)):
        ours, ref = _run(specs, params, grads, names, kernels=True), _run(specs, params, grads, names, kernels=False)
        _assert_same_steps(specs, ours, ref, dtype)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_non_finite_gradient_gets_the_spare_code_as_in_the_decoded_path(interpreted, name):
    """Note [non-finite momenta]: the kernels write the decoded path's codes and scales when m
    holds inf and nan, and the same parameters end non-finite."""
    specs = _specs()
    params, grads = _problem(specs, torch.float32, 2)
    for g, value in zip(grads[0], [float("inf"), float("nan"), -float("inf")] * len(specs)):
        g.view(-1)[g.numel() // 3] = value
    names = [name] * len(specs)
    ours, ref = _run(specs, params, grads, names, kernels=True), _run(specs, params, grads, names, kernels=False)
    for (p, m, _), (p_ref, m_ref, _) in zip(ours, ref, strict=True):
        for a, b in zip(m, m_ref):
            assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))
            assert torch.isfinite(a[1]).all()  # the scales
        assert all(torch.equal(torch.isfinite(a), torch.isfinite(b)) for a, b in zip(p, p_ref))
        assert any(not torch.isfinite(a).all() for a in p)
