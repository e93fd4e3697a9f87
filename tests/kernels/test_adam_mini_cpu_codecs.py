"""The fused CPU kernel steps compressed first moments (`StoredMomentum`) itself: its codes,
scales and bf16 bits are those of the decoded path (`step_with_decoded(reference_adam_mini)`),
bit for bit, on every layout kind; its parameters agree to rounding.

The widths are chosen around the codecs' chunk of 256: rows wider than a chunk with a short last
chunk, rows narrower than a chunk, odd widths (an int4 row ending in half a byte).
"""

from __future__ import annotations

import copy

import pytest
import torch

import blockopt
from blockopt.kernels.adam_mini import cpu, decoded, fused
from blockopt.kernels.adam_mini.layout import kernel_args, kernel_layouts
from blockopt.kernels.adam_mini.reference import reference_adam_mini
from blockopt.kernels.codecs import BFloat16Rounding, ChunkQuantized, StoredMomentum, codec
from blockopt.partition import BlockSpec, Plan

from tests.optim.conftest import batches, make_tiny, train

CODECS = ["bfloat16", "int8", "int4"]
HYPER = dict(lr=0.02, beta1=0.9, beta2=0.95, eps=1e-8, maximize=False)

# (shape, block_dims, segments): every layout kind the kernel takes, around the chunk of 256
LAYOUTS = [
    ((5, 600), (0,), ((5, 1),)),  # rows: 3 chunks a row, the last 88 wide
    ((12, 37), (0,), ((12, 3),)),  # heads of 3 rows of 37 (rows narrower than a chunk, odd)
    ((9, 300), (1,), ((300, 1),)),  # columns of an (in, out) weight (outer > 1)
    ((7, 3 * 101), (1,), ((101, 1), (101, 1), (101, 1))),  # fused c_attn columns
    ((3 * 4, 513), (0,), ((4, 2), (4, 4), (4, 1))),  # fused qkv rows
    ((6, 301), (), ((1, 1),)),  # whole
    ((1000,), (), ((1, 1),)),  # whole vector
    ((6, 333), (0, 1), ((6 * 333, 1),)),  # per coordinate
    ((777,), (0,), ((777, 1),)),  # per-coordinate vector
    ((3, 4, 70), (0, 1), ((12, 1),)),  # experts: one block per expert row, 4 blocks a chunk
    ((3, 5, 99), (0, 1), ((15, 3),)),  # blocks of three expert rows: some cross a chunked row
    ((3, 4, 300), (0,), ((3, 1),)),  # one block per expert
    ((2, 6, 130), (1,), ((6, 1),)),  # a middle block dim: layout rows of 130 in a chunked row of 780
    ((3, 4, 5), (0, 2), ((15, 1),)),  # non-adjacent block dims: left to the batched path
]
SPECS = [BlockSpec(name=f"p{k}", shape=s, rule="heads", reason="test", block_dims=d, segments=g)
         for k, (s, d, g) in enumerate(LAYOUTS)]


@pytest.fixture(scope="module", autouse=True)
def fused_kernel():
    if not cpu.available():
        pytest.skip("the fused CPU kernel could not be built here (no compiler or ninja)")


def _problem(dtype, specs, seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s.shape, generator=gen).to(dtype) for s in specs]
    grads = [[torch.randn(s.shape, generator=gen).to(dtype) for s in specs] for _ in range(steps)]
    return params, grads


