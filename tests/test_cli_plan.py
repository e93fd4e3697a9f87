"""`blockopt plan`: a model from a config on the meta device -> table, summary, memory figures."""

from __future__ import annotations

import json

import pytest

from blockopt.cli import main


@pytest.mark.hf
def test_plan_prints_table_summary_and_memory(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.k_proj.weight" in out and "2 x8 rows" in out
    assert "second-moment scalars: 313 vs AdamW's 11,872" in out
    # AdamW: 2 x 4 bytes x 11,872 params; Adam-mini: 4 x 11,872 + 4 x 313
    assert "float32" in out and "bfloat16" in out


def test_plan_reports_a_missing_config_as_an_error(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["plan", str(tmp_path / "nope.json")]) == 1
    assert "neither a named config" in capsys.readouterr().err
