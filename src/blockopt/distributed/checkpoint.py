"""Loading a DCP checkpoint whose optimizer state is stored otherwise than the live optimizer's.

``dcp.load`` fills the tensors of the state dict it is handed (``get_state_dict``'s: the live
optimizer's own), so it can only load state stored as the live optimizer stores it. A checkpoint
saved with another ``momentum_dtype`` keeps its momentum under other keys, dtypes or sizes
(``exp_avg`` in float32, or int8 ``exp_avg_codes`` and their scales): DCP refuses the missing
keys, or casts where the tensors happen to fit, which converts nothing.

`ConvertingLoadPlanner` loads such entries as they were saved: for every optimizer state entry
whose tensors differ from the checkpoint's (names, dtypes or global sizes), it swaps the live
tensors for whole tensors shaped like the saved ones before DCP plans the reads, so the state dict
comes back in the checkpoint's storage. ``set_state_dict`` then hands it to the optimizer's
``load_state_dict``, which converts it to the live storage exactly as it converts a one-process
state dict (a sharded parameter's part cut back out; ``docs/compressed-state.md``). Entries that
match load in place, as with DCP's own planner. The swapped tensors are whole on every rank, one
entry's worth each, until ``load_state_dict`` converts and drops them. It is for optimizers whose
``load_state_dict`` converts (blockopt's): torch's own would keep a whole tensor for a shard.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .shard import is_dtensor, local_tensor


class ConvertingLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner for checkpoints whose optimizer state is stored in another layout::

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path, planner=blockopt.distributed.ConvertingLoadPlanner())
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    """

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is None:
            return
        saved = {key: meta for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
        saved_by_entry: dict[str, list[str]] = {}
        for key in saved:
            saved_by_entry.setdefault(key.rpartition(".")[0], []).append(key)
        for entry, live_keys in _state_entries(self.mappings).items():
            saved_keys = saved_by_entry.get(".".join(map(str, entry)), [])
            if not saved_keys or _stored_alike(self.state_dict, live_keys, saved):
                continue
            tensors = [self.state_dict[k] for k in live_keys if isinstance(self.state_dict[k], torch.Tensor)]
            device = local_tensor(tensors[0]).device if tensors else torch.device("cpu")
            nested = _nested(self.original_state_dict, entry)  # (what dcp.load hands back)
            for key in live_keys:
                del self.state_dict[key], self.mappings[key]
                nested.pop(key.rpartition(".")[2], None)
            for key in saved_keys:
                meta, leaf = saved[key], key.rpartition(".")[2]
                self.state_dict[key] = nested[leaf] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=device)
                self.mappings[key] = (*entry, leaf)


def _nested(state_dict: dict, path: tuple) -> dict:
    for part in path:
        state_dict = state_dict[part]
    return state_dict


def _state_entries(mappings: dict[str, tuple]) -> dict[tuple, list[str]]:
    """The flattened keys of each optimizer state entry (``(..., "state", <param>)`` -> keys)."""
    entries: dict[tuple, list[str]] = {}
    for key, path in mappings.items():
        if len(path) >= 3 and path[-3] == "state":
            entries.setdefault(tuple(path[:-1]), []).append(key)
    return entries


def _stored_alike(state_dict: dict, live_keys: list[str], saved: dict) -> bool:
    """Whether every live tensor of an entry is in the checkpoint with its dtype and global size."""
    for key in live_keys:
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            continue
        meta = saved.get(key)
        if meta is None or meta.properties.dtype != value.dtype or tuple(meta.size) != tuple(value.size()):
            return False
    return True
