r"""``param_rounding=``: how a step writes bf16/fp16 parameters, for training without float32 weights.

A step computes a low-precision parameter's update in float32 and rounds the result into the
parameter. Rounded to nearest, an update smaller than half the spacing of bf16 values around
:math:`p` (:math:`2^{-9}|p|`) is lost whole, so a long run of small updates (a late learning
rate, a small gradient) leaves the weights where they were. Two ways keep it, per param group:

================  ==================================================================================
``"nearest"``     (default) round to nearest, as torch.optim writes a bf16/fp16 parameter
``"stochastic"``  round up with probability (the distance to the lower value) / (the gap): the
                  parameter is exact in expectation (`kernels.codecs.BFloat16Rounding`, bf16 only)
``"kahan"``       compensated (Kahan) summation: ``param_compensation``, a tensor in the
                  parameter's dtype, keeps what the rounding dropped, and the next step adds it
                  back, so ``p + param_compensation`` carries about twice the parameter's bits
================  ==================================================================================

float32 and float64 parameters are written as computed under every setting (no state, no extra
work). Under ``"kahan"`` the step works on :math:`w = p + c` and splits its float32 result
:math:`w'` into :math:`p \leftarrow \operatorname{round}(w')` and
:math:`c \leftarrow \operatorname{round}(w' - p)`; the gradient is still taken at :math:`p`.

Note [a float32 step on low-precision parameters]: rather than teach every implementation of
every optimizer two more ways to write a parameter, `apply` runs the optimizer's own update
(``_update``, any ``implementation``) on float32 copies of a slice of its low-precision
parameters, their gradients and the state kept in their dtype (``LIKE_PARAM``, e.g. a bf16
``exp_avg``, written back rounded to nearest), and then writes the parameters back
with the group's rounding. The copies are made a slice at a time (at most the largest tensor,
or 4M elements), like compressed momenta (`kernels.adam_mini.decoded`). The float32 update is
the one the step computes for a bf16 parameter anyway, so ``"kahan"``'s first step writes
exactly what ``"nearest"`` writes.

Note [seeded parameter rounding]: ``"stochastic"`` draws its bits from (the optimizer's ``seed``,
the step count the update reaches, ``crc32("param:" + name)``), as compressed momenta do from
(the seed, the step count, the name's crc32): a run is reproducible, a resume bit-identical, and a parameter's bits differ
from its momentum's. There is no generator state to checkpoint. Each element draws the bits of
its place in the whole parameter: a shard of a sharded (DTensor) parameter offsets its key by
its first element's flat index (`StoredMomentum.offset`, as compressed momenta of shards do), so
FSDP2 at any world size writes the parameters one process writes from the same float32 update.
That needs each shard to be one contiguous run of the flattened parameter (FSDP2's
``Shard(0)``); a sharding along a later dim is refused.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..distributed import ShardView, local_tensor
from ..kernels.adam_mini.decoded import slices
from ..kernels.codecs import StoredMomentum
from ..validation import check, choice

PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
PARAM_COMPENSATION = "param_compensation"  # "kahan": what rounding dropped, like the parameter, in its dtype
LOW_PRECISION = (torch.bfloat16, torch.float16)

RULE = choice(*PARAM_ROUNDINGS, hint="how bf16/fp16 parameters are written; see blockopt.optim.param_rounding")


def salt(name: str) -> int:
    """A parameter's share of its rounding key, distinct from its momentum's (``crc32(name)``)."""
    return zlib.crc32(f"param:{name}".encode())


def needs_steps(group: dict, param: Tensor) -> bool:
    """Whether ``param`` (of ``group``) needs a step count for its rounding keys."""
    return group["param_rounding"] == "stochastic" and param.dtype in LOW_PRECISION


def check_mode(mode) -> None:
    """Raise (the constructor's ``ValueError``) unless ``mode`` is one of `PARAM_ROUNDINGS`: a
    setting changed on a live group is never read as another."""
    if type(mode) is not str or mode not in PARAM_ROUNDINGS:
        check("param_rounding", mode, RULE)  # (raises: what the rule accepts is exactly those)


@dataclass
class Rounding:
    """What writing a batch's low-precision parameters needs, made by `prepare` before any update."""

    mode: str  # "stochastic" or "kahan"
    low: list[int]  # the positions of the batch's bf16/fp16 parameters
    writes: dict[int, Tensor | int]  # per position: its compensation ("kahan") or rounding offset ("stochastic")


def prepare(optimizer, batch, journal: list | None = None) -> Rounding | None:
    """Check that the batch's ``param_rounding`` can be honoured, and make what writing its
    parameters needs (a ``"kahan"`` compensation created at zero on first use); ``None`` where the
    update writes the parameters as it computes them (``"nearest"``, or no bf16/fp16 parameter).
    A step runs this for every batch before the first update, so a refusal leaves every group
    as it was (Note [a step that raises changes nothing] in `blockopt.optim.base`): each state
    dict a compensation is added to is first recorded in ``journal``, with its length."""
    mode = batch.group.get("param_rounding", "nearest")
    if mode == "nearest":
        return None
    check_mode(mode)
    low = [i for i, p in enumerate(batch.params) if p.dtype in LOW_PRECISION]
    if not low:
        return None
    return Rounding(mode, low, _writes(optimizer, batch, low, mode, journal))


def apply(optimizer, batch, collectives, rounding: Rounding | None) -> None:
    """``optimizer._update(batch, collectives)``, with the batch's bf16/fp16 parameters stepped in
    float32 and written as ``rounding`` (what `prepare` returned) says (Note [a float32 step on
    low-precision parameters]). ``batch.steps`` must hold each parameter's step count for
    ``"stochastic"``: the update increments it, and the new count keys the rounding."""
    if rounding is None:
        optimizer._update(batch, collectives)
    else:
        _update_rounded(optimizer, batch, rounding, collectives)


@torch.compiler.disable  # (keys are read from step counts as numbers: a compiled step runs this eagerly)
def _update_rounded(optimizer, batch, rounding: Rounding, collectives) -> None:
    low, writes, mode = rounding.low, rounding.writes, rounding.mode
    taken = set(low)
    rest = [i for i in range(len(batch.params)) if i not in taken]
    if rest:
        optimizer._update(_pick(batch, rest), collectives)
    for part in slices([batch.params[i].numel() for i in low]):
        index = [low[j] for j in part]
        _step_in_float32(optimizer, batch, index, [writes[i] for i in index], mode, collectives)


def _step_in_float32(optimizer, batch, index: list[int], writes: list[Tensor | int], mode: str, collectives) -> None:
    sub = _pick(batch, index)
    params = sub.params
    if mode == "kahan":
        sub.params = [p.to(torch.float32) + c for p, c in zip(params, writes)]
    elif mode == "stochastic":
        sub.params = [p.to(torch.float32) for p in params]
    sub.grads = [g.to(torch.float32) for g in sub.grads]
    kept = []  # (the state tensor, its float32 copy)
    for name in type(batch).LIKE_PARAM:
        tensors = getattr(sub, name)
        for j, t in enumerate(tensors):
            if isinstance(t, Tensor) and t.dtype in LOW_PRECISION:
                tensors[j] = t.to(torch.float32)
                kept.append((t, tensors[j]))
    optimizer._update(sub, collectives)
    for t, copy in kept:
        t.copy_(copy)
    for j, (p, w) in enumerate(zip(params, sub.params)):
        if mode == "stochastic":  # (p stored as a codec stores m: element i draws the bits of element offset + i)
            StoredMomentum("bfloat16", (p,), salt(sub.names[j]), optimizer.seed, offset=writes[j]).encode_(w, int(sub.steps[j]))
        elif mode == "kahan":  # p + c is w, to about twice p's bits
            rounded = w.to(p.dtype)
            writes[j].copy_(w.sub_(rounded))
            p.copy_(rounded)


def _writes(optimizer, batch, low: list[int], mode: str, journal: list | None = None) -> dict[int, Tensor | int]:
    """What writing each low-precision position needs, after checking that the setting can be
    honoured for every one: under "kahan" its ``param_compensation`` (created at zero on first
    use, once all are checked), under "stochastic" its rounding offset (Note [seeded parameter
    rounding]). ``mode`` is one `prepare` checked."""
    group = batch.group
    zero = optimizer.__dict__.get("_zero") is not None  # (its groups hold flat partitions, not the named tensors)
    by_name = {} if zero else dict(zip(group["param_names"], group["params"]))
    out, found = {}, []
    for i in low:  # (every check first)
        name, p = batch.names[i], by_name.get(batch.names[i])
        if p is None:  # DeepSpeed ZeRO steps pieces of its flat partitions
            raise NotImplementedError(
                f"{name}: param_rounding={mode!r} under DeepSpeed ZeRO with {batch.params[i].dtype} partitions is not "
                "supported; let DeepSpeed keep float32 master weights (its bf16/fp16 modes do), or use "
                "param_rounding='nearest'"
            )
        if mode == "stochastic":
            if p.dtype != torch.bfloat16:
                raise ValueError(
                    f"param_rounding must be 'nearest' or 'kahan' for {p.dtype} parameters, got 'stochastic' ({name}): "
                    "stochastic rounding is implemented for bfloat16; use param_rounding='kahan' for float16"
                )
            out[i] = _rounding_offset(batch.layouts[i], name)
        elif mode == "kahan":
            found.append((i, p))
    for i, p in found:  # "kahan": every position checked, the compensations
        state = optimizer.state[p]
        if PARAM_COMPENSATION not in state:  # (placed like a sharded parameter)
            if journal is not None:
                journal.append((p, state, len(state)))
            state[PARAM_COMPENSATION] = torch.zeros_like(p, memory_format=torch.preserve_format)
        out[i] = local_tensor(state[PARAM_COMPENSATION])
    return out


def _rounding_offset(layout, name: str) -> int:
    """Where the stepped tensor starts in its flattened whole parameter: 0, or a shard's first
    element's flat index (Note [seeded parameter rounding])."""
    if not isinstance(layout, ShardView):
        return 0
    start = layout.flat_start()
    if start is None:
        raise NotImplementedError(
            f"{name}: param_rounding='stochastic' needs a sharding along dim 0 only (each shard one run of the "
            f"flattened parameter, whose rounding bits it draws), but its placements split dim {max(layout.cut_dims)} of "
            f"{tuple(layout.spec.shape)}; shard it along dim 0 (fully_shard's default), or use param_rounding='kahan'"
        )
    return start


def _pick(batch, index: list[int]):
    """The batch restricted to positions ``index``: every list field of a `ParamBatch` is per tensor."""
    n = len(batch.params)
    picked = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, list) and len(value) == n:
            picked[f.name] = [value[i] for i in index]
    return replace(batch, **picked)


