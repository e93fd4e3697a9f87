"""The fused CUDA step of Adam-mini: Triton kernels over whole param groups.

A step of one param group runs at most three kernel launches per parameter dtype, whatever the
number of tensors (``triton_kernels``: one for contiguous blocks, one for column blocks, one for
per-coordinate tensors). Each reads a block's g twice (sum of squares, then the update) in one
program, so the second read comes from cache: the step moves about 5 tensors' worth of bytes per
coordinate where AdamW moves 7 (DESIGN §5).

Needs ``triton`` (it ships with PyTorch's CUDA wheels on Linux). Without it, one warning is shown
and CUDA tensors step batched. The kernels' correctness is tested on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``); see ``tests/optim/test_fused_cuda.py``.

Note [which tensors the CUDA kernels take]: dense contiguous tensors of float32, float64,
bfloat16 or float16 (gradient and first moment alike; second moments in the statistics dtype) on
one device, whose layout a kernel knows (`KernelLayout`). Column blocks wider than
`MAX_TILE_COLUMNS` columns, and contiguous blocks of more than `MAX_BLOCK_ELEMENTS` elements (a
block is one program, which would run alone for long), are left to the batched path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections import defaultdict

import torch
from torch import Tensor

from .layout import KernelLayout, kernel_args
from .. import stat_dtype

TILE_COLUMNS = 64  # column blocks are packed into tiles of about this many columns
MAX_TILE_COLUMNS = 128  # a column tile is held in registers: wider blocks go batched
MAX_BLOCK_ELEMENTS = 1 << 22  # a contiguous block is one program: larger ones go batched
BLOCK = 1024  # elements per vector operation in the blocks and coordinates kernels
CHUNK = 1 << 16  # elements per program of the coordinates kernel
_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def kernels():
    """The `triton_kernels` module, or ``None`` (after one warning) where Triton is missing."""
    try:
        return importlib.import_module(f"{__package__}.triton_kernels")
    except Exception as error:  # not installed, or an install that does not load
        warnings.warn(
            f"blockopt: the fused CUDA Adam-mini step needs Triton ({type(error).__name__}: {error}); "
            "CUDA tensors step with the batched implementation instead. `pip install triton` for the fast path.",
            RuntimeWarning, stacklevel=3,
        )
        return None


def handles(p: Tensor) -> bool:
    return p.is_cuda


def step(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, *, lr, beta1, beta2, eps, weight_decays, maximize) -> list[int]:
    """Steps every tensor the kernels take (Note [which tensors the CUDA kernels take]); returns
    the positions of the others, for the caller to step another way. Tensors may be on any
    device the kernels run on: CUDA, or the CPU when Triton interprets them."""
    if not available():
        return list(range(len(params)))
    take, left = [], []
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, layouts)):
        (take if _fits(*tensors) else left).append(i)
    if take:
        def pick(xs):
            return [xs[i] for i in take]

        lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
        triton_step(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), *kernel_args(pick(layouts)),
                    lr, beta1, beta2, eps, [float(wd) for wd in pick(weight_decays)], maximize)
    return left


# Note [built before tracing], as for the CPU kernel: Triton is imported while a step is traced.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether Triton is here to run the kernels."""
    return kernels() is not None


# Note [the CUDA step as a custom op]: the kernels read tensors through a table of their addresses
# and their coefficients from the step counts, neither of which a traced graph can hold; as one
# opaque op that declares what it writes, a compiled step calls them as the eager one does.
@torch.library.custom_op("blockopt::adam_mini_triton_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def triton_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], outer: list[int], inner: list[int], n_segments: list[int], segments: list[int],
                lr: Tensor, beta1: float, beta2: float, eps: float, weight_decays: list[float], maximize: bool) -> None:
    """The Triton launches for tensors `_fits` accepted; layouts as `layout.kernel_args` gives them."""
    k = kernels()
    layouts, first = [], 0
    for o, i, count in zip(outer, inner, n_segments):
        layouts.append(_layout(o, i, tuple(zip(segments[first:first + 2 * count:2], segments[first + 1:first + 2 * count:2]))
                               if count else None))
        first += 2 * count
    lr = lr.item()
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[p.device, p.dtype].append(i)
    for (device, dtype), idx in groups.items():
        picked_steps = [steps[i] for i in idx]
        torch._foreach_add_(picked_steps, 1)
        coeffs = [_coefficients(lr, beta1, beta2, eps, weight_decays[i], s.item()) for i, s in zip(idx, picked_steps)]
        math_dtype = stat_dtype(params[idx[0]])
        ptrs = torch.tensor(
            [[params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr()] for i in idx],
            dtype=torch.int64,
        ).to(device)
        coeffs = torch.tensor(coeffs, dtype=math_dtype).to(device)
        work = _work_items(tuple(layouts[i] for i in idx), tuple(params[i].numel() for i in idx), device)
        kinds = dict(DTYPE=_tl_dtype(k, dtype), MATH=_tl_dtype(k, math_dtype), MAXIMIZE=bool(maximize))
        # Triton launches on the current CUDA device: make it the tensors' own
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if work.blocks is not None:
                k.blocks_kernel[(work.blocks.shape[0],)](ptrs, coeffs, work.blocks, BLOCK=BLOCK, **kinds)
            if work.columns is not None:
                cols = work.tile_columns
                k.columns_kernel[(work.columns.shape[0],)](
                    ptrs, coeffs, work.columns, work.column_blocks, ROWS=max(1, 4096 // cols), COLS=cols,
                    num_warps=8 if cols > 64 else 4, **kinds,
                )
            if work.coordinates is not None:
                k.coordinates_kernel[(work.coordinates.shape[0],)](ptrs, coeffs, work.coordinates, BLOCK=BLOCK, **kinds)


@triton_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, outer, inner, n_segments, segments, lr, beta1, beta2, eps,
      weight_decays, maximize) -> None:
    return None


