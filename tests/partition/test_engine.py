"""`partition()`: structure detection, adapters, overrides, user geometry, fallbacks.

Expected partitions are written from the models' config numbers with plain loops (see
``build_index``); the engine's helpers are never used to build an expectation.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt import PartitionWarning

# Config numbers of the tiny models built in conftest.py (repeated here on purpose: the tests'
# expectations are written from them, and conftest is not importable as a module).
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)



def build_index(shape, fn) -> torch.Tensor:
    """LongTensor of ``shape`` whose entry at ``pos`` is ``fn(*pos)`` (row-major loop)."""
    flat = [fn(*pos) for pos in itertools.product(*(range(n) for n in shape))]
    return torch.tensor(flat, dtype=torch.long).view(shape)


def flat_pos(shape):
    """fn(*pos) -> row-major flat position (one block per coordinate)."""

    def fn(*pos):
        k = 0
        for p, n in zip(pos, shape):
            k = k * n + p
        return k

    return fn


def rows(*pos):
    return pos[0]


def cols(*pos):
    return pos[1]


def zero(*pos):
    return 0


def assert_layout(spec, rule, n_blocks, fn):
    assert spec.rule == rule, spec
    assert spec.n_blocks == n_blocks, spec
    assert torch.equal(spec.block_index(), build_index(spec.shape, fn)), spec.name


# ---- expected partitions from config numbers ----------------------------------------------
def gpt2_expected(name, shape, value="rows", n_heads=None):
    """(rule, n_blocks, fn) for a GPT-2 tensor. Conv1D stores (in, out): neurons are columns."""
    E, H, V, P = GPT2["n_embd"], n_heads or GPT2["n_head"], GPT2["vocab_size"], GPT2["n_positions"]
    hd = E // H
    if name.endswith(".bias"):
        n = 1
        for s in shape:
            n *= s
        return "coordinate", n, flat_pos(shape)
    if ".ln_" in name or name.startswith("transformer.ln_f"):
        return "whole", 1, zero
    if name.endswith("attn.c_attn.weight"):
        assert shape == (E, 3 * E)

        def col(i, c):
            if c < E:
                return c // hd  # query heads 0..H-1
            if c < 2 * E:
                return H + (c - E) // hd  # key heads H..2H-1
            return 2 * H if value == "whole" else 2 * H + (c - 2 * E)  # value: one block, or per column

        return "heads", 2 * H + (1 if value == "whole" else E), col
    if name.endswith("attn.c_proj.weight"):
        return "cols", E, cols
    if name.endswith("mlp.c_fc.weight"):
        return "cols", 4 * E, cols
    if name.endswith("mlp.c_proj.weight"):
        return "cols", E, cols
    if name == "transformer.wte.weight":
        return "rows", V, rows
    if name == "transformer.wpe.weight":
        return "rows", P, rows
    raise AssertionError(f"unexpected GPT-2 parameter {name}")


def llama_expected(name, shape, value="rows", n_heads=None, n_kv_heads=None):
    E, I, V = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    H = n_heads or LLAMA["num_attention_heads"]
    KV = n_kv_heads or LLAMA["num_key_value_heads"]
    hd = E // H
    kv_width = LLAMA["num_key_value_heads"] * (E // LLAMA["num_attention_heads"])
    if name.endswith("self_attn.q_proj.weight"):
        assert shape == (E, E)
        return "heads", H, lambda i, j: i // hd
    if name.endswith("self_attn.k_proj.weight"):
        assert shape == (kv_width, E)
        k_hd = kv_width // KV
        return "heads", KV, lambda i, j: i // k_hd
    if name.endswith("self_attn.v_proj.weight"):
        return ("whole", 1, zero) if value == "whole" else ("rows", kv_width, rows)
    if name.endswith("self_attn.o_proj.weight"):
        return "rows", E, rows
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return "rows", I, rows
    if name.endswith("mlp.down_proj.weight"):
        return "rows", E, rows
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "rows", V, rows
    if name.endswith("norm.weight"):
        return "whole", 1, zero
    raise AssertionError(f"unexpected Llama parameter {name}")


def check_model(model, plan, expected, **kw):
    names = [n for n, _ in model.named_parameters()]
    assert sorted(plan) == sorted(names)
    for name, p in model.named_parameters():
        rule, n, fn = expected(name, tuple(p.shape), **kw)
        assert_layout(plan[name], rule, n, fn)


# ---- 2. GPT-2 and Llama -----------------------------------------------------------------
@pytest.mark.hf
def test_tiny_configs_match_expectations(llama, gpt2):
    for key, v in LLAMA.items():
        assert getattr(llama.config, key) == v, key
    for key, v in GPT2.items():
        assert getattr(gpt2.config, key) == v, key


@pytest.mark.hf
def test_gpt2_every_tensor(gpt2, gpt2_plan):
    check_model(gpt2, gpt2_plan, gpt2_expected)


@pytest.mark.hf
def test_gpt2_tied_lm_head_is_an_alias_of_wte(gpt2, gpt2_plan):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    spec = gpt2_plan["lm_head.weight"]
    assert spec is gpt2_plan["transformer.wte.weight"]
    assert spec.name == "transformer.wte.weight"
    assert spec.aliases == ("lm_head.weight",)
    assert "lm_head.weight" in gpt2_plan
    assert "lm_head.weight" not in list(gpt2_plan)  # one spec per tensor: iteration is canonical only
    assert_layout(spec, "rows", GPT2["vocab_size"], rows)


@pytest.mark.hf
def test_gpt2_value_whole(gpt2):
    plan = blockopt.partition(gpt2, value="whole")
    check_model(gpt2, plan, gpt2_expected, value="whole")


@pytest.mark.hf
def test_gpt2_roles(gpt2_plan):
    roles = {n: s.role for n, s in gpt2_plan.items()}
    assert roles["transformer.wte.weight"] == "embedding"
    assert roles["transformer.wpe.weight"] == "pos_embedding"
    assert roles["transformer.h.0.attn.c_attn.weight"] == "qkv"
    assert roles["transformer.h.0.attn.c_proj.weight"] == "attn_out"
    assert roles["transformer.h.0.mlp.c_fc.weight"] == roles["transformer.h.1.mlp.c_proj.weight"] == "ffn"
    assert roles["transformer.h.0.ln_1.weight"] == roles["transformer.ln_f.weight"] == "norm"
    assert all(r == "bias" for n, r in roles.items() if n.endswith(".bias"))


@pytest.mark.hf
def test_llama_gqa_every_tensor(llama, llama_plan):
    check_model(llama, llama_plan, llama_expected)
    k = llama_plan["model.layers.0.self_attn.k_proj.weight"]
    assert k.n_heads == LLAMA["num_key_value_heads"]
    assert llama_plan["model.layers.0.self_attn.q_proj.weight"].n_heads == LLAMA["num_attention_heads"]


@pytest.mark.hf
def test_llama_value_whole(llama):
    plan = blockopt.partition(llama, value="whole")
    check_model(llama, plan, llama_expected, value="whole")


@pytest.mark.hf
def test_llama_roles(llama_plan):
    want = {
        "model.embed_tokens.weight": "embedding", "lm_head.weight": "head",
        "model.layers.1.self_attn.q_proj.weight": "query", "model.layers.1.self_attn.k_proj.weight": "key",
        "model.layers.1.self_attn.v_proj.weight": "value", "model.layers.1.self_attn.o_proj.weight": "attn_out",
        "model.layers.1.mlp.gate_proj.weight": "ffn", "model.layers.1.mlp.up_proj.weight": "ffn",
        "model.layers.1.mlp.down_proj.weight": "ffn", "model.layers.1.input_layernorm.weight": "norm",
        "model.norm.weight": "norm",
    }
    assert {n: llama_plan[n].role for n in want} == want


@pytest.mark.hf
def test_llama_tied_embeddings_one_spec(llama_factory):
    model = llama_factory(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = blockopt.partition(model)
    assert plan["lm_head.weight"] is plan["model.embed_tokens.weight"]
    assert len(plan) == len(list(model.parameters()))
    assert_layout(plan["lm_head.weight"], "rows", LLAMA["vocab_size"], rows)


@pytest.mark.hf
def test_hf_models_plan_without_partition_warning(llama, gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        assert blockopt.partition(llama).warnings == ()
        assert blockopt.partition(gpt2).warnings == ()


# ---- 3. torch.nn modules ----------------------------------------------------------------
def mha_in_proj(E, H, value="rows"):
    hd = E // H

    def fn(r, c):
        if r < E:
            return r // hd
        if r < 2 * E:
            return H + (r - E) // hd
        return 2 * H if value == "whole" else 2 * H + (r - 2 * E)

    return fn


@pytest.mark.parametrize("value", ["rows", "whole"])
def test_multihead_attention_packed_in_proj(value):
    E, H = 16, 4
    plan = blockopt.partition(nn.MultiheadAttention(E, H), value=value)
    assert_layout(plan["in_proj_weight"], "heads", 2 * H + (1 if value == "whole" else E), mha_in_proj(E, H, value))
    assert_layout(plan["in_proj_bias"], "coordinate", 3 * E, lambda i: i)
    assert_layout(plan["out_proj.weight"], "rows", E, rows)
    assert_layout(plan["out_proj.bias"], "coordinate", E, lambda i: i)
    assert len(plan) == 4


def test_multihead_attention_separate_kdim_vdim():
    E, H, KD = 16, 4, 8
    plan = blockopt.partition(nn.MultiheadAttention(E, H, kdim=KD, vdim=KD))
    assert_layout(plan["q_proj_weight"], "heads", H, lambda i, j: i // (E // H))
    assert_layout(plan["k_proj_weight"], "heads", H, lambda i, j: i // (E // H))
    assert_layout(plan["v_proj_weight"], "rows", E, rows)
    assert plan["k_proj_weight"].shape == (E, KD)


def test_transformer_encoder_layer():
    E, H, F = 16, 4, 32
    layer = nn.TransformerEncoderLayer(E, H, F, dropout=0.0, batch_first=True)
    plan = blockopt.partition(layer)
    assert_layout(plan["self_attn.in_proj_weight"], "heads", 2 * H + E, mha_in_proj(E, H))
    assert_layout(plan["self_attn.out_proj.weight"], "rows", E, rows)
    assert_layout(plan["linear1.weight"], "rows", F, rows)
    assert_layout(plan["linear2.weight"], "rows", E, rows)
    for norm in ("norm1", "norm2"):
        assert_layout(plan[f"{norm}.weight"], "whole", 1, zero)
        assert_layout(plan[f"{norm}.bias"], "coordinate", E, lambda i: i)
    for bias, n in (("self_attn.in_proj_bias", 3 * E), ("self_attn.out_proj.bias", E), ("linear1.bias", F), ("linear2.bias", E)):
        assert_layout(plan[bias], "coordinate", n, lambda i: i)
    assert len(plan) == len(list(layer.parameters()))


def test_plain_mlp():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    plan = blockopt.partition(mlp)
    assert_layout(plan["0.weight"], "rows", 20, rows)
    assert_layout(plan["2.weight"], "rows", 5, rows)
    assert_layout(plan["0.bias"], "coordinate", 20, lambda i: i)
    assert_layout(plan["2.bias"], "coordinate", 5, lambda i: i)


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False),
                         nn.ConvTranspose2d(4, 6, 3))


def test_cnn_conv_whole_by_default():
    plan = blockopt.partition(_cnn())
    for name in ("0.weight", "3.weight", "4.weight"):
        assert_layout(plan[name], "whole", 1, zero)
    assert_layout(plan["0.bias"], "coordinate", 8, lambda i: i)
    assert_layout(plan["1.weight"], "whole", 1, zero)  # BatchNorm scale
    assert_layout(plan["1.bias"], "coordinate", 8, lambda i: i)
    assert_layout(plan["4.bias"], "coordinate", 6, lambda i: i)


def test_cnn_conv_per_output_channel():
    plan = blockopt.partition(_cnn(), conv="channel")
    assert_layout(plan["0.weight"], "rows", 8, lambda o, i, h, w: o)  # Conv2d: (out, in, kh, kw)
    assert_layout(plan["3.weight"], "rows", 4, lambda o, i, h, w: o)
    assert_layout(plan["4.weight"], "cols", 6, lambda i, o, h, w: o)  # ConvTranspose2d: (in, out, kh, kw)
    assert_layout(plan["1.weight"], "whole", 1, zero)


def test_grouped_conv_per_output_channel():
    conv = nn.Conv2d(4, 6, 3, groups=2)  # weight (out=6, in/groups=2, 3, 3): dim 0 is the output channel
    plan = blockopt.partition(nn.Sequential(conv), conv="channel")
    assert_layout(plan["0.weight"], "rows", 6, lambda o, i, h, w: o)


def test_grouped_conv_transpose_blocks_stay_within_one_output_channel():
    cin, cout, groups = 4, 6, 2
    conv = nn.ConvTranspose2d(cin, cout, 3, groups=groups)  # weight (in=4, out/groups=3, 3, 3)
    plan = blockopt.partition(nn.Sequential(conv), conv="channel")
    idx = plan["0.weight"].block_index()
    # output channel of weight[i, c]: input channel i belongs to group i // (cin/groups), whose outputs
    # are channels g*(cout/groups) .. (g+1)*(cout/groups)-1
    out_ch = build_index(tuple(conv.weight.shape), lambda i, c, h, w: (i // (cin // groups)) * (cout // groups) + c)
    for b in idx.unique().tolist():
        assert out_ch[idx == b].unique().numel() == 1, f"block {b} spans output channels {out_ch[idx == b].unique().tolist()}"


def test_embedding_and_norms():
    model = nn.ModuleDict({"emb": nn.Embedding(12, 6), "ln": nn.LayerNorm(6), "rms": nn.RMSNorm(6),
                           "ln_nobias": nn.LayerNorm(6, bias=False)})
    plan = blockopt.partition(model)
    assert_layout(plan["emb.weight"], "rows", 12, rows)
    assert plan["emb.weight"].role == "embedding"
    assert_layout(plan["ln.weight"], "whole", 1, zero)
    assert_layout(plan["ln.bias"], "coordinate", 6, lambda i: i)
    assert_layout(plan["rms.weight"], "whole", 1, zero)
    assert_layout(plan["ln_nobias.weight"], "whole", 1, zero)
    assert len(plan) == 5



class ViTOnTheModel(nn.Module):
    """timm's and vit-pytorch's layout: the learned tables are the model's own parameters."""

    def __init__(self, T=5, D=6, pos_shape=None):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.reg_token = nn.Parameter(torch.zeros(1, 4, D))
        self.pos_embed = nn.Parameter(torch.zeros(*(pos_shape or (1, T, D))))
        self.norm = nn.LayerNorm(D)


