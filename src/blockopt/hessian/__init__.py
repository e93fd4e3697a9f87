"""Hessian tools: sharpness by block type (Hessian-vector products, power iteration, Hutchinson),
and the learning-rate ratios it suggests."""

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
    "MEASURES",
    "PowerResult",
    "SharpnessReport",
    "TypeSharpness",
    "block_sharpness",
    "hutchinson_trace",
    "hvp_operator",
    "power_iteration",
    "sharpness_ratios",
]