@functools.lru_cache(maxsize=None)
def _layout(outer: int, inner: int, segments: tuple | None) -> KernelLayout:
    """One layout object per layout, so that `_work_items` finds the work lists it made before."""
    n_blocks = None if segments is None else sum(units // per_block for units, per_block in segments)  # (unused per coordinate)
    return KernelLayout(outer, inner, segments, n_blocks)


def _fits(p: Tensor, g: Tensor, m: Tensor, v: Tensor, layout: KernelLayout | None) -> bool:
    if layout is None or p.dtype not in _SUPPORTED or not isinstance(m, Tensor):
        return False
    if layout.segments is not None:
        widest = max(units_per_block for _, units_per_block in layout.segments) * layout.inner
        if widest > (MAX_TILE_COLUMNS if layout.outer > 1 else MAX_BLOCK_ELEMENTS):
            return False
    like_p = all(t.dtype == p.dtype and t.shape == p.shape and t.device == p.device for t in (g, m))
    dense = all(t.layout == torch.strided and t.is_contiguous() for t in (p, g, m, v))  # (real dtypes: no neg/conj views)
    return like_p and dense and v.dtype == stat_dtype(p) and v.device == p.device


def _coefficients(lr, beta1, beta2, eps, weight_decay, step) -> list[float]:
    """A row of ``coeffs`` (see `triton_kernels.N_COEFFS`), as the reference computes them."""
    return [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps, -lr / (1 - beta1**step), 0.0]


def _tl_dtype(k, dtype: torch.dtype):
    return {torch.float32: k.tl.float32, torch.float64: k.tl.float64, torch.bfloat16: k.tl.bfloat16, torch.float16: k.tl.float16}[dtype]


class _WorkItems:
    """The kernels' work lists for one list of layouts (int64 tensors on the device, ``None``
    where a kernel has nothing to do). They depend only on the layouts, so they are cached."""

    __slots__ = ("blocks", "columns", "column_blocks", "tile_columns", "coordinates")


@functools.lru_cache(maxsize=64)
def _work_items(layouts: tuple[KernelLayout, ...], numels: tuple[int, ...], device: torch.device) -> _WorkItems:
    blocks, columns, column_blocks, coordinates = [], [], [], []
    tile_columns, column_offset = 1, 0
    for t, (layout, numel) in enumerate(zip(layouts, numels)):
        if layout.bounds is None:  # per coordinate: chunks of CHUNK elements
            starts = torch.arange(0, numel, CHUNK, dtype=torch.int64)
            ends = (starts + CHUNK).clamp_(max=numel)
            coordinates.append(torch.stack([torch.full_like(starts, t), starts, ends], dim=1))
            continue
        edges = layout.bounds * layout.inner  # block b: columns edges[b]:edges[b + 1] of (outer, width)
        n_blocks = edges.numel() - 1
        if layout.outer == 1:  # one program per block
            index = torch.arange(n_blocks, dtype=torch.int64)
            blocks.append(torch.stack([torch.full_like(index, t), edges[:-1], edges[1:], index], dim=1))
            continue
        width = int(edges[-1])
        for lo, hi in _tiles(edges.tolist()):
            columns.append([t, lo, hi, layout.outer, width, column_offset])
            tile_columns = max(tile_columns, hi - lo)
        column_blocks.append(torch.repeat_interleave(torch.arange(n_blocks, dtype=torch.int64), edges[1:] - edges[:-1]))
        column_offset += width

    work = _WorkItems()
    work.blocks = torch.cat(blocks).to(device) if blocks else None
    work.coordinates = torch.cat(coordinates).to(device) if coordinates else None
    work.columns = torch.tensor(columns, dtype=torch.int64).to(device) if columns else None
    work.column_blocks = torch.cat(column_blocks).to(device) if column_blocks else None
    work.tile_columns = max(16, 1 << (tile_columns - 1).bit_length())  # a power of two for tl.arange
    return work


def _tiles(edges: list[int]) -> list[tuple[int, int]]:
    """Column ranges holding whole blocks, each about TILE_COLUMNS wide (a wider block alone)."""
    tiles, lo = [], edges[0]
    for b in range(1, len(edges)):
        last = b + 1 == len(edges)
        if last or edges[b + 1] - lo > TILE_COLUMNS:
            tiles.append((lo, edges[b]))
            lo = edges[b]
    return tiles