def test_position_tables_and_tokens_held_by_the_model_get_one_block_per_vector():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(ViTOnTheModel())
    assert_layout(plan["pos_embed"], "rows", 5, lambda o, t, d: t)
    assert_layout(plan["reg_token"], "rows", 4, lambda o, t, d: t)
    assert_layout(plan["cls_token"], "rows", 1, lambda o, t, d: 0)
    assert {plan[n].role for n in ("pos_embed", "reg_token", "cls_token")} == {"pos_embedding"}


@pytest.mark.parametrize("pos_shape, norm", [((1, 6, 5), True), ((1, 5, 6), False)])
def test_a_position_table_not_along_a_normalised_width_is_not_recognised(pos_shape, norm):
    model = ViTOnTheModel(pos_shape=pos_shape)  # channels first, or no norm to say the width
    if not norm:
        model.norm = nn.Identity()
    with pytest.warns(PartitionWarning, match="no adapter recognised.* pos_embed"):
        plan = blockopt.partition(model)
    assert plan["pos_embed"].role == "other"

# ---- 4. overrides -----------------------------------------------------------------------
@pytest.mark.hf
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_all_coordinate_is_adamw(which, gpt2, llama):
    model = gpt2 if which == "gpt2" else llama
    plan = blockopt.partition(model, rules={"*": "coordinate"})
    for name, p in model.named_parameters():
        spec = plan[name]
        assert spec.rule == "coordinate"
        assert spec.n_blocks == p.numel()
        assert torch.equal(spec.block_index(), torch.arange(p.numel()).view(p.shape))
    s = plan.summary()
    assert s.n_blocks == s.n_params == sum(p.numel() for p in model.parameters())


