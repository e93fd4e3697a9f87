"""Stacked expert tensors ``(E, a, b)``: which dim holds the output neurons, and their layout.

One block per expert per output neuron is the rule; the orientation is established, in order,
from the forward (`usage.output_dims`), from what the module declares (``output_size``,
``is_transposed``), or from the tensor's name with the hidden size. Shared by the module path
(`adapters.stacked_experts`) and the names-only path (`engine`).
"""

from __future__ import annotations

import torch.nn as nn

from . import usage
from .context import Context, _int_attr
from .spec import BlockSpec

# Names that say which side of an expert's MLP a stacked tensor is; used only where its forward
# could not be followed, and only when the hidden size confirms it (see `expert_output_dim`).
_DOWN_NAMES = ("down", "w2", "wo", "fc2")
_UP_NAMES = ("gate", "up", "w1", "w3", "wi", "fc1")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size", "d_model", "n_embd", "embed_dim")


def expert_output_dim(name: str, shape: tuple[int, ...], hidden: int | None) -> int | None:
    """The output dim (1 or 2) of a stacked expert tensor ``(E, a, b)`` named ``name``, when its
    name says which side of the MLP it is and exactly one of ``a``, ``b`` is the hidden size: a
    down projection outputs the hidden size, a gate/up projection reads it. Otherwise None."""
    if not hidden or (shape[1] == hidden) == (shape[2] == hidden):
        return None
    hidden_dim = 1 if shape[1] == hidden else 2
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(k in leaf for k in _DOWN_NAMES):
        return hidden_dim
    if any(k in leaf for k in _UP_NAMES):
        return 3 - hidden_dim
    return None


def expert_output_dims(path: str, module: nn.Module, names: list[str], ctx: Context) -> dict[str, tuple[int, str]]:
    """Output dim and how it was established, for each stacked tensor of an experts module:
    from the forward (`usage.output_dims`, once per module type and shapes), else from what the
    module declares (``output_size``/``input_size``, ``is_transposed``), else from name and hidden
    size; missing when none can tell."""
    params = dict(module.named_parameters(recurse=False))
    key = ("experts", type(module), tuple((n, tuple(params[n].shape), params[n].dtype) for n in names))
    if key not in ctx.cache:
        parent_path, _, leaf = path.rpartition(".")
        parent = ctx.modules.get(parent_path) if path else None
        ctx.cache[key] = usage.output_dims(module, names, parent=parent, prefix=leaf)
    found = {n: (d, "output dim read from its forward") for n, d in ctx.cache[key].items()}
    transposed = getattr(module, "is_transposed", None)
    cfg = getattr(module, "config", None)
    hidden = _int_attr(module, _HIDDEN_ATTRS) or (_int_attr(cfg, _HIDDEN_ATTRS) if cfg is not None else None)
    sizes = (_int_attr(module, ("output_size", "out_features")), _int_attr(module, ("input_size", "in_features")))
    for n in names:
        shape = tuple(params[n].shape)
        if n in found:
            continue
        if sizes[0] and sizes[1] and sizes[0] != sizes[1] and sorted(shape[1:]) == sorted(sizes):
            found[n] = (shape.index(sizes[0], 1), f"output_size={sizes[0]} (forward not followed)")
        elif isinstance(transposed, bool):
            found[n] = (2 if transposed else 1, f"is_transposed={transposed} (forward not followed)")
        elif (d := expert_output_dim(n, shape, hidden)) is not None:
            found[n] = (d, f"name and hidden size {hidden} (forward not followed)")
    return found


def expert_rows_spec(name: str, shape: tuple[int, ...], out_dim: int, why: str) -> BlockSpec:
    """One block per expert per output neuron of a stacked ``(E, ., .)`` tensor."""
    return BlockSpec(name=name, shape=tuple(shape), rule="rows", role="ffn", reason=why,
                     block_dims=(0, out_dim), segments=((shape[0] * shape[out_dim], 1),))
