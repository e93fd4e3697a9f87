"""What AdamMini and AdaPM share: their hyperparameters, the block second moment's place in a
step's batch, and its one reduction across ranks. (Shared here so neither imports the other.)

Note [one all-reduce per step]: each block's ``mean(g^2)`` needs the whole block. Where a sharding
cuts blocks, every tensor's per-block partial ``sum(g^2)``, of every param group, is computed
first and summed across ranks with one collective (`Collectives.sum_blocks`); the update then
takes those sums (``sq_sums``) instead of computing its own. With nothing cut, ``sq_sums`` stays
``None`` and the fused kernels sum each block while it is in cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import Collectives, ShardView, is_dtensor, local_tensor
from ..kernels.adam_mini import IMPLEMENTATIONS, block_sq_sums
from ..kernels.codecs import ROUNDING_SEED, StoredMomentum
from ..partition import collapse_names
from ..validation import boolean, caller_stacklevel, choice, pair, real
from . import momentum, param_rounding
from .base import ParamBatch
from .momentum import MOMENTUM_DTYPE_ALIASES, MOMENTUM_DTYPES
from .state import EXP_AVG, STEP, holds_state, stat_dtype
from .nonfinite import NONFINITE

ADAM_HYPERPARAMETERS = {
    "lr": real(0, tensor=True),
    "betas": pair(real(0, 1, high_open=True)),
    "eps": real(0),
    "weight_decay": real(0),
    "decay_1d": boolean(),
    "maximize": boolean(),
    "implementation": choice(*IMPLEMENTATIONS),
    "nonfinite": choice(*NONFINITE),
    "momentum_dtype": choice(*MOMENTUM_DTYPES, aliases=MOMENTUM_DTYPE_ALIASES,
                             hint="how the first moment is stored; see blockopt.optim.momentum"),
    "param_rounding": param_rounding.RULE,
    "seed": momentum.SEED,  # optimizer-wide, not a group setting
}


@dataclass
class SecondMomentBatch(ParamBatch):
    """A batch whose tensors keep one second-moment value per block (``exp_avg_sqs``) and a step count."""

    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    sq_sums: list[Tensor] | None = None  # per-block sum(g^2), summed across ranks; None when no block is cut

    def arguments(self) -> dict:
        """The functional's per-tensor arguments but the first moments."""
        return dict(params=self.params, grads=self.grads, exp_avg_sqs=self.exp_avg_sqs, steps=self.steps,
                    specs=self.layouts, weight_decays=self.weight_decays, sq_sums=self.sq_sums)


