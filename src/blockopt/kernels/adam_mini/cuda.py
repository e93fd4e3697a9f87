"""The fused CUDA step of Adam-mini: Triton kernels over whole param groups.

A step of one param group runs at most three kernel launches per parameter dtype (and storage of
the first moment), whatever the number of tensors (``triton_kernels``: one for contiguous blocks,
one for column blocks, one for per-coordinate tensors; one for compressed first moments). Each
reads a block's g twice (sum of squares, then the update) in one program, so the second read comes
from cache: the step moves about 5 tensors' worth of bytes per
coordinate where AdamW moves 7 (DESIGN §5).

Needs ``triton`` (it ships with PyTorch's CUDA wheels on Linux). Without it, one warning is shown
and CUDA tensors step batched. The kernels' correctness is tested on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``); see ``tests/kernels/test_adam_mini_cuda.py`` and
``tests/kernels/test_adam_mini_cuda_codecs.py``.

Note [which tensors the CUDA kernels take]: dense contiguous tensors of float32, float64,
bfloat16 or float16 (gradient and first moment alike; second moments in the statistics dtype) on
one device, whose layout a kernel knows (`KernelLayout`). Column blocks wider than
`MAX_TILE_COLUMNS` columns, and contiguous blocks of more than `MAX_BLOCK_ELEMENTS` elements (a
block is one program, which would run alone for long), are left to the batched path. A first
moment stored compressed (`StoredMomentum`) is taken on every one of those layouts when its
storage is dense, contiguous and on the parameter's device, and its codec is one of `CODECS`'
(bf16 stochastic rounding, int8/int4 stochastic codes whose chunk is a power of two up to
`MAX_CODEC_CHUNK`); its codes are those `decoded.step_with_decoded` writes (Note [compressed m in
the kernels] in `triton_kernels`). `codec_kernel` steps them chunk by chunk. A block that is
whole chunks is one program and one pass, as in `blocks_kernel`: rows and heads under int8/int4
(chunks run along rows), and under bf16 (one row, chunks of `BFLOAT16_CHUNK`) blocks whose edges
fall on multiples of it. The other blocks' second moments are updated by a launch before (g is
read once more). Each rounding key is computed
inside the custom op from the step count it has just incremented, so a compiled step holds no
Python int of the step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import warnings
from collections import defaultdict

import torch
from torch import Tensor

from .layout import KernelLayout, kernel_args
from .. import stat_dtype
from ..codecs import CODECS, BFloat16Rounding, ChunkQuantized, StoredMomentum, codec, rows_of

TILE_COLUMNS = 64  # column blocks are packed into tiles of about this many columns
MAX_TILE_COLUMNS = 128  # a column tile is held in registers: wider blocks go batched
MAX_BLOCK_ELEMENTS = 1 << 22  # a contiguous block is one program: larger ones go batched
BLOCK = 1024  # elements per vector operation in the blocks and coordinates kernels
CHUNK = 1 << 16  # elements per program of the coordinates and codec kernels
BFLOAT16_CHUNK = 1024  # elements per vector operation of the codec kernel for a bf16 m (no chunks of its own)
MAX_CODEC_CHUNK = 1 << 13  # a codec chunk is one vector operation of the codec kernel
_CODEC_NAMES = tuple(CODECS)  # the custom op names a StoredMomentum's codec by its position here (-1: plain m)
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

        momenta = pick(exp_avgs)
        stored = [m for m in momenta if isinstance(m, StoredMomentum)]
        if stored:  # the op takes a compressed m's storage tensors and what makes its rounding keys
            codecs = [_CODEC_NAMES.index(m.codec) if isinstance(m, StoredMomentum) else -1 for m in momenta]
            momenta = [m.stored[0] if isinstance(m, StoredMomentum) else m for m in momenta]
        else:
            codecs = [-1] * len(momenta)
        lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
        triton_step(pick(params), pick(grads), momenta, pick(exp_avg_sqs), pick(steps), *kernel_args(pick(layouts)), lr,
                    beta1, beta2, eps, [float(wd) for wd in pick(weight_decays)], maximize, codecs,
                    [m.stored[1] for m in stored if len(m.stored) > 1], [m.salt for m in stored], [m.seed for m in stored],
                    [m.offset for m in stored])
    return left


# Note [built before tracing], as for the CPU kernel: Triton is imported while a step is traced.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether Triton is here to run the kernels."""
    return kernels() is not None


