"""Random specs of every layout kind the step implementations know, with odd sizes (partial
vector packs), and a problem (parameters and gradients) over them."""

from __future__ import annotations

import random

import torch

from blockopt.partition import BlockSpec


def random_layouts(rng: random.Random) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """(shape, block_dims, segments) for every kind of layout, with odd sizes (partial vector packs)."""
    rows, cols, heads = rng.choice([6, 12, 20]), rng.choice([5, 24, 37]), rng.choice([1, 2, 3, 6])
    e, out, inp = rng.choice([2, 3]), rng.choice([4, 6]), rng.choice([3, 17])
    n = rng.choice([1, 7, 40])
    return [
        ((rows, cols), (0,), ((rows, 1),)),  # rows
        ((rows, cols), (1,), ((cols, 1),)),  # cols: neurons of an (in, out) Conv1D weight
        ((rows, cols), (0,), ((rows, rows // heads),)),  # heads
        ((rows, cols), (), ((1, 1),)),  # whole
        ((n,), (), ((1, 1),)),  # whole vector (norm scale)
        ((rows, cols), (0, 1), ((rows * cols, 1),)),  # coordinate
        ((n,), (0,), ((n, 1),)),  # coordinate vector (bias)
        ((3 * rows, cols), (0,), ((rows, rows // heads), (rows, rows // heads), (rows, 1))),  # fused qkv rows
        ((rows, 3 * cols), (1,), ((cols, 1), (cols, 1), (cols, 1))),  # fused c_attn columns
        ((rows, 8 + cols), (1,), ((4, 2), (4, 4), (cols, 1))),  # grouped columns + per-column tail
        ((e, out, inp), (0, 1), ((e * out, 1),)),  # experts: one block per expert row
        ((e, out, inp), (0,), ((e, 1),)),  # one block per expert
        ((e, out, inp), (1,), ((out, 1),)),  # a middle block dim: every expert holds a piece of each block
        ((e, out, inp), (0, 2), ((e * inp, 1),)),  # non-adjacent block dims (the kernel leaves it to batched)
    ]


def make_problem(seed: int, dtype=torch.float64):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    specs, params = [], []
    for k, (shape, block_dims, segments) in enumerate(random_layouts(rng)):
        specs.append(BlockSpec(name=f"p{k}", shape=shape, rule="heads", reason="test", block_dims=block_dims, segments=segments))
        params.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params] for _ in range(4)]
    return specs, params, grads
