"""The coverage sweep on a fixed sample of model types, and its checker on plans known to be wrong.

The full sweep over every model type of the installed transformers is a study
(``benchmarks/studies/partition_coverage``); here a sample of 75 types from every family runs on
each CI push: built from default configs on the meta device, partitioned, checked. Every type
must come out right (``structural``) or name what it could not do (``warned``); none may crash or
be silently wrong. The sample lists the types expected to be fully structural apart, so a
regression from structural to warned shows too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import blockopt

transformers = pytest.importorskip("transformers")
from blockopt.partition import coverage  # noqa: E402  (needs transformers)

STRUCTURAL = [
    # causal LMs: GQA, fused qkv of every layout, MoE (stacked experts, both orientations), latent
    # attention, gated queries, hybrids with state-space layers
    "llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "gpt_neox", "gpt_bigcode", "falcon", "bloom", "phi3",
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "qwen3_next", "olmoe",
    "bamba", "falcon_h1", "granitemoehybrid", "opt",
    # seq2seq
    "t5", "bart", "marian", "switch_transformers", "nllb-moe", "pegasus",
    # encoders
    "distilbert", "deberta-v2", "modernbert", "albert",
    # vision
    "vit", "convnext", "resnet", "beit", "dinov2", "segformer", "hiera", "swin", "sam", "canary",  # (tables per coordinate)
    # audio
    "whisper", "seamless_m4t", "audio-spectrogram-transformer", "speech_to_text", "wav2vec2", "hubert",
    # multimodal: towers with their own heads, pooling heads, cross-attention
    "llava", "qwen2_vl", "idefics3", "clip", "blip", "internvl", "glm4v", "fuyu", "align", "siglip", "mistral_large4",
    "blip-2", "layoutlmv3",  # learned query tokens, a pos_embed held outside an embedding module
    # time series and others
    "patchtst", "timesfm", "clip_vision_model", "decision_transformer", "dpr",
]
WARNED = [  # something the engine cannot know (and says so): state-space layers, exotic attention
    "mamba", "rwkv", "xlnet", "sam2", "squeezebert", "gemma3", "patchtsmixer",
]
UNBUILDABLE = ["autoformer"]  # transformers needs a prediction_length its default config lacks
SAMPLE = STRUCTURAL + WARNED + UNBUILDABLE


def test_sample_covers_every_family():
    assert len(SAMPLE) >= 60
    assert {coverage.family(t) for t in SAMPLE} >= {*coverage.FAMILIES, "other"}


@pytest.mark.hf
@pytest.mark.parametrize("model_type", SAMPLE)
def test_right_or_warned_never_silent(model_type):
    row = coverage.cover(model_type)
    silent = [f"{v.tensor}: {v.what}" for v in row.violations if not v.warned]
    assert row.status not in ("crash", "silent"), row.error or silent
    expected = "structural" if model_type in STRUCTURAL else "warned" if model_type in WARNED else "unbuildable"
    assert row.status == expected, (row.error, row.warnings, silent)
    if row.status != "unbuildable":
        assert row.tensors and row.params  # planning time is the sweep's figure, not a test's
    else:
        assert row.error  # listed with transformers' own reason


# ---- the checker catches wrong plans -------------------------------------------------------
def _tiny(name: str, **kw) -> nn.Module:
    config = transformers.AutoConfig.for_model(name, vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, **kw)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.hf
@pytest.mark.parametrize("rules, what", [
    ({"*.q_proj.weight": "whole"}, "crosses a head"),
    ({"*.k_proj.weight": "rows"}, "whole heads"),
    ({"model.embed_tokens.weight": "cols"}, "token row"),
    ({"*.mlp.down_proj.weight": "whole"}, "a matrix in one block"),
])
def test_checker_flags_a_wrong_llama_plan(rules, what):
    model = _tiny("llama")
    assert coverage.check(model, blockopt.partition(model))[0] == []
    violations, _ = coverage.check(model, blockopt.partition(model, rules=rules))
    assert any(what in v.what for v in violations), violations


@pytest.mark.hf
def test_checker_flags_experts_along_the_input_dim():
    model = _tiny("mixtral", num_local_experts=4)
    violations, _ = coverage.check(model, blockopt.partition(model, rules={"*.experts.down_proj": "cols"}))
    assert any("experts" in v.what for v in violations), violations


def test_checker_flags_unrecognised_attention_and_sees_the_warning():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(8, 24)

    model = nn.Sequential(MyAttention())
    with pytest.warns(blockopt.PartitionWarning) as caught:
        plan = blockopt.partition(model)
    violations, _ = coverage.check(model, plan)
    assert [v.tensor for v in violations] == ["0.mix.weight"]
    assert coverage._named_in(violations[0], [str(w.message) for w in caught])
    assert not coverage._named_in(violations[0], ["something else went wrong in 1.mix"])


def test_a_model_of_another_library_is_covered_through_its_builder():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = 2, 4
            self.qkv, self.proj, self.norm = nn.Linear(8, 24), nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj((q * k + v).transpose(1, 2).reshape(B, N, C))

    row = coverage.cover("attention", builder=lambda name: (Attention(), "Attention"), family_name="mine")
    assert (row.status, row.family, row.model_class, row.attention_checked) == ("structural", "mine", "Attention", 1)
    broken = coverage.cover("broken", builder=lambda name: (_ for _ in ()).throw(ImportError("no such library")))
    assert broken.status == "unbuildable" and "no such library" in broken.error
    written = coverage.sweep_results([row, broken], 2.0)
    assert written["totals"] == {"types": 2, "structural": 1, "warned": 0, "silent": 0, "crash": 0, "unbuildable": 1}
    assert [m["model_type"] for m in written["models"]] == ["attention", "broken"] and written["sweep_seconds"] == 2.0