class MomentumStorage:
    """What an optimizer with a ``momentum_dtype`` group setting adds to the base class
    (Note [compressed momentum] in `blockopt.optim.momentum`): state creation and checkpoints
    that load across storages. SGDSaI uses it too, for its ``momentum_buffer``."""

    _MOMENTUM_KEY = EXP_AVG  # the state key of the momentum (its codes and scales: `momentum.keys`)
    _LIVE_SETTINGS = ("momentum_dtype", "implementation")  # group settings a load leaves as they are
    seed: int = ROUNDING_SEED  # the optimizer's ``seed``: its rounding bits (Note [seeded rounding])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._say_where_codes_are_not_kept(len(self.param_groups) - 1)

    def _say_where_codes_are_not_kept(self, index: int, share: float = 0.1) -> None:
        """Warn when int8/int4 codes would keep bf16 m for more than ``share`` of a group's
        momentum (Note [int codes only where a chunk lies in one block]): the user asked for codes
        and gets bf16's memory there (biases alone, a small share, stay quiet)."""
        group = self.param_groups[index]
        setting = group["momentum_dtype"]
        if setting not in momentum.QUANTIZED:
            return
        held = [(n, p.numel()) for n, p in zip(group["param_names"], group["params"]) if self._stores_momentum(n)]
        kept = [(n, k) for n, k in held if self._kept_as(setting, n) != setting]
        total, in_bf16 = sum(k for _, k in held), sum(k for _, k in kept)
        if not total or in_bf16 <= share * total:
            return
        names = collapse_names([n for n, _ in sorted(kept, key=lambda item: -item[1])])  # (the largest first)
        warnings.warn(
            f"momentum_dtype={setting!r}: {in_bf16 / total:.0%} of param group {index}'s momentum "
            f"stays bfloat16 ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): a code chunk of those "
            "tensors would hold several blocks (per-column blocks as in GPT-2's Conv1D, experts whose input width "
            "is not a multiple of 256, per-coordinate tensors), where int codes lose small momenta, or their rows "
            "are so narrow (a few elements) that a scale per row outweighs the codes (docs/compressed-state.md). "
            "blockopt.state_bytes(opt) counts what is kept",
            UserWarning, stacklevel=caller_stacklevel(),
        )

    def _stores_momentum(self, name: str) -> bool:
        """Whether parameter ``name`` keeps a momentum in its group's ``momentum_dtype``."""
        return True

    def _kept_as(self, momentum_dtype: str | None, name: str) -> str | None:
        """`momentum.kept_as` for parameter ``name``: its storage under ``momentum_dtype`` (Note [int
        codes only where a chunk lies in one block])."""
        if momentum_dtype not in momentum.QUANTIZED:
            return momentum_dtype
        return momentum.kept_as(momentum_dtype, self.block_spec(name))

    def _keep_momentum(self, batch: ParamBatch, name: str, p: Tensor, state: dict, plain: bool) -> Tensor | StoredMomentum:
        """Create ``p``'s momentum on first use; what the update takes in place of ``exp_avg``:
        the tensor itself, or a `StoredMomentum` where it is compressed."""
        dtype, key = self._kept_as(batch.group["momentum_dtype"], name), self._MOMENTUM_KEY
        if dtype is None or dtype == "float32":  # the common case, every step: keep it cheap
            m = state.get(key)
            if m is not None and m.dtype == (p.dtype if dtype is None else torch.float32):
                return m if plain else local_tensor(m)
        layout = batch.layouts[-1]  # (the base class appended p's)
        if not any(k in state for k in momentum.keys(key)):
            state.update(momentum.create(dtype, p, key) if plain else momentum.create_sharded(dtype, p, layout, name, key))
        else:  # (the plain case's every step returned above)
            momentum.check_kept(dtype, state, name, key, param_dtype=p.dtype)
        if dtype in (None, "float32"):
            return local_tensor(state[key])
        if not isinstance(layout, ShardView):
            return momentum.stored(dtype, state, name, key, seed=self.seed)
        if momentum.kept_whole(dtype, layout):
            whole = momentum.stored(dtype, state, name, key, seed=self.seed)
            return self._part_of_whole(whole, layout, state, local_tensor(p))
        return momentum.stored_shard(dtype, state, name, layout, key, seed=self.seed)  # (FSDP2's shards, ZeRO's pieces)

    # Note [compressed momentum of sharded parameters] in `blockopt.optim.momentum`: a momentum
    # kept whole on every rank is stepped in parts, and encoded whole after the step.
    def _part_of_whole(self, whole: StoredMomentum, view: ShardView, state: dict, p: Tensor) -> Tensor:
        """This rank's part of a momentum kept whole on every rank, decoded, for the step to update
        (the whole is encoded again once the step is done: `step`)."""
        start, size = view.box[0]
        part = whole.decode(tuple(view.spec.shape), stat_dtype(p))[start:start + size]
        self.__dict__.setdefault("_parts_of_whole", []).append((part, whole, view, state))
        return part

    @torch.no_grad()
    def step(self, closure=None):
        """The base class's step; then the momenta kept whole on every rank are gathered from
        their parts (one all-reduce) and encoded, as one process encodes them."""
        self.__dict__.pop("_parts_of_whole", None)  # (what a step that raised left)
        loss = super().step(closure)
        parts = self.__dict__.pop("_parts_of_whole", None)
        if parts:
            views = [view for _, _, view, _ in parts]
            gathered = self._collectives(views).gather_whole([part for part, _, _, _ in parts], views)
            for m, (_, whole, _, state) in zip(gathered, parts):
                whole.encode_(m, int(state[STEP]))
        return loss

    def _convert_loaded(self, state_dict: dict, pairs) -> dict:
        declared = {pid: g.get("momentum_dtype") for g in state_dict["param_groups"] for pid in g["params"]}
        state = dict(state_dict["state"])
        for saved_id, p, name in pairs:
            saved = state.get(saved_id)
            if not holds_state(saved):
                continue
            source = momentum.saved_dtype(saved, self._kept_as(declared.get(saved_id), name), self._MOMENTUM_KEY)
            target = self._kept_as(self._group_of(p)["momentum_dtype"], name)
            # as saved, before a conversion makes a misfit the right shape
            momentum.check_saved(saved, name, tuple(p.shape), source, target, self._MOMENTUM_KEY)
            if source != target:
                state[saved_id] = momentum.convert(saved, name=name, shape=tuple(p.shape), param_dtype=p.dtype,
                                                   source=source, target=target, key=self._MOMENTUM_KEY,
                                                   param=p, layout=self._layout(name, p), seed=self.seed)
        # the live momentum_dtype and implementation stay: choices of storage and of machine, not
        # of the training run (a checkpoint of a CPU run resumes on the fused kernel it is built with)
        groups = [{**g, **{key: live[key] for key in self._LIVE_SETTINGS if key in live}}
                  for g, live in zip(state_dict["param_groups"], self.param_groups)]
        return {**state_dict, "state": state, "param_groups": groups}

    def _restore_loaded(self, state_dict: dict, pairs) -> None:
        # torch cast every floating state tensor to its parameter's dtype and the codes to floats:
        # the storage goes back exactly as converted
        for saved_id, p, name in pairs:
            saved = state_dict["state"].get(saved_id)
            dtype = self._kept_as(self._group_of(p)["momentum_dtype"], name)
            if not saved or dtype is None:
                continue
            loaded = {key: saved[key].to(device=p.device, copy=True) for key in momentum.keys(self._MOMENTUM_KEY) if key in saved}
            if is_dtensor(p):  # Note [compressed momentum of sharded parameters]
                loaded = momentum.place_loaded(dtype, loaded, p, self._layout(name, p))
            self.state[p].update(loaded)


def reduce_block_sq_sums(batches: list[SecondMomentBatch], collectives: Collectives) -> None:
    """Note [one all-reduce per step]: fill every batch's ``sq_sums`` when blocks are cut."""
    layouts = [layout for batch in batches for layout in batch.layouts]
    if not collectives.cuts_blocks(layouts):
        return
    for batch in batches:
        batch.sq_sums = block_sq_sums(batch.grads, batch.exp_avg_sqs, batch.layouts)
    collectives.sum_blocks([s for batch in batches for s in batch.sq_sums], layouts)