def test_all_coordinate_on_torch_modules():
    layer = nn.TransformerEncoderLayer(16, 4, 32)
    plan = blockopt.partition(layer, rules={"*": "coordinate"})
    for name, p in layer.named_parameters():
        assert plan[name].n_blocks == p.numel()


@pytest.mark.hf
def test_first_matching_glob_wins(llama):
    plan = blockopt.partition(llama, rules={"*.q_proj.weight": "whole", "*_proj.weight": "coordinate"})
    for name, p in llama.named_parameters():
        spec = plan[name]
        if name.endswith("q_proj.weight"):
            assert_layout(spec, "whole", 1, zero)
        elif name.endswith("_proj.weight"):
            assert spec.rule == "coordinate" and spec.n_blocks == p.numel()
        else:  # untouched: as detected
            rule, n, fn = llama_expected(name, tuple(p.shape))
            assert_layout(spec, rule, n, fn)
    assert "*.q_proj.weight" in plan["model.layers.0.self_attn.q_proj.weight"].reason


@pytest.mark.hf
def test_override_through_tied_alias(gpt2):
    plan = blockopt.partition(gpt2, rules={"lm_head.weight": "coordinate"})
    assert plan["transformer.wte.weight"].rule == "coordinate"
    assert plan["transformer.wte.weight"].n_blocks == GPT2["vocab_size"] * GPT2["n_embd"]


@pytest.mark.hf
def test_heads_override_on_fused_keeps_split(gpt2, gpt2_plan):
    plan = blockopt.partition(gpt2, rules={"*.c_attn.weight": "heads"})
    name = "transformer.h.0.attn.c_attn.weight"
    rule, n, fn = gpt2_expected(name, (GPT2["n_embd"], 3 * GPT2["n_embd"]))
    assert_layout(plan[name], rule, n, fn)


