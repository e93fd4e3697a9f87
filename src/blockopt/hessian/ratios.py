"""Learning-rate ratios from measured sharpness: a `block_sharpness` report -> ``blockwise_lr`` ratios.

The paper's ratios (`blockopt.param_groups.DEFAULT_RATIOS`) rest on its ordering (Emb << QK < FFN
< VO << Norm). Where a model's own ordering differs (on the demo Llama the embedding is among the
sharpest and the norms in the middle: benchmarks/studies/blockwise_lr), ratios from its own measurement
follow the principle where the paper's table does not.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..partition import BLOCK_TYPES
from ..validation import check, real
from .sharpness import MEASURES, SharpnessReport


def sharpness_ratios(
    sharpness: Mapping[str, float] | SharpnessReport,
    *,
    measure: str = "gauss_newton",
    power: float = 0.5,
    max_ratio: float = 10.0,
) -> dict[str, float]:
    """LR ratios from measured sharpness: ``(S_sharpest / S_type) ** power``, between 1 and
    ``max_ratio``, so that the sharpest type trains at the base LR and flatter ones faster.

    Args:
        sharpness: a `SharpnessReport` (from `block_sharpness`), or a mapping
            ``{block type: average sharpness}``.
        measure (str): with a report, which of its measures to use (default ``"gauss_newton"``,
            Tr(G_bb)/m_b, which is positive; a Hessian trace can be negative early on).
        power (float): 0.5 (default) scales the LR with the inverse square root of sharpness,
            1 with its inverse. 0.5 trained best on the demo Llama (benchmarks/studies/blockwise_lr).
        max_ratio (float): the largest multiplier handed out (default 10, the paper's largest);
            at least 1, as the sharpest type trains at the base LR.

    Returns:
        ``{block type: ratio}`` for every block type of `BLOCK_TYPES` except ``qkv`` (which then
        follows ``min(qk, vo)``, Note [fused qkv] of `blockopt.param_groups.blockwise_lr`, unless
        it was measured itself): measured types get their ratio, the others the base (1). Pass it
        as ``blockwise_lr(..., ratios=...)``.
    """
    if isinstance(sharpness, SharpnessReport):
        report, sharpness = sharpness, sharpness.values_of(measure)
        if not sharpness:
            held = [m for m in MEASURES if report.values_of(m)]
            raise ValueError(
                f"the SharpnessReport has no {measure!r} values (it measured {', '.join(held) or 'nothing'}): pass "
                f"measure={held[0]!r}, or measure it with block_sharpness(..., measures=(..., 'gauss_newton'), "
                "logits_fn=...) (block_sharpness measures lambda_max and trace by default)"
                if held else "the SharpnessReport holds no values: measure at least one block type"
            )
    if not isinstance(sharpness, Mapping) or not sharpness:
        raise ValueError("sharpness must be a non-empty mapping {block type: sharpness} or a SharpnessReport")
    check("power", power, real(0, low_open=True))
    check("max_ratio", max_ratio, real(1))
    for key, value in sharpness.items():
        check(f"sharpness[{key!r}]", value, real())
    values = {k: float(v) for k, v in sharpness.items()}
    unknown = [k for k in values if k not in BLOCK_TYPES]
    if unknown:
        raise ValueError(f"unknown block type(s) {unknown} in sharpness; block types are {list(BLOCK_TYPES)}")
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"sharpness must be positive to set LR ratios, got {bad}; measure 'gauss_newton' is "
                         "(a Hessian trace can be negative early in training)")
    sharpest = max(values.values())
    ratios = {t: 1.0 for t in BLOCK_TYPES if t != "qkv"}
    ratios.update({k: min(max_ratio, (sharpest / v) ** power) for k, v in values.items()})
    return ratios
