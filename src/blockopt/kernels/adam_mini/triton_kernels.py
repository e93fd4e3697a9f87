"""Triton kernels of the fused CUDA Adam-mini step (imported only where ``triton`` is installed).

Each kernel steps many tensors of one dtype in one launch (multi-tensor apply): program ``i``
reads its work item from ``items``, the item names a tensor, and the tensor's pointers and step
coefficients are row ``t`` of ``ptrs`` (int64 addresses of p, g, m, v, ...: `N_PTRS`) and
``coeffs`` (in the math dtype; its columns are listed at `N_COEFFS`). Math runs in float32 (float64 for float64
parameters) and is rounded once on store, with correctly rounded division and square roots, as ATen does.

- `blocks_kernel`: one program per block whose elements are one contiguous run (rows, heads,
  output neurons, whole tensors, experts). It sums g^2 over the block, updates the block's v,
  then updates the block; the second read of g comes from cache.
- `columns_kernel`: one program per tile of whole column blocks of an ``(outer, width)`` view (the
  neurons of an ``(in, out)`` weight). Pass 1 sums g^2 down the columns, the tile turns column
  sums into block sums in registers, pass 2 updates the tile.
- `coordinates_kernel`: plain Adam (one v per element) over chunks of the per-coordinate tensors.
- `codec_kernel`: the tensors whose first moment is stored compressed (a `StoredMomentum`: bf16
  stochastically rounded, or int8/int4 codes with a scale per chunk of a row), one codec chunk at
  a time: decode m, update p and m, encode m back, all in registers (Note [compressed m in the
  kernels]). A block made of whole chunks (rows, heads) is one program, which updates its v
  first, as `blocks_kernel` does; where chunks cross blocks (columns, experts' rows narrower than
  a chunk), the blocks' v are updated before, by `blocks_kernel` and `columns_kernel` launched
  with ``UPDATE=False``, and g is read once more.

Note [compressed m in the kernels]: the codes must be the bits `codecs` writes when
`decoded.step_with_decoded` steps the same m, so the new m and every rounding of its encode are
the reference's, op for op: m's lerp is ATen's (one fma, as its vectorized CPU kernel computes
it, and its CUDA kernel once nvcc contracts it: the gpu test checks), divisions and square roots
are correctly rounded (``div_rn``, ``sqrt_rn``; a GPU's default ``/`` and ``sqrt`` are
approximate), and `codec_kernel` is compiled without
floating-point contraction (``enable_fp_fusion=False``: a product followed by a sum, as in
``|x| * (L**2 / scale) - k**2``, would otherwise round once instead of twice). The random bits are
`codecs.random_bits`: murmur3's finalizer on uint32, of the element's index in the flattened
tensor and the tensor's rounding key for this step. Only finite values are stored bit for bit: a
nan or inf in m stays non-finite (in bf16, or as the spare code: Note [non-finite momenta] in
`codecs`), but not in the same bits.

When interpreted (``TRITON_INTERPRET=1``, set before this module is imported), the same kernels
run on CPU tensors: that is how the tests check them without a GPU.
"""

# (no `from __future__ import annotations`: Triton reads the tl.constexpr annotations)
import triton
import triton.language as tl

# A row of ``coeffs``: 1 - lr wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps,
# -lr / (1 - beta1^t), and one unused slot (rows of 8 keep the offsets shifts).
N_COEFFS = 8
# A row of ``ptrs``: the int64 addresses of p, g, m (a compressed m's bf16 values or codes), v and
# a compressed m's scales (0 where it has none), then m's rounding key at this step (0 if plain).
N_PTRS: tl.constexpr = tl.constexpr(6)


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
def _pointer(ptrs, t, column: tl.constexpr, DTYPE: tl.constexpr):
    return tl.load(ptrs + N_PTRS * t + column).to(tl.pointer_type(DTYPE))


@triton.jit
def _tensor(ptrs, t, DTYPE: tl.constexpr, MATH: tl.constexpr):
    return _pointer(ptrs, t, 0, DTYPE), _pointer(ptrs, t, 1, DTYPE), _pointer(ptrs, t, 2, DTYPE), _pointer(ptrs, t, 3, MATH)


