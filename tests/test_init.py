"""What ``import blockopt`` gives: the public names, and the submodules the docs use as attributes."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_submodules_the_docs_use_are_attributes_after_import_blockopt():
    # docs/deepspeed.md: `import deepspeed, blockopt` then `blockopt.deepspeed.load_state(...)`;
    # a fresh interpreter, as other tests import the submodules themselves
    code = ("import sys, blockopt\n"
            "assert 'blockopt.bench' not in sys.modules  # (imported on first use, not by `import blockopt`)\n"
            "print(callable(blockopt.deepspeed.load_state), callable(blockopt.deepspeed.zero_to_state), "
            "callable(blockopt.bench.train_run))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


def test_an_unknown_attribute_is_an_attribute_error():
    import blockopt

    with pytest.raises(AttributeError, match="module 'blockopt' has no attribute 'nothing'"):
        blockopt.nothing  # noqa: B018
