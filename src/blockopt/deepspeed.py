"""blockopt optimizers under DeepSpeed ZeRO (stages 1, 2 and 3), and their checkpoints.

Nothing to wrap: pass a blockopt optimizer to ``deepspeed.initialize`` as any torch optimizer, with
``"zero_allow_untested_optimizer": true`` (with the HF Trainer's ``deepspeed=``, through
``optimizer_cls_and_kwargs=blockopt.hf.optimizer_cls_and_kwargs(args)``: the Trainer drops an
optimizer passed in ``optimizers=`` under DeepSpeed)::

    model = ...
    engine, *_ = deepspeed.initialize(model=model, optimizer=blockopt.AdamMini(model, lr=1e-3), config=config)

At its first step the optimizer sees that DeepSpeed replaced its parameters by flat partitions and
steps those as pieces of its parameters, with the blocks of its `Plan`
(`blockopt.distributed.zero`); ``engine.save_checkpoint``/``load_checkpoint`` work as usual.

This module converts checkpoints: `zero_to_state` turns the optimizer files of a ZeRO checkpoint
(any stage, any world size) into the state dict a one-process optimizer loads (CLI: ``blockopt
zero-to-state``), and `load_state` loads such a state dict into an engine's optimizer at any world
size. See docs/deepspeed.md.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .distributed.zero import LABELS, PIECES, _storage, read_partitions
from .optim import momentum
from .optim.state import EXP_AVG, MOMENTUM_BUFFER

_FIRST_MOMENTS = (EXP_AVG, MOMENTUM_BUFFER)  # (AdamMini and AdaPM's, SGD-SaI's)
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _optimizer_state_dict(saved: Any) -> dict | None:
    """The torch optimizer state dict inside a DeepSpeed optimizer file (where it sits depends on the stage)."""
    if isinstance(saved, dict):
        if "state" in saved and "param_groups" in saved:
            return saved
        for value in saved.values():
            found = _optimizer_state_dict(value)
            if found is not None:
                return found
    return None


def _rank_files(checkpoint_dir: str, tag: str | None) -> list[str]:
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir!r} is not a folder: pass the folder DeepSpeed's "
                                "save_checkpoint wrote (the one holding 'latest' and the step folders)")
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir!r} has no 'latest' file: pass the tag (the step folder's name)")
        with open(latest) as f:
            tag = f.read().strip()
    files = [f for f in glob.glob(os.path.join(checkpoint_dir, tag, "*optim_states.pt")) if _RANK.search(f)]
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt) in {os.path.join(checkpoint_dir, tag)!r}")
    return sorted(files, key=lambda f: int(_RANK.search(f).group(1)))


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:  # (torch's zip reader raises RuntimeError)
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error}); is it a "
                         "DeepSpeed optimizer file written whole?") from None


def zero_to_state(checkpoint_dir: str, tag: str | None = None) -> dict[str, Any]:
    """The one-process state dict of the blockopt optimizer saved in a DeepSpeed ZeRO checkpoint.

    Reads every rank's optimizer file of ``checkpoint_dir/<tag>`` (``tag`` from the ``latest``
    file by default) and assembles each parameter's state from its pieces: tensors shaped like
    the parameter from the boxes, block statistics from the global block ids (a block cut by
    the partition has the same value on every rank that holds part of it). The result loads
    into the same optimizer class built on the model in one process (``opt.load_state_dict``),
    or into an engine at another world size (`load_state`).
    """
    per_rank = [_optimizer_state_dict(_load(f)) for f in _rank_files(checkpoint_dir, tag)]
    if any(sd is None for sd in per_rank):
        raise ValueError(f"{checkpoint_dir!r}: an optimizer file holds no torch optimizer state dict")
    pieces: dict[str, list[dict]] = defaultdict(list)
    for sd in per_rank:
        for entry in sd["state"].values():
            if not isinstance(entry, dict) or PIECES not in entry:
                raise ValueError(f"{checkpoint_dir!r} was not saved by a blockopt optimizer under ZeRO (no {PIECES!r} in its state)")
            for piece in entry[PIECES]:
                pieces[piece["param"]].append(piece)
    groups, state, index = [], {}, 0
    for group in per_rank[0]["param_groups"]:
        names = list(group["param_names"])
        ids = list(range(index, index + len(names)))
        index += len(names)
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": ids, "param_names": names})
        for i, name in zip(ids, names):
            if name in pieces:
                state[i] = _assemble(name, pieces[name])
    return {"state": state, "param_groups": groups}


def _assemble(name: str, pieces: list[dict]) -> dict[str, Any]:
    """One parameter's state from its pieces (Note [ZeRO partitions as pieces])."""
    shape = tuple(max(start + size for start, size in dims) for dims in zip(*(p["box"] for p in pieces)))
    n_blocks = max(b for p in pieces for _, b in p["blocks"])
    out: dict[str, Any] = {}
    for piece in pieces:
        box = tuple(slice(start, start + size) for start, size in piece["box"])
        ids = torch.cat([torch.arange(a, b) for a, b in piece["blocks"]])
        for key, value in piece.items():
            if key in LABELS:
                continue
            if not isinstance(value, Tensor) or value.ndim == 0:
                out.setdefault(key, value.clone() if isinstance(value, Tensor) else value)
            elif tuple(value.shape) == tuple(s.stop - s.start for s in box):
                out.setdefault(key, value.new_zeros(shape))[box] = value
            elif value.shape[0] == len(ids):
                out.setdefault(key, value.new_zeros((n_blocks, *value.shape[1:])))[ids] = value
            else:
                raise ValueError(f"{name}: state {key!r} of shape {tuple(value.shape)} is neither like its piece nor per block")
    return out


