"""The partition engine: structure detection, block rules, adapters, the `Plan`, and block types."""

from .adapters import ADAPTERS, register_adapter
from .block_types import BLOCK_TYPES, ROLE_TO_TYPE, block_types
from .context import Context
from .engine import PartitionWarning, collapse_names, partition
from .plan import Plan, PlanSummary
from .spec import ROLES, RULES, BlockSpec, make_spec

__all__ = [
    "ADAPTERS", "BLOCK_TYPES", "BlockSpec", "Context", "PartitionWarning", "Plan", "PlanSummary", "ROLES",
    "ROLE_TO_TYPE", "RULES", "block_types", "collapse_names", "make_spec", "partition", "register_adapter",
]