def _state(name, params, specs):
    """Fresh copies of the parameters, zero compressed momenta, second moments and step counts.
    (Some momenta are shards of a larger tensor, starting at an offset in it.)"""
    return ([p.clone() for p in params],
            [StoredMomentum(name, codec(name).storage(tuple(p.shape), "cpu"), salt=1000 + k, offset=(k % 3) * 2**31 // 3)
             for k, p in enumerate(params)],
            [torch.zeros(s.n_blocks) for s in specs],
            [torch.tensor(0.0) for _ in params])


def _step(implementation, state, grads, specs):
    params, momenta, exp_avg_sqs, steps = state
    hyper = dict(HYPER, weight_decays=[0.1 * (k % 2) for k in range(len(params))])
    if implementation == "fused":
        fused.fused_adam_mini(params, grads, momenta, exp_avg_sqs, steps, specs, **hyper)
    else:
        decoded.step_with_decoded(reference_adam_mini, params, grads, momenta, exp_avg_sqs, steps, specs, **hyper)


def _assert_same_steps(name, dtype, specs, params, grads):
    ours, ref = _state(name, params, specs), _state(name, params, specs)
    for step_grads in grads:
        _step("fused", ours, step_grads, specs)
        _step("reference", ref, step_grads, specs)
    for spec, p, m, v, p_ref, m_ref, v_ref in zip(specs, *ours[:3], *ref[:3]):
        where = f"{spec.name} {spec.shape} {spec.block_dims} {spec.segments}"
        for stored, stored_ref in zip(m.stored, m_ref.stored):
            assert torch.equal(stored, stored_ref), where
        assert m.stored[0].float().abs().max() > 0, where  # the momentum went somewhere
        # p: the block sums of g^2 are summed in another order (a last-bit difference, one
        # rounding of a bf16 p at most); v likewise
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(p, p_ref, rtol=ulp, atol=1e-6, msg=where)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=0, msg=where)