# Note [the CUDA step as a custom op]: the kernels read tensors through a table of their addresses
# and their coefficients from the step counts, neither of which a traced graph can hold; as one
# opaque op that declares what it writes, a compiled step calls them as the eager one does.
@torch.library.custom_op("blockopt::adam_mini_triton_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "momentum_scales"))
def triton_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], outer: list[int], inner: list[int], n_segments: list[int], segments: list[int],
                lr: Tensor, beta1: float, beta2: float, eps: float, weight_decays: list[float], maximize: bool,
                codecs: list[int], momentum_scales: list[Tensor], salts: list[int], seeds: list[int],
                offsets: list[int]) -> None:
    """The Triton launches for tensors `_fits` accepted; layouts as `layout.kernel_args` gives them.
    ``codecs``: per tensor, -1 where ``exp_avgs`` holds m itself, else the position in `_CODEC_NAMES`
    of the codec whose values (bf16) or codes it holds; the compressed ones, in order, have
    ``momentum_scales`` (int codes only), ``salts``, ``seeds`` and ``offsets`` (`StoredMomentum`'s)."""
    k = kernels()
    layouts, first = [], 0
    for o, i, count in zip(outer, inner, n_segments):
        layouts.append(_layout(o, i, tuple(zip(segments[first:first + 2 * count:2], segments[first + 1:first + 2 * count:2]))
                               if count else None))
        first += 2 * count
    keyed = iter(zip(salts, seeds, offsets))  # a StoredMomentum without its tensors makes its rounding keys
    compressed = [None if c < 0 else StoredMomentum(_CODEC_NAMES[c], (), *next(keyed)) for c in codecs]
    scales = iter(momentum_scales)
    scale_ptrs = [next(scales).data_ptr() if m is not None and isinstance(codec(m.codec), ChunkQuantized) else 0
                  for m in compressed]
    lr = lr.item()
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[p.device, p.dtype, codecs[i]].append(i)
    for (device, dtype, codec_index), idx in groups.items():
        picked_steps = [steps[i] for i in idx]
        torch._foreach_add_(picked_steps, 1)
        step_counts = [s.item() for s in picked_steps]
        coeffs = [_coefficients(lr, beta1, beta2, eps, weight_decays[i], s) for i, s in zip(idx, step_counts)]
        keys = [0 if compressed[i] is None else compressed[i].key(int(s)) for i, s in zip(idx, step_counts)]
        math_dtype = stat_dtype(params[idx[0]])
        ptrs = torch.tensor(
            [[params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), scale_ptrs[i], key]
             for i, key in zip(idx, keys)],
            dtype=torch.int64,
        ).to(device)
        coeffs = torch.tensor(coeffs, dtype=math_dtype).to(device)
        group_layouts, numels = tuple(layouts[i] for i in idx), tuple(params[i].numel() for i in idx)
        m_codec = None if codec_index < 0 else codec(_CODEC_NAMES[codec_index])
        if m_codec is not None:  # the blocks codec_kernel does not step whole have their v updated first
            chunks = _codec_items(group_layouts, tuple(tuple(params[i].shape) for i in idx), m_codec, device)
            group_layouts = tuple(layout if first else None for layout, first in zip(group_layouts, chunks.statistics_first))
        work = _work_items(group_layouts, numels, device)
        kinds = dict(DTYPE=_tl_dtype(k, dtype), MATH=_tl_dtype(k, math_dtype), MAXIMIZE=bool(maximize))
        # Triton launches on the current CUDA device: make it the tensors' own
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if work.blocks is not None:
                k.blocks_kernel[(work.blocks.shape[0],)](ptrs, coeffs, work.blocks, BLOCK=BLOCK, UPDATE=m_codec is None,
                                                         **kinds)
            if work.columns is not None:
                cols = work.tile_columns
                k.columns_kernel[(work.columns.shape[0],)](
                    ptrs, coeffs, work.columns, work.column_blocks, ROWS=max(1, 4096 // cols), COLS=cols,
                    UPDATE=m_codec is None, num_warps=8 if cols > 64 else 4, **kinds,
                )
            if m_codec is not None:
                k.codec_kernel[(chunks.items.shape[0],)](
                    ptrs, coeffs, chunks.items, chunks.tensors, chunks.segments, BITS=chunks.bits, POWER=chunks.power,
                    CHUNK=chunks.chunk, enable_fp_fusion=False, **kinds,  # (Note [compressed m in the kernels])
                )
            elif work.coordinates is not None:
                k.coordinates_kernel[(work.coordinates.shape[0],)](ptrs, coeffs, work.coordinates, BLOCK=BLOCK, **kinds)


@triton_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, outer, inner, n_segments, segments, lr, beta1, beta2, eps,
      weight_decays, maximize, codecs, momentum_scales, salts, seeds, offsets) -> None:
    return None


