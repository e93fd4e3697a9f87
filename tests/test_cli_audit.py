"""`blockopt audit`: a built-in or HF model (scaled down) -> the audit table and the override;
every bad input -> one line on stderr."""

from __future__ import annotations

import json

import pytest

from blockopt.cli import main

from .cli_support import cli_failure

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model-override", "n_layers=1,dim=32,n_heads=4,vocab_size=64,mlp_hidden=32", "--batch-size", "2",
        "--seq-len", "8", "--samples", "8"]


def test_audit_prints_the_table_for_a_built_in_model(capsys):
    assert main(["audit", "llama-tiny", *TINY, "--only", "layers.*.attn.*"]) == 0
    out = capsys.readouterr().out
    assert "Llama, " in out and "2 x 8 random token ids" in out
    lines = [line for line in out.splitlines() if line.startswith("layers.0.attn.")]
    assert [line.split()[0] for line in lines] == [f"layers.0.attn.{p}_proj.weight" for p in "qkvo"]
    assert lines[0].split()[3] == "heads(4)"  # the plan's query rule
    assert "measured: the finest rule keeping >= 0.9" in out


def test_audit_json_carries_every_candidate(capsys):
    assert main(["audit", "gpt2-tiny", *TINY[2:], "--model-override", "n_layers=1,dim=32,n_heads=4,vocab_size=64",
                 "--only", "layers.0.attn.q_proj.weight", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["tensors"]
    assert row["plan"] == "heads(4)" and {"rows", "whole", "coordinate", "heads(2)", "heads(8)"} <= set(row["mass"])
    assert data["model"]["source"] == "gpt2-tiny" and data["settings"]["samples"] == 8


@pytest.mark.hf
def test_audit_an_hf_config_scaled_down(capsys):
    pytest.importorskip("transformers")
    assert main(["audit", "hf:llama", "--model-override", "hidden_size=32,intermediate_size=32,num_hidden_layers=1,"
                 "num_attention_heads=4,num_key_value_heads=2,vocab_size=64", *TINY[2:],
                 "--only", "*.k_proj.weight"]) == 0
    out = capsys.readouterr().out  # names as LlamaForCausalLM spells them (no wrapper's prefix)
    assert "model.layers.0.self_attn.k_proj.weight" in out and "model.model." not in out and "heads(2)" in out


@pytest.mark.hf
def test_the_override_for_an_hf_model_applies_to_that_model(capsys):
    """The printed rules= name the HF model's own tensors: with the bench wrapper's prefix they
    matched no parameter of the user's model, and partition refused them."""
    pytest.importorskip("transformers")
    import blockopt
    from blockopt.bench.modelspec import ModelSpec, parse_overrides

    override = "hidden_size=32,num_attention_heads=4,num_hidden_layers=1,intermediate_size=64,vocab_size=64"
    assert main(["audit", "hf:gpt_neox", "--model-override", override, *TINY[2:], "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["override"]["rules"] and not any(row["name"].startswith("model.") for row in data["tensors"])
    hf_model = ModelSpec.parse("hf:gpt_neox", parse_overrides(override)).build(0).model  # the user's model
    plan = blockopt.partition(hf_model, **data["override"])
    flagged = [row["name"] for row in data["tensors"] if row["verdict"] != "agrees"]
    assert any(plan[name].rule == "whole" for name in flagged)


@pytest.mark.parametrize("argv, status, words", [
    (["audit", "no-such-model"], 1, "unknown model 'no-such-model'"),
    (["audit", "gpt2-small"], 1, "more than --max-params"),
    (["audit", "llama-tiny", *TINY, "--only", "nothing*"], 1, "--only nothing* matches no tensor"),
    (["audit", "llama-tiny", "--model-override", "n_heads=3"], 1, "bad model override"),
    (["audit", "llama-tiny", "--keep", "2", *TINY], 1, "keep must be"),
    (["audit", "llama-tiny", "--samples", "0"], 2, "--samples"),
])
def test_bad_input_is_one_line(argv, status, words, capsys):
    code, err = cli_failure(argv, capsys)
    assert code == status and words in err, err
