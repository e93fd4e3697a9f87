"""Where the first moment lives between steps: ``momentum_dtype=`` of AdamMini and AdaPM.

============  =====================================================================================
``None``      ``exp_avg`` in the parameter's dtype (torch.optim's choice)
``float32``   ``exp_avg`` in float32 (bf16/fp16 parameters: m is never rounded)
``bfloat16``  ``exp_avg`` in bf16, written with stochastic rounding (`kernels.codecs`)
``int8``      ``exp_avg_codes`` (int8, one per element) and ``exp_avg_scales`` (float32, one per
              256 elements of the flattened tensor): companded, stochastically rounded codes
``int4``      the same with two 4-bit codes a byte
============  =====================================================================================

Note [compressed momentum]: a step takes a compressed momentum as a `StoredMomentum` in place of
``exp_avg``; every implementation of the step decodes it, runs the same update as uncompressed,
and encodes the new m back (the fused kernels in registers; `kernels.adam_mini.decoded`): nothing
but the codes is kept between steps. The rounding bits are drawn from (step, the parameter's name), so a run
is reproducible and a resumed run bit-identical (`kernels.codecs`, Note [seeded rounding]).

A checkpoint holds what the optimizer keeps (codes and scales, or ``exp_avg``) and its param
groups the ``momentum_dtype`` it was saved with; loading into another ``momentum_dtype`` decodes
and encodes again (`convert`): from a compressed checkpoint, m is what the codes said; into one,
m is rounded as a step would round it.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..distributed import local_tensor
from ..kernels.codecs import ROUNDING_SEED, StoredMomentum, codec, rounding_key
from .state import EXP_AVG

EXP_AVG_CODES = "exp_avg_codes"  # int8/int4 momentum: the codes (flat; int4 packs two a byte)
EXP_AVG_SCALES = "exp_avg_scales"  # int8/int4 momentum: one float32 scale per chunk of the flattened tensor
MOMENTUM_DTYPES = (None, "float32", "bfloat16", "int8", "int4")
QUANTIZED = ("int8", "int4")
KEYS = (EXP_AVG, EXP_AVG_CODES, EXP_AVG_SCALES)


def plain_dtype(momentum_dtype: str | None, param: Tensor) -> torch.dtype | None:
    """The dtype of an ``exp_avg`` tensor, or None for quantized storage."""
    if momentum_dtype is None:
        return param.dtype
    if momentum_dtype in QUANTIZED:
        return None
    return getattr(torch, momentum_dtype)


def state_shapes(momentum_dtype: str | None, param_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The momentum's state keys and shapes for a parameter of ``param_shape``."""
    if momentum_dtype not in QUANTIZED:
        return {EXP_AVG: tuple(param_shape)}
    codes, scales = codec(momentum_dtype).storage(tuple(param_shape), "meta")
    return {EXP_AVG_CODES: tuple(codes.shape), EXP_AVG_SCALES: tuple(scales.shape)}


def create(momentum_dtype: str | None, param: Tensor) -> dict[str, Tensor]:
    """Zero momentum in the storage ``momentum_dtype`` asks for (local tensors: the caller places them)."""
    dtype = plain_dtype(momentum_dtype, param)
    if dtype is not None:
        return {EXP_AVG: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}
    codes, scales = codec(momentum_dtype).storage(tuple(param.shape), param.device)
    return {EXP_AVG_CODES: codes, EXP_AVG_SCALES: scales}


def salt(name: str) -> int:
    """A parameter's share of its rounding key: stable across runs, processes and resumes."""
    return zlib.crc32(name.encode())


def stored(momentum_dtype: str, state: dict, name: str) -> StoredMomentum:
    """A compressed momentum's storage as a step takes it (local tensors, updated in place)."""
    if momentum_dtype == "bfloat16":
        tensors = (local_tensor(state[EXP_AVG]),)
    else:
        tensors = (local_tensor(state[EXP_AVG_CODES]), local_tensor(state[EXP_AVG_SCALES]))
    return StoredMomentum(momentum_dtype, tensors, salt(name), ROUNDING_SEED)


def read(momentum_dtype: str | None, state: dict, shape: tuple[int, ...]) -> Tensor:
    """A float32 copy of the momentum in ``state``, whatever its storage."""
    if momentum_dtype in QUANTIZED:
        return codec(momentum_dtype).decode((state[EXP_AVG_CODES], state[EXP_AVG_SCALES]), shape)
    return state[EXP_AVG].to(torch.float32)


def saved_dtype(saved: dict, declared: str | None) -> str | None:
    """The ``momentum_dtype`` a saved entry was written with: its group's, checked against what it
    holds (a checkpoint from before the setting has plain ``exp_avg``)."""
    if EXP_AVG_CODES in saved:
        codes = saved[EXP_AVG_CODES]
        if declared in QUANTIZED:
            return declared
        # no group setting (an edited checkpoint): int4 packs two codes a byte in uint8
        return "int4" if codes.dtype == torch.uint8 else "int8"
    return declared if declared in (None, "float32", "bfloat16") else None


def convert(saved: dict, *, name: str, shape: tuple[int, ...], param_dtype: torch.dtype, source: str | None,
            target: str | None) -> dict:
    """A saved entry's momentum moved from ``source`` storage to ``target`` storage (other keys
    unchanged). Quantized sources are decoded; quantized targets are encoded as the next step
    would encode (the saved step's rounding key)."""
    if not any(key in saved for key in KEYS):
        return saved
    out = {k: v for k, v in saved.items() if k not in KEYS}
    if source in QUANTIZED:
        m = codec(source).decode((saved[EXP_AVG_CODES], saved[EXP_AVG_SCALES]), shape)
    else:
        m = saved[EXP_AVG].to(torch.float32)
    if target in QUANTIZED:
        step = int(saved["step"]) if "step" in saved else 0
        codes, scales = codec(target).encode(m, rounding_key(ROUNDING_SEED, step, salt(name)))
        out[EXP_AVG_CODES], out[EXP_AVG_SCALES] = codes, scales
    elif target == "bfloat16" and source != "bfloat16":
        step = int(saved["step"]) if "step" in saved else 0
        out[EXP_AVG] = codec("bfloat16").encode(m, rounding_key(ROUNDING_SEED, step, salt(name)))[0].reshape(shape)
    else:
        dtype = param_dtype if target is None else getattr(torch, target)
        out[EXP_AVG] = (saved[EXP_AVG] if source not in QUANTIZED else m).to(dtype)
    return out

