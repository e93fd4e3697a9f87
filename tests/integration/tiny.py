"""A tiny dataset and tiny transformers models for the framework recipes (seconds on a CPU)."""

from __future__ import annotations

import torch

VOCAB = 64


class Tokens(torch.utils.data.Dataset):
    """16 fixed sequences of 12 tokens, labelled with themselves (causal LM)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def assert_same_parameters(model, other):
    """Bit for bit: a resumed run must be the uninterrupted one."""
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