@triton.jit
def _new_v(v, mean_sq, coeffs, t):
    """v <- beta2 v + (1 - beta2) mean(g^2), as ``v.mul_(beta2).add_(mean, alpha=1 - beta2)``."""
    return v * tl.load(coeffs + 8 * t + 2) + mean_sq * tl.load(coeffs + 8 * t + 3)


@triton.jit
def _denom(v, coeffs, t, MATH: tl.constexpr):
    """sqrt(v) / sqrt(1 - beta2^t) + eps."""
    return _div(_sqrt(v, MATH), tl.load(coeffs + 8 * t + 4), MATH) + tl.load(coeffs + 8 * t + 5)


@triton.jit
def _step(p, g, m, denom, coeffs, t, MATH: tl.constexpr, MAXIMIZE: tl.constexpr):
    """(p, m) after p <- p (1 - lr wd); m <- lerp(m, g, 1 - beta1); p <- p + step_size m / denom."""
    weight = tl.load(coeffs + 8 * t + 1)
    if MAXIMIZE:
        g = -g
    p = p * tl.load(coeffs + 8 * t)
    # ATen's lerp: from the nearer end (weight 1 gives g exactly), in one fma
    m = tl.where(weight < 0.5, tl.fma(weight, g - m, m), tl.fma(weight - 1, g - m, g))
    return p + tl.load(coeffs + 8 * t + 6) * _div(m, denom, MATH), m


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, offsets, mask, denom, coeffs, t, DTYPE: tl.constexpr, MATH: tl.constexpr,
            MAXIMIZE: tl.constexpr):
    """One step of the elements at ``offsets`` whose m is stored like p."""
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(MATH)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(MATH)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(MATH)
    p, m = _step(p, g, m, denom, coeffs, t, MATH, MAXIMIZE)
    tl.store(p_ptr + offsets, _round(p, DTYPE), mask=mask)
    tl.store(m_ptr + offsets, _round(m, DTYPE), mask=mask)


@triton.jit
def blocks_kernel(ptrs, coeffs, items, DTYPE: tl.constexpr, MATH: tl.constexpr, MAXIMIZE: tl.constexpr,
                  BLOCK: tl.constexpr, UPDATE: tl.constexpr):
    """items: (tensor, first element, end element, block index) per program. ``UPDATE=False``:
    the second moments only (for a compressed m, which `codec_kernel` steps after)."""
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
    if UPDATE:
        denom = _denom(v, coeffs, t, MATH)
        for first in range(start, end, BLOCK):
            offsets = first + tl.arange(0, BLOCK)
            _update(p_ptr, g_ptr, m_ptr, offsets, offsets < end, denom, coeffs, t, DTYPE, MATH, MAXIMIZE)


@triton.jit
def columns_kernel(ptrs, coeffs, items, column_blocks, DTYPE: tl.constexpr, MATH: tl.constexpr,
                   MAXIMIZE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, UPDATE: tl.constexpr):
    """items: (tensor, first column, end column, rows, width, offset of the tensor's row in
    ``column_blocks``, which holds the block index of every column) per program. A tile holds
    whole blocks, so no other program touches its second moments. ``UPDATE`` as for `blocks_kernel`."""
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
    if UPDATE:
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


# ---- a compressed first moment (Note [compressed m in the kernels]) ------------------------------
@triton.jit
def _random_bits(index, key):
    """`codecs.random_bits`: murmur3's finalizer of ``index * 0x9E3779B1 + key``, on uint32."""
    h = index.to(tl.uint32) * 0x9E3779B1 + key
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _power(x, POWER: tl.constexpr):
    if POWER == 2:
        return x * x
    else:
        return x


@triton.jit
def _dequantize(q, scale, LEVELS: tl.constexpr, POWER: tl.constexpr):
    """``scale * sign(q) * (|q| / L) ** power`` (`ChunkQuantized.decode`, op for op)."""
    level = tl.div_rn(q.to(tl.float32), LEVELS * 1.0)
    magnitude = _power(tl.abs(level), POWER)
    value = tl.where(level < 0, -magnitude, magnitude) * scale
    return tl.where(q == -LEVELS - 1, float("nan"), value)  # the spare code: a non-finite value