def load_state(engine, state_dict: dict[str, Any]) -> None:
    """Load a one-process blockopt state dict (from ``opt.state_dict()`` in one process, or
    `zero_to_state`) into the optimizer of a DeepSpeed ZeRO ``engine``, at any world size.

    Each parameter's state is matched by name and cut to the pieces this rank holds. Collective
    in nothing: every rank loads from the same state dict. (The model's weights come with the
    checkpoint that goes with it, e.g. DeepSpeed's consolidated fp32 weights.)"""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict) or \
            not all(isinstance(g, dict) and "param_names" in g for g in groups):
        raise ValueError("load_state takes a blockopt state dict with parameter names (opt.state_dict() of a blockopt "
                         "optimizer in one process, or `blockopt zero-to-state`'s output); this one has no 'param_names' "
                         "in its param groups (a torch.optim state dict?)")
    zero = engine.optimizer
    client = zero.optimizer
    partitions = client.__dict__.get("_zero") or read_partitions(zero, client)
    client._zero = partitions
    saved = {name: (state_dict["state"][i], g) for g in groups
             for i, name in zip(g["params"], g["param_names"]) if i in state_dict["state"]}
    pairs = [(flat, group) for group in client.param_groups for flat in group["params"]]
    if not pairs and hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3 keeps the groups empty between steps
        pairs = list(zip(zero.fp32_partitioned_groups_flat, client.param_groups))
    converted = {}  # name -> its saved entry in the storage its live group keeps
    loaded = {}  # every flat partition's state, before any is applied
    for flat, group in pairs:
        target = _storage(group.get("momentum_dtype"))
        states = []
        for piece in partitions.partition(flat).pieces:
            if piece.name not in saved:
                raise ValueError(f"the state dict has no state for {piece.name!r}: it comes from another model or optimizer")
            if piece.name not in converted:
                converted[piece.name] = _as_kept(client, piece, *saved[piece.name], target)
            states.append({**piece.labels(), **_cut(converted[piece.name], piece, flat)})
        loaded[flat] = {PIECES: states}
    for flat, state in loaded.items():
        client.state[flat] = state


def _as_kept(optimizer, piece, entry: dict[str, Any], group: dict, target: str) -> dict[str, Any]:
    """A parameter's saved entry with its first moment in ``target`` storage (float32 or
    bfloat16: what a ZeRO piece keeps), converted as a one-process load converts (an int8 or
    int4 checkpoint is decoded; a float32 one rounded to bf16 with the step's rounding bits)."""
    name, shape = piece.name, tuple(piece.spec.shape)
    for key in _FIRST_MOMENTS:
        if any(k in entry for k in momentum.keys(key)):
            source = momentum.saved_dtype(entry, group.get("momentum_dtype"), key)
            momentum.check_saved(entry, name, shape, source, target, key)
            entry = momentum.convert(entry, name=name, shape=shape, param_dtype=torch.float32, source=source,
                                     target=target, key=key, seed=getattr(optimizer, "seed", 0))
    return entry


def _cut(entry: dict[str, Any], piece, like: Tensor) -> dict[str, Any]:
    """The part of one parameter's state that ``piece`` holds, as the step keeps it."""
    box = tuple(slice(start, start + size) for start, size in piece.box)
    spec = piece.spec
    ids = torch.cat([torch.arange(a, b) for a, b in piece.blocks])
    out = {}
    for key, value in entry.items():
        if not isinstance(value, Tensor) or value.ndim == 0:
            out[key] = value.clone() if isinstance(value, Tensor) else value
        elif tuple(value.shape) == tuple(spec.shape):  # (a bf16 first moment stays bf16: `_as_kept` chose its storage)
            dtype = value.dtype if key in _FIRST_MOMENTS and value.dtype == torch.bfloat16 else like.dtype
            out[key] = value[box].to(device=like.device, dtype=dtype).clone()
        elif value.shape[0] == spec.n_blocks:
            out[key] = value[ids].to(device=like.device, dtype=like.dtype).clone()
        else:
            raise ValueError(f"{piece.name}: state {key!r} of shape {tuple(value.shape)} fits neither {tuple(spec.shape)} nor {spec.n_blocks} blocks")
    return out
