"""Tiny models shared by the partition tests (built from configs, nothing is downloaded).

The expected partitions in the tests are written from the config numbers below with plain
loops, never with the engine's own helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

# Llama with grouped-query attention: 4 query heads, 2 KV heads, head_dim 8.
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
# GPT-2: E=32, 4 heads of 8, MLP 4E=128, tied lm_head. bos/eos inside the tiny vocab (no config warning).
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)


def make_llama(**overrides) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))


def make_gpt2(**overrides) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **overrides}))


@pytest.fixture(scope="session")
def llama_factory():
    return make_llama


@pytest.fixture(scope="session")
def gpt2_factory():
    return make_gpt2


@pytest.fixture(scope="session")
def llama():
    """A shared Llama; tests must not modify it (build a fresh one with llama_factory instead)."""
    return make_llama()


@pytest.fixture(scope="session")
def gpt2():
    """A shared GPT-2; tests must not modify it (build a fresh one with gpt2_factory instead)."""
    return make_gpt2()


@pytest.fixture(scope="session")
def llama_plan(llama):
    import blockopt

    return blockopt.partition(llama)


@pytest.fixture(scope="session")
def gpt2_plan(gpt2):
    import blockopt

    return blockopt.partition(gpt2)


class TinyCustom(nn.Module):
    """A module the adapters cannot know: raw parameters next to a Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 5))  # raw matrix: must fall back to rows, warned
        self.scale = nn.Parameter(torch.ones(5))  # raw vector: per coordinate


@pytest.fixture
def custom():
    return TinyCustom()