@triton.jit
def _quantize(x, uniform, LEVELS: tl.constexpr, POWER: tl.constexpr):
    """The codes of a chunk ``x`` (a 2-D tile) and its scale, a level up where ``uniform * gap``
    falls below ``a - lo`` (`ChunkQuantized.encode`, op for op: Note [finding the level])."""
    # the scale of the finite values; a non-finite one gets the spare code (Note [non-finite momenta])
    finite = tl.abs(x) < float("inf")  # (false for nan)
    magnitude = tl.where(finite, tl.abs(x), 0.0)
    scale = tl.max(tl.max(magnitude, axis=1), axis=0)
    safe = tl.where(scale > 0, scale, 1.0)
    top = tl.full([], LEVELS ** POWER, tl.float32)
    inv = tl.div_rn(top, safe)
    if inv < float("inf"):  # |x| in level units, by the chunk's reciprocal
        a = magnitude * inv
    else:  # a scale so small that the reciprocal overflows
        a = tl.div_rn(magnitude, safe) * top
    a = tl.where(magnitude == safe, top, a)  # the chunk's maximum on the top level exactly
    if POWER == 2:
        k = tl.floor(tl.sqrt_rn(a))
    else:
        k = tl.floor(a)
    lo = _power(k, POWER)
    gap = _power(k + 1, POWER) - lo
    level = k + (uniform * gap < a - lo).to(tl.float32)
    return tl.where(finite, tl.where(x < 0, -level, level), -LEVELS - 1.0).to(tl.int32), scale


@triton.jit
def _bfloat16_bits(x, random):
    """The bf16 bits of ``x`` rounded up with probability (its lower 16 bits) / 2**16
    (`BFloat16Rounding.encode`): the random bits' upper half added below the upper half of x."""
    bits = x.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000  # inf and nan keep their own encoding
    upper = tl.where(special, bits, bits + (random >> 16)) >> 16
    return tl.where(x != x, 0x7FC0, upper).to(tl.uint16)


@triton.jit
def _block_of(offsets, view_width, inner, segments, first, count):
    """The block of each element of a tensor viewed as ``(outer, units, inner)`` (`layout`): its
    unit's segment (rows of ``segments``: first unit, units per block, first block), and the block
    within the segment."""
    unit = offsets % view_width // inner
    block = tl.zeros_like(unit)
    for s in range(first, first + count):  # (segments run in order: the last one started wins)
        start = tl.load(segments + 3 * s)
        in_segment = tl.load(segments + 3 * s + 2) + (unit - start) // tl.load(segments + 3 * s + 1)
        block = tl.where(unit >= start, in_segment, block)
    return block


@triton.jit
def _chunk(c, n_chunks, width, pair, half, CHUNK: tl.constexpr):
    """Chunk ``c`` of a tensor as a ``(CHUNK / 2, 2)`` tile (int4 codes pair up along its rows):
    its row and place in the row, its columns, element offsets and mask."""
    row = c // n_chunks
    in_row = c % n_chunks
    pair_column = in_row * CHUNK + 2 * pair
    column = pair_column[:, None] + half[None, :]
    return row, in_row, pair_column, row * width + column, column < width


