"""Block types from the Plan's roles: `Plan.block_type` for one tensor, `block_types` for all.

Expected types are written from the models' known layouts (which module is what), never with the
library's own role table.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.partition import BLOCK_TYPES, ROLE_TO_TYPE, ROLES, block_types


def llama_types(n_layers: int) -> dict[str, str]:
    """name -> block type of an HF Llama with biases on every projection (untied head)."""
    out = {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm", "lm_head.weight": "head"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": "norm", p + "post_attention_layernorm.weight": "norm"})
        for x, kind in (("q", "qk"), ("k", "qk"), ("v", "vo"), ("o", "vo")):
            out.update({p + f"self_attn.{x}_proj.weight": kind, p + f"self_attn.{x}_proj.bias": kind})
        for x in ("gate", "up", "down"):
            out.update({p + f"mlp.{x}_proj.weight": "ffn", p + f"mlp.{x}_proj.bias": "ffn"})
    return out


@pytest.fixture(scope="module")
def biased_llama_plan(llama_factory):
    model = llama_factory(attention_bias=True, mlp_bias=True)
    return blockopt.partition(model), model.config.num_hidden_layers


def test_each_tensor_of_a_llama_has_its_block_type(biased_llama_plan):
    plan, n_layers = biased_llama_plan
    expected = llama_types(n_layers)
    assert {name: plan.block_type(name) for name in plan} == expected  # a bias takes its layer's type
    assert block_types(plan) == expected


def test_separate_biases_are_their_own_type(biased_llama_plan):
    plan, n_layers = biased_llama_plan
    expected = {n: "bias" if n.endswith(".bias") else kind for n, kind in llama_types(n_layers).items()}
    assert block_types(plan, bias="separate") == expected
    assert plan.block_type("model.layers.0.mlp.up_proj.bias", bias="separate") == "bias"
    assert plan.block_type("model.layers.0.mlp.up_proj.bias") == "ffn"  # the default is unchanged


def test_gpt2_tied_head_fused_qkv_and_biases(gpt2_plan):
    assert gpt2_plan.block_type("lm_head.weight") == gpt2_plan.block_type("transformer.wte.weight") == "embedding"
    assert gpt2_plan.block_type("transformer.wpe.weight") == "pos_embedding"
    p = "transformer.h.0."
    assert gpt2_plan.block_type(p + "attn.c_attn.weight") == gpt2_plan.block_type(p + "attn.c_attn.bias") == "qkv"
    assert gpt2_plan.block_type(p + "attn.c_proj.bias") == "vo"
    assert gpt2_plan.block_type(p + "mlp.c_fc.bias") == "ffn"
    assert gpt2_plan.block_type(p + "ln_1.bias") == "norm"


def test_a_bias_without_a_unique_owner_is_its_own_type():
    class TwoMatrices(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, 4))
            self.b = nn.Parameter(torch.randn(3, 4))
            self.bias = nn.Parameter(torch.zeros(3))

    with pytest.warns(blockopt.PartitionWarning):
        plan = blockopt.partition(nn.ModuleDict({"mix": TwoMatrices(), "fc": nn.Linear(4, 3)}))
    assert block_types(plan) == {
        "mix.a": "other", "mix.b": "other", "mix.bias": "bias",  # two candidate owners: no guess
        "fc.weight": "linear", "fc.bias": "linear",
    }


def test_rules_keep_the_roles(llama):
    plan = blockopt.partition(llama, rules={"*": "coordinate"})  # AdamW layout, same roles
    assert plan.block_type("model.layers.0.self_attn.q_proj.weight") == "qk"
    assert block_types(plan) == block_types(blockopt.partition(llama))


def test_every_role_has_a_block_type():
    assert set(ROLE_TO_TYPE) == set(ROLES)
    assert set(ROLE_TO_TYPE.values()) <= set(BLOCK_TYPES)


def test_asking_leaves_the_plan_as_it_was(llama_plan):
    llama_plan.block_type("lm_head.weight")
    assert pickle.loads(pickle.dumps(llama_plan)) == llama_plan


def test_bad_arguments(llama_plan):
    with pytest.raises(ValueError, match=r"bias must be one of 'owner', 'separate', got 'shared'"):
        llama_plan.block_type("lm_head.weight", bias="shared")
    with pytest.raises(ValueError, match=r"bias must be one of 'owner', 'separate', got \['owner'\]"):
        block_types(llama_plan, bias=["owner"])
    with pytest.raises(KeyError, match="'nothing' is not a trainable parameter"):
        llama_plan.block_type("nothing")
    with pytest.raises(TypeError, match="plan must be a blockopt.Plan, got list"):
        block_types(list(llama_plan.values()))
