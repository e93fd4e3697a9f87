"""Triton kernels of the fused CUDA Adam-mini step (imported only where ``triton`` is installed).

Each kernel steps many tensors of one dtype in one launch (multi-tensor apply): program ``i``
reads its work item from ``items``, the item names a tensor, and the tensor's pointers and step
coefficients are row ``t`` of ``ptrs`` (int64 addresses of p, g, m, v) and ``coeffs`` (in the
math dtype; its columns are listed at `N_COEFFS`). Math runs in float32 (float64 for float64
parameters) and is rounded once on store, with correctly rounded division and square roots, as ATen does.

- `blocks_kernel`: one program per block whose elements are one contiguous run (rows, heads,
  output neurons, whole tensors, experts). It sums g^2 over the block, updates the block's v,
  then updates the block; the second read of g comes from cache.
- `columns_kernel`: one program per tile of whole column blocks of an ``(outer, width)`` view (the
  neurons of an ``(in, out)`` weight). Pass 1 sums g^2 down the columns, the tile turns column
  sums into block sums in registers, pass 2 updates the tile.
- `coordinates_kernel`: plain Adam (one v per element) over chunks of the per-coordinate tensors.

When interpreted (``TRITON_INTERPRET=1``, set before this module is imported), the same kernels
run on CPU tensors: that is how the tests check them without a GPU.
"""

# (no `from __future__ import annotations`: Triton reads the tl.constexpr annotations)
import triton
import triton.language as tl

# A row of ``coeffs``: 1 - lr wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps,
# -lr / (1 - beta1^t), and one unused slot (rows of 8 keep the offsets shifts).
N_COEFFS = 8


@triton.jit
def _div(a, b, MATH: tl.constexpr):
    """Correctly rounded a / b (Triton's float32 ``/`` and ``tl.sqrt`` are approximate; float64's
    are exact, and the _rn functions take float32 only)."""
    if MATH == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, MATH: tl.constexpr):
    if MATH == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (float32 or float64) rounded to the storage dtype, to nearest even. bfloat16 is rounded
    by hand: Triton's interpreter truncates instead, and the tests run there."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(DTYPE)


@triton.jit
def _tensor(ptrs, t, DTYPE: tl.constexpr, MATH: tl.constexpr):
    p = tl.load(ptrs + 4 * t).to(tl.pointer_type(DTYPE))
    g = tl.load(ptrs + 4 * t + 1).to(tl.pointer_type(DTYPE))
    m = tl.load(ptrs + 4 * t + 2).to(tl.pointer_type(DTYPE))
    v = tl.load(ptrs + 4 * t + 3).to(tl.pointer_type(MATH))
    return p, g, m, v


@triton.jit
def _new_v(v, mean_sq, coeffs, t):
    """v <- beta2 v + (1 - beta2) mean(g^2), as ``v.mul_(beta2).add_(mean, alpha=1 - beta2)``."""
    return v * tl.load(coeffs + 8 * t + 2) + mean_sq * tl.load(coeffs + 8 * t + 3)


@triton.jit
def _denom(v, coeffs, t, MATH: tl.constexpr):
    """sqrt(v) / sqrt(1 - beta2^t) + eps."""
    return _div(_sqrt(v, MATH), tl.load(coeffs + 8 * t + 4), MATH) + tl.load(coeffs + 8 * t + 5)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, offsets, mask, denom, coeffs, t, DTYPE: tl.constexpr, MATH: tl.constexpr,
            MAXIMIZE: tl.constexpr):
    """p <- p (1 - lr wd); m <- lerp(m, g, 1 - beta1); p <- p + step_size m / denom."""
    decay = tl.load(coeffs + 8 * t)
    weight = tl.load(coeffs + 8 * t + 1)
    step_size = tl.load(coeffs + 8 * t + 6)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(MATH)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(MATH)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(MATH)
    if MAXIMIZE:
        g = -g
    p = p * decay
    # torch's lerp: from the nearer end, so that weight 1 gives g exactly
    m = tl.where(weight < 0.5, m + weight * (g - m), g - (g - m) * (1 - weight))
    p = p + step_size * _div(m, denom, MATH)
    tl.store(p_ptr + offsets, _round(p, DTYPE), mask=mask)
    tl.store(m_ptr + offsets, _round(m, DTYPE), mask=mask)


