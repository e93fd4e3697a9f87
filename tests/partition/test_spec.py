"""`BlockSpec`: layouts as data. Every expected index here is built by plain loops over the
tensor's entries, from the layout's numbers, never with the spec's own helpers."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from blockopt.partition import BlockSpec, make_spec


def build_index(shape, fn) -> torch.Tensor:
    """LongTensor of ``shape`` whose entry at ``pos`` is ``fn(*pos)`` (row-major loop)."""
    flat = [fn(*pos) for pos in itertools.product(*(range(n) for n in shape))]
    return torch.tensor(flat, dtype=torch.long).view(shape)


def fused_qkv_col(c: int) -> int:
    """Shape (8, 24), block_dims=(1,), segments ((8,2),(8,2),(8,1)): 4 q heads of 2 columns,
    4 k heads of 2 columns, then 8 single value columns."""
    if c < 8:
        return c // 2
    if c < 16:
        return 4 + (c - 8) // 2
    return 8 + (c - 16)


def uneven_3d(a: int, b: int, c: int) -> int:
    """Shape (2, 3, 4), block_dims=(0, 1), segments ((2, 2), (4, 1)): unit u = 3a + b; the first
    two units form one block, the remaining four are one block each."""
    u = 3 * a + b
    return 0 if u < 2 else 1 + (u - 2)


# (id, spec factory, expected block id of entry pos, expected n_blocks)
CASES = [
    ("rows", lambda: make_spec("w", (5, 3), "rows", "r"), lambda i, j: i, 5),
    ("cols", lambda: make_spec("w", (5, 3), "cols", "r"), lambda i, j: j, 3),
    ("heads", lambda: make_spec("w", (8, 3), "heads", "r", n_heads=4), lambda i, j: i // 2, 4),
    ("heads-dim1", lambda: make_spec("w", (3, 8), "heads", "r", n_heads=2, neuron_dim=1), lambda i, j: j // 4, 2),
    ("whole", lambda: make_spec("w", (5, 3), "whole", "r"), lambda i, j: 0, 1),
    ("coordinate", lambda: make_spec("w", (5, 3), "coordinate", "r"), lambda i, j: 3 * i + j, 15),
    ("coordinate-1d", lambda: make_spec("b", (7,), "coordinate", "r"), lambda i: i, 7),
    ("whole-1d", lambda: make_spec("g", (7,), "whole", "r"), lambda i: 0, 1),
    ("scalar", lambda: make_spec("s", (), "coordinate", "r"), lambda: 0, 1),
    ("rows-4d", lambda: make_spec("conv", (4, 3, 2, 2), "rows", "r"), lambda o, i, h, w: o, 4),
    ("coordinate-3d", lambda: make_spec("t", (2, 3, 4), "coordinate", "r"), lambda a, b, c: 12 * a + 4 * b + c, 24),
    (
        "fused-3-segments",
        lambda: BlockSpec(name="qkv", shape=(8, 24), rule="heads", reason="r", block_dims=(1,),
                          segments=((8, 2), (8, 2), (8, 1))),
        lambda i, c: fused_qkv_col(c),
        16,
    ),
    (
        "3d-dims01",
        lambda: BlockSpec(name="experts", shape=(2, 3, 4), rule="rows", reason="r", block_dims=(0, 1),
                          segments=((6, 1),)),
        lambda a, b, c: 3 * a + b,
        6,
    ),
    (
        "3d-dims01-uneven",
        lambda: BlockSpec(name="experts", shape=(2, 3, 4), rule="heads", reason="r", block_dims=(0, 1),
                          segments=((2, 2), (4, 1))),
        uneven_3d,
        5,
    ),
    (
        "3d-dims02",
        lambda: BlockSpec(name="t", shape=(2, 3, 4), rule="rows", reason="r", block_dims=(0, 2),
                          segments=((8, 1),)),
        lambda a, b, c: 4 * a + c,
        8,
    ),
]
IDS = [c[0] for c in CASES]


def _case(case):
    _, factory, fn, n_blocks = case
    spec = factory()
    return spec, build_index(spec.shape, fn), n_blocks


def _loop_sums(x: torch.Tensor, idx: torch.Tensor, n_blocks: int):
    sums, counts = [0.0] * n_blocks, [0] * n_blocks
    for pos in itertools.product(*(range(n) for n in x.shape)):
        b = int(idx[pos])
        sums[b] += float(x[pos])
        counts[b] += 1
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_index_and_n_blocks(case):
    spec, expected, n_blocks = _case(case)
    assert spec.n_blocks == n_blocks
    idx = spec.block_index()
    assert idx.dtype == torch.long
    assert idx.shape == torch.Size(spec.shape)
    assert torch.equal(idx, expected)
    assert sorted(set(idx.reshape(-1).tolist())) == list(range(n_blocks))  # every block used


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_block_sum_and_mean_match_loop(case, contiguous):
    spec, expected, n_blocks = _case(case)
    g = torch.Generator().manual_seed(1)
    shape = spec.shape
    if contiguous or len(shape) == 0:
        x = torch.randn(shape, dtype=torch.float64, generator=g)
    elif len(shape) == 1:  # every other element of a longer vector
        x = torch.randn(2 * shape[0], dtype=torch.float64, generator=g)[::2]
        assert not x.is_contiguous()
    else:  # same values pattern, transposed storage: a step may see non-contiguous grads
        x = torch.randn(tuple(reversed(shape)), dtype=torch.float64, generator=g).permute(*reversed(range(len(shape))))
        assert not x.is_contiguous()
    sums, counts = _loop_sums(x, expected, n_blocks)
    got = spec.block_sum(x)
    assert got.shape == (n_blocks,)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spec.block_mean(x), sums / counts, rtol=1e-12, atol=1e-12)
    numel = torch.as_tensor(spec.block_numel(x), dtype=torch.float64)
    torch.testing.assert_close(torch.broadcast_to(numel, (n_blocks,)), counts)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expand_broadcasts_to_vals_at_block_index(case):
    spec, expected, n_blocks = _case(case)
    vals = torch.arange(n_blocks, dtype=torch.float64) * 1.5 - 7.0
    out = spec.expand(vals)
    assert out.dim() == len(spec.shape)
    for d, n in enumerate(spec.shape):  # reduced dims stay size 1: no full-size copy
        assert out.shape[d] in (1, n)
    assert torch.equal(torch.broadcast_to(out, spec.shape), vals[expected])


def test_block_mean_of_constant_is_constant_for_uneven_segments():
    spec = BlockSpec(name="qkv", shape=(8, 24), rule="heads", reason="r", block_dims=(1,),
                     segments=((8, 2), (8, 2), (8, 1)))
    x = torch.full((8, 24), 3.0, dtype=torch.float64)
    # block sizes differ (16 entries for heads, 8 for value columns); the mean must not
    torch.testing.assert_close(spec.block_mean(x), torch.full((16,), 3.0, dtype=torch.float64))
    assert spec.block_sizes == (16, 16, 8)


def test_with_rule_changes_layout_and_keeps_identity():
    spec = BlockSpec(name="qkv", shape=(8, 24), rule="heads", reason="r", role="qkv", block_dims=(1,),
                     segments=((8, 2), (8, 2), (8, 1)), aliases=("other",), n_heads=4)
    coord = spec.with_rule("coordinate", reason="user")
    assert (coord.name, coord.role, coord.aliases, coord.shape) == ("qkv", "qkv", ("other",), (8, 24))
    assert coord.rule == "coordinate" and coord.n_heads is None
    assert coord.n_blocks == 8 * 24
    assert torch.equal(coord.block_index(), build_index((8, 24), lambda i, j: 24 * i + j))
    whole = spec.with_rule("whole", reason="user")
    assert whole.n_blocks == 1 and torch.equal(whole.block_index(), torch.zeros(8, 24, dtype=torch.long))


def test_spec_is_frozen_and_hashable():
    spec = make_spec("w", (4, 2), "rows", "r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rule = "whole"
    assert spec == make_spec("w", (4, 2), "rows", "r")
    assert hash(spec) == hash(make_spec("w", (4, 2), "rows", "r"))
    assert spec != make_spec("w", (4, 2), "cols", "r")


# ---- invalid layouts ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "segments",
    [((8, 2), (8, 2)), ((8, 2), (8, 2), (16, 1)), ((24, 1), (8, 1))],
    ids=["short", "long", "long2"],
)
def test_segments_not_covering_raise(segments):
    with pytest.raises(ValueError, match=r"bad\.qkv"):
        BlockSpec(name="bad.qkv", shape=(8, 24), rule="heads", reason="r", block_dims=(1,), segments=segments)


@pytest.mark.parametrize("segments", [((8, 3), (8, 2), (8, 1)), ((8, 0), (16, 1))], ids=["uneven", "zero"])
def test_segment_not_splitting_evenly_raises(segments):
    with pytest.raises(ValueError, match=r"bad\.qkv"):
        BlockSpec(name="bad.qkv", shape=(8, 24), rule="heads", reason="r", block_dims=(1,), segments=segments)


@pytest.mark.parametrize("block_dims", [(2,), (-1,), (1, 0), (0, 0)], ids=["out-of-range", "negative", "unsorted", "dup"])
def test_bad_block_dims_raise(block_dims):
    with pytest.raises(ValueError, match=r"bad\.w.*block_dims"):
        BlockSpec(name="bad.w", shape=(4, 6), rule="rows", reason="r", block_dims=block_dims, segments=((24, 1),))


def test_heads_not_dividing_names_parameter_and_count():
    with pytest.raises(ValueError, match=r"n_heads=3.*blk\.q\.weight|blk\.q\.weight.*n_heads=3"):
        make_spec("blk.q.weight", (10, 4), "heads", "r", n_heads=3)


def test_heads_without_count_raises():
    with pytest.raises(ValueError, match=r"blk\.q\.weight.*n_heads"):
        make_spec("blk.q.weight", (8, 4), "heads", "r")


def test_unknown_rule_and_role_raise():
    with pytest.raises(ValueError, match="diagonal"):
        make_spec("w", (4, 4), "diagonal", "r")
    with pytest.raises(ValueError, match="diagonal"):
        BlockSpec(name="w", shape=(4, 4), rule="diagonal", reason="r", block_dims=(0,), segments=((4, 1),))
    with pytest.raises(ValueError, match="weird"):
        make_spec("w", (4, 4), "rows", "r", role="weird")


def test_cols_on_vector_raises_naming_parameter():
    with pytest.raises(ValueError, match=r"vec\.bias"):
        make_spec("vec.bias", (5,), "cols", "r")