def loaded(state_dict: dict, groups: list[dict]) -> dict:
    """A state dict (aligned to ``groups``) in the form the live settings keep: the saved
    ``param_compensation`` of a ``"kahan"`` group's low-precision parameter kept (its shape
    checked), dropped elsewhere; a ``"kahan"`` parameter saved without one starts at zero. The
    live ``param_rounding`` stays (like ``momentum_dtype``, it decides the state)."""
    state = dict(state_dict["state"])
    for saved_group, group in zip(state_dict["param_groups"], groups):
        mode = group.get("param_rounding", "nearest")
        check_mode(mode)
        kahan = mode == "kahan"
        for saved_id, p, name in zip(saved_group["params"], group["params"], group["param_names"]):
            saved = state.get(saved_id)
            if not saved or PARAM_COMPENSATION not in saved:
                continue
            if not (kahan and p.dtype in LOW_PRECISION):
                state[saved_id] = {k: v for k, v in saved.items() if k != PARAM_COMPENSATION}
            elif tuple(saved[PARAM_COMPENSATION].shape) != tuple(p.shape):
                raise ValueError(
                    f"state {PARAM_COMPENSATION!r} of {name!r} has shape {tuple(saved[PARAM_COMPENSATION].shape)}, "
                    f"expected {tuple(p.shape)}: it comes from another model"
                )
    param_groups = [{**g, "param_rounding": live["param_rounding"]} if "param_rounding" in live else g
                    for g, live in zip(state_dict["param_groups"], groups)]
    return {**state_dict, "state": state, "param_groups": param_groups}
