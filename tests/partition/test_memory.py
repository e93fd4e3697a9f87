"""State-memory figures implied by a plan, and meta-device planning of named HF shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.partition.memory import memory_table, state_memory


def test_state_memory_formula_matches_real_optimizer_state():
    model = nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 40), nn.LayerNorm(40))
    plan = blockopt.partition(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    mem = state_memory(plan, torch.float32)
    assert mem.adamw_bytes == 8 * n_params
    opt = blockopt.AdamMini(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert blockopt.state_bytes(opt) == mem.adam_mini_bytes + 4 * n_tensors  # + float32 step counters
    bf16 = state_memory(plan, torch.bfloat16)
    assert bf16.adamw_bytes == 4 * n_params and bf16.adam_mini_bytes == 2 * n_params + 4 * plan.summary().n_blocks
    assert "float32" in memory_table(plan) and "bfloat16" in memory_table(plan)


@pytest.mark.hf
def test_llama_2_7b_meta_plan_reproduces_table_1():
    pytest.importorskip("transformers")
    model = blockopt.hf.meta_model("llama-2-7b")
    assert all(p.is_meta for p in model.parameters())
    mem = state_memory(blockopt.partition(model), torch.float32)
    # Adam-mini paper, Table 1: Llama 2-7B, AdamW 53.92 GB vs Adam-mini 26.96 GB of state
    assert mem.adamw_bytes / 1e9 == pytest.approx(53.92, abs=0.02)
    assert mem.adam_mini_bytes / 1e9 == pytest.approx(26.96, abs=0.02)


@pytest.mark.hf
def test_meta_model_from_config_json(tmp_path):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, '
                   '"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}')
    plan = blockopt.partition(blockopt.hf.meta_model(str(cfg)))
    assert plan["model.layers.0.self_attn.k_proj.weight"].n_blocks == 2
    with pytest.raises(FileNotFoundError, match="neither a named config"):
        blockopt.hf.meta_model(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'model_type'"):
        blockopt.hf.meta_model(str(tmp_path / "bad.json"))
