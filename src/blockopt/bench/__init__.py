"""Benchmarks and the demo: small Llama/GPT-2 models, a local corpus and tokenizer, a training loop,
`compare` (several optimizers x seeds on one model, with tables, JSON and plots), and the one
result writer every benchmark and study uses.

Needs the ``bench`` extras (``pip install blockopt[bench]``): tokenizers, matplotlib, tqdm. Every
public name is loaded on first use, so ``import blockopt.bench`` itself stays light::

    from blockopt.bench import TrainConfig, compare, register_optimizer, train_run, write_result

The modules, by job:

- models, modelspec: the in-house Llama/GPT-2 and what a comparison trains (built-in or HF config);
- corpus, tokenizer: the text and its BPE ids;
- loop, schedules, train: the training-loop settings (`TrainConfig`), the LR schedules, `train_run`;
- peers: the optimizer registry, the spec grammar (``"lion:lr=3e-4"``) and the built-in catalogue;
- compare_config, runner, comparison, plots: `compare` and its `CompareResult`;
- demo: `blockopt demo`, a two-optimizer `compare`;
- environment, results, argtypes: what every benchmark script shares.
"""

from __future__ import annotations

import importlib

# Bound now, not lazily: the submodule of the same name would otherwise shadow the function as
# soon as anything imports it (a package attribute is set to a submodule on its first import).
# Cheap: it needs only torch and blockopt, which importing this package has loaded already.
from .environment import environment

# name -> submodule that defines it (PEP 562 lazy attributes)
_LAZY = {
    # compare
    "compare": "runner",
    "CompareResult": "comparison",
    "RunRecord": "comparison",
    "CompareConfig": "compare_config",
    "DEFAULT_LR": "compare_config",
    "DEMO_CONFIG": "compare_config",
    # optimizers
    "register_optimizer": "peers",
    "unregister_optimizer": "peers",
    "registered_optimizers": "peers",
    "get_peer": "peers",
    "build_optimizer": "peers",
    "parse_optimizer_spec": "peers",
    "OptimizerSpec": "peers",
    "Peer": "peers",
    "PeerError": "peers",
    "PeerUnavailableError": "peers",
    "adamw": "peers",
    "decay_groups": "peers",
    # models
    "ModelSpec": "modelspec",
    "CONFIGS": "models",
    "config_dict": "models",
    "build_model": "models",
    "ModelConfig": "models",
    "LlamaConfig": "models",
    "GPT2Config": "models",
    "Llama": "models",
    # data
    "load_corpus": "corpus",
    "split_ids": "corpus",
    "DEFAULT_MAX_BYTES": "corpus",
    "CorpusError": "corpus",
    "tokenize_corpus": "tokenizer",
    "demo_data": "tokenizer",
    # training
    "TrainConfig": "loop",
    "DEFAULT_STEPS": "loop",
    "train_run": "train",
    "RunResult": "train",
    "steps_to_reach": "train",
    "count_params": "train",
    "windows": "train",
    # what every benchmark script shares
    "write_result": "results",
    "read_result": "results",
    "plot_loss_curves": "plots",
    "positive_int": "argtypes",
    "nonnegative_int": "argtypes",
}

__all__ = sorted([*_LAZY, "environment"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
