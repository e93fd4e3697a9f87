"""The state codecs: round-trip error bounds, unbiased rounding, seeded bits, storage."""

from __future__ import annotations

import math

import pytest
import torch

from blockopt.kernels.codecs import CODECS, BFloat16Rounding, ChunkQuantized, codec, random_bits, rounding_key, uniforms

QUANTIZED = [ChunkQuantized(bits=b, chunk=c, power=p) for b in (8, 4) for p in (1, 2) for c in (64, 256)]


def heavy_tailed(n, seed=0):
    """Momentum-like values: most small, a few large."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4


def murmur_fmix32(h):
    """The finalizer written out independently on Python ints."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def test_random_bits_are_the_hash_of_the_element_index():
    key = rounding_key(seed=3, step=7, salt=11)
    bits = random_bits(key, 1000).tolist()
    for i in (0, 1, 2, 999):
        assert bits[i] == murmur_fmix32((i * 0x9E3779B1 + key) % 2**32)
    assert random_bits(key, 1000).tolist() == bits  # same key, same bits
    assert random_bits(rounding_key(3, 8, 11), 1000).tolist() != bits  # the next step draws anew


def test_uniforms_cover_the_unit_interval_evenly():
    u = uniforms(rounding_key(0, 1, 0), 200_000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 19 degrees of freedom: p < 1e-4 above 43.8


@pytest.mark.parametrize("c", QUANTIZED, ids=lambda c: f"{c.name}-p{c.power}-chunk{c.chunk}")
def test_quantized_round_trip_stays_within_one_level_spacing(c):
    x = heavy_tailed(1000)  # not a multiple of the chunk: the last chunk is short
    stored = c.encode(x, rounding_key(0, 1, 0))
    assert [tuple(t.shape) for t in stored] == [tuple(t.shape) for t in c.storage(tuple(x.shape), "cpu")]
    y = c.decode(stored, tuple(x.shape))
    scales = torch.stack([chunk.abs().max() for chunk in x.split(c.chunk)])
    L = c.levels
    # x lies between two levels k and k+1; the widest gap is the top one
    widest = (L**c.power - (L - 1) ** c.power) / L**c.power
    bound = torch.repeat_interleave(scales, c.chunk)[: x.numel()] * widest
    assert bool(((y - x).abs() <= bound * (1 + 1e-6)).all())
    # the chunk maxima are levels themselves: stored exactly
    for chunk_x, chunk_y in zip(x.split(c.chunk), y.split(c.chunk)):
        i = chunk_x.abs().argmax()
        assert chunk_y[i] == chunk_x[i]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("power", [1, 2])
def test_values_on_a_level_are_stored_exactly(bits, power):
    c = ChunkQuantized(bits=bits, power=power, chunk=256)  # one chunk: one scale
    L = c.levels
    levels = torch.arange(-L, L + 1, dtype=torch.float32) / L
    x = (levels.abs() ** c.power * levels.sign() * 0.5)  # scale 0.5, every level once
    y = c.decode(c.encode(x, rounding_key(1, 2, 3)), tuple(x.shape))
    torch.testing.assert_close(y, x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(CODECS))
def test_rounding_is_unbiased(name):
    """The mean of many independent roundings is the value (Note [unbiased rounding]): each
    rounding errs by at most one level gap, so the mean of n errs by ~gap/(2 sqrt n)."""
    c = codec(name)
    n = 2000
    chunk = getattr(c, "chunk", 256)
    x = heavy_tailed(chunk, seed=1)
    # n copies in one tensor: the same chunk contents (so the same scale), independent bits
    y = c.decode(c.encode(x.repeat(n), rounding_key(0, 1, 0)), (n * chunk,)).reshape(n, chunk)
    single = (y[0] - x).abs().max()
    assert single > 0  # rounding does happen
    assert float((y.mean(0) - x).abs().max()) < 6 * float(single) / (2 * math.sqrt(n)) + 1e-7


def test_bfloat16_rounding_brackets_and_keeps_bf16_values_and_specials():
    c = BFloat16Rounding()
    x = heavy_tailed(4096) * 1e3
    (stored,) = c.encode(x, rounding_key(0, 1, 0))
    assert stored.dtype == torch.bfloat16
    down = x.to(torch.bfloat16).to(torch.float32)
    y = stored.to(torch.float32)
    # y is one of the two bf16 neighbours of x
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(x.abs()).exponent - 8)
    assert bool(((y - x).abs() <= ulp).all())
    assert bool((y != down).any())  # not round-to-nearest
    exact = down
    assert torch.equal(c.decode(c.encode(exact, 5), tuple(exact.shape)), exact)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    out = c.decode(c.encode(specials, 9), (5,))
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan() and (out[3:] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_chunk_too_small_for_its_reciprocal_rounds_as_any_other(bits):
    """Where ``L**2 / scale`` overflows (a momentum decayed for thousands of steps), ``|x|`` is
    divided by the scale instead (Note [finding the level]): still within a level, the maximum
    exact, unbiased."""
    c = ChunkQuantized(bits=bits)
    x = heavy_tailed(c.chunk, seed=2) * 1e-39  # (subnormal)
    assert math.isinf(float(torch.tensor(float(c.levels**2)) / x.abs().max()))
    n = 2000
    y = c.decode(c.encode(x.repeat(n), rounding_key(0, 1, 0)), (n * c.chunk,)).reshape(n, c.chunk)
    gap = float(x.abs().max()) * (2 * c.levels - 1) / c.levels**2  # the widest gap, the top one
    assert float((y[0] - x).abs().max()) <= gap and y[0][x.abs().argmax()] == x[x.abs().argmax()]
    assert float((y.mean(0) - x).abs().max()) < 3 * gap / math.sqrt(n)


def test_a_zero_chunk_decodes_to_zeros():
    c = ChunkQuantized(bits=8, chunk=64)
    x = torch.cat([torch.zeros(64), heavy_tailed(64)])
    y = c.decode(c.encode(x, 1), (128,))
    assert torch.equal(y[:64], torch.zeros(64))


def test_int4_packs_two_codes_a_byte_with_odd_lengths():
    c = ChunkQuantized(bits=4, chunk=64)
    x = heavy_tailed(65)
    codes, scales = c.encode(x, 3)
    assert codes.dtype == torch.uint8 and codes.numel() == 33 and scales.numel() == 2
    y = c.decode((codes, scales), (65,))
    assert y.shape == (65,) and torch.isfinite(y).all()


def test_bytes_per_element_counts_scales():
    assert ChunkQuantized(bits=8, chunk=256).bytes_per_element() == 1 + 4 / 256
    assert ChunkQuantized(bits=4, chunk=128).bytes_per_element() == 0.5 + 4 / 128
    assert BFloat16Rounding().bytes_per_element() == 2


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        ChunkQuantized(bits=3)
    with pytest.raises(ValueError, match="power must be 1"):
        ChunkQuantized(power=3)
    with pytest.raises(ValueError, match="chunk must be an even number"):
        ChunkQuantized(chunk=7)
    with pytest.raises(ValueError, match="codec must be one of 'bfloat16', 'int8', 'int4', got 'fp8'"):
        codec("fp8")


@pytest.mark.parametrize("c", QUANTIZED, ids=lambda c: f"{c.name}-p{c.power}-chunk{c.chunk}")
def test_a_non_finite_value_costs_its_own_element(c):
    """Note [non-finite momenta]: an inf or nan gets the spare code, which decodes to nan, and its
    chunk's scale and other codes are those of the chunk with the value 0: the rest of the chunk
    (other blocks, maybe) decodes as if it were not there."""
    x = heavy_tailed(3 * c.chunk + 5)
    bad = torch.tensor([3, c.chunk + 1, c.chunk + 2, 3 * c.chunk + 4])
    x_bad = x.clone()
    x_bad[bad] = torch.tensor([float("inf"), -float("inf"), float("nan"), float("inf")])
    x_zero = x.clone()
    x_zero[bad] = 0.0
    (codes, scales), (codes_zero, scales_zero) = c.encode(x_bad, 7), c.encode(x_zero, 7)
    assert torch.equal(scales, scales_zero) and torch.isfinite(scales).all()
    y, y_zero = c.decode((codes, scales), x.shape), c.decode((codes_zero, scales_zero), x.shape)
    assert torch.equal(torch.isnan(y).nonzero().flatten(), bad)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[bad] = False
    assert torch.equal(y[keep], y_zero[keep])
    # a chunk of nothing but non-finite values: scale 0, every element nan
    y_all = c.decode(c.encode(torch.full((c.chunk,), float("inf")), 1), (c.chunk,))
    assert torch.isnan(y_all).all()


@pytest.mark.parametrize("name", list(CODECS))
def test_new_storage_decodes_to_zero(name):
    """(int4's zero codes are 0x88 bytes: a 0 byte is two spare codes.)"""
    c = codec(name)
    for shape in [(7,), (3, 5), (2, 3, 300)]:
        assert torch.equal(c.decode(c.storage(shape, "cpu"), shape), torch.zeros(shape))
