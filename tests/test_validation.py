"""blockopt.validation: one rule table, one error style ("{name} must be {range}, got {value!r}")."""

from __future__ import annotations

import math

import pytest
import torch

from blockopt.validation import boolean, check, choice, integer, pair, real, validate


@pytest.mark.parametrize("value, rule, error, message", [
    (-1.0, real(0), ValueError, "lr must be a number >= 0, got -1.0"),
    (1.0, real(0, 1, high_open=True), ValueError, r"lr must be a number in \[0, 1\), got 1.0"),
    (0.0, real(0, 1, low_open=True), ValueError, r"lr must be a number in \(0, 1\], got 0.0"),
    (math.nan, real(0), ValueError, "lr must be a number >= 0, got nan"),
    (math.inf, real(0), ValueError, "lr must be a number >= 0, got inf"),
    ("fast", real(0), TypeError, r"lr must be a number >= 0, got 'fast' \(str\)"),
    (True, real(0), TypeError, r"lr must be a number >= 0, got True \(bool\)"),
    (2.5, integer(1), TypeError, r"lr must be an int >= 1, got 2.5 \(float\)"),
    (True, integer(1), TypeError, r"lr must be an int >= 1, got True \(bool\)"),
    (0, integer(1), ValueError, "lr must be an int >= 1, got 0"),
    (1, boolean(), TypeError, "lr must be True or False, got 1"),
    (1, choice(True, False), ValueError, "lr must be one of True, False, got 1"),  # 1 == True, but not a bool
    ("x", choice("a", "b", hint="pick one"), ValueError, "lr must be one of 'a', 'b', got 'x': pick one"),
    (torch.float16, choice("a", aliases={torch.float32: "a"}), ValueError,
     r"lr must be one of 'a' \(or torch.float32 for 'a'\), got torch.float16"),
    (0.9, pair(real(0, 1)), TypeError, r"lr must be a pair, each a number in \[0, 1\], got 0.9"),
    ((0.9,), pair(real(0, 1)), ValueError, r"lr must be a pair, each a number in \[0, 1\], got \(0.9,\)"),
    ((0.9, 2.0), pair(real(0, 1)), ValueError, r"lr\[1\] must be a number in \[0, 1\], got 2.0"),
    (torch.tensor(0.1), real(0), TypeError, r"lr must be a number >= 0, got a tensor \(tensor\(0.1000\)\): pass a Python number"),
    (torch.ones(2), real(0, tensor=True), ValueError, r"got a tensor of shape \(2,\) \(a 1-element tensor is accepted\)"),
    (torch.tensor(-1.0), real(0, tensor=True), ValueError, r"lr must be a number >= 0, got tensor\(-1.\)"),
])
def test_a_bad_value_is_named_with_its_range(value, rule, error, message):
    with pytest.raises(error, match=message):
        check("lr", value, rule)


@pytest.mark.parametrize("value, rule", [
    (0.0, real(0)), (1, real(0)), (None, real(0, optional=True)), (3, integer(1)), (False, boolean()),
    ("a", choice("a", "b")), ([0.9, 0.99], pair(real(0, 1))), (torch.tensor([1e-3]), real(0, tensor=True)),
])
def test_a_good_value_passes(value, rule):
    check("x", value, rule)


def test_validate_checks_only_the_names_in_its_table():
    table = {"lr": real(0), "rank": integer(1)}
    validate(table, {"lr": 1e-3, "rank": 2, "unknown": object()})
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        validate(table, {"lr": 1e-3, "rank": 0})


def test_validate_puts_the_option_in_place_of_its_alias():
    table = {"dtype": choice(None, "bfloat16", aliases={torch.bfloat16: "bfloat16"}), "lr": real(0)}
    given = {"dtype": torch.bfloat16, "lr": 1e-3, "other": 1}
    assert validate(table, given) == {"dtype": "bfloat16", "lr": 1e-3, "other": 1}
    assert given["dtype"] is torch.bfloat16  # the caller's dict is left as it was
    assert validate(table, {"dtype": None})["dtype"] is None


def test_numbers_are_kept_as_python_numbers():
    """A numpy uint8 lr was stored as is: negated in AdaPM's step it wrapped to 255 (steps 250x
    too large, silently); a Fraction passed the checks and failed inside the kernels."""
    import fractions

    import numpy as np

    table = {"lr": real(0, tensor=True), "rank": integer(1), "betas": pair(real(0, 1, high_open=True))}
    out = validate(table, {"lr": np.uint8(1), "rank": np.int64(3), "betas": (fractions.Fraction(9, 10), np.float32(0.5))})
    assert out == {"lr": 1.0, "rank": 3, "betas": (0.9, 0.5)}
    assert type(out["lr"]) is float and type(out["rank"]) is int and all(type(b) is float for b in out["betas"])
    lr = torch.tensor(0.1)
    assert validate(table, {"lr": lr})["lr"] is lr  # a tensor lr stays the tensor schedulers change in place


def test_an_optimizer_with_a_numpy_lr_steps_as_with_a_float():
    import numpy as np

    import blockopt

    results = []
    for lr in (1, np.uint8(1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = blockopt.AdaPM(model, lr=lr, rank=2)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
