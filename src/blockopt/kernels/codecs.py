r"""Codecs for compressed optimizer state: a float tensor kept in fewer bits between steps.

A step decodes a state tensor to float32, updates it and encodes it again, so no full-precision
copy is kept between steps. The codecs here are the readable definitions; every implementation of
a step that stores compressed state must produce their bits exactly.

============  ===============================================================================
``bfloat16``  bf16, stochastically rounded: 2 bytes an element, unbiased
``int8``      one signed 8-bit code an element, and one float32 scale (the chunk's absolute
              maximum) per `chunk` elements of a row (Note [chunks by row])
``int4``      the same at 4 bits, two codes a byte
============  ===============================================================================

Note [unbiased rounding]: an exponential moving average re-encoded every step loses what
rounding to nearest drops: an increment ``(1 - beta1) * g`` smaller than half a code step never
moves the stored value. Every codec here therefore rounds stochastically, *in value space*: a
value between two neighbouring decoded levels ``lo <= x <= hi`` is stored as ``hi`` with
probability ``(x - lo) / (hi - lo)``, so the decoded value is ``x`` in expectation, whatever the
spacing of the levels.

Note [companded codes]: the integer codes ``q`` in ``[-L, L]`` stand for ``scale * sign(q) *
(|q| / L) ** power`` (and ``-L - 1`` for a non-finite value: Note [non-finite momenta]).
``power=1`` is the linear code. A momentum chunk is heavy-tailed (a few large entries set the
scale, most are far smaller), and ``power=2`` spends the levels where most
values are: the smallest non-zero level is ``scale / L**2`` instead of ``scale / L``. Both are a
multiply to decode, with no lookup table, so the fused kernels can do them in registers.

Note [finding the level]: `ChunkQuantized.encode` finds, for each ``|x|``, the levels around it
with as few operations per element as the fused kernels can run, which is what an int8 step costs:
``a = |x| * (L**power / scale)``, a reciprocal per chunk instead of a division per element (where
it overflows, for a scale below ``L**power / 3.4e38``, ``|x| / scale * L**power``), the chunk's
maximum put on the top level exactly, so ``a <= L**power``; ``k = floor(a ** (1 / power))``; and level ``k + 1``
taken when ``u * gap < a - k**power`` (``gap = (k + 1)**power - k**power``), a multiply in place
of dividing by the gap. It stays unbiased: ``a - k**power`` and ``gap`` are exact (integers, and a
float minus an integer below it), so the only roundings are those of ``a`` and of ``u * gap``, both
relative ~2**-24, as in the division they replace; ``u`` is a multiple of ``2**-24``, so the level
above comes with probability ``(a - k**power) / gap`` up to ``2**-24``. Where a square root rounds
up to the integer just above ``a`` (``a`` within an ulp below ``k**2``), ``a - k**2 < 0`` and the
code is ``k``: an error of an ulp of ``a``, the size of ``a``'s own rounding.

Note [non-finite momenta]: an inf or nan in m (from an inf gradient, say) is stored as the spare
code ``-L - 1`` (-128 in int8, -8 in int4: the symmetric codes leave it free), which decodes to nan,
and the chunk's scale is the maximum of its *finite* values. So a non-finite value costs its own
element, as in float32 m (where it stays inf or nan and turns its block's update into nan), and
never the chunk's other elements, which may belong to other blocks: a scale of inf would decode
their zero codes to ``0 * inf = nan``. bf16 keeps inf and nan as they are.

Note [seeded rounding]: the random bits come from a counter-based hash of (key, element index),
the key mixed from (seed, step, salt), instead of from a generator; the seed is the optimizer's
``seed`` option (runs that share it share their rounding noise). There is no generator state
to checkpoint (a resumed run draws the same bits, because the step is part of the state), every
implementation draws the same bits for the same element, and tensors don't depend on the order
in which they are encoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # odd, so element indices map to distinct hash inputs


# ---- seeded random bits (Note [seeded rounding]) ----------------------------------------------
def _mix(h: int) -> int:
    """murmur3's 32-bit finalizer on a Python int."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def rounding_key(seed: int, step: int, salt: int) -> int:
    """The 32-bit key of one tensor's rounding at one step."""
    return _mix(_mix(_mix(seed) ^ (step & _MASK32)) ^ (salt & _MASK32))


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for int64 ``h < 2**32`` without overflowing int64 (split in halves)."""
    return ((h & 0xFFFF) * c + (((h >> 16) * c) & 0xFFFF) * 65536) & _MASK32


def random_bits(key: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """``numel`` uniformly distributed 32-bit values (int64) for element indices ``0..numel-1``."""
    h = (torch.arange(numel, dtype=torch.int64, device=device) * _GOLDEN + key) & _MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(key: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """``numel`` float32 uniforms in ``[0, 1)``, exact multiples of ``2**-24``."""
    return (random_bits(key, numel, device) >> 8).to(torch.float32) * 2.0**-24


# ---- the codecs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BFloat16Rounding:
    """bfloat16 storage with stochastic rounding (Note [unbiased rounding]).

    A float32 and the two bf16 values around it share their upper 16 bits; adding 16 random bits
    below them and truncating rounds up with probability (the dropped bits) / 2**16, which is the
    value-space probability because the bf16 levels between two powers of two are evenly spaced.
    """

    name = "bfloat16"

    def storage(self, shape: tuple[int, ...], device) -> tuple[Tensor, ...]:
        return (torch.zeros(shape, dtype=torch.bfloat16, device=device),)

    def bytes_per_element(self) -> float:
        return 2.0

    def encode(self, x: Tensor, key: int) -> tuple[Tensor, ...]:
        x = x.to(torch.float32)
        bits = x.reshape(-1).view(torch.int32).to(torch.int64) & _MASK32  # the unsigned pattern
        noise = random_bits(key, bits.numel(), x.device) >> 16
        rounded = ((bits + noise) & 0xFFFF0000).to(torch.int64)
        rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
        out = rounded.view(torch.float32).reshape(x.shape)
        # inf and nan keep their own encoding (noise would turn an inf into a nan)
        out = torch.where(torch.isfinite(x), out, x)
        return (out.to(torch.bfloat16),)

    def decode(self, stored: tuple[Tensor, ...], shape: tuple[int, ...]) -> Tensor:
        return stored[0].to(torch.float32).reshape(shape)


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, width)``: how a chunked codec sees a tensor of ``shape`` (Note [chunks by row])."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return 1, numel
    return shape[0], (numel // shape[0] if shape[0] else 0)


@dataclass(frozen=True)
class ChunkQuantized:
    """Signed integer codes with one float32 scale per ``chunk`` elements of a row (Notes
    [companded codes], [unbiased rounding], [chunks by row]). ``stochastic=False`` rounds to the
    nearest level instead (biased; kept for comparison).

    Note [chunks by row]: a tensor with >= 2 dims is ``shape[0]`` rows of ``numel / shape[0]``
    elements (a 1-D tensor is one row), and each row is cut into chunks of ``chunk`` elements, the
    last one short. Codes and scales are laid out by row: int8 codes have the parameter's shape,
    int4 codes are ``(rows, ceil(width / 2))`` bytes, scales ``(rows, ceil(width / chunk))``
    (1-D: without the rows dim). So no chunk crosses a row, and a sharding along dim 0 (FSDP2's)
    cuts codes and scales where it cuts the parameter. Element ``i`` of the flattened tensor draws
    random bits ``i`` (`uniforms`).
    """

    bits: int = 8
    chunk: int = 256
    power: int = 2
    stochastic: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if self.power not in (1, 2):
            raise ValueError(f"power must be 1 (linear) or 2 (companded), got {self.power!r}")
        if self.chunk < 2 or self.chunk % 2:
            raise ValueError(f"chunk must be an even number >= 2, got {self.chunk!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def levels(self) -> int:
        """L: codes run over ``[-L, L]``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def spare(self) -> int:
        """The code of a non-finite value, ``-L - 1`` (Note [non-finite momenta])."""
        return -self.levels - 1

    def shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of the codes and the scales of a tensor of ``shape``."""
        rows, width = rows_of(shape)
        n_chunks = -(-width // self.chunk)
        if len(shape) < 2:  # (a 0-d tensor too)
            return (width if self.bits == 8 else -(-width // 2),), (n_chunks,)
        return (tuple(shape) if self.bits == 8 else (rows, -(-width // 2))), (rows, n_chunks)

    @property
    def zero_byte(self) -> int:
        """A byte of zero codes: 0 in int8, two nibbles ``0 + 8`` in int4 (a 0 byte is the spare code)."""
        return 0 if self.bits == 8 else 0x88

    def storage(self, shape: tuple[int, ...], device) -> tuple[Tensor, ...]:
        """Zero momentum: zero codes (`zero_byte`) and zero scales."""
        codes, scales = self.shapes(tuple(shape))
        dtype = torch.int8 if self.bits == 8 else torch.uint8
        return (torch.full(codes, self.zero_byte, dtype=dtype, device=device),
                torch.zeros(scales, dtype=torch.float32, device=device))

    def bytes_per_element(self) -> float:
        """At rows whose width is a multiple of ``chunk`` (short chunks cost more)."""
        return self.bits / 8 + 4 / self.chunk

    def _chunks(self, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``x`` (of ``shape``) as ``(rows, n_chunks, chunk)``, each row's last chunk padded with zeros."""
        rows, width = rows_of(shape)
        pad = -width % self.chunk
        return torch.nn.functional.pad(x.reshape(rows, width), (0, pad)).reshape(rows, (width + pad) // self.chunk, self.chunk)

    def encode(self, x: Tensor, key: int) -> tuple[Tensor, ...]:
        shape = tuple(x.shape)
        rows, width = rows_of(shape)
        chunks = self._chunks(x.to(torch.float32), shape)
        finite = torch.isfinite(chunks)  # Note [non-finite momenta]
        magnitude = torch.where(finite, chunks.abs(), 0.0)
        scales = magnitude.amax(dim=2)
        # |x| in level units, level k at k**power (Note [finding the level])
        top = float(self.levels**self.power)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[..., None]
        inv = torch.full_like(safe, top) / safe
        a = torch.where(torch.isfinite(inv), magnitude * inv, magnitude / safe * top)
        a = torch.where(magnitude == safe, top, a)
        k = (a.sqrt() if self.power == 2 else a).floor()
        lo = k.pow(self.power)
        gap = (k + 1).pow(self.power) - lo
        u = self._chunks(uniforms(key, rows * width, x.device), shape) if self.stochastic else 0.5
        q = (k + (u * gap < a - lo).to(k.dtype)) * chunks.sign()  # level k + 1 with probability (a - lo) / gap
        q = torch.where(finite, q, float(self.spare))
        q = q.reshape(rows, chunks.shape[1] * self.chunk)[:, :width].to(torch.int8)
        codes_shape, scales_shape = self.shapes(shape)
        return self._pack(q).reshape(codes_shape), scales.reshape(scales_shape)

    def decode(self, stored: tuple[Tensor, ...], shape: tuple[int, ...]) -> Tensor:
        codes, scales = stored
        rows, width = rows_of(tuple(shape))
        q = self._unpack(codes.reshape(rows, codes.numel() // max(rows, 1)), width)
        q = torch.where(q == self.spare, float("nan"), q.to(torch.float32) / self.levels)
        values = q.abs().pow(self.power) * q.sign() if self.power != 1 else q
        values = self._chunks(values, shape) * scales.reshape(rows, -1 if rows else 0)[..., None]
        return values.reshape(rows, values.shape[1] * self.chunk)[:, :width].reshape(shape)

    def _pack(self, q: Tensor) -> Tensor:
        """``(rows, width)`` codes as bytes: int8 as they are, int4 two a byte along each row (the
        lower nibble first; an odd row ends with a zero code)."""
        if self.bits == 8:
            return q
        nibbles = (q + 8).to(torch.uint8)  # -7..7 -> 1..15 (the spare code -8 -> 0)
        if nibbles.shape[1] % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8)
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)

    def _unpack(self, codes: Tensor, width: int) -> Tensor:
        if self.bits == 8:
            return codes
        nibbles = torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(codes.shape[0], 2 * codes.shape[1])[:, :width]
        return nibbles.to(torch.int8) - 8


# ---- momentum stored through a codec, as a step sees it ------------------------------------
ROUNDING_SEED = 0  # an optimizer's default ``seed``, its share of every rounding key (the step and the tensor vary them)


@dataclass(frozen=True, eq=False)
class StoredMomentum:
    """A first moment kept compressed between steps, handed to a step in place of ``exp_avg``.

    ``stored`` are the codec's storage tensors (``(bf16,)`` or ``(codes, scales)``), which the
    step rewrites in place; ``salt`` is the tensor's share of its rounding key. A step that
    increments the step count to ``t`` encodes the new m with ``key(t)``, so every
    implementation draws the same bits (Note [seeded rounding]).

    ``offset``: where the stored tensor starts in the flattened whole tensor, for a shard of a
    sharded parameter that is one contiguous run of it. Element ``i`` of the shard draws the bits
    of element ``offset + i`` of the whole, so a run draws the same bits at any world size: since
    ``random_bits`` hashes ``i * GOLDEN + key``, the offset is a shift of the key,
    ``key(t) = rounding_key(seed, t, salt) + offset * GOLDEN`` (mod 2**32; 0 when unsharded).
    """

    codec: str
    stored: tuple[Tensor, ...]
    salt: int
    seed: int = ROUNDING_SEED
    offset: int = 0

    def key(self, step: int) -> int:
        return (rounding_key(self.seed, step, self.salt) + self.offset * _GOLDEN) & _MASK32

    def decode(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return codec(self.codec).decode(self.stored, shape).to(dtype)

    @torch.compiler.disable  # a compiled step encodes eagerly (inductor miscompiled the int8 encode)
    def encode_(self, m: Tensor, step: int | Tensor) -> None:
        """Store ``m`` (rounded as this codec rounds at ``step``, a number or a step count) in place."""
        for out, new in zip(self.stored, codec(self.codec).encode(m, self.key(int(step)))):
            out.copy_(new.reshape(out.shape))


CODECS = {
    "bfloat16": BFloat16Rounding(),
    "int8": ChunkQuantized(bits=8),
    "int4": ChunkQuantized(bits=4),
}


def codec(name: str):
    """The codec called ``name`` (a key of `CODECS`)."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"codec must be one of {', '.join(map(repr, CODECS))}, got {name!r}") from None
