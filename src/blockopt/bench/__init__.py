"""Benchmarks and the demo: small Llama/GPT-2 models, a local corpus and tokenizer, a training loop.

Needs the ``bench`` extras (``pip install blockopt[bench]``): tokenizers, matplotlib, tqdm. The
submodules import them, so import what you need from the submodules directly, e.g.
``from blockopt.bench.train import train_run``.
"""
