"""Hessian tools: sharpness by block type (Hessian-vector products, power iteration, Hutchinson)."""

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
]