def _spy_on_the_decoded_path(monkeypatch) -> list:
    """The shapes `fused` hands to the decoded batched step (what no kernel took)."""
    handed_over, original = [], fused.step_with_decoded

    def spy(step, params, *args, **kwargs):
        handed_over.extend(tuple(p.shape) for p in params)
        original(step, params, *args, **kwargs)

    monkeypatch.setattr(fused, "step_with_decoded", spy)
    return handed_over


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CODECS)
def test_codes_equal_the_decoded_path_on_every_layout(name, dtype, monkeypatch):
    handed_over = _spy_on_the_decoded_path(monkeypatch)
    params, grads = _problem(dtype, SPECS)
    _assert_same_steps(name, dtype, SPECS, params, grads)
    assert handed_over == [LAYOUTS[-1][0]] * len(grads)  # the kernel took everything else


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_large_tensors_split_across_threads(name):
    """Tensors cut into many tasks: blocks grouped into tasks that end at chunks, column sums from
    several chunks of rows then updates in chunk-aligned ranges, long per-coordinate runs."""
    layouts = [((400, 300), (0,), ((400, 1),)), ((1100, 301), (1,), ((301, 1),)), ((300, 333), (0, 1), ((99900, 1),)),
               ((70000,), (0,), ((70000, 1),)), ((40, 20, 130), (0, 1), ((800, 1),))]
    specs = [BlockSpec(name=f"q{k}", shape=s, rule="heads", reason="test", block_dims=d, segments=g)
             for k, (s, d, g) in enumerate(layouts)]
    params, grads = _problem(torch.float32, specs, steps=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _assert_same_steps(name, torch.float32, specs, params, grads)
    finally:
        torch.set_num_threads(threads)


def test_the_codecs_are_those_the_kernel_is_written_for():
    """The C++ codecs hard-code these definitions: a change here must change the kernel too."""
    assert cpu.KERNEL_CODECS == {"bfloat16": 1, "int8": 2, "int4": 3}
    assert codec("int8") == ChunkQuantized(bits=8, chunk=256, power=2, stochastic=True)
    assert codec("int4") == ChunkQuantized(bits=4, chunk=256, power=2, stochastic=True)
    assert isinstance(codec("bfloat16"), BFloat16Rounding)


def test_float64_parameters_leave_compressed_momenta_to_the_decoded_path():
    """m's working dtype is float64 for float64 parameters: the kernel computes compressed m in float32 only."""
    spec = SPECS[0]
    params, grads = _problem(torch.float64, [spec])
    params, momenta, v, steps = _state("int8", params, [spec])
    left = cpu.step(params, grads[0], momenta, v, steps, kernel_layouts([spec]), lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8,
                    weight_decays=[0.0], maximize=False)
    assert left == [0] and steps[0].item() == 0


def test_a_bad_input_raises_before_any_tensor_is_touched():
    specs = SPECS[:2]
    params, grads = _problem(torch.float32, specs)
    params, momenta, v, steps = _state("int8", params, specs)
    _step("fused", (params, momenta, v, steps), grads[0], specs)  # codes and scales that are not zero
    before = [t.clone() for t in (*params, *momenta[0].stored, *momenta[1].stored, *v, *steps)]

    def call(scales, codec_number=2):
        torch.ops.blockopt.adam_mini_step(
            params, grads[1], [m.stored[0] for m in momenta], v, steps, *kernel_args(kernel_layouts(specs)),
            torch.tensor(0.01, dtype=torch.float64), 0.9, 0.95, 1e-8, [0.0, 0.0], False, codec_number, scales,
            [1, 2], [0, 0], [0, 0])

    good_scales = [m.stored[1] for m in momenta]
    with pytest.raises(RuntimeError, match="compressed first moment of tensor 1"):
        call([good_scales[0], good_scales[1][:-1]])  # a row of scales short for tensor 1
    with pytest.raises(RuntimeError, match="compressed first moment of tensor 0"):
        call(good_scales, codec_number=3)  # int8 codes handed in as int4
    with pytest.raises(RuntimeError, match="momentum_codec must be"):
        call(good_scales, codec_number=7)
    after = (*params, *momenta[0].stored, *momenta[1].stored, *v, *steps)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", CODECS)
def test_fused_compressed_momentum_resumes_bit_identically(name):
    data = batches(6)
    full_model = make_tiny(torch.float32)
    full = blockopt.AdamMini(full_model, lr=1e-2, momentum_dtype=name, implementation="fused")
    train(full_model, full, data)
    model = make_tiny(torch.float32)
    first = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=name, implementation="fused")
    train(model, first, data[:3])
    resumed = blockopt.AdamMini(model, lr=1e-2, momentum_dtype=name, implementation="fused")
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    train(model, resumed, data[3:])
    for (param_name, a), b in zip(model.named_parameters(), full_model.parameters()):
        assert torch.equal(a, b), param_name
        for key, value in full.state[b].items():
            assert torch.equal(resumed.state[a][key], value), (param_name, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_momentum_of_low_precision_parameters_is_stepped_by_the_kernel(dtype, monkeypatch):
    """momentum_dtype="float32" with bf16/fp16 parameters: m stays float32, p is rounded once, as
    the reference computes it (the block sums of g^2 in another order: p to one rounding)."""
    handed_over = _spy_on_the_decoded_path(monkeypatch)
    params, grads = _problem(dtype, SPECS)
    results = {}
    for implementation in ("fused", "reference"):
        tensors = [p.clone().requires_grad_(True) for p in params]
        opt = blockopt.AdamMini([(s.name, t) for s, t in zip(SPECS, tensors)], lr=0.02, betas=(0.9, 0.95),
                                weight_decay=0.1, plan=Plan(SPECS), momentum_dtype="float32",
                                implementation=implementation)
        for step_grads in grads:
            for t, g in zip(tensors, step_grads):
                t.grad = g.clone()
            opt.step()
        results[implementation] = [(t, opt.state[t]["exp_avg"]) for t in tensors]
    assert handed_over == [LAYOUTS[-1][0]] * len(grads)
    for spec, (p, m), (p_ref, m_ref) in zip(SPECS, *results.values()):
        assert p.dtype == dtype and m.dtype == torch.float32
        torch.testing.assert_close(p, p_ref, rtol=torch.finfo(dtype).eps, atol=1e-6, msg=spec.name)
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7, msg=spec.name)
