"""Block types: which kind of Transformer block a parameter belongs to (embedding, qk, vo, ffn, ...).

Wang et al. (2025) order the sharpness of a Transformer's blocks by type, ``Emb << QK < FFN < VO
<< Norm``; `blockopt.blockwise_lr` gives each type its own learning rate and
`blockopt.hessian.block_sharpness` measures each type's sharpness. Both read the type from the
spec's ``role`` (what the engine detected from the model's structure), never from a parameter's
name, so the table lives here, beside the roles:

=================  ===========================
block type         roles
=================  ===========================
``embedding``      embedding (a tied embedding/output head counts here)
``pos_embedding``  pos_embedding
``head``           head (an untied output head)
``qk``             query, key
``vo``             value, attn_out
``qkv``            qkv (fused projections)
``ffn``            ffn
``router``         router (MoE gate)
``norm``           norm
``bias``           bias without an owner: see Note [biases]
``conv``           conv
``linear``         linear
``other``          other
=================  ===========================

Note [biases]: the authors' scripts group a bias with its layer (an MLP bias trains at the FFN's
LR, a LayerNorm bias at the norm's). With ``bias="owner"`` (the default) a bias takes the block
type of the one other parameter registered on the same module (``fc.bias`` -> ``fc.weight``'s
role); a bias with no such owner (none, or several candidates) is of type ``bias``. With
``bias="separate"`` every bias is of type ``bias``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .spec import BlockSpec

# Every block type, in a fixed order (the order of blockwise_lr's groups and of sharpness reports).
BLOCK_TYPES = (
    "embedding", "pos_embedding", "head", "qk", "vo", "qkv", "ffn", "router", "norm", "bias", "conv", "linear", "other",
)

# Plan role -> block type. Every role of `ROLES` is listed (a test checks it).
ROLE_TO_TYPE = MappingProxyType({
    "embedding": "embedding",
    "pos_embedding": "pos_embedding",
    "head": "head",
    "query": "qk",
    "key": "qk",
    "value": "vo",
    "attn_out": "vo",
    "qkv": "qkv",
    "ffn": "ffn",
    "router": "router",
    "norm": "norm",
    "bias": "bias",
    "conv": "conv",
    "linear": "linear",
    "other": "other",
})

BIAS_OPTIONS = ("owner", "separate")


def block_types(plan: Mapping[str, BlockSpec], *, bias: str = "owner") -> dict[str, str]:
    """Every parameter's block type at once: name (canonical, as in the plan) -> type.

    ``plan`` is a `Plan` (or any mapping name -> `BlockSpec`). `Plan.block_type` answers for one
    name. ``bias="owner"`` gives a bias its layer's type, ``"separate"`` the type ``bias``
    (Note [biases]).
    """
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a blockopt.Plan, got {type(plan).__name__}")
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {', '.join(map(repr, BIAS_OPTIONS))}, got {bias!r}")
    owners = _owner_roles(plan.values()) if bias == "owner" else {}
    return {name: _block_type(spec, owners) for name, spec in plan.items()}


def _owner_roles(specs: Iterable[BlockSpec]) -> dict[str, str | None]:
    """Module path -> the role of its one non-bias parameter (``None`` where it has several)."""
    roles: dict[str, str | None] = {}
    for spec in specs:
        if spec.role != "bias":
            path = _module_path(spec.name)
            roles[path] = None if path in roles else spec.role
    return roles


def _block_type(spec: BlockSpec, owners: Mapping[str, str | None]) -> str:
    role = spec.role
    if role == "bias":
        role = owners.get(_module_path(spec.name)) or role
    return ROLE_TO_TYPE.get(role, "other")


def _module_path(name: str) -> str:
    return name.rpartition(".")[0]