def test_heads_override_with_n_heads_on_plain_linear():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    plan = blockopt.partition(mlp, n_heads=4, rules={"0.weight": "heads"})
    assert_layout(plan["0.weight"], "heads", 4, lambda i, j: i // 5)
    assert_layout(plan["2.weight"], "rows", 5, rows)


def test_unknown_rule_raises_naming_it():
    mlp = nn.Sequential(nn.Linear(10, 20))
    with pytest.raises(ValueError, match="diagonal"):
        blockopt.partition(mlp, rules={"0.weight": "diagonal"})


def test_unmatched_pattern_raises_naming_it():
    mlp = nn.Sequential(nn.Linear(10, 20))
    with pytest.raises(ValueError, match=r"\*\.q_proj\.weight"):
        blockopt.partition(mlp, rules={"0.weight": "whole", "*.q_proj.weight": "rows"})


def test_pattern_matching_only_frozen_parameters_raises():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    mlp[1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"1\.weight"):
        blockopt.partition(mlp, rules={"1.weight": "whole"})


def test_heads_override_without_head_info_raises():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with pytest.raises(ValueError, match=r"n_heads"):
        blockopt.partition(mlp, rules={"0.weight": "heads"})


@pytest.mark.hf
def test_heads_override_on_gqa_value_uses_kv_heads(llama):
    plan = blockopt.partition(llama, n_heads=4, n_kv_heads=2, rules={"*.v_proj.weight": "heads"})
    hd = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    assert_layout(plan["model.layers.0.self_attn.v_proj.weight"], "heads", LLAMA["num_key_value_heads"], lambda i, j: i // hd)


# ---- 5. user geometry -------------------------------------------------------------------
@pytest.mark.hf
def test_n_heads_not_dividing_query_width_raises(llama, gpt2):
    with pytest.raises(ValueError, match=r"n_heads=3") as e:
        blockopt.partition(llama, n_heads=3)
    assert "q_proj" in str(e.value)
    with pytest.raises(ValueError, match=r"n_heads=3") as e:
        blockopt.partition(gpt2, n_heads=3)
    assert "c_attn" in str(e.value)


def test_n_heads_not_dividing_mha_raises():
    with pytest.raises(ValueError, match=r"n_heads=3"):
        blockopt.partition(nn.TransformerEncoderLayer(16, 4, 32), n_heads=3)


@pytest.mark.hf
def test_n_kv_heads_not_dividing_n_heads_raises(llama):
    with pytest.raises(ValueError, match=r"n_kv_heads=3"):
        blockopt.partition(llama, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"n_kv_heads=3"):  # n_heads detected (4)
        blockopt.partition(llama, n_kv_heads=3)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(n_heads=0), ValueError, r"n_heads must be an int >= 1 or None, got 0"),
    (dict(n_kv_heads=-2), ValueError, r"n_kv_heads must be an int >= 1 or None, got -2"),
    (dict(dim=0), ValueError, r"dim must be an int >= 1 or None, got 0"),
    (dict(head_dim=2.5), TypeError, r"head_dim must be an int >= 1 or None, got 2.5"),
    (dict(n_heads=True), TypeError, r"n_heads must be an int >= 1 or None, got True"),
])
def test_bad_geometry_values_raise(kw, exc, match):
    with pytest.raises(exc, match=match):
        blockopt.partition(nn.Linear(4, 4), **kw)


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"value must be one of 'rows', 'whole', got 'cols'"):
        blockopt.partition(nn.Linear(4, 4), value="cols")
    with pytest.raises(ValueError, match=r"conv must be one of 'whole', 'channel', got 'rows'"):
        blockopt.partition(nn.Linear(4, 4), conv="rows")


@pytest.mark.hf
def test_explicit_heads_override_detected_llama(llama):
    plan = blockopt.partition(llama, n_heads=8, n_kv_heads=4)
    check_model(llama, plan, llama_expected, n_heads=8, n_kv_heads=4)
    plan = blockopt.partition(llama, n_kv_heads=4)  # query heads still detected
    check_model(llama, plan, llama_expected, n_kv_heads=4)
    assert plan["model.layers.0.self_attn.q_proj.weight"].n_blocks == 4
    assert plan["model.layers.0.self_attn.k_proj.weight"].n_blocks == 4


@pytest.mark.hf
def test_explicit_heads_override_detected_gpt2(gpt2):
    plan = blockopt.partition(gpt2, n_heads=8)
    check_model(gpt2, plan, gpt2_expected, n_heads=8)


def test_explicit_heads_override_detected_mha():
    E = 16
    plan = blockopt.partition(nn.MultiheadAttention(E, 4), n_heads=8)
    assert_layout(plan["in_proj_weight"], "heads", 16 + E, mha_in_proj(E, 8))


@pytest.mark.hf
def test_explicit_fewer_heads_gpt2(gpt2):
    plan = blockopt.partition(gpt2, n_heads=2)
    check_model(gpt2, plan, gpt2_expected, n_heads=2)


