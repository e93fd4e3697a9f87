"""Where the first moment lives between steps: ``momentum_dtype=`` of AdamMini, AdaPM and SGDSaI.

============  =====================================================================================
``None``      ``exp_avg`` in the parameter's dtype (torch.optim's choice)
``float32``   ``exp_avg`` in float32 (bf16/fp16 parameters: m is never rounded)
``bfloat16``  ``exp_avg`` in bf16, written with stochastic rounding (`kernels.codecs`)
``int8``      ``exp_avg_codes`` (int8, the parameter's shape) and ``exp_avg_scales`` (float32, one
              per 256 elements of a row, `kernels.codecs` Note [chunks by row]): companded,
              stochastically rounded codes
``int4``      the same with two 4-bit codes a byte
============  =====================================================================================

Note [compressed momentum]: a step takes a compressed momentum as a `StoredMomentum` in place of
``exp_avg``; every implementation of the step decodes it, runs the same update as uncompressed,
and encodes the new m back (the fused kernels in registers; `kernels.adam_mini.decoded`): nothing
but the codes is kept between steps. The rounding bits are drawn from (step, the parameter's name), so a run
is reproducible and a resumed run bit-identical (`kernels.codecs`, Note [seeded rounding]).

Note [int codes only where a chunk lies in one block]: the update divides m by the square root of
its block's second moment, and an int code's error is a fraction of its chunk's largest |m| (one
scale per 256 elements of a row). Where every chunk lies inside one block (rows, heads, embedding
rows, whole tensors), that largest |m| is of the order of the block's own root second moment, so
the error stays a small fraction of the step. Where a chunk holds several blocks (the
per-coordinate rule: biases, other vectors; per-column blocks of an ``(in, out)`` weight), an
element whose block has a second moment far below the chunk's largest |m|^2 is rounded to a level
that can be many times its own denominator: on a 256-element bias with one gradient 1e6 times the
others, single steps of 55 lr with int8, and int4 rounding those m to 0 so that they trained ~10x
slower. Such tensors keep m in ``"bfloat16"`` (an error relative to each element) under
``"int8"``/``"int4"`` (`kept_as`): biases only in a Llama, but most of GPT-2 (its Conv1D weights
have per-column blocks), so an optimizer warns where they hold more than a tenth of a group's momentum.
So do tensors whose rows are too narrow for codes to save memory (`codes_save_bytes`: a scale per
row of 1-4 elements costs more than bf16).

A checkpoint holds what the optimizer keeps (codes and scales, or ``exp_avg``) and its param
groups the ``momentum_dtype`` it was saved with; loading into another ``momentum_dtype`` decodes
and encodes again (`convert`): from a compressed checkpoint, m is what the codes said; into one,
m is rounded as a step would round it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import torch
from torch import Tensor

from ..distributed import ShardView, is_dtensor, local_tensor, replicated_like, shard_like, split_rows_like
from ..kernels.codecs import ROUNDING_SEED, StoredMomentum, codec, rounding_key, rows_of
from ..validation import integer
from .state import EXP_AVG

EXP_AVG_CODES = "exp_avg_codes"  # int8/int4 momentum: the codes (int4 packs two a byte along each row)
EXP_AVG_SCALES = "exp_avg_scales"  # int8/int4 momentum: one float32 scale per chunk of a row
MOMENTUM_DTYPES = (None, "float32", "bfloat16", "int8", "int4")
# torch dtypes accepted for the names above (a group keeps the name, so state dicts hold strings)
MOMENTUM_DTYPE_ALIASES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
QUANTIZED = ("int8", "int4")
KEYS = (EXP_AVG, EXP_AVG_CODES, EXP_AVG_SCALES)


# Note [seeded rounding] in `blockopt.kernels.codecs`: an optimizer's ``seed`` is a 32-bit key share
SEED = integer(0, 2**32 - 1, hint="the seed of the stochastic rounding's bits (and AdaPM's initial factors): "
                                  "give every rank the same one, and independent runs different ones")


def keys(plain: str = EXP_AVG) -> tuple[str, str, str]:
    """The state keys of a momentum kept under ``plain`` (``exp_avg``; SGD-SaI's ``momentum_buffer``):
    the tensor itself, or its ``<plain>_codes`` and ``<plain>_scales``. Every function here takes
    the ``key`` it keeps the momentum under (default: Adam's)."""
    return plain, f"{plain}_codes", f"{plain}_scales"


def check_kept(momentum_dtype: str | None, state: dict, name: str, key: str = EXP_AVG, *,
               param_dtype: torch.dtype | None = None) -> None:
    """Raise if ``state`` holds the momentum in another storage than ``momentum_dtype`` (a param
    group's setting changed after its state was created): a step would misread it, or keep
    rounding it as before (a bf16 ``exp_avg`` under a setting now ``"float32"``)."""
    plain, codes_key, _ = keys(key)
    if not holds(momentum_dtype, state, key, param_dtype=param_dtype):
        if momentum_dtype is None and plain in state and param_dtype is not None:  # (a cast, or None set by hand)
            raise ValueError(
                f"{name}: its param group says momentum_dtype=None (m in the parameter's dtype, now {param_dtype}), but "
                f"its state holds {state[plain].dtype} {plain}: the parameter was cast after the optimizer made its "
                "state (e.g. model.to(torch.bfloat16)), or the group's momentum_dtype was changed by hand. Build "
                "the optimizer after the cast, or save opt.state_dict() and load it into an optimizer built with the "
                "model and setting you want (it converts)"
            )
        held = saved_dtype(state, None, key) if codes_key in state else f"{state[plain].dtype} {plain}"
        raise ValueError(
            f"{name}: its param group now says momentum_dtype={momentum_dtype!r}, but its state holds {held}; "
            f"a group's momentum_dtype can't change between steps: save opt.state_dict() and load it into "
            "an optimizer built with the new setting (it converts)"
        )


def holds(momentum_dtype: str | None, state: dict, key: str = EXP_AVG, *, param_dtype: torch.dtype | None = None) -> bool:
    """Whether ``state`` keeps its momentum in the storage ``momentum_dtype`` makes (``None``: a
    plain tensor in ``param_dtype``, or of any dtype when that is not given)."""
    plain, codes_key, _ = keys(key)
    if momentum_dtype in QUANTIZED:
        codes = state.get(codes_key)
        return codes is not None and codes.dtype == (torch.int8 if momentum_dtype == "int8" else torch.uint8)
    if plain not in state:
        return False
    if momentum_dtype is None:
        return param_dtype is None or state[plain].dtype == param_dtype
    return state[plain].dtype == getattr(torch, momentum_dtype)


def kept_as(momentum_dtype: str | None, spec) -> str | None:
    """The storage a tensor's momentum gets under its group's ``momentum_dtype``: the setting,
    except int codes for a tensor whose chunks would hold several blocks (Note [int codes only
    where a chunk lies in one block]) or whose rows are so narrow that codes and scales take as
    many bytes as bf16 (`codes_save_bytes`), which keep ``"bfloat16"``; ``spec`` is its `BlockSpec`."""
    if momentum_dtype not in QUANTIZED:
        return momentum_dtype
    fit = _codes_fit if torch.compiler.is_compiling() else _cached_codes_fit  # (asked every step, per tensor)
    return momentum_dtype if fit(tuple(spec.shape), tuple(spec.block_dims), tuple(spec.segments),
                                 codec(momentum_dtype)) else "bfloat16"


def _codes_fit(shape: tuple[int, ...], block_dims: tuple[int, ...], segments: tuple[tuple[int, int], ...],
               quantized) -> bool:
    return codes_save_bytes(shape, quantized) and _chunks_in_one_block(shape, block_dims, segments, quantized.chunk)


def codes_save_bytes(shape: tuple[int, ...], quantized) -> bool:
    """Whether the ``quantized`` codec's codes and scales (a float32 per chunk of a row) take fewer
    bytes than bf16's 2 an element: not on rows of fewer than 5 elements (int8) or 3 (int4), where
    each row's scale outweighs what the codes save (a 0-d tensor: 5 bytes as int8). bf16, rounded
    per element, is then both the smaller and the more precise storage."""
    codes, scales = quantized.shapes(shape)
    numel = math.prod(shape)
    return numel == 0 or math.prod(codes) + 4 * math.prod(scales) < 2 * numel


def _chunks_in_one_block(shape: tuple[int, ...], block_dims: tuple[int, ...], segments: tuple[tuple[int, int], ...],
                         chunk: int) -> bool:
    """Whether every chunk of ``chunk`` elements of a row (`kernels.codecs.rows_of`) lies inside one
    block of the layout: no block starts inside a chunk. Plain integers, so a traced step folds it."""
    n_blocks = sum(units // per_block for units, per_block in segments)
    rows, width = rows_of(shape)
    if n_blocks <= 1 or width <= 1 or rows == 0:
        return True
    if not block_dims or list(block_dims) != list(range(block_dims[0], block_dims[-1] + 1)):
        return False  # (blocks over dims that are not adjacent: not worked out, so not assumed)
    first, last = block_dims[0], block_dims[-1] + 1
    units, inner = math.prod(shape[first:last]), math.prod(shape[last:])
    # Block dims from dim 0 cut each row into per_row units; block dims after it repeat their
    # whole unit range within each row. A block starts at offset (unit % per_row) * inner of its row.
    per_row = units // rows if first == 0 else units
    if first == 0 and per_row == 1:
        return True  # blocks of whole rows
    if first > 0 and math.prod(shape[:first]) > rows and (units * inner) % chunk:
        return False  # (a row holds several repeats, and a repeat's end is a block start)
    start = 0
    for n_units, per_block in segments:
        for u in range(start, start + n_units, per_block):
            if (u % per_row) * inner % chunk:
                return False
            if (per_block * inner) % chunk == 0 and (per_row * inner) % chunk == 0:
                break  # (every later start of this segment is a multiple of the chunk too)
        start += n_units
    return True


_cached_codes_fit = functools.lru_cache(maxsize=None)(_codes_fit)


def plain_dtype(momentum_dtype: str | None, param: Tensor) -> torch.dtype | None:
    """The dtype of an ``exp_avg`` tensor, or None for quantized storage."""
    if momentum_dtype is None:
        return param.dtype
    if momentum_dtype in QUANTIZED:
        return None
    return getattr(torch, momentum_dtype)


def state_shapes(momentum_dtype: str | None, param_shape: tuple[int, ...], key: str = EXP_AVG) -> dict[str, tuple[int, ...]]:
    """The momentum's state keys and shapes for a parameter of ``param_shape``."""
    plain, codes_key, scales_key = keys(key)
    if momentum_dtype not in QUANTIZED:
        return {plain: tuple(param_shape)}
    codes, scales = codec(momentum_dtype).storage(tuple(param_shape), "meta")
    return {codes_key: tuple(codes.shape), scales_key: tuple(scales.shape)}


def create(momentum_dtype: str | None, param: Tensor, key: str = EXP_AVG) -> dict[str, Tensor]:
    """Zero momentum in the storage ``momentum_dtype`` asks for (local tensors: the caller places them)."""
    plain, codes_key, scales_key = keys(key)
    dtype = plain_dtype(momentum_dtype, param)
    if dtype is not None:
        return {plain: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}
    codes, scales = codec(momentum_dtype).storage(tuple(param.shape), param.device)
    return {codes_key: codes, scales_key: scales}


_SALTS: dict[str, int] = {}  # name -> salt: a compiled step reads a dict (dynamo cannot trace zlib)


def salt(name: str) -> int:
    """A parameter's share of its rounding key: stable across runs, processes and resumes."""
    value = _SALTS.get(name)
    if value is None:
        value = _SALTS[name] = zlib.crc32(name.encode())
    return value


def stored(momentum_dtype: str, state: dict, name: str, key: str = EXP_AVG, *, seed: int = ROUNDING_SEED) -> StoredMomentum:
    """A compressed momentum's storage as a step takes it (local tensors, updated in place);
    ``seed``: the optimizer's (its rounding bits)."""
    plain, codes_key, scales_key = keys(key)
    if momentum_dtype == "bfloat16":
        tensors = (local_tensor(state[plain]),)
    else:
        tensors = (local_tensor(state[codes_key]), local_tensor(state[scales_key]))
    return StoredMomentum(momentum_dtype, tensors, salt(name), seed)


def read(momentum_dtype: str | None, state: dict, shape: tuple[int, ...], key: str = EXP_AVG) -> Tensor:
    """A float32 copy of the momentum in ``state``, whatever its storage."""
    plain, codes_key, scales_key = keys(key)
    if momentum_dtype in QUANTIZED:
        return codec(momentum_dtype).decode((state[codes_key], state[scales_key]), shape)
    return state[plain].to(torch.float32)


def saved_dtype(saved: dict, declared: str | None, key: str = EXP_AVG) -> str | None:
    """The ``momentum_dtype`` a saved entry was written with: its group's, checked against what it
    holds (a checkpoint from before the setting has plain ``exp_avg``).

    An entry may hold both a plain tensor and codes: torch's ``set_state_dict`` with a full state
    dict fills every key the live optimizer keeps, and which the saved entry lacks, with the live
    optimizer's zero state. A group that says plain storage was saved plain: its codes are those
    zeros (the conversion drops them)."""
    plain, codes_key = keys(key)[:2]
    if declared in (None, "float32", "bfloat16") and plain in saved:
        return declared
    if codes_key in saved:
        codes = saved[codes_key]
        if declared in QUANTIZED:
            return declared
        # no group setting (an edited checkpoint): int4 packs two codes a byte in uint8
        return "int4" if codes.dtype == torch.uint8 else "int8"
    return declared if declared in (None, "float32", "bfloat16") else None


def check_saved(saved: dict, name: str, shape: tuple[int, ...], source: str | None, target: str | None,
                key: str = EXP_AVG) -> None:
    """Refuse a saved momentum that is not what ``source`` storage (the one it was saved with:
    `saved_dtype`) keeps for this optimizer's parameter of ``shape``: a key missing, or a tensor of
    another shape or dtype, named with the key. Run before `convert` reads it: codes saved for a
    parameter of another shape (same numel) decode with their scales on the wrong chunks into an
    m of the right shape, which no later check could tell from a good one."""
    plain, codes_key, scales_key = keys(key)
    if not any(k in saved for k in (plain, codes_key, scales_key)):
        return
    if source != target:
        _check_held(saved, name, source, target, key)  # (a DCP cast: its message says what to do)
    if source in QUANTIZED:
        codes, scales = codec(source).storage(tuple(shape), "meta")
        expected = {codes_key: (tuple(codes.shape), codes.dtype), scales_key: (tuple(scales.shape), scales.dtype)}
    else:  # any floating dtype: m may be cast on load (None storage follows the parameter's dtype)
        expected = {plain: (tuple(shape), None)}
    kept = " and ".join(f"{k} {s}" for k, (s, _) in expected.items())
    why = f"momentum_dtype={source!r}, as saved, keeps {kept} for a parameter of shape {tuple(shape)}"
    for k, (want_shape, want_dtype) in expected.items():
        value = saved.get(k)
        if not isinstance(value, Tensor):
            raise ValueError(f"the state of {name!r} has no {k!r} tensor (it has {sorted(saved)}): {why}")
        if tuple(value.shape) != want_shape:
            raise ValueError(f"state {k!r} of {name!r} has shape {tuple(value.shape)}, expected {want_shape} ({why}): "
                             "it was saved for a parameter of another shape or another model; build both the same way")
        if (value.dtype != want_dtype) if want_dtype is not None else not value.dtype.is_floating_point:
            raise ValueError(f"state {k!r} of {name!r} is {value.dtype}, expected {want_dtype or 'a floating dtype'} "
                             f"({why}): the checkpoint was not written by this storage")


def convert(saved: dict, *, name: str, shape: tuple[int, ...], param_dtype: torch.dtype, source: str | None,
            target: str | None, key: str = EXP_AVG, param: Tensor | None = None,
            layout: ShardView | None = None, seed: int = ROUNDING_SEED) -> dict:
    """A saved entry's momentum moved from ``source`` storage to ``target`` storage (other keys
    unchanged). Quantized sources are decoded; quantized targets are encoded as the next step
    would encode (the saved step's rounding key, with the optimizer's ``seed``). For a sharded (DTensor) ``param`` (``layout``:
    its `ShardView`; ignored otherwise) the result is placed as this optimizer keeps it (Note
    [compressed momentum of sharded parameters])."""
    plain, codes_key, scales_key = kept = keys(key)  # (the entry passed `check_saved`)
    if not any(k in saved for k in kept):
        return saved
    sharded = param is not None and is_dtensor(param)
    if sharded and target not in (None, "float32"):
        _check_sharding(target, layout, name)
    out = {k: v for k, v in saved.items() if k not in kept}
    whole = {k: v.full_tensor() if is_dtensor(v) else v for k, v in saved.items() if k in kept}
    if source in QUANTIZED:
        m = codec(source).decode((whole[codes_key], whole[scales_key]), shape)
    else:
        m = whole[plain].to(torch.float32)
    converted = {}
    key_at_step = rounding_key(seed, int(saved.get("step", 0)), salt(name))
    if target in QUANTIZED:
        converted[codes_key], converted[scales_key] = codec(target).encode(m, key_at_step)
    elif target == "bfloat16" and source != "bfloat16":
        converted[plain] = codec("bfloat16").encode(m, key_at_step)[0].reshape(shape)
    else:
        dtype = param_dtype if target is None else getattr(torch, target)
        converted[plain] = (whole[plain] if source not in QUANTIZED else m).to(dtype)
    if sharded:
        converted = place_loaded(target, converted, param, layout) if target in QUANTIZED else \
            {k: shard_like(v, param) for k, v in converted.items()}
    return {**out, **converted}


def _check_held(saved: dict, name: str, source: str | None, target: str | None, key: str) -> None:
    """Refuse an entry whose tensors are not in the storage its param group says it was saved in
    (``source``), unless they hold exactly what converting it to ``target`` gives.

    A DCP load (``dcp.load`` into the tensors of ``get_state_dict``) fills this optimizer's own
    tensors, cast to their dtype, while the param groups it loads say what the checkpoint was
    saved with: ``"float32"`` m loaded into a ``"bfloat16"`` optimizer arrives rounded to nearest,
    not stochastically as `convert` rounds it, and int8 codes cast into int4 bytes (where the two
    have one shape: rows of one element) are garbage. A cast into ``None``/``"float32"`` storage
    is the conversion itself (`convert` casts), and is kept."""
    plain = keys(key)[0]
    if holds(source, saved, key):
        return
    if source not in QUANTIZED and target in (None, "float32") and plain in saved:
        return
    held = next(f"{saved[k].dtype} {k}" for k in keys(key) if k in saved)
    raise ValueError(
        f"{name}: its checkpoint was saved with momentum_dtype={source!r}, but the momentum arrived in this optimizer's "
        f"momentum_dtype={target!r} storage ({held}), cast, not converted: a DCP load fills the live optimizer's own "
        f"tensors, whose values are now the cast ones: build the optimizer again and pass "
        f"planner=blockopt.distributed.ConvertingLoadPlanner() to dcp.load, which loads the saved tensors as saved "
        f"for load_state_dict to convert"
    )


# ---- sharded parameters ------------------------------------------------------------------
# Note [compressed momentum of sharded parameters]: every state tensor of a compressed momentum
# is, globally, the one-process tensor; only where its parts live changes. So a step at any world
# size draws the same bits and writes the same codes as one process (up to the gradients'
# rounding), and DCP reshards a checkpoint like any DTensor.
# * ``bfloat16``: ``exp_avg`` is placed like the parameter; element ``i`` of a shard draws the
#   bits of its place in the whole tensor (`StoredMomentum.offset`), which needs the shard to be
#   one contiguous run of the flattened parameter (FSDP2's ``Shard(0)``, a ZeRO piece).
# * ``int8``/``int4`` of a parameter with >= 2 dims: chunks run along rows (Note [chunks by
#   row]), so codes and scales have the parameter's rows, and a sharding along dim 0 splits them
#   where it splits the parameter: DTensors split over rows like it.
# * ``int8``/``int4`` of a 1-D parameter (one row) that the sharding cuts: a chunk may straddle
#   shards, and its scale is the whole chunk's maximum. Codes and scales are kept whole on every
#   rank (replicated DTensors; vectors are small): the step updates this rank's part of the
#   decoded m, and after the step the parts are gathered (one all-reduce for all such tensors)
#   and every rank encodes the whole m, as one process would.
# * Loading a state dict saved with another ``momentum_dtype`` (`convert`): a DTensor momentum is
#   gathered whole, a tensor at a time, converted as one process converts it, and cut back to
#   this rank's part; so a DCP checkpoint converts exactly, loaded first into an optimizer with
#   the checkpoint's ``momentum_dtype`` (DCP loads into the live storage: `_check_held`).
# Shardings along a later dim of a matrix (rows cut) are refused.
def kept_whole(momentum_dtype: str | None, view: ShardView) -> bool:
    """Whether a sharded parameter's compressed momentum is kept whole on every rank (Note
    [compressed momentum of sharded parameters]): int8/int4 of a 1-D parameter the sharding cuts."""
    return momentum_dtype in QUANTIZED and len(view.spec.shape) < 2 and bool(view.cut_dims)


def _check_sharding(momentum_dtype: str, view: ShardView, name: str) -> None:
    later = [d for d in view.cut_dims if d > 0]
    if later:
        raise NotImplementedError(
            f"{name}: momentum_dtype={momentum_dtype!r} needs a sharding along dim 0 only (whole rows in each shard: "
            f"int8/int4 chunks run along rows, bf16 rounding bits along the flattened tensor), but its placements "
            f"split dim {later[0]} of {tuple(view.spec.shape)}; shard it along dim 0 (fully_shard's default), or give it "
            "momentum_dtype='float32' in a param group of its own"
        )


def create_sharded(momentum_dtype: str | None, param: Tensor, view: ShardView, name: str,
                   key: str = EXP_AVG) -> dict[str, Tensor]:
    """Zero momentum for the DTensor ``param``, placed as Note [compressed momentum of sharded
    parameters] says."""
    if momentum_dtype in (None, "float32"):
        return create(momentum_dtype, param, key)  # (zeros_like a DTensor: placed like it)
    _check_sharding(momentum_dtype, view, name)
    if momentum_dtype not in QUANTIZED:
        return create(momentum_dtype, param, key)
    device = local_tensor(param).device
    codes_key, scales_key = keys(key)[1:]
    whole = dict(zip((codes_key, scales_key), codec(momentum_dtype).storage(tuple(param.shape), "meta")))
    fill = {codes_key: codec(momentum_dtype).zero_byte, scales_key: 0}  # zero momentum (an int4 0 byte is not)
    if kept_whole(momentum_dtype, view):
        return {k: replicated_like(param, torch.full_like(meta, fill[k], device=device)) for k, meta in whole.items()}

    def here(meta: Tensor) -> tuple[int, ...]:  # this rank's rows (an empty shard keeps the other dims)
        return (view.box[0][1], *meta.shape[1:]) if view.cut_dims else tuple(meta.shape)

    return {k: split_rows_like(param, torch.full(here(meta), fill[k], dtype=meta.dtype, device=device), tuple(meta.shape))
            for k, meta in whole.items()}


def place_loaded(momentum_dtype: str | None, loaded: dict[str, Tensor], param: Tensor, view: ShardView) -> dict[str, Tensor]:
    """Loaded int8/int4 codes and scales of the DTensor ``param`` in the form a step keeps them:
    whole (one-process) tensors placed as `create_sharded` places them; DTensors (DCP loaded them
    into this optimizer's own) as they are."""
    if momentum_dtype not in QUANTIZED:
        return loaded
    whole = kept_whole(momentum_dtype, view)
    return {
        k: value if is_dtensor(value) else
        replicated_like(param, value) if whole else
        split_rows_like(param, (view.local_rows(value) if view.cut_dims else value).clone(), tuple(value.shape))
        for k, value in loaded.items()
    }


def stored_shard(momentum_dtype: str, state: dict, name: str, view: ShardView, key: str = EXP_AVG, *,
                 seed: int = ROUNDING_SEED) -> StoredMomentum:
    """A shard's compressed momentum as a step takes it: its elements draw the rounding bits of
    their place in the whole tensor."""
    return dataclasses.replace(stored(momentum_dtype, state, name, key, seed=seed), offset=view.flat_start())

