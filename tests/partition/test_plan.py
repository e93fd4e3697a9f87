"""`Plan`: the mapping, its report, its summary, and what it contains."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt import PartitionWarning, Plan
from blockopt.partition import make_spec

# Config numbers of the tiny Llama built in conftest.py (the expectations are written from them).
V, E, I, L, H, KV = 64, 32, 48, 2, 4, 2
KV_W = KV * (E // H)  # k_proj/v_proj output width


@pytest.mark.hf
def test_str_shows_every_name_rule_and_reason(gpt2_plan):
    text = str(gpt2_plan)
    for name, spec in gpt2_plan.items():
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert spec.rule in line.split()
        assert spec.reason and spec.reason in line
    assert "lm_head.weight" in text  # the tied alias is shown next to its canonical name
    assert str(gpt2_plan.summary()) in text


@pytest.mark.hf
def test_summary_totals_llama(llama, llama_plan):
    s = llama_plan.summary()
    trainable = [p for p in llama.parameters() if p.requires_grad]
    assert s.n_tensors == len(trainable) == len(llama_plan)
    assert s.n_params == sum(p.numel() for p in trainable)
    assert s.n_blocks == sum(spec.n_blocks for spec in llama_plan.values())
    # written from the config: rows = embed, lm_head and per layer v, o, gate, up, down;
    # heads = q, k per layer; whole = two norms per layer + the final norm
    assert s.tensors_per_rule == {"rows": 2 + 5 * L, "heads": 2 * L, "whole": 2 * L + 1}
    assert s.blocks_per_rule == {"rows": 2 * V + L * (KV_W + E + I + I + E), "heads": L * (H + KV), "whole": 2 * L + 1}
    assert s.params_per_rule == {
        "rows": 2 * V * E + L * (KV_W * E + E * E + 3 * I * E),
        "heads": L * (E * E + KV_W * E),
        "whole": (2 * L + 1) * E,
    }
    assert s.v_fraction == pytest.approx(s.n_blocks / s.n_params)
    assert "total" in str(s)


@pytest.mark.hf
def test_summary_counts_tied_tensor_once(gpt2, gpt2_plan):
    s = gpt2_plan.summary()
    assert s.n_params == sum(p.numel() for p in gpt2.parameters())  # parameters() yields the tied tensor once
    assert s.n_tensors == len(list(gpt2.parameters()))
    assert s.n_blocks == sum(spec.n_blocks for spec in gpt2_plan.values())
    assert s.tensors_per_rule == dict(Counter(spec.rule for spec in gpt2_plan.values()))


def test_summary_on_torch_model():
    layer = nn.TransformerEncoderLayer(16, 4, 32)
    s = blockopt.partition(layer).summary()
    # in_proj: 4 q heads + 4 k heads + 16 v rows; out_proj/linear1/linear2 rows; 2 norms; 6 biases
    assert s.blocks_per_rule == {"heads": 24, "rows": 16 + 32 + 16, "whole": 2, "coordinate": 48 + 16 + 32 + 16 + 16 + 16}
    assert s.n_params == sum(p.numel() for p in layer.parameters())


@pytest.mark.hf
def test_pickle_round_trip(gpt2_plan):
    back = pickle.loads(pickle.dumps(gpt2_plan))
    assert isinstance(back, Plan)
    assert back == gpt2_plan
    assert hash(back) == hash(gpt2_plan)
    assert list(back) == list(gpt2_plan)
    assert back["lm_head.weight"].name == "transformer.wte.weight"  # aliases survive
    name = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(back[name].block_index(), gpt2_plan[name].block_index())
    assert back[name].reduce_dims == gpt2_plan[name].reduce_dims


def test_pickle_keeps_warnings(custom):
    with pytest.warns(PartitionWarning):
        plan = blockopt.partition(custom)
    back = pickle.loads(pickle.dumps(plan))
    assert back == plan and back.warnings == plan.warnings and back.warnings


def test_equality_is_by_specs():
    a = Plan([make_spec("w", (4, 2), "rows", "r"), make_spec("b", (4,), "coordinate", "r")])
    b = Plan([make_spec("w", (4, 2), "rows", "r"), make_spec("b", (4,), "coordinate", "r")])
    c = Plan([make_spec("w", (4, 2), "whole", "r"), make_spec("b", (4,), "coordinate", "r")])
    assert a == b and a != c and a != {"w": a["w"], "b": a["b"]}


@pytest.mark.hf
def test_missing_name_raises_key_error(llama_plan):
    with pytest.raises(KeyError, match="nope"):
        llama_plan["nope"]
    assert "nope" not in llama_plan
    assert llama_plan.get("nope") is None


def test_duplicate_spec_names_rejected():
    with pytest.raises(ValueError, match="w"):
        Plan([make_spec("w", (4, 2), "rows", "r"), make_spec("w", (4, 2), "whole", "r")])


@pytest.mark.hf
def test_frozen_parameters_absent(llama_factory):
    model = llama_factory()
    frozen = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    plan = blockopt.partition(model)
    for name in frozen:
        assert name not in plan
        with pytest.raises(KeyError):
            plan[name]
    assert set(plan) == set(params) - set(frozen)
    assert plan.summary().n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.hf
def test_frozen_tied_parameter_absent_under_both_names(gpt2_factory):
    model = gpt2_factory()
    model.transformer.wte.weight.requires_grad_(False)
    plan = blockopt.partition(model)
    assert "transformer.wte.weight" not in plan and "lm_head.weight" not in plan
    assert plan.summary().n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_empty_or_all_frozen_model_raises():
    with pytest.raises(ValueError):
        blockopt.partition(nn.Module())
    with pytest.raises(ValueError):
        blockopt.partition(nn.Sequential(nn.ReLU()))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError):
        blockopt.partition(frozen)


def test_table_truncates_and_repr():
    mlp = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    plan = blockopt.partition(mlp)
    table = plan.table(max_rows=2)
    assert "... 4 more tensors" in table
    assert "0.weight" in table and "2.bias" not in table
    assert repr(plan) == "Plan(6 tensors, 60 params, 24 blocks)"


def test_merged_plans():
    a = blockopt.partition(nn.Sequential(nn.Linear(3, 4)))
    b = Plan([make_spec("extra", (5, 2), "rows", "r")])
    m = a.merged(b)
    assert set(m) == {"0.weight", "0.bias", "extra"}
    assert m.summary().n_blocks == 4 + 4 + 5
    with pytest.raises(ValueError):
        a.merged(a)


def test_a_plan_is_made_by_partition_and_says_so_when_given_a_model():
    model = nn.Linear(3, 4)
    for wrong, got in ((model, "Linear"), (list(model.named_parameters()), "tuple"), (list(model.parameters()), "Parameter")):
        with pytest.raises(TypeError, match=rf"Plan takes BlockSpecs \(got {got}\): a model's plan is blockopt.partition\(model\)"):
            blockopt.Plan(wrong)
    plan = blockopt.partition(model)
    assert blockopt.Plan(plan) == plan == blockopt.Plan(iter(plan.values()))
