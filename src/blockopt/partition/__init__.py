"""The partition engine: structure detection, block rules, adapters, and the `Plan`."""

from .adapters import ADAPTERS, register_adapter
from .context import Context
from .engine import PartitionWarning, partition
from .plan import Plan, PlanSummary
from .spec import ROLES, RULES, BlockSpec, make_spec

__all__ = [
    "ADAPTERS", "BlockSpec", "Context", "PartitionWarning", "Plan", "PlanSummary", "ROLES", "RULES",
    "make_spec", "partition", "register_adapter",
]