@functools.lru_cache(maxsize=None)
def _layout(outer: int, inner: int, segments: tuple | None) -> KernelLayout:
    """One layout object per layout, so that `_work_items` finds the work lists it made before."""
    n_blocks = None if segments is None else sum(units // per_block for units, per_block in segments)  # (unused per coordinate)
    return KernelLayout(outer, inner, segments, n_blocks)


def _fits(p: Tensor, g: Tensor, m: Tensor | StoredMomentum, v: Tensor, layout: KernelLayout | None) -> bool:
    if layout is None or p.dtype not in _SUPPORTED:
        return False
    if layout.segments is not None:
        widest = max(units_per_block for _, units_per_block in layout.segments) * layout.inner
        if widest > (MAX_TILE_COLUMNS if layout.outer > 1 else MAX_BLOCK_ELEMENTS):
            return False
    if isinstance(m, StoredMomentum):
        m_fits, m_tensors = _codec_fits(m, p), m.stored
    else:
        m_fits, m_tensors = _like(m, p), (m,)
    dense = all(t.layout == torch.strided and t.is_contiguous() for t in (p, g, v, *m_tensors))  # (real dtypes: no neg/conj views)
    return m_fits and _like(g, p) and dense and v.dtype == stat_dtype(p) and v.device == p.device


def _like(t: Tensor, p: Tensor) -> bool:
    return t.dtype == p.dtype and t.shape == p.shape and t.device == p.device


def _codec_fits(m: StoredMomentum, p: Tensor) -> bool:
    """Whether `codec_kernel` writes this codec's bits, into storage laid out as the codec's own."""
    c = codec(m.codec)
    if isinstance(c, BFloat16Rounding):
        expected = ((tuple(p.shape), torch.bfloat16),)
    elif isinstance(c, ChunkQuantized) and c.stochastic and c.chunk & (c.chunk - 1) == 0 and c.chunk <= MAX_CODEC_CHUNK:
        codes, scales = c.shapes(tuple(p.shape))
        expected = ((codes, torch.int8 if c.bits == 8 else torch.uint8), (scales, torch.float32))
    else:
        return False
    return len(m.stored) == len(expected) and all(tuple(t.shape) == shape and t.dtype == dtype and t.device == p.device
                                                  for t, (shape, dtype) in zip(m.stored, expected))


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
def _work_items(layouts: tuple[KernelLayout | None, ...], numels: tuple[int, ...], device: torch.device) -> _WorkItems:
    """(A layout of ``None``: nothing to do for that tensor.)"""
    blocks, columns, column_blocks, coordinates = [], [], [], []
    tile_columns, column_offset = 1, 0
    for t, (layout, numel) in enumerate(zip(layouts, numels)):
        if layout is None:
            continue
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


class _CodecItems:
    """`codec_kernel`'s work for one list of layouts and shapes under one codec (see its
    docstring): ``items``, ``tensors`` and ``segments`` (int64 tensors on the device), the
    codec's constants, and per tensor whether its blocks' v must be updated before (blocks the
    kernel does not step whole). Cached, as `_work_items`."""

    __slots__ = ("items", "tensors", "segments", "bits", "power", "chunk", "statistics_first")


@functools.lru_cache(maxsize=64)
def _codec_items(layouts: tuple[KernelLayout, ...], shapes: tuple[tuple[int, ...], ...], m_codec,
                 device: torch.device) -> _CodecItems:
    work = _CodecItems()
    quantized = isinstance(m_codec, ChunkQuantized)
    work.bits, work.power = (m_codec.bits, m_codec.power) if quantized else (16, 1)
    work.chunk = m_codec.chunk if quantized else BFLOAT16_CHUNK
    per_program = max(1, CHUNK // work.chunk)  # chunks
    items, tensors, segments, statistics_first = [], [], [], []
    for t, (layout, shape) in enumerate(zip(layouts, shapes)):
        rows, width = rows_of(shape) if quantized else (1, math.prod(shape))
        n_chunks = -(-width // work.chunk)
        edges = None if layout.segments is None or layout.outer > 1 else layout.bounds * layout.inner
        whole = edges is not None and bool((edges % width % work.chunk == 0).all())
        if whole:  # every block is whole chunks (rows, heads): a program per block, its v in the same pass
            first = edges // width * n_chunks + edges % width // work.chunk
            index = torch.arange(edges.numel() - 1, dtype=torch.int64)
            items.append(torch.stack([torch.full_like(index, t), first[:-1], first[1:], index, edges[1:] - edges[:-1]], dim=1))
        else:
            starts = torch.arange(0, rows * n_chunks, per_program, dtype=torch.int64)
            ends = (starts + per_program).clamp_(max=rows * n_chunks)
            items.append(torch.stack([torch.full_like(starts, t), starts, ends, torch.full_like(starts, -1),
                                      torch.zeros_like(starts)], dim=1))
        statistics_first.append(layout.segments is not None and not whole)
        if layout.segments is None:  # per coordinate
            tensors.append([width, n_chunks, 1, 1, 0, 0])
            continue
        units = sum(n_units for n_units, _ in layout.segments)
        tensors.append([width, n_chunks, units * layout.inner, layout.inner, len(segments), len(layout.segments)])
        first_unit = first_block = 0
        for n_units, per_block in layout.segments:
            segments.append([first_unit, per_block, first_block])
            first_unit += n_units
            first_block += n_units // per_block
    work.statistics_first = tuple(statistics_first)
    work.items = torch.cat(items).to(device)
    work.tensors = torch.tensor(tensors, dtype=torch.int64).to(device)
    work.segments = torch.tensor(segments or [[0, 1, 0]], dtype=torch.int64).to(device)  # (never empty: a pointer)
    return work
