"""Hessian tools: sharpness by block type (Hessian-vector products, power iteration, Hutchinson),
the learning-rate ratios it suggests, exact and sampled Hessian blocks, and `audit` (a plan
against the measured block structure)."""

from .audit import AuditReport, TensorAudit, audit
from .blocks import Mass, block_mass, block_masses, hessian_block, sample_columns
from .ratios import sharpness_ratios
from .sharpness import (
    MEASURES,
    PowerResult,
    SharpnessReport,
    TypeSharpness,
    block_sharpness,
    hutchinson_trace,
    hvp_operator,
    power_iteration,
)

__all__ = [
    "AuditReport",
    "MEASURES",
    "Mass",
    "PowerResult",
    "SharpnessReport",
    "TensorAudit",
    "TypeSharpness",
    "audit",
    "block_mass",
    "block_masses",
    "block_sharpness",
    "hessian_block",
    "hutchinson_trace",
    "hvp_operator",
    "power_iteration",
    "sample_columns",
    "sharpness_ratios",
]
