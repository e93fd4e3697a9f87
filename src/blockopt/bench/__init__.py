"""Benchmarks and the demo: small Llama/GPT-2 models, a local corpus and tokenizer, a training loop,
and `compare` (several optimizers x seeds on one model, with tables, JSON and plots).

Needs the ``bench`` extras (``pip install blockopt[bench]``): tokenizers, matplotlib, tqdm. The
submodules import them, so import what you need from the submodules directly, e.g.
``from blockopt.bench.train import train_run``. The names below are loaded on first use, so
``import blockopt.bench`` itself stays light::

    from blockopt.bench import compare, register_optimizer
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it (PEP 562 lazy attributes)
_LAZY = {
    "compare": "comparison",
    "CompareResult": "comparison",
    "RunRecord": "comparison",
    "CompareConfig": "compare_config",
    "register_optimizer": "peers",
    "registered_optimizers": "peers",
    "get_peer": "peers",
    "build_optimizer": "peers",
    "parse_optimizer_spec": "peers",
    "OptimizerSpec": "peers",
    "Peer": "peers",
    "PeerError": "peers",
    "PeerUnavailableError": "peers",
    "ModelSpec": "modelspec",
    "train_run": "train",
    "RunResult": "train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