@triton.jit
def blocks_kernel(ptrs, coeffs, items, DTYPE: tl.constexpr, MATH: tl.constexpr, MAXIMIZE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """items: (tensor, first element, end element, block index) per program."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(items + 4 * i)
    start = tl.load(items + 4 * i + 1)
    end = tl.load(items + 4 * i + 2)
    b = tl.load(items + 4 * i + 3)
    p_ptr, g_ptr, m_ptr, v_ptr = _tensor(ptrs, t, DTYPE, MATH)
    acc = tl.zeros([BLOCK], dtype=MATH)
    for first in range(start, end, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offsets, mask=offsets < end, other=0.0).to(MATH)
        acc += g * g
    v = _new_v(tl.load(v_ptr + b), _div(tl.sum(acc, axis=0), (end - start).to(MATH), MATH), coeffs, t)
    tl.store(v_ptr + b, v)
    denom = _denom(v, coeffs, t, MATH)
    for first in range(start, end, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        _update(p_ptr, g_ptr, m_ptr, offsets, offsets < end, denom, coeffs, t, DTYPE, MATH, MAXIMIZE)


@triton.jit
def columns_kernel(ptrs, coeffs, items, column_blocks, DTYPE: tl.constexpr, MATH: tl.constexpr,
                   MAXIMIZE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """items: (tensor, first column, end column, rows, width, offset of the tensor's row in
    ``column_blocks``, which holds the block index of every column) per program. A tile holds
    whole blocks, so no other program touches its second moments."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(items + 6 * i)
    lo = tl.load(items + 6 * i + 1)
    hi = tl.load(items + 6 * i + 2)
    rows = tl.load(items + 6 * i + 3)
    width = tl.load(items + 6 * i + 4)
    p_ptr, g_ptr, m_ptr, v_ptr = _tensor(ptrs, t, DTYPE, MATH)
    cols = lo + tl.arange(0, COLS)
    in_tile = cols < hi
    block = tl.load(column_blocks + tl.load(items + 6 * i + 5) + cols, mask=in_tile, other=-1)

    acc = tl.zeros([ROWS, COLS], dtype=MATH)
    for first in range(0, rows, ROWS):
        r = first + tl.arange(0, ROWS)
        offsets = r[:, None].to(tl.int64) * width + cols[None, :]
        g = tl.load(g_ptr + offsets, mask=(r < rows)[:, None] & in_tile[None, :], other=0.0).to(MATH)
        acc += g * g
    column_sums = tl.sum(acc, axis=0)
    # each column's block sum and block width: a masked sum over the tile's columns
    same = (block[:, None] == block[None, :]) & in_tile[None, :]
    block_sums = tl.sum(tl.where(same, column_sums[None, :], 0.0), axis=1)
    block_numel = tl.where(in_tile, tl.sum(same.to(tl.int64), axis=1) * rows, 1).to(MATH)
    v = _new_v(tl.load(v_ptr + block, mask=in_tile, other=0.0), _div(block_sums, block_numel, MATH), coeffs, t)
    tl.debug_barrier()  # every column has read its block's old v before any writes the new one
    tl.store(v_ptr + block, v, mask=in_tile)  # the columns of a block store the same value
    denom = _denom(v, coeffs, t, MATH)
    for first in range(0, rows, ROWS):
        r = first + tl.arange(0, ROWS)
        offsets = r[:, None].to(tl.int64) * width + cols[None, :]
        mask = (r < rows)[:, None] & in_tile[None, :]
        _update(p_ptr, g_ptr, m_ptr, offsets, mask, denom[None, :], coeffs, t, DTYPE, MATH, MAXIMIZE)


@triton.jit
def coordinates_kernel(ptrs, coeffs, items, DTYPE: tl.constexpr, MATH: tl.constexpr, MAXIMIZE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """items: (tensor, first element, end element) per program; one v per element."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(items + 3 * i)
    start = tl.load(items + 3 * i + 1)
    end = tl.load(items + 3 * i + 2)
    p_ptr, g_ptr, m_ptr, v_ptr = _tensor(ptrs, t, DTYPE, MATH)
    for first in range(start, end, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        mask = offsets < end
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(MATH)
        v = _new_v(tl.load(v_ptr + offsets, mask=mask, other=0.0), g * g, coeffs, t)
        tl.store(v_ptr + offsets, v, mask=mask)
        _update(p_ptr, g_ptr, m_ptr, offsets, mask, _denom(v, coeffs, t, MATH), coeffs, t, DTYPE, MATH, MAXIMIZE)