@pytest.mark.hf
def test_explicit_n_heads_alone_keeps_head_size_for_keys(llama):
    plan = blockopt.partition(llama, n_heads=8)
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert_layout(q, "heads", 8, lambda i, j: i // 4)
    # keys use the same head size as queries (as the official adam-mini: head_numel = dim*dim/n_heads)
    assert_layout(plan["model.layers.0.self_attn.k_proj.weight"], "heads", 4, lambda i, j: i // 4)


# ---- 6. fallback ------------------------------------------------------------------------
def test_raw_matrix_falls_back_to_rows_with_warning(custom):
    with pytest.warns(PartitionWarning, match=r"\bmix\b"):
        plan = blockopt.partition(custom)
    assert_layout(plan["mix"], "rows", 6, rows)
    assert_layout(plan["scale"], "coordinate", 5, lambda i: i)
    assert_layout(plan["lin.weight"], "rows", 6, rows)
    assert all(s.rule != "whole" for s in plan.values())
    assert any("mix" in w for w in plan.warnings)
    assert not any("scale" in w or "lin" in w for w in plan.warnings)
    assert "mix" in str(plan)  # the report shows the warning


def test_raw_3d_parameter_falls_back_to_one_block_per_last_dim_vector():
    # finer than rows-on-dim-0, so a leading dim of size 1 can't make the tensor one block
    m = nn.Module()
    m.experts = nn.Parameter(torch.randn(3, 4, 2))
    m.table = nn.Parameter(torch.randn(1, 5, 2))
    with pytest.warns(PartitionWarning, match="experts"):
        plan = blockopt.partition(m)
    assert_layout(plan["experts"], "rows", 12, lambda a, b, c: 4 * a + b)
    assert_layout(plan["table"], "rows", 5, lambda a, b, c: b)


def test_no_warning_when_everything_is_recognised():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert plan.warnings == ()


# ---- 7. named parameters ----------------------------------------------------------------
@pytest.mark.hf
def test_named_parameters_match_module_path(llama, llama_plan):
    named = blockopt.partition(llama.named_parameters(), n_heads=4, n_kv_heads=2)
    assert sorted(named) == sorted(llama_plan)
    for name, spec in llama_plan.items():
        other = named[name]
        assert (other.rule, other.n_blocks) == (spec.rule, spec.n_blocks), name
        assert torch.equal(other.block_index(), spec.block_index()), name
    check_model(llama, named, llama_expected)


@pytest.mark.hf
def test_named_parameters_of_mlp_weights_of_unsaid_orientation_warn(gpt2, llama):
    """GPT-2's ``mlp.c_fc`` is a Conv1D, (in, out), in transformers and an nn.Linear in nanoGPT: by
    name alone its blocks are a guess (per row: per input neuron for the Conv1D), so it warns,
    where Llama's gate/up/down_proj (nn.Linear by their names) plan silently."""
    with pytest.warns(PartitionWarning, match=r"mlp\.c_fc\.weight \(x\d\), transformer\.h\.\*\.mlp\.c_proj\.weight.*"
                                              r"do not say their orientation.*pass the model itself"):
        plan = blockopt.partition(gpt2.named_parameters(), n_heads=4)
    assert plan["transformer.h.0.mlp.c_fc.weight"].rule == "rows"
    assert blockopt.partition(gpt2)["transformer.h.0.mlp.c_fc.weight"].rule == "cols"  # the model says
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        blockopt.partition(llama.named_parameters(), n_heads=4, n_kv_heads=2)


@pytest.mark.hf
def test_named_parameters_without_heads_never_whole(llama):
    with pytest.warns(PartitionWarning, match="n_heads"):
        plan = blockopt.partition(llama.named_parameters())
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert_layout(q, "rows", LLAMA["hidden_size"], rows)  # finer than heads: safe


@pytest.mark.hf
def test_named_parameters_bad_n_heads(llama):
    with pytest.raises(ValueError, match=r"n_heads=3"):
        blockopt.partition(llama.named_parameters(), n_heads=3)


def test_named_parameter_given_twice_raises():
    named = list(nn.Sequential(nn.Linear(3, 4)).named_parameters())
    with pytest.raises(ValueError, match=r"0\.weight"):
        blockopt.partition(named + [named[0]])


def test_named_parameters_skip_frozen_and_reject_empty():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    mlp[0].weight.requires_grad_(False)
    with pytest.warns(PartitionWarning, match=r"1\.weight"):  # a bare name says nothing: rows, warned
        plan = blockopt.partition(mlp.named_parameters())
    assert_layout(plan["1.weight"], "rows", 2, rows)
    assert "0.weight" not in plan and set(plan) == {"0.bias", "1.weight", "1.bias"}
    with pytest.raises(ValueError):
        blockopt.partition([])


def test_named_parameters_reject_non_pairs():
    with pytest.raises(TypeError):
        blockopt.partition([torch.zeros(3)])


# ---- 8. meta device ---------------------------------------------------------------------
@pytest.mark.hf
def test_meta_llama_plan_equals_cpu_plan(llama_factory, llama_plan):
    with torch.device("meta"):
        model = llama_factory()
    assert next(model.parameters()).is_meta
    plan = blockopt.partition(model)
    assert plan == llama_plan
    assert plan != blockopt.partition(model, value="whole")  # == is not trivially true
    assert torch.equal(plan["model.layers.0.self_attn.k_proj.weight"].block_index(),
                       llama_plan["model.layers.0.self_attn.k_proj.weight"].block_index())


@pytest.mark.hf
def test_meta_gpt2_plan_equals_cpu_plan(gpt2_factory, gpt2_plan):
    with torch.device("meta"):
        model = gpt2_factory()
    plan = blockopt.partition(model)
    assert plan == gpt2_plan
    assert plan["lm_head.weight"].name == "transformer.wte.weight"


@pytest.mark.hf
def test_user_n_heads_on_fused_qkv_is_not_mixed_with_the_models_head_size():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(cfg)  # qkv_proj: 96 rows = 3 x 4 heads of 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(model, n_heads=2)  # the user's view: 2 heads of 16 rows
    spec = plan["model.layers.0.self_attn.qkv_proj.weight"]
    index = spec.block_index()[:, 0].tolist()
    expected = [r // 16 for r in range(32)] + [2 + r // 16 for r in range(32)] + [4 + r for r in range(32)]
    assert index == expected


class StatedHeads(nn.Module):
    """Attention that states its own head count (4 heads of 8)."""

    def __init__(self):
        super().__init__()
        self.num_heads = 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))


def test_a_user_head_dim_sets_the_head_count_and_is_never_half_mixed_with_the_modules():
    """``head_dim=16`` on a module stating 4 heads gave queries the module's 4 heads of 8 and keys
    the user's heads of 16 (2 of them): key blocks crossing the query heads, silently."""
    model = nn.ModuleDict({"attn": StatedHeads()})
    plan = blockopt.partition(model, head_dim=16)
    for t in ("q_proj", "k_proj"):
        assert plan[f"attn.{t}.weight"].n_blocks == 2  # the user's 2 heads of 16, queries and keys alike
    assert blockopt.partition(model)["attn.q_proj.weight"].n_blocks == 4  # (the module's own view)


@pytest.mark.parametrize("kw, message", [
    (dict(head_dim=5), r"head_dim=5 does not divide the query width 32"),
    (dict(n_heads=4, head_dim=16), r"4 heads of head_dim=16 do not make the query width 32"),
])
def test_user_head_geometry_that_does_not_fit_the_width_is_refused(kw, message):
    """Both were accepted: ``head_dim=5`` ignored, ``n_heads=4, head_dim=16`` planned as 4 heads of 8."""
    with pytest.raises(ValueError, match=message + r".*pass the model's real head counts"):
        blockopt.partition(nn.ModuleDict({"attn": StatedHeads()}), **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(n_heads=4, head_dim=16), r"n_heads=4 heads of head_dim=16 make 64 rows, not the width 32 of attn.q_proj"),
    (dict(head_dim=5), r"head_dim=5 does not divide the width 32 of attn.q_proj.weight"),
])
def test_named_parameters_with_head_geometry_that_does_not_fit_are_refused(kw, message):
    named = list(nn.ModuleDict({"attn": StatedHeads()}).named_parameters())
    with pytest.raises(ValueError, match=message):
        blockopt.partition(named, **kw)
    assert blockopt.partition(named, head_dim=16)["attn.q_proj.weight"].n_blocks == 2


# ---- 8. structure over names (issue 27) ----------------------------------------------------
class TransposedExperts(nn.Module):
    """Experts stored (E, in, out) with no ``is_transposed`` attribute, used as ``x @ W[e]``; in and
    out differ so the expected blocks are unambiguous."""

    def __init__(self, E=3, d=4, f=6):
        super().__init__()
        self.num_experts = E
        self.up = nn.Parameter(torch.randn(E, d, f))
        self.down = nn.Parameter(torch.randn(E, f, d))

    def forward(self, hidden_states):
        return sum(torch.relu(hidden_states @ self.up[e]) @ self.down[e] for e in range(self.num_experts))


def test_stacked_experts_orientation_read_from_the_forward():
    plan = blockopt.partition(TransposedExperts())
    # (E, in, out): one block per expert per *column* (output neuron)
    assert_layout(plan["up"], "rows", 3 * 6, lambda e, i, o: e * 6 + o)
    assert_layout(plan["down"], "rows", 3 * 4, lambda e, i, o: e * 4 + o)
    assert "forward" in plan["up"].reason and "(E, in, out)" in plan["up"].reason


def test_stacked_experts_whose_forward_cannot_be_followed_warn():
    class Opaque(TransposedExperts):
        def forward(self, hidden_states, dispatcher):
            return dispatcher(hidden_states, self.up, self.down)

    with pytest.warns(PartitionWarning, match=r"up: stacked expert weights.*rules="):
        blockopt.partition(Opaque())