@triton.jit
def codec_kernel(ptrs, coeffs, items, tensors, segments, DTYPE: tl.constexpr, MATH: tl.constexpr,
                 MAXIMIZE: tl.constexpr, BITS: tl.constexpr, POWER: tl.constexpr, CHUNK: tl.constexpr):
    """items: (tensor, first chunk, end chunk, block, its elements) per program, a tensor's chunks
    numbered row by row (Note [chunks by row] in `codecs`; a bf16 m is one row); block -1 where
    the chunks are not one whole block, whose v is then read. ``tensors``: per tensor, the width
    of its rows, its chunks per row, then its layout: the width and ``inner`` of its ``(outer,
    width)`` view and its first segment and number of segments (0: per coordinate, one v per
    element, updated here). ``BITS``: 16 for bf16 m, 8 or 4 for codes (two a byte, the lower
    nibble first) with ``scales`` per chunk."""
    LEVELS: tl.constexpr = 2 ** (BITS - 1) - 1
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(items + 5 * i)
    first = tl.load(items + 5 * i + 1)
    end = tl.load(items + 5 * i + 2)
    b = tl.load(items + 5 * i + 3)
    p_ptr, g_ptr, v_ptr = _pointer(ptrs, t, 0, DTYPE), _pointer(ptrs, t, 1, DTYPE), _pointer(ptrs, t, 3, MATH)
    if BITS == 16:
        m_ptr = _pointer(ptrs, t, 2, tl.uint16)
    elif BITS == 8:
        m_ptr = _pointer(ptrs, t, 2, tl.int8)
    else:
        m_ptr = _pointer(ptrs, t, 2, tl.uint8)
    scales_ptr = _pointer(ptrs, t, 4, tl.float32)
    key = tl.load(ptrs + N_PTRS * t + 5).to(tl.uint32)
    width = tl.load(tensors + 6 * t)
    n_chunks = tl.load(tensors + 6 * t + 1)
    view_width = tl.load(tensors + 6 * t + 2)
    inner = tl.load(tensors + 6 * t + 3)
    first_segment = tl.load(tensors + 6 * t + 4)
    n_segments = tl.load(tensors + 6 * t + 5)
    pair = tl.arange(0, CHUNK // 2)
    half = tl.arange(0, 2)
    block_v = tl.load(v_ptr + tl.maximum(b, 0))
    if b >= 0:  # the chunks are block b: its new v first (the second read of g comes from cache)
        acc = tl.zeros([CHUNK // 2, 2], dtype=MATH)
        for c in range(first, end):
            row, in_row, pair_column, offsets, mask = _chunk(c, n_chunks, width, pair, half, CHUNK)
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(MATH)
            acc += g * g
        block_v = _new_v(block_v, _div(tl.sum(tl.sum(acc, axis=1), axis=0), tl.load(items + 5 * i + 4).to(MATH), MATH),
                         coeffs, t)
        tl.store(v_ptr + b, block_v)
    for c in range(first, end):
        row, in_row, pair_column, offsets, mask = _chunk(c, n_chunks, width, pair, half, CHUNK)
        byte = row * ((width + 1) // 2) + pair_column // 2  # (int4 codes)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(MATH)
        if b >= 0:
            v = tl.zeros_like(g) + block_v
        elif n_segments == 0:  # per coordinate
            v = _new_v(tl.load(v_ptr + offsets, mask=mask, other=0.0), g * g, coeffs, t)
            tl.store(v_ptr + offsets, v, mask=mask)
        else:  # updated before, by the blocks' own kernel
            block = _block_of(offsets, view_width, inner, segments, first_segment, n_segments)
            v = tl.load(v_ptr + block, mask=mask, other=1.0)
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(MATH)

        if BITS == 16:
            m = (tl.load(m_ptr + offsets, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            if BITS == 8:
                q = tl.load(m_ptr + offsets, mask=mask, other=0).to(tl.int32)
            else:
                packed = tl.load(m_ptr + byte, mask=pair_column < width, other=0).to(tl.int32)
                q = tl.where(mask, ((packed[:, None] >> (4 * half[None, :])) & 0xF) - 8, 0)
            m = _dequantize(q, tl.load(scales_ptr + row * n_chunks + in_row), LEVELS, POWER)

        p, m = _step(p, g, m.to(MATH), _denom(v, coeffs, t, MATH), coeffs, t, MATH, MAXIMIZE)
        tl.store(p_ptr + offsets, _round(p, DTYPE), mask=mask)

        m = tl.where(mask, m.to(tl.float32), 0.0)
        random = _random_bits(offsets, key)
        if BITS == 16:
            tl.store(m_ptr + offsets, _bfloat16_bits(m, random), mask=mask)
        else:
            q, scale = _quantize(m, (random >> 8).to(tl.float32) * 2.0**-24, LEVELS, POWER)
            tl.store(scales_ptr + row * n_chunks + in_row, scale)
            if BITS == 8:
                tl.store(m_ptr + offsets, q.to(tl.int8), mask=mask)
            else:
                packed = tl.sum((q + 8) << (4 * half[None, :]), axis=1)
                tl.store(m_ptr + byte, packed.to(tl.uint8), mask=pair_column < width)
