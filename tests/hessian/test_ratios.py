"""sharpness_ratios: a sharpness measurement (a report or a mapping) -> blockwise_lr ratios."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import blockopt
from blockopt.bench.models import build_model
from blockopt.hessian import SharpnessReport, TypeSharpness, sharpness_ratios
from blockopt.param_groups import resolve_ratios


def test_ratios_scale_with_inverse_sqrt_of_sharpness():
    ratios = sharpness_ratios({"vo": 4.0, "norm": 1.0, "ffn": 0.25, "qk": 1e-4})
    assert ratios["vo"] == 1.0  # the sharpest type is the base
    assert ratios["norm"] == pytest.approx(2.0)  # sqrt(4 / 1)
    assert ratios["ffn"] == pytest.approx(4.0)  # sqrt(4 / 0.25)
    assert ratios["qk"] == 10.0  # sqrt(4e4) = 200, capped at max_ratio
    assert ratios["embedding"] == ratios["head"] == ratios["bias"] == 1.0  # not measured: the base
    assert "qkv" not in ratios and resolve_ratios(ratios)["qkv"] == 1.0  # min(qk, vo)


def test_power_and_cap():
    ratios = sharpness_ratios({"vo": 4.0, "norm": 1.0, "qk": 0.01}, power=1.0, max_ratio=50.0)
    assert ratios["norm"] == pytest.approx(4.0) and ratios["qk"] == pytest.approx(50.0)
    assert sharpness_ratios({"vo": 4.0, "norm": 1.0}, max_ratio=1.0)["norm"] == 1.0


def test_ratios_from_a_report_feed_blockwise_lr():
    report = SharpnessReport([
        TypeSharpness("embedding", 10, ("e",), gauss_newton_per_param=9e-4, trace_per_param=-1.0),
        TypeSharpness("vo", 10, ("v",), gauss_newton_per_param=3.6e-3, trace_per_param=2.0),
    ], settings={})
    ratios = sharpness_ratios(report)
    assert ratios["embedding"] == pytest.approx(2.0) and ratios["vo"] == 1.0
    assert blockopt.sharpness_ratios is sharpness_ratios
    groups = blockopt.blockwise_lr(build_model("llama-tiny"), lr=1e-3, ratios=ratios)
    lrs = {g["block_type"]: g["lr"] for g in groups}
    assert lrs["embedding"] == pytest.approx(2e-3) and lrs["norm"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="positive.*gauss_newton"):
        sharpness_ratios(report, measure="trace")  # the embedding's trace is negative


def test_a_report_without_the_measure_says_which_it_has_and_how_to_measure_it():
    # block_sharpness measures lambda_max and trace by default; sharpness_ratios reads gauss_newton
    report = SharpnessReport([TypeSharpness("vo", 10, ("v",), lambda_max=2.0, trace_per_param=1.0),
                              TypeSharpness("qk", 10, ("q",), lambda_max=8.0, trace_per_param=3.0)], settings={})
    with pytest.raises(ValueError, match=r"no 'gauss_newton' values \(it measured lambda_max, trace\): pass "
                                         r"measure='lambda_max', or .*logits_fn"):
        sharpness_ratios(report)
    assert sharpness_ratios(report, measure="lambda_max")["vo"] == pytest.approx(2.0)


@pytest.mark.parametrize("bad, exc, match", [
    ({}, ValueError, "non-empty"),
    ([("vo", 1.0)], ValueError, "non-empty mapping"),
    ({"vo": 1.0, "emb": 0.5}, ValueError, r"unknown block type.*'emb'"),
    ({"vo": 1.0, "qk": 0.0}, ValueError, "positive"),
    ({"vo": float("nan")}, ValueError, r"sharpness\['vo'\] must be a number, got nan"),
    ({"vo": "1"}, TypeError, r"sharpness\['vo'\] must be a number, got '1'"),
])
def test_refuse_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        sharpness_ratios(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ratio=0.5), r"max_ratio must be a number >= 1, got 0.5"),
    (dict(power=0.0), r"power must be a number > 0, got 0.0"),
])
def test_refuse_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharpness_ratios({"vo": 1.0}, **kwargs)


def test_hessian_does_not_import_the_optimizers():
    # `import blockopt.hessian` runs blockopt/__init__.py first, which imports every optimizer; an
    # empty stand-in for the top package leaves what blockopt.hessian itself imports.
    code = (
        "import importlib.util, sys, types\n"
        "top = types.ModuleType('blockopt')\n"
        "top.__path__ = list(importlib.util.find_spec('blockopt').submodule_search_locations)\n"
        "sys.modules['blockopt'] = top\n"
        "import blockopt.hessian\n"
        "print(sorted(m for m in sys.modules if m.startswith('blockopt.')))\n"
    )
    loaded = ast.literal_eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "blockopt.hessian.ratios" in loaded and "blockopt.partition.block_types" in loaded
    assert [m for m in loaded if m.startswith(("blockopt.optim", "blockopt.param_groups"))] == []