@pytest.mark.hf
def test_named_parameters_experts_per_expert_neuron_like_the_module_path():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = transformers.MixtralForCausalLM(cfg)
    module_plan = blockopt.partition(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        named = blockopt.partition(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2)
    for p in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{p}"
        assert named[name].n_blocks == module_plan[name].n_blocks == 4 * module_plan[name].shape[1]
        assert torch.equal(named[name].block_index(), module_plan[name].block_index())
    # without dim= the side cannot be confirmed: the (E, out, in) convention, said in a warning
    with pytest.warns(PartitionWarning, match="dim="):
        named = blockopt.partition(model.named_parameters(), n_heads=4, n_kv_heads=2)
    assert named["model.layers.0.mlp.experts.down_proj"].n_blocks == 4 * 32


class MyAttention(nn.Module):
    """Attention the adapters cannot know: a fused projection under a private name."""

    def __init__(self, d=16):
        super().__init__()
        self.num_heads = 4
        self.wqkv_fused = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


def test_unknown_attention_always_warns_naming_tensors_and_options():
    model = nn.Sequential(MyAttention(), MyAttention())
    with pytest.warns(PartitionWarning) as caught:
        plan = blockopt.partition(model)
    text = " ".join(str(w.message) for w in caught)
    assert "MyAttention" in text and "*.wqkv_fused.weight" in text and "n_heads=" in text and "rules=" in text
    assert plan["0.wqkv_fused.weight"].rule == "rows"  # finer than heads: safe
    # the user's rules for those tensors answer the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        blockopt.partition(model, rules={"*.wqkv_fused.weight": "rows", "*.proj.weight": "rows"})


def test_fused_name_with_unknown_heads_warns():
    attn = nn.Module()
    attn.to_qkv = nn.Linear(16, 48)
    attn.to_out = nn.Linear(16, 16)
    with pytest.warns(PartitionWarning, match=r"to_qkv\.weight.*n_heads="):
        plan = blockopt.partition(attn)
    assert plan["to_qkv.weight"].rule == "rows" and plan["to_qkv.weight"].role == "qkv"


class SSMMixer(nn.Module):
    """A state-space layer: ``in_proj`` makes x, z, B, C and dt, not query/key/value, though its
    width (96) happens to fit 4 heads + 2 x 2 KV heads of 8."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim, self.num_key_value_heads = 4, 8, 2
        self.in_proj = nn.Linear(32, 64)
        self.out_proj = nn.Linear(32, 32)


def test_in_proj_of_a_state_space_layer_is_a_linear():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(SSMMixer())
    assert_layout(plan["in_proj.weight"], "rows", 64, rows)
    assert plan["in_proj.weight"].role == "linear"


def test_vision_module_takes_the_matching_sub_config():
    """A composite config (text + vision) and a tower with no config of its own: the heads come
    from the sub-config whose geometry matches the projections, never from the text model's."""
    text = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8)
    vision = SimpleNamespace(num_attention_heads=3, hidden_size=24)
    model = nn.Module()
    model.config = SimpleNamespace(text_config=text, vision_config=vision)
    model.tower = nn.Module()
    for p, out in (("q_proj", 24), ("k_proj", 24), ("v_proj", 24), ("o_proj", 24)):
        setattr(model.tower, p, nn.Linear(24, out))
    plan = blockopt.partition(model)
    assert_layout(plan["tower.q_proj.weight"], "heads", 3, lambda i, j: i // 8)
    assert_layout(plan["tower.k_proj.weight"], "heads", 3, lambda i, j: i // 8)


def test_config_fields_that_raise_are_skipped():
    class PerLayerConfig:
        num_attention_heads, hidden_size = 4, 16

        @property
        def head_dim(self):
            raise RuntimeError("head_dim varies per layer; ask the layer's config")

    model = NestedAttention()
    model.config = PerLayerConfig()
    plan = blockopt.partition(model)
    assert_layout(plan["attn.q_proj.weight"], "heads", 4, lambda i, j: i // 4)


class NestedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.attn, p, nn.Linear(16, 16))


def test_ffn_role_of_transformer_encoder_layer():
    plan = blockopt.partition(nn.TransformerEncoderLayer(16, 4, 24))
    assert plan["linear1.weight"].role == plan["linear2.weight"].role == "ffn"
    assert plan.block_type("linear1.bias") == "ffn"
    assert plan["self_attn.out_proj.weight"].role == "attn_out"


def test_rnn_gates_and_weight_norm_parametrizations():
    model = nn.Sequential(nn.LSTM(4, 6), nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(model)
    assert_layout(plan["0.weight_ih_l0"], "rows", 24, rows)  # 4 gates x 6 units, one block per gate unit
    assert_layout(plan["0.weight_hh_l0"], "rows", 24, rows)
    assert_layout(plan["1.parametrizations.weight.original1"], "rows", 5, rows)  # the direction: the weight's layout
    assert_layout(plan["1.parametrizations.weight.original0"], "coordinate", 5, flat_pos((5, 1)))  # the magnitude



def test_the_older_weight_norm_keeps_the_weights_layout_in_weight_v():
    """torch.nn.utils.weight_norm (HiFi-GAN, EnCodec, DAC and diffusers' audio VAEs use it) moves
    the weight to weight_v and weight_g: both fell to the fallback, with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch: deprecated in favour of the parametrization)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(6, 5)), nn.utils.weight_norm(nn.Conv1d(5, 4, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(model)
        by_channel = blockopt.partition(model, conv="channel")
    assert_layout(plan["0.weight_v"], "rows", 5, rows)  # the direction: the weight's layout
    assert_layout(plan["0.weight_g"], "coordinate", 5, flat_pos((5, 1)))  # the magnitude
    assert plan["1.weight_v"].rule == "whole" and by_channel["1.weight_v"].n_blocks == 4
    assert plan["1.weight_g"].rule == "coordinate" and set(plan) == {"0.weight_v", "0.weight_g", "0.bias",
                                                                      "1.weight_v", "1.weight_g", "1.bias"}

def test_frozen_parameters_are_planned_only_when_asked():
    """partition(model) plans the trainable parameters; frozen=True also the frozen ones, from the
    same structure (what an optimizer built from a module uses)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.layers[0].requires_grad_(False)
    q = "model.layers.0.self_attn.k_proj.weight"
    assert q not in blockopt.partition(model)
    full = blockopt.partition(model, frozen=True)
    assert full[q].rule == "heads" and full[q].n_blocks == 2
    assert set(full) == {n for n, _ in model.named_parameters()}
    with pytest.raises(TypeError, match="frozen must be True or False"):
        blockopt.partition(model, frozen="yes")


def test_a_torchscript_module_or_a_non_model_is_refused_naming_what_to_pass():
    """A scripted module raised a bare AttributeError from deep in the adapters; None a bare
    'NoneType is not iterable'."""
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match=r"cannot plan a TorchScript module .*before torch.jit.script, or its named_parameters\(\)"):
        blockopt.partition(scripted)
    with pytest.raises(TypeError, match="cannot plan a TorchScript module"):
        blockopt.AdamMini(scripted)
    assert blockopt.AdamMini(scripted.named_parameters()).plan["0.weight"].rule == "rows"
    for bad in (None, "model", torch.zeros(3)):
        with pytest.raises(TypeError, match=r"partition takes an nn.Module or \(name, tensor\) pairs"):
            blockopt.partition(bad)


def test_a_patch_projection_is_planned_per_output_channel_wherever_it_sits():
    """A hand-written ViT's ``nn.Conv2d(3, D, p, stride=p)`` held by the model itself was planned
    whole (only one inside an ``*Embed*`` class was found); a patchify conv is a Linear on patches.
    Overlapping, padded, dilated, grouped and transposed convolutions stay whole (conv='whole')."""
    model = nn.ModuleDict({
        "stem": nn.Conv2d(3, 8, 4, stride=4), "valid": nn.Conv1d(3, 8, 2, stride=2, padding="valid"),
        "resnet": nn.Conv2d(3, 8, 7, stride=2, padding=3), "overlap": nn.Conv2d(8, 8, 3, stride=1),
        "dilated": nn.Conv2d(8, 8, 2, stride=2, dilation=2), "depthwise": nn.Conv2d(8, 8, 2, stride=2, groups=8),
        "up": nn.ConvTranspose2d(8, 8, 2, stride=2), "pointwise": nn.Conv2d(8, 8, 1),
    })
    plan = blockopt.partition(model)
    assert {n.split(".")[0] for n, s in plan.items() if n.endswith("weight") and s.rule == "rows"} == {"stem", "valid"}
    assert plan["stem.weight"].n_blocks == 8 and plan["stem.weight"].role == "embedding"
    assert all(plan[f"{n}.weight"].rule == "whole" for n in ("resnet", "overlap", "dilated", "depthwise", "up", "pointwise"))


def test_the_fallback_warning_says_when_rows_are_not_finer():
    """It said 'one block per row', which is finer than the true blocks only for a weight stored
    (out, in): stacked experts (E, in, out) without a count attribute got blocks across output
    neurons, and the warning neither said so nor named a fix."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(4, 8, 12))

    with pytest.warns(PartitionWarning, match=r"no adapter recognised w_in: one block per vector along the last dim "
                                              r"\(per output neuron only for a weight stored \(out, in\).*"
                                              r"pass rules=\{'w_in': 'coordinate'\} \(always safe\)"):
        plan = blockopt.partition(Experts())
    assert plan["w_in"].n_blocks == 32


def test_gpt_fast_wqkv_with_n_local_heads_is_split_by_heads():
    """gpt-fast's ``wqkv`` ([q | k | v], GQA with ``n_local_heads`` KV heads) was not recognised:
    rows, and a warning whose advice (n_heads=) changed nothing."""
    class Attention(nn.Module):
        def __init__(self, dim=64, n_head=8, n_local_heads=2):
            super().__init__()
            self.head_dim, self.n_head, self.n_local_heads = dim // n_head, n_head, n_local_heads
            self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * self.head_dim, bias=False)
            self.wo = nn.Linear(dim, dim, bias=False)
            self.dim = dim

        def forward(self, x):  # gpt-fast's split: what says the rows are [q | k | v]
            kv_size = self.n_local_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
            return self.wo(q)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        spec = blockopt.partition(nn.ModuleDict({"attention": Attention()}))["attention.wqkv.weight"]
    assert spec.n_blocks == 8 + 2 + 2 * 8  # 8 query heads, 2 key heads, a block per value row
    rows = spec.block_index()[:, 0]  # (a row lies in one block)
    assert [int(b) for b in rows.unique_consecutive()] == list(range(26))
    assert (rows[:64].reshape(8, 8) == torch.arange(8).unsqueeze(1)).all()  # query head h: rows 8h..8h+7


# ---- attention built of per-head modules (Karpathy's nanoGPT lecture) ----------------------------
class Head(nn.Module):
    def __init__(self, width: int, head_size: int):
        super().__init__()
        self.key, self.query, self.value = (nn.Linear(width, head_size, bias=False) for _ in range(3))


class PerHeadAttention(nn.Module):
    def __init__(self, width: int = 48, n_heads: int = 4):
        super().__init__()
        self.heads = nn.ModuleList([Head(width, width // n_heads) for _ in range(n_heads)])
        self.proj = nn.Linear(width, width)


def test_attention_of_per_head_modules_gets_one_block_per_head_module():
    """Each ``Head`` fell back to one block per neuron, with a warning (per head module) advising
    n_heads=, which would have cut every one-head query into n_heads pieces."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(nn.ModuleList([PerHeadAttention(), PerHeadAttention()]))
    for layer, head, t in itertools.product(range(2), range(4), ("query", "key")):
        spec = plan[f"{layer}.heads.{head}.{t}.weight"]
        assert (spec.rule, spec.n_blocks, spec.role) == ("heads", 1, t)
    assert plan["0.heads.0.value.weight"].n_blocks == 12


def test_a_stack_of_attention_layers_is_never_taken_for_heads():
    """A ModuleList of attention layers, each as wide as its input, does not tile the width: no
    head count is made up (its query stays per neuron, under the heads-unknown warning, said once
    for the stack)."""
    stack = nn.ModuleList([Head(48, 48) for _ in range(4)])
    with pytest.warns(PartitionWarning) as caught:
        plan = blockopt.partition(stack)
    assert plan["0.query.weight"].n_blocks == 48
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].count("attention heads unknown") == 1 and "(x4)" in messages[0]


class NarrowLayer(Head):
    """A whole attention layer (its own output projection) whose q/k/v are half its input width."""

    def __init__(self):
        super().__init__(64, 32)
        self.out = nn.Linear(32, 64)


def test_a_stack_of_layers_whose_widths_happen_to_tile_is_not_taken_for_heads():
    """Two layers with queries of 32 on an input of 64 tile the width by coincidence: each was
    planned as one head, a query block across the layer's real heads, silently."""
    with pytest.warns(PartitionWarning, match="attention heads unknown"):
        plan = blockopt.partition(nn.ModuleList([NarrowLayer(), NarrowLayer()]))
    assert plan["0.query.weight"].n_blocks == 32


def test_the_unrecognised_attention_warning_says_what_each_tensor_got():
    """A 1x1 Conv1d qkv (guided-diffusion's AttentionBlock) is planned whole, as convolutions are;
    the warning said "one block per row"."""
    class AttentionBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj_out = nn.Conv1d(16, 48, 1), nn.Conv1d(16, 16, 1)

    with pytest.warns(PartitionWarning) as caught:
        plan = blockopt.partition(nn.ModuleDict({"block": AttentionBlock()}))
    assert plan["block.qkv.weight"].rule == "whole"
    message = " ".join(str(w.message) for w in caught)
    assert "block.qkv.weight, block.proj_out.weight get one block each" in message and "conv='channel'" in message
    assert "one block per row" not in message



def test_a_block_around_an_unrecognised_attention_is_warned_for_its_own_tensors():
    """timm's BoTNet/HaloNet ``SelfAttnBlock``: convs around an inner attention. Only the inner
    module was reported; the outer one's own convs, one block each, were named by no warning."""
    class ConvAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Conv2d(16, 48, 1)

    class SelfAttnBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in, self.self_attn, self.conv_out = nn.Conv2d(16, 16, 1), ConvAttention(), nn.Conv2d(16, 16, 1)

    with pytest.warns(PartitionWarning) as caught:
        blockopt.partition(nn.ModuleDict({"block": SelfAttnBlock()}))
    message = " ".join(str(w.message) for w in caught)
    assert "block (SelfAttnBlock) looks like attention" in message
    assert "block.conv_in.weight, block.conv_out.weight get one block each" in message
    assert "block.self_attn (ConvAttention) looks like attention" in message and "block.self_attn.qkv.weight get" in message
    assert message.count("block.self_attn.qkv.weight") == 1  # (each tensor named once: by its innermost module)

# ---- LoRA written by hand ----------------------------------------------------------------------
class LoraLinear(nn.Linear):
    """loralib's ``lora.Linear``: a Linear subclass holding ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, d_in, d_out, r=4):
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(torch.zeros(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))


class LoraWrapper(nn.Module):
    """A wrapper around a Linear, its factors stored ``x @ A @ B``: A (in, r), B (r, out)."""

    def __init__(self, d_in, d_out, r=4, names=("A", "B")):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.names = names
        self.register_parameter(names[0], nn.Parameter(torch.zeros(d_in, r)))
        self.register_parameter(names[1], nn.Parameter(torch.zeros(r, d_out)))


class LoraAttention(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.num_heads = 4
        self.q_proj, self.k_proj, self.v_proj = make(32, 32), make(32, 16), make(32, 16)
        self.o_proj = nn.Linear(32, 32)


@pytest.mark.parametrize("make, a, b, orientation", [
    (LoraLinear, "lora_A", "lora_B", "rows"),
    (LoraWrapper, "A", "B", "cols"),
])
def test_lora_factors_written_by_hand_get_one_block_per_output_neuron_and_the_adapted_role(make, a, b, orientation):
    """They were unrecognised: rows, with a warning; through a wrapper the attention itself was
    not recognised (the wrapper held parameters, so it was no Linear), and ``B`` stored (r, out)
    got r blocks across all output neurons under that warning."""
    model = nn.ModuleDict({"attn": LoraAttention(make)})
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((a, b)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(model)
    for proj, role, d_out in (("q_proj", "query", 32), ("k_proj", "key", 16), ("v_proj", "value", 16)):
        A, B = plan[f"attn.{proj}.{a}"], plan[f"attn.{proj}.{b}"]
        assert (A.rule, A.n_blocks, A.role) == (orientation, 4, role)
        assert (B.rule, B.n_blocks, B.role) == (orientation, d_out, role)


def test_square_lora_factors_are_read_by_their_names_or_left_to_the_safe_fallback():
    """With in == out, (r, d) is A stored (r, in) or B stored (r, out): the names decide; two
    unnamed factors are left alone (rows, under a warning)."""
    named = nn.ModuleDict({"layer": LoraWrapper(32, 32, names=("lora_down", "lora_up"))})
    plan = blockopt.partition(named)
    assert (plan["layer.lora_down"].rule, plan["layer.lora_down"].n_blocks) == ("cols", 4)
    assert (plan["layer.lora_up"].rule, plan["layer.lora_up"].n_blocks) == ("cols", 32)
    with pytest.warns(PartitionWarning, match="no adapter recognised"):
        blockopt.partition(nn.ModuleDict({"layer": LoraWrapper(32, 32, names=("p", "q"))}))


def test_attention_bias_relative_position_and_modulation_tables_are_per_coordinate_without_a_warning():
    """Swin's relative_position_bias_table (positions, heads), SAM's rel_pos_h (positions, head
    size), conformer's bias_u (heads, head size), a DiT's adaLN scale_shift_table (6, D): one block
    per vector along the last dim mixed heads or shifts with scales, under a warning; per
    coordinate is Adam, never wrong, and small."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.out_proj = (nn.Linear(8, 8) for _ in range(4))
            self.num_heads = 2
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
            self.rel_pos_h = nn.Parameter(torch.zeros(7, 4))
            self.bias_u = nn.Parameter(torch.zeros(2, 4))
            self.scale_shift_table = nn.Parameter(torch.zeros(6, 8))  # (diffusers' DiT blocks hold it so)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(nn.ModuleDict({"attn": Attention()}))
    for name, n, role in (("relative_position_bias_table", 18, "bias"), ("rel_pos_h", 28, "bias"), ("bias_u", 8, "bias"),
                          ("scale_shift_table", 48, "norm")):
        spec = plan[f"attn.{name}"]
        assert (spec.rule, spec.n_blocks, spec.role) == ("coordinate", n, role)
    other = nn.ModuleDict({"attn": Attention()})
    other.attn.register_parameter("table", nn.Parameter(torch.zeros(9, 2)))  # a name that says nothing
    with pytest.warns(PartitionWarning, match="no adapter recognised attn.table"):
        assert blockopt.partition(other)["attn.table"].rule == "rows"


def test_a_channels_first_or_square_position_table_is_not_taken_for_one_vector_per_position():
    """(1, C, H, W) with W equal to a batch norm's channels, and (1, D, T) with T == D, matched the
    name and a normalised width by coincidence: one block per position, with no warning."""
    class ConvPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)
            self.pos_embed = nn.Parameter(torch.zeros(1, 64, 16, 16))

    class SquarePos(ViTOnTheModel):
        def __init__(self):
            super().__init__(T=6, D=6)

    for model, name in ((ConvPos(), "pos_embed"), (SquarePos(), "pos_embed")):
        with pytest.warns(PartitionWarning, match=f"no adapter recognised.*{name}"):
            assert blockopt.partition(model)[name].role == "other"
