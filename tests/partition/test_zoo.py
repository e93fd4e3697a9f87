"""The partition of a zoo of architectures, tensor by tensor (docs/partition.md: Principle 1).

Every model is built from a tiny config (nothing is downloaded). For every trainable tensor the
test writes down, from the config numbers alone, the block-index tensor Principle 1 asks for
(plain ``arange``/loops below; never the engine's ``make_spec``/``layout_for``/``_qkv_segments``)
and compares it with ``plan[name].block_index()``, together with the rule name.

Conventions of the expectations:

* ``rows(n, *inner)``: one block per index of dim 0 (per output neuron / token / channel).
* ``cols(n_in, n_out)``: one block per column (HF ``Conv1D`` stores ``(in, out)``).
* ``by_row(f, n, *inner)`` / ``by_col(f, n_in, n_out)``: block of row/column ``r`` is ``f(r)``; the
  fused projections write ``f`` in closed form from the row number and the head geometry.
* ``coord(*shape)``: one block per coordinate (biases: plain Adam); ``whole(*shape)``: one block.
* Blocks are numbered in order of first appearance along the block dim.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import blockopt

# ---- the tiny geometry shared by the decoder models ------------------------------------------
V = 64  # vocab
D = 32  # hidden
H = 4  # query heads
KV = 2  # key/value heads (GQA)
HD = D // H  # head dim = 8
I = 48  # MLP width


# ---- expected block-index tensors, from numbers only -----------------------------------------
def _bcast(ids: torch.Tensor, dim: int, shape: tuple[int, ...]) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return ids.view(view).expand(shape)


def rows(n: int, *inner: int) -> torch.Tensor:
    return _bcast(torch.arange(n), 0, (n, *inner))


def cols(n_in: int, n_out: int) -> torch.Tensor:
    return _bcast(torch.arange(n_out), 1, (n_in, n_out))


def by_row(f, n: int, *inner: int) -> torch.Tensor:
    return _bcast(torch.tensor([f(r) for r in range(n)], dtype=torch.long), 0, (n, *inner))


def by_col(f, n_in: int, n_out: int) -> torch.Tensor:
    return _bcast(torch.tensor([f(c) for c in range(n_out)], dtype=torch.long), 1, (n_in, n_out))


def coord(*shape: int) -> torch.Tensor:
    return torch.arange(math.prod(shape)).view(shape)


def whole(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


def heads(n_heads: int, head_dim: int, inner: int) -> torch.Tensor:
    """(n_heads * head_dim, inner) Linear weight: one block per head (consecutive rows)."""
    return by_row(lambda r: r // head_dim, n_heads * head_dim, inner)


def expert_rows(n_experts: int, out: int, inp: int) -> torch.Tensor:
    """(E, out, in) stacked expert weights: one block per expert per output row."""
    return torch.arange(n_experts * out).view(n_experts, out, 1).expand(n_experts, out, inp)


# Closed forms of the fused query/key/value row orders (block numbers in row order).
def neox_qkv_block(r: int, n_heads: int, hd: int) -> int:
    """GPT-NeoX/Bloom/Falcon-RW: per head h, rows [q (hd) | k (hd) | v (hd)]; q and k one block
    each, v one block per row -> 2 + hd blocks per head."""
    h, off = divmod(r, 3 * hd)
    part, within = divmod(off, hd)
    local = part if part < 2 else 2 + within
    return h * (2 + hd) + local


def falcon_group_qkv_block(r: int, n_heads: int, n_kv: int, hd: int) -> int:
    """Falcon new architecture / multi-query: per KV group, rows [q heads of the group | k | v];
    each q head one block, k one block, v one block per row."""
    q_per_group = n_heads // n_kv
    rows_per_group = (q_per_group + 2) * hd
    blocks_per_group = q_per_group + 1 + hd
    g, off = divmod(r, rows_per_group)
    if off < q_per_group * hd:
        local = off // hd
    elif off < (q_per_group + 1) * hd:
        local = q_per_group
    else:
        local = q_per_group + 1 + (off - (q_per_group + 1) * hd)
    return g * blocks_per_group + local


def concat_qkv_block(r: int, n_heads: int, n_kv: int, hd: int, value_whole: bool = False) -> int:
    """Phi-3 qkv_proj / nn.MultiheadAttention in_proj: [q heads | k heads | v rows]."""
    if r < n_heads * hd:
        return r // hd
    r -= n_heads * hd
    if r < n_kv * hd:
        return n_heads + r // hd
    r -= n_kv * hd
    return n_heads + n_kv + (0 if value_whole else r)


# ---- building and checking ------------------------------------------------------------------
@dataclass
class Built:
    model: nn.Module
    plan: blockopt.Plan
    partition_warnings: list[str]


def plan_recording(model, **kw) -> tuple[blockopt.Plan, list[str]]:
    """``blockopt.partition`` with every PartitionWarning it raised collected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = blockopt.partition(model, **kw)
    return plan, [str(w.message) for w in caught if issubclass(w.category, blockopt.PartitionWarning)]


def tensor_names(model: nn.Module) -> list[list[str]]:
    """All names of each trainable tensor, first name first (tied weights share one entry)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            groups.setdefault(id(p), []).append(name)
    return list(groups.values())


def check_plan(model: nn.Module, plan: blockopt.Plan, table: dict[str, tuple[str, torch.Tensor]],
               tied: dict[str, tuple[str, ...]] | None = None) -> None:
    """Every trainable tensor matches exactly one pattern of ``table`` and has that block index.

    ``table``: ``{glob (see glob_match) on the canonical name: (rule, expected block_index)}``; every pattern must
    be used (so a renamed parameter can't silently skip its check). ``tied``: canonical name ->
    the aliases the plan must list for it.
    """
    groups = tensor_names(model)
    assert sorted(plan) == sorted(ns[0] for ns in groups), "plan must hold exactly the trainable tensors"
    used: set[str] = set()
    for ns in groups:
        name, aliases = ns[0], tuple(ns[1:])
        spec = plan[name]
        assert spec.name == name
        assert spec.aliases == aliases, (name, spec.aliases)
        for a in aliases:
            assert a in plan and plan[a] is spec, f"tied name {a} must resolve to {name}'s spec"
        hits = [pat for pat in table if glob_match(name, pat)]
        assert len(hits) == 1, f"{name}: expected exactly one pattern to match, got {hits}"
        used.add(hits[0])
        rule, want = table[hits[0]]
        assert spec.rule == rule, f"{name}: rule {spec.rule!r}, expected {rule!r} ({spec.reason})"
        assert isinstance(spec.reason, str) and spec.reason.strip(), f"{name}: empty reason"
        got = spec.block_index()
        assert got.dtype == torch.long
        assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} vs expected {tuple(want.shape)}"
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            raise AssertionError(
                f"{name} ({spec.rule}, {spec.describe()}): block index differs first at {bad}: "
                f"got {got[tuple(bad)].item()}, expected {want[tuple(bad)].item()}"
            )
        assert spec.n_blocks == int(want.max()) + 1, name
    assert used == set(table), f"patterns that matched nothing: {sorted(set(table) - used)}"
    for name, aliases in (tied or {}).items():
        assert plan[name].aliases == aliases, (name, plan[name].aliases)
        for a in aliases:
            assert plan[a] is plan[name]


def glob_match(name: str, pattern: str) -> bool:
    """``*`` matches within one dotted component (``layers.*.x`` never matches ``a.layers.0.b.x``)."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]*"), name) is not None


def norm_entries(*patterns: str, width: int = D, bias: bool = True) -> dict:
    out = {}
    for pat in patterns:
        out[f"{pat}.weight"] = ("whole", whole(width))
        if bias:
            out[f"{pat}.bias"] = ("coordinate", coord(width))
    return out


# ---- the Hugging Face zoo -----------------------------------------------------------------
def _tf():
    return pytest.importorskip("transformers")


def _seeded(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg)


LLAMA_CFG = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=2, num_attention_heads=H,
                 num_key_value_heads=KV, pad_token_id=0)
MIXTRAL_CFG = dict(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=1, num_attention_heads=H,
                   num_key_value_heads=KV, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
PHI3_CFG = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=H,
                num_key_value_heads=KV, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def build_llama():
    T = _tf()
    return _seeded(T.LlamaForCausalLM, T.LlamaConfig(**LLAMA_CFG))


def build_mistral():
    T = _tf()
    return _seeded(T.MistralForCausalLM, T.MistralConfig(**{**LLAMA_CFG, "num_hidden_layers": 1}))


def build_qwen2():
    T = _tf()
    return _seeded(T.Qwen2ForCausalLM, T.Qwen2Config(**{**LLAMA_CFG, "num_hidden_layers": 1}))


def build_gemma():
    T = _tf()
    cfg = T.GemmaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=16, pad_token_id=0)
    return _seeded(T.GemmaForCausalLM, cfg)


def build_phi3():
    T = _tf()
    return _seeded(T.Phi3ForCausalLM, T.Phi3Config(**PHI3_CFG))


def build_gpt2():
    T = _tf()
    cfg = T.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=16, bos_token_id=0, eos_token_id=0)
    return _seeded(T.GPT2LMHeadModel, cfg)


def build_neox():
    T = _tf()
    cfg = T.GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=H, intermediate_size=64,
                          max_position_embeddings=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _seeded(T.GPTNeoXForCausalLM, cfg)


def build_falcon_new():
    T = _tf()
    cfg = T.FalconConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=H, num_kv_heads=KV,
                         new_decoder_architecture=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _seeded(T.FalconForCausalLM, cfg)


def build_falcon_mq():
    T = _tf()
    cfg = T.FalconConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=H,
                         new_decoder_architecture=False, multi_query=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _seeded(T.FalconForCausalLM, cfg)


def build_opt():
    T = _tf()
    cfg = T.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=I, num_hidden_layers=1, num_attention_heads=H,
                      max_position_embeddings=16, word_embed_proj_dim=D, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _seeded(T.OPTForCausalLM, cfg)


def build_bert():
    T = _tf()
    cfg = T.BertConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=H,
                       max_position_embeddings=16, type_vocab_size=2, pad_token_id=0)
    return _seeded(T.BertForMaskedLM, cfg)


def build_t5():
    T = _tf()
    cfg = T.T5Config(vocab_size=V, d_model=D, d_kv=HD, d_ff=I, num_layers=1, num_decoder_layers=1, num_heads=H,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return _seeded(T.T5ForConditionalGeneration, cfg)


def build_vit():
    T = _tf()
    cfg = T.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=D, intermediate_size=I,
                      num_hidden_layers=1, num_attention_heads=H)
    return _seeded(T.ViTModel, cfg)


def build_mixtral():
    T = _tf()
    return _seeded(T.MixtralForCausalLM, T.MixtralConfig(**MIXTRAL_CFG))


def build_qwen2_moe():
    T = _tf()
    # layer 0 sparse (experts + shared expert), layer 1 a dense MLP
    cfg = T.Qwen2MoeConfig(vocab_size=V, hidden_size=D, intermediate_size=I, moe_intermediate_size=24,
                           shared_expert_intermediate_size=40, num_hidden_layers=2, mlp_only_layers=[1],
                           num_attention_heads=H, num_key_value_heads=KV, num_experts=4, num_experts_per_tok=2,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _seeded(T.Qwen2MoeForCausalLM, cfg)


# ---- expectations per architecture ----------------------------------------------------------
def llama_like(*, n_heads=H, n_kv=KV, hd=HD, qkv_bias=False, value="rows", mlp=True) -> dict:
    """A Llama-style decoder (separate q/k/v/o, gated MLP, RMSNorm) under ``model.``."""
    a = "model.layers.*.self_attn"
    t = {
        "model.embed_tokens.weight": ("rows", rows(V, D)),
        f"{a}.q_proj.weight": ("heads", heads(n_heads, hd, D)),
        f"{a}.k_proj.weight": ("heads", heads(n_kv, hd, D)),
        f"{a}.v_proj.weight": ("whole", whole(n_kv * hd, D)) if value == "whole" else ("rows", rows(n_kv * hd, D)),
        f"{a}.o_proj.weight": ("rows", rows(D, n_heads * hd)),
        "model.layers.*.input_layernorm.weight": ("whole", whole(D)),
        "model.layers.*.post_attention_layernorm.weight": ("whole", whole(D)),
        "model.norm.weight": ("whole", whole(D)),
    }
    if mlp:
        t["model.layers.*.mlp.gate_proj.weight"] = ("rows", rows(I, D))
        t["model.layers.*.mlp.up_proj.weight"] = ("rows", rows(I, D))
        t["model.layers.*.mlp.down_proj.weight"] = ("rows", rows(D, I))
    if qkv_bias:
        t[f"{a}.q_proj.bias"] = ("coordinate", coord(n_heads * hd))
        t[f"{a}.k_proj.bias"] = ("coordinate", coord(n_kv * hd))
        t[f"{a}.v_proj.bias"] = ("coordinate", coord(n_kv * hd))
    return t


def expect_llama(value="rows"):
    return {**llama_like(value=value), "lm_head.weight": ("rows", rows(V, D))}, {}


def expect_mistral():
    return {**llama_like(), "lm_head.weight": ("rows", rows(V, D))}, {}


def expect_qwen2():
    return {**llama_like(qkv_bias=True), "lm_head.weight": ("rows", rows(V, D))}, {}


def expect_gemma():
    # head_dim 16 != hidden / heads = 8; one KV head; tied output head
    return llama_like(n_heads=4, n_kv=1, hd=16), {"model.embed_tokens.weight": ("lm_head.weight",)}


def expect_phi3(value="rows"):
    a = "model.layers.*.self_attn"
    qkv = by_row(lambda r: concat_qkv_block(r, H, KV, HD, value_whole=value == "whole"), (H + 2 * KV) * HD, D)
    t = {
        "model.embed_tokens.weight": ("rows", rows(V, D)),
        f"{a}.qkv_proj.weight": ("heads", qkv),
        f"{a}.o_proj.weight": ("rows", rows(D, D)),
        "model.layers.*.mlp.gate_up_proj.weight": ("rows", rows(2 * I, D)),
        "model.layers.*.mlp.down_proj.weight": ("rows", rows(D, I)),
        "model.layers.*.input_layernorm.weight": ("whole", whole(D)),
        "model.layers.*.post_attention_layernorm.weight": ("whole", whole(D)),
        "model.norm.weight": ("whole", whole(D)),
        "lm_head.weight": ("rows", rows(V, D)),
    }
    return t, {}


def expect_gpt2(value="rows"):
    def c_attn(c):  # Conv1D (in, 3E): columns [q heads | k heads | v columns]
        if c < D:
            return c // HD
        if c < 2 * D:
            return H + (c - D) // HD
        return 2 * H + (0 if value == "whole" else c - 2 * D)

    h = "transformer.h.*"
    t = {
        "transformer.wte.weight": ("rows", rows(V, D)),
        "transformer.wpe.weight": ("rows", rows(16, D)),
        f"{h}.attn.c_attn.weight": ("heads", by_col(c_attn, D, 3 * D)),
        f"{h}.attn.c_attn.bias": ("coordinate", coord(3 * D)),
        f"{h}.attn.c_proj.weight": ("cols", cols(D, D)),
        f"{h}.attn.c_proj.bias": ("coordinate", coord(D)),
        f"{h}.mlp.c_fc.weight": ("cols", cols(D, 4 * D)),
        f"{h}.mlp.c_fc.bias": ("coordinate", coord(4 * D)),
        f"{h}.mlp.c_proj.weight": ("cols", cols(4 * D, D)),
        f"{h}.mlp.c_proj.bias": ("coordinate", coord(D)),
        **norm_entries(f"{h}.ln_1", f"{h}.ln_2", "transformer.ln_f"),
    }
    return t, {"transformer.wte.weight": ("lm_head.weight",)}


def expect_neox():
    F = 64
    a = "gpt_neox.layers.*.attention"
    t = {
        "gpt_neox.embed_in.weight": ("rows", rows(V, D)),
        f"{a}.query_key_value.weight": ("heads", by_row(lambda r: neox_qkv_block(r, H, HD), 3 * D, D)),
        f"{a}.query_key_value.bias": ("coordinate", coord(3 * D)),
        f"{a}.dense.weight": ("rows", rows(D, D)),
        f"{a}.dense.bias": ("coordinate", coord(D)),
        "gpt_neox.layers.*.mlp.dense_h_to_4h.weight": ("rows", rows(F, D)),
        "gpt_neox.layers.*.mlp.dense_h_to_4h.bias": ("coordinate", coord(F)),
        "gpt_neox.layers.*.mlp.dense_4h_to_h.weight": ("rows", rows(D, F)),
        "gpt_neox.layers.*.mlp.dense_4h_to_h.bias": ("coordinate", coord(D)),
        **norm_entries("gpt_neox.layers.*.input_layernorm", "gpt_neox.layers.*.post_attention_layernorm",
                       "gpt_neox.final_layer_norm"),
        "lm_head.weight": ("rows", rows(V, D)),
    }
    return t, {}


def _falcon_common(norms: tuple[str, ...]) -> dict:
    a = "transformer.h.*.self_attention"
    return {
        "transformer.word_embeddings.weight": ("rows", rows(V, D)),
        f"{a}.dense.weight": ("rows", rows(D, D)),
        "transformer.h.*.mlp.dense_h_to_4h.weight": ("rows", rows(4 * D, D)),
        "transformer.h.*.mlp.dense_4h_to_h.weight": ("rows", rows(D, 4 * D)),
        **norm_entries(*norms, "transformer.ln_f"),
    }


def expect_falcon_new():
    qkv = by_row(lambda r: falcon_group_qkv_block(r, H, KV, HD), (H + 2 * KV) * HD, D)
    t = {**_falcon_common(("transformer.h.*.ln_attn", "transformer.h.*.ln_mlp")),
         "transformer.h.*.self_attention.query_key_value.weight": ("heads", qkv)}
    return t, {"transformer.word_embeddings.weight": ("lm_head.weight",)}


def expect_falcon_mq():
    # multi-query: [all q heads | 1 k head | v rows] = one KV group
    qkv = by_row(lambda r: falcon_group_qkv_block(r, H, 1, HD), (H + 2) * HD, D)
    t = {**_falcon_common(("transformer.h.*.input_layernorm",)),
         "transformer.h.*.self_attention.query_key_value.weight": ("heads", qkv)}
    return t, {"transformer.word_embeddings.weight": ("lm_head.weight",)}


def expect_opt():
    a = "model.decoder.layers.*.self_attn"
    t = {
        "model.decoder.embed_tokens.weight": ("rows", rows(V, D)),
        "model.decoder.embed_positions.weight": ("rows", rows(16 + 2, D)),  # OPT offsets positions by 2
        f"{a}.q_proj.weight": ("heads", heads(H, HD, D)),
        f"{a}.k_proj.weight": ("heads", heads(H, HD, D)),
        f"{a}.v_proj.weight": ("rows", rows(D, D)),
        f"{a}.out_proj.weight": ("rows", rows(D, D)),
        **{f"{a}.{p}.bias": ("coordinate", coord(D)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "model.decoder.layers.*.fc1.weight": ("rows", rows(I, D)),
        "model.decoder.layers.*.fc1.bias": ("coordinate", coord(I)),
        "model.decoder.layers.*.fc2.weight": ("rows", rows(D, I)),
        "model.decoder.layers.*.fc2.bias": ("coordinate", coord(D)),
        **norm_entries("model.decoder.layers.*.self_attn_layer_norm", "model.decoder.layers.*.final_layer_norm",
                       "model.decoder.final_layer_norm"),
    }
    return t, {"model.decoder.embed_tokens.weight": ("lm_head.weight",)}


def expect_bert():
    L = "bert.encoder.layer.*"
    t = {
        "bert.embeddings.word_embeddings.weight": ("rows", rows(V, D)),
        "bert.embeddings.position_embeddings.weight": ("rows", rows(16, D)),
        "bert.embeddings.token_type_embeddings.weight": ("rows", rows(2, D)),
        f"{L}.attention.self.query.weight": ("heads", heads(H, HD, D)),
        f"{L}.attention.self.key.weight": ("heads", heads(H, HD, D)),
        f"{L}.attention.self.value.weight": ("rows", rows(D, D)),
        f"{L}.attention.output.dense.weight": ("rows", rows(D, D)),
        **{f"{L}.attention.self.{p}.bias": ("coordinate", coord(D)) for p in ("query", "key", "value")},
        f"{L}.attention.output.dense.bias": ("coordinate", coord(D)),
        f"{L}.intermediate.dense.weight": ("rows", rows(I, D)),
        f"{L}.intermediate.dense.bias": ("coordinate", coord(I)),
        f"{L}.output.dense.weight": ("rows", rows(D, I)),
        f"{L}.output.dense.bias": ("coordinate", coord(D)),
        "cls.predictions.transform.dense.weight": ("rows", rows(D, D)),
        "cls.predictions.transform.dense.bias": ("coordinate", coord(D)),
        "cls.predictions.bias": ("coordinate", coord(V)),
        **norm_entries("bert.embeddings.LayerNorm", f"{L}.attention.output.LayerNorm", f"{L}.output.LayerNorm",
                       "cls.predictions.transform.LayerNorm"),
    }
    tied = {"bert.embeddings.word_embeddings.weight": ("cls.predictions.decoder.weight",),
            "cls.predictions.bias": ("cls.predictions.decoder.bias",)}
    return t, tied


def expect_t5():
    t = {"shared.weight": ("rows", rows(V, D))}
    for att in ("encoder.block.*.layer.0.SelfAttention", "decoder.block.*.layer.0.SelfAttention",
                "decoder.block.*.layer.1.EncDecAttention"):
        t[f"{att}.q.weight"] = ("heads", heads(H, HD, D))
        t[f"{att}.k.weight"] = ("heads", heads(H, HD, D))
        t[f"{att}.v.weight"] = ("rows", rows(H * HD, D))
        t[f"{att}.o.weight"] = ("rows", rows(D, H * HD))
    for side in ("encoder", "decoder"):
        # (buckets, heads): one block per bucket row
        t[f"{side}.block.*.layer.0.SelfAttention.relative_attention_bias.weight"] = ("rows", rows(8, H))
        t[f"{side}.block.*.layer.*.layer_norm.weight"] = ("whole", whole(D))
        t[f"{side}.final_layer_norm.weight"] = ("whole", whole(D))
    for ff in ("encoder.block.*.layer.1.DenseReluDense", "decoder.block.*.layer.2.DenseReluDense"):
        t[f"{ff}.wi.weight"] = ("rows", rows(I, D))
        t[f"{ff}.wo.weight"] = ("rows", rows(D, I))
    return t, {"shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}


def expect_vit():
    T_ = (8 // 4) ** 2 + 1  # patches + cls
    a = "layers.*.attention"
    t = {
        "embeddings.cls_token": ("rows", whole(1, 1, D)),  # one token vector: one block
        "embeddings.position_embeddings": ("rows", torch.arange(T_).view(1, T_, 1).expand(1, T_, D)),
        "embeddings.patch_embeddings.projection.weight": ("rows", rows(D, 3, 4, 4)),
        "embeddings.patch_embeddings.projection.bias": ("coordinate", coord(D)),
        f"{a}.q_proj.weight": ("heads", heads(H, HD, D)),
        f"{a}.k_proj.weight": ("heads", heads(H, HD, D)),
        f"{a}.v_proj.weight": ("rows", rows(D, D)),
        f"{a}.o_proj.weight": ("rows", rows(D, D)),
        **{f"{a}.{p}.bias": ("coordinate", coord(D)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "layers.*.mlp.fc1.weight": ("rows", rows(I, D)),
        "layers.*.mlp.fc1.bias": ("coordinate", coord(I)),
        "layers.*.mlp.fc2.weight": ("rows", rows(D, I)),
        "layers.*.mlp.fc2.bias": ("coordinate", coord(D)),
        "pooler.dense.weight": ("rows", rows(D, D)),
        "pooler.dense.bias": ("coordinate", coord(D)),
        **norm_entries("layers.*.layernorm_before", "layers.*.layernorm_after", "layernorm"),
    }
    return t, {}


def expect_mixtral():
    E, FI = 4, 24
    t = {
        **llama_like(mlp=False),
        "model.layers.*.mlp.gate.weight": ("rows", rows(E, D)),  # router: one block per expert
        "model.layers.*.mlp.experts.gate_up_proj": ("rows", expert_rows(E, 2 * FI, D)),
        "model.layers.*.mlp.experts.down_proj": ("rows", expert_rows(E, D, FI)),
        "lm_head.weight": ("rows", rows(V, D)),
    }
    return t, {}


def expect_qwen2_moe():
    E, FI, S = 4, 24, 40
    m0, m1 = "model.layers.0.mlp", "model.layers.1.mlp"
    t = {
        **llama_like(qkv_bias=True, mlp=False),
        f"{m0}.gate.weight": ("rows", rows(E, D)),
        f"{m0}.experts.gate_up_proj": ("rows", expert_rows(E, 2 * FI, D)),
        f"{m0}.experts.down_proj": ("rows", expert_rows(E, D, FI)),
        f"{m0}.shared_expert.gate_proj.weight": ("rows", rows(S, D)),
        f"{m0}.shared_expert.up_proj.weight": ("rows", rows(S, D)),
        f"{m0}.shared_expert.down_proj.weight": ("rows", rows(D, S)),
        f"{m0}.shared_expert_gate.weight": ("rows", whole(1, D)),  # (1, H): one block
        f"{m1}.gate_proj.weight": ("rows", rows(I, D)),  # the dense layer
        f"{m1}.up_proj.weight": ("rows", rows(I, D)),
        f"{m1}.down_proj.weight": ("rows", rows(D, I)),
        "lm_head.weight": ("rows", rows(V, D)),
    }
    return t, {}


HF_ZOO = {
    "llama": (build_llama, expect_llama),
    "mistral": (build_mistral, expect_mistral),
    "qwen2": (build_qwen2, expect_qwen2),
    "gemma": (build_gemma, expect_gemma),
    "phi3": (build_phi3, expect_phi3),
    "gpt2": (build_gpt2, expect_gpt2),
    "gpt_neox": (build_neox, expect_neox),
    "falcon_new_decoder": (build_falcon_new, expect_falcon_new),
    "falcon_multi_query": (build_falcon_mq, expect_falcon_mq),
    "opt": (build_opt, expect_opt),
    "bert": (build_bert, expect_bert),
    "t5": (build_t5, expect_t5),
    "vit": (build_vit, expect_vit),
    "mixtral": (build_mixtral, expect_mixtral),
    "qwen2_moe": (build_qwen2_moe, expect_qwen2_moe),
}


@pytest.fixture(scope="module")
def zoo():
    """``zoo(arch)`` -> Built(model, plan, partition warnings); each model built once per module.
    Tests must not modify the models (build a fresh one with HF_ZOO[arch][0]() instead)."""
    cache: dict[str, Built] = {}

    def get(arch: str) -> Built:
        if arch not in cache:
            model = HF_ZOO[arch][0]()
            cache[arch] = Built(model, *plan_recording(model))
        return cache[arch]

    yield get
    cache.clear()


@pytest.mark.hf
@pytest.mark.parametrize("arch", list(HF_ZOO))
def test_every_parameter(arch, zoo):
    built = zoo(arch)
    table, tied = HF_ZOO[arch][1]()
    check_plan(built.model, built.plan, table, tied)


@pytest.mark.hf
@pytest.mark.parametrize("arch", list(HF_ZOO))
def test_no_partition_warning(arch, zoo):
    built = zoo(arch)
    assert built.partition_warnings == []
    assert built.plan.warnings == ()


# ---- details worth a named test ----------------------------------------------------------------
@pytest.mark.hf
def test_gqa_head_counts_recorded(zoo):
    for arch, (nq, nk) in {"llama": (H, KV), "mistral": (H, KV), "qwen2": (H, KV), "gemma": (4, 1),
                           "mixtral": (H, KV)}.items():
        plan = zoo(arch).plan
        assert plan["model.layers.0.self_attn.q_proj.weight"].n_heads == nq, arch
        assert plan["model.layers.0.self_attn.k_proj.weight"].n_heads == nk, arch


@pytest.mark.hf
def test_neox_qkv_interleaving_by_hand(zoo):
    """Spot-check the closed form: rows 0-7 head 0 query, 8-15 head 0 key, 16-23 head 0 value rows,
    24-31 head 1 query."""
    idx = zoo("gpt_neox").plan["gpt_neox.layers.0.attention.query_key_value.weight"].block_index()[:, 0]
    assert idx[:8].tolist() == [0] * 8
    assert idx[8:16].tolist() == [1] * 8
    assert idx[16:24].tolist() == list(range(2, 10))
    assert idx[24:32].tolist() == [10] * 8
    assert idx.max().item() == 4 * (2 + 8) - 1


@pytest.mark.hf
def test_falcon_group_layout_by_hand(zoo):
    """Falcon new architecture, 4 q heads / 2 KV heads of 8: group = [q, q, k, v x8] = 32 rows."""
    idx = zoo("falcon_new_decoder").plan["transformer.h.0.self_attention.query_key_value.weight"].block_index()[:, 0]
    group0 = [0] * 8 + [1] * 8 + [2] * 8 + list(range(3, 11))
    assert idx.tolist() == group0 + [b + 11 for b in group0]
    mq = zoo("falcon_multi_query").plan["transformer.h.0.self_attention.query_key_value.weight"].block_index()[:, 0]
    assert mq.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8 + list(range(5, 13))


@pytest.mark.hf
def test_value_whole_llama(zoo):
    model = zoo("llama").model
    plan, pw = plan_recording(model, value="whole")
    assert pw == []
    table, tied = expect_llama(value="whole")
    check_plan(model, plan, table, tied)
    assert plan["model.layers.0.self_attn.v_proj.weight"].n_blocks == 1


@pytest.mark.hf
def test_value_whole_phi3_fused_value_segment_is_one_block(zoo):
    model = zoo("phi3").model
    plan, pw = plan_recording(model, value="whole")
    assert pw == []
    table, tied = expect_phi3(value="whole")
    check_plan(model, plan, table, tied)
    assert plan["model.layers.0.self_attn.qkv_proj.weight"].n_blocks == H + KV + 1


@pytest.mark.hf
def test_phi3_head_dim_not_hidden_over_heads():
    """Like Gemma's head_dim=16 with hidden 32 and 4 heads, but on Phi-3's fused qkv_proj
    (GQA 4/2): rows [4 q heads x16 | 2 k heads x16 | 32 v rows]."""
    T = _tf()
    hd = 16
    model = _seeded(T.Phi3ForCausalLM, T.Phi3Config(**{**PHI3_CFG, "head_dim": hd}))
    assert model.model.layers[0].self_attn.qkv_proj.out_features == (H + 2 * KV) * hd
    plan, pw = plan_recording(model)
    table, _ = expect_phi3()
    table["model.layers.*.self_attn.qkv_proj.weight"] = (
        "heads", by_row(lambda r: concat_qkv_block(r, H, KV, hd), (H + 2 * KV) * hd, D))
    table["model.layers.*.self_attn.o_proj.weight"] = ("rows", rows(D, H * hd))
    check_plan(model, plan, table)
    assert pw == []


@pytest.mark.hf
def test_value_whole_gpt2(zoo):
    model = zoo("gpt2").model
    plan, _ = plan_recording(model, value="whole")
    table, tied = expect_gpt2(value="whole")
    check_plan(model, plan, table, tied)


@pytest.mark.hf
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_meta_device_plan_equals_cpu_plan(arch, zoo):
    cpu = zoo(arch).plan
    with torch.device("meta"):
        model = HF_ZOO[arch][0]()
    assert all(p.is_meta for p in model.parameters())
    plan, pw = plan_recording(model)
    assert pw == []
    assert plan == cpu
    for name in cpu:
        assert torch.equal(plan[name].block_index(), cpu[name].block_index()), name
    table, tied = HF_ZOO[arch][1]()
    check_plan(model, plan, table, tied)


# ---- LoRA through PEFT ----------------------------------------------------------------------
@pytest.mark.hf
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers deprecation hit by peft
def test_lora_only_adapters_are_planned():
    peft = pytest.importorskip("peft")
    r = 4
    model = peft.get_peft_model(build_llama(), peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    plan, pw = plan_recording(model)
    assert pw == []
    a = "base_model.model.model.layers.*.self_attn"
    table = {
        f"{a}.q_proj.lora_A.default.weight": ("rows", rows(r, D)),  # (r, in): one block per row
        f"{a}.q_proj.lora_B.default.weight": ("rows", rows(H * HD, r)),  # (out, r): one per output neuron
        f"{a}.v_proj.lora_A.default.weight": ("rows", rows(r, D)),
        f"{a}.v_proj.lora_B.default.weight": ("rows", rows(KV * HD, r)),
    }
    check_plan(model, plan, table)
    # the frozen base weights are not in the plan
    for frozen in ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
                   "base_model.model.model.layers.0.self_attn.k_proj.weight",
                   "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        assert frozen not in plan
    assert plan.summary().n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- heads from a nested config (multimodal-style text_config) ------------------------------
class BareAttention(nn.Module):
    """q/k/v/o Linear children and no head attributes at all."""

    def __init__(self, d=D, n_heads=H, n_kv=KV, hd=HD):
        super().__init__()
        self.q_proj = nn.Linear(d, n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.o_proj = nn.Linear(n_heads * hd, d, bias=False)


class NestedConfigModel(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        if config is not None:
            self.config = config
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([BareAttention() for _ in range(2)])
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, V, bias=False)


def _nested_table(qk_heads: bool) -> dict:
    a = "layers.*"
    return {
        "embed.weight": ("rows", rows(V, D)),
        f"{a}.q_proj.weight": ("heads", heads(H, HD, D)) if qk_heads else ("rows", rows(H * HD, D)),
        f"{a}.k_proj.weight": ("heads", heads(KV, HD, D)) if qk_heads else ("rows", rows(KV * HD, D)),
        f"{a}.v_proj.weight": ("rows", rows(KV * HD, D)),
        f"{a}.o_proj.weight": ("rows", rows(D, H * HD)),
        "norm.weight": ("whole", whole(D)),
        "head.weight": ("rows", rows(V, D)),
    }


@pytest.mark.hf
def test_heads_from_nested_text_config():
    T = _tf()
    text = T.LlamaConfig(**{**LLAMA_CFG, "num_attention_heads": H, "num_key_value_heads": KV})
    model = NestedConfigModel(SimpleNamespace(text_config=text))
    plan, pw = plan_recording(model)
    assert pw == []
    check_plan(model, plan, _nested_table(qk_heads=True))
    assert plan["layers.0.q_proj.weight"].n_heads == H
    assert plan["layers.1.k_proj.weight"].n_heads == KV


def test_nested_control_without_config_warns_and_splits_per_neuron():
    """Control for the test above: with no config the heads are unknown, so q/k fall back to one
    block per row (finer than heads: safe) and the engine says so."""
    model = NestedConfigModel()
    plan, pw = plan_recording(model)
    assert pw, "expected a PartitionWarning when head counts are unknowable"
    check_plan(model, plan, _nested_table(qk_heads=False))


# ---- torch-only models --------------------------------------------------------------------
def mha_in_proj_block(r: int, E: int, n_heads: int) -> int:
    return concat_qkv_block(r, n_heads, n_heads, E // n_heads)


def test_transformer_encoder_layer():
    E, NH, F = 16, 4, 24
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, NH, F, dropout=0.0, batch_first=True)
    plan, pw = plan_recording(layer)
    assert pw == []
    table = {
        "self_attn.in_proj_weight": ("heads", by_row(lambda r: mha_in_proj_block(r, E, NH), 3 * E, E)),
        "self_attn.in_proj_bias": ("coordinate", coord(3 * E)),
        "self_attn.out_proj.weight": ("rows", rows(E, E)),
        "self_attn.out_proj.bias": ("coordinate", coord(E)),
        "linear1.weight": ("rows", rows(F, E)),
        "linear1.bias": ("coordinate", coord(F)),
        "linear2.weight": ("rows", rows(E, F)),
        "linear2.bias": ("coordinate", coord(E)),
        **norm_entries("norm1", "norm2", width=E),
    }
    check_plan(layer, plan, table)
    idx = plan["self_attn.in_proj_weight"].block_index()[:, 0]
    assert idx[:4].tolist() == [0] * 4 and idx[16:20].tolist() == [4] * 4 and idx[32:36].tolist() == [8, 9, 10, 11]


def test_plain_mlp():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))
    plan, pw = plan_recording(mlp)
    assert pw == []
    table = {
        "0.weight": ("rows", rows(20, 10)), "0.bias": ("coordinate", coord(20)),
        "2.weight": ("rows", rows(7, 20)), "2.bias": ("coordinate", coord(7)),
        "4.weight": ("rows", rows(3, 7)),
    }
    check_plan(mlp, plan, table)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )


@pytest.mark.parametrize("conv", ["whole", "channel"])
def test_cnn(conv):
    model = _cnn()
    plan, pw = plan_recording(model, conv=conv)
    assert pw == []
    c0 = ("whole", whole(8, 3, 3, 3)) if conv == "whole" else ("rows", rows(8, 3, 3, 3))
    c3 = ("whole", whole(6, 8, 3, 3)) if conv == "whole" else ("rows", rows(6, 8, 3, 3))
    table = {
        "0.weight": c0, "0.bias": ("coordinate", coord(8)),
        "1.weight": ("whole", whole(8)), "1.bias": ("coordinate", coord(8)),  # BatchNorm
        "3.weight": c3,
        "4.weight": ("whole", whole(6)), "4.bias": ("coordinate", coord(6)),
        "8.weight": ("rows", rows(10, 6)), "8.bias": ("coordinate", coord(10)),
    }
    check_plan(model, plan, table)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


class MessagePassing(nn.Module):
    """x' = A @ (x W^T) + bias, with the bias a raw Parameter."""

    def __init__(self, f_in: int, f_out: int):
        super().__init__()
        self.lin = nn.Linear(f_in, f_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(f_out))

    def forward(self, x, adj):
        return adj @ self.lin(x) + self.bias


class TinyGNN(nn.Module):
    def __init__(self, n_nodes=5, dims=(6, 8, 3)):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        adj = (torch.rand(n_nodes, n_nodes, generator=g) < 0.5).float()
        adj = ((adj + adj.T + torch.eye(n_nodes)) > 0).float()
        self.register_buffer("adj", adj / adj.sum(1, keepdim=True))
        self.register_buffer("x", torch.randn(n_nodes, dims[0], generator=g))
        self.layers = nn.ModuleList(MessagePassing(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self):
        h = self.x
        for i, layer in enumerate(self.layers):
            h = layer(h, self.adj)
            h = torch.relu(h) if i < len(self.layers) - 1 else h
        return h


def test_gnn_message_passing():
    model = TinyGNN()
    assert model().shape == (5, 3)
    plan, pw = plan_recording(model)
    assert pw == []
    table = {
        "layers.0.lin.weight": ("rows", rows(8, 6)), "layers.0.bias": ("coordinate", coord(8)),
        "layers.1.lin.weight": ("rows", rows(3, 8)), "layers.1.bias": ("coordinate", coord(3)),
    }
    check_plan(model, plan, table)
    assert "adj" not in plan and "x" not in plan  # buffers are not parameters


# ---- multi-head latent attention (DeepSeek-V3) ----------------------------------------------
MLA = dict(heads=4, q_rank=16, kv_rank=8, nope=4, rope=2, v=6, moe_inter=12, experts=4)


def build_deepseek_v3():
    T = _tf()
    m = MLA
    cfg = T.DeepseekV3Config(vocab_size=V, hidden_size=D, intermediate_size=I, moe_intermediate_size=m["moe_inter"],
                             num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=m["heads"],
                             num_key_value_heads=m["heads"], q_lora_rank=m["q_rank"], kv_lora_rank=m["kv_rank"],
                             qk_nope_head_dim=m["nope"], qk_rope_head_dim=m["rope"], v_head_dim=m["v"],
                             n_routed_experts=m["experts"], num_experts_per_tok=2, n_group=1, topk_group=1,
                             n_shared_experts=1, pad_token_id=0)
    return _seeded(T.DeepseekV3ForCausalLM, cfg)


def expect_deepseek_v3():
    m = MLA
    n, nope, rope, v, E, FI = m["heads"], m["nope"], m["rope"], m["v"], m["experts"], m["moe_inter"]

    def kv_latent(r):  # [kv_rank latent rows: one block each | rope rows shared by every head: one block]
        return r if r < m["kv_rank"] else m["kv_rank"]

    def kv_up(r):  # per head [nope key rows: one block | v value rows: one block each]
        h, off = divmod(r, nope + v)
        return h * (1 + v) + (0 if off < nope else 1 + off - nope)

    a = "model.layers.*.self_attn"
    t = {
        "model.embed_tokens.weight": ("rows", rows(V, D)),
        f"{a}.q_a_proj.weight": ("rows", rows(m["q_rank"], D)),
        f"{a}.q_b_proj.weight": ("heads", heads(n, nope + rope, m["q_rank"])),
        f"{a}.kv_a_proj_with_mqa.weight": ("heads", by_row(kv_latent, m["kv_rank"] + rope, D)),
        f"{a}.kv_b_proj.weight": ("heads", by_row(kv_up, n * (nope + v), m["kv_rank"])),
        f"{a}.o_proj.weight": ("rows", rows(D, n * v)),
        f"{a}.q_a_layernorm.weight": ("whole", whole(m["q_rank"])),
        f"{a}.kv_a_layernorm.weight": ("whole", whole(m["kv_rank"])),
        "model.layers.*.input_layernorm.weight": ("whole", whole(D)),
        "model.layers.*.post_attention_layernorm.weight": ("whole", whole(D)),
        "model.layers.0.mlp.gate_proj.weight": ("rows", rows(I, D)),
        "model.layers.0.mlp.up_proj.weight": ("rows", rows(I, D)),
        "model.layers.0.mlp.down_proj.weight": ("rows", rows(D, I)),
        "model.layers.1.mlp.gate.weight": ("rows", rows(E, D)),
        "model.layers.1.mlp.experts.gate_up_proj": ("rows", expert_rows(E, 2 * FI, D)),
        "model.layers.1.mlp.experts.down_proj": ("rows", expert_rows(E, D, FI)),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": ("rows", rows(FI, D)),
        "model.layers.1.mlp.shared_experts.up_proj.weight": ("rows", rows(FI, D)),
        "model.layers.1.mlp.shared_experts.down_proj.weight": ("rows", rows(D, FI)),
        "model.norm.weight": ("whole", whole(D)),
        "lm_head.weight": ("rows", rows(V, D)),
    }
    return t, {}


@pytest.mark.hf
def test_latent_attention_every_tensor():
    model = build_deepseek_v3()
    plan, pw = plan_recording(model)
    assert pw == []
    check_plan(model, plan, *expect_deepseek_v3())
    a = "model.layers.0.self_attn"
    assert [plan[f"{a}.{p}.weight"].role for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")] == \
        ["query", "query", "key", "qkv"]
    # the report says which rows are per head and which are latents shared by every head
    assert "shared by all heads" in plan[f"{a}.kv_a_proj_with_mqa.weight"].reason
    assert "per head" in plan[f"{a}.kv_b_proj.weight"].reason


# ---- fused c_attn as a Linear (GPT-BigCode): the layout follows the config ------------------
@pytest.mark.hf
@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_fused_c_attn(multi_query):
    T = _tf()
    cfg = T.GPTBigCodeConfig(vocab_size=V, n_embd=D, n_layer=1, n_head=H, n_positions=16, multi_query=multi_query,
                             bos_token_id=0, eos_token_id=0)
    model = _seeded(T.GPTBigCodeForCausalLM, cfg)
    plan, pw = plan_recording(model)
    assert pw == []
    if multi_query:  # [q heads (D) | one key head (HD) | value rows (HD)]
        qkv = by_row(lambda r: concat_qkv_block(r, H, 1, HD), D + 2 * HD, D)
    else:  # [q k v] per head
        qkv = by_row(lambda r: neox_qkv_block(r, H, HD), 3 * D, D)
    h = "transformer.h.*"
    table = {
        "transformer.wte.weight": ("rows", rows(V, D)),
        "transformer.wpe.weight": ("rows", rows(16, D)),
        f"{h}.attn.c_attn.weight": ("heads", qkv),
        f"{h}.attn.c_attn.bias": ("coordinate", coord(qkv.shape[0])),
        f"{h}.attn.c_proj.weight": ("rows", rows(D, D)),
        f"{h}.attn.c_proj.bias": ("coordinate", coord(D)),
        f"{h}.mlp.c_fc.weight": ("rows", rows(4 * D, D)),
        f"{h}.mlp.c_fc.bias": ("coordinate", coord(4 * D)),
        f"{h}.mlp.c_proj.weight": ("rows", rows(D, 4 * D)),
        f"{h}.mlp.c_proj.bias": ("coordinate", coord(D)),
        **norm_entries(f"{h}.ln_1", f"{h}.ln_2", "transformer.ln_f"),
    }
    check_plan(model, plan, table, {"transformer.wte.weight": ("lm_head.weight",)})
    assert plan["transformer.h.0.attn.c_attn.weight"].role == "qkv"


# ---- a query that carries a gate per head (Qwen3-Next) ---------------------------------------
@pytest.mark.hf
def test_gated_query_heads_and_gate_rows():
    T = _tf()
    hd = 16  # stated by the config; the query is 2 x heads x hd wide
    cfg = T.Qwen3NextConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=H,
                            num_key_value_heads=KV, head_dim=hd, layer_types=["full_attention"], num_experts=4,
                            moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts_per_tok=2,
                            pad_token_id=0)
    model = _seeded(T.Qwen3NextForCausalLM, cfg)
    plan, pw = plan_recording(model)
    assert pw == []
    a = "model.layers.0.self_attn"

    def gated(r):  # per head: hd query rows (one block), then hd gate rows (one block each)
        h, off = divmod(r, 2 * hd)
        return h * (1 + hd) + (0 if off < hd else 1 + off - hd)

    q = plan[f"{a}.q_proj.weight"]
    assert torch.equal(q.block_index(), by_row(gated, 2 * H * hd, D)) and q.role == "query"
    assert torch.equal(plan[f"{a}.k_proj.weight"].block_index(), heads(KV, hd, D))


# ---- a multimodal model: every tower takes its own sub-config's heads ------------------------
@pytest.mark.hf
def test_vision_tower_uses_its_own_heads():
    """LLaVA with a SigLIP tower of 3 heads of 8 (width 24) beside a Llama of 4 query / 2 KV heads:
    the tower's attention and its pooling head (an nn.MultiheadAttention) take 3 heads, never the
    text model's counts (before: 2 KV heads do not divide 3 query heads, and partition raised)."""
    T = _tf()
    vision = T.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                                  image_size=8, patch_size=4)
    cfg = T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**{**LLAMA_CFG, "num_hidden_layers": 1}),
                        image_token_id=1)
    model = _seeded(T.LlavaForConditionalGeneration, cfg)
    plan, pw = plan_recording(model)
    assert pw == []
    v = "model.vision_tower"
    for p in ("q_proj", "k_proj"):
        assert torch.equal(plan[f"{v}.encoder.layers.0.self_attn.{p}.weight"].block_index(), heads(3, 8, 24))
    pool = by_row(lambda r: concat_qkv_block(r, 3, 3, 8), 72, 24)
    assert torch.equal(plan[f"{v}.head.attention.in_proj_weight"].block_index(), pool)
    assert torch.equal(plan["model.language_model.layers.0.self_attn.q_proj.weight"].block_index(), heads(H, HD, D))
    assert torch.equal(plan["model.language_model.layers.0.self_attn.k_proj.weight"].block_index(), heads(KV, HD, D))


@pytest.mark.hf
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_factors_take_the_role_of_the_adapted_layer():
    """A LoRA factor is trained like the layer it adapts: blockwise LR and AdaPM read its role."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"]))
    plan, pw = plan_recording(model)
    assert pw == []
    layer = "base_model.model.model.layers.0"
    for target, role, block_type in (("self_attn.q_proj", "query", "qk"), ("self_attn.v_proj", "value", "vo"),
                                     ("self_attn.o_proj", "attn_out", "vo"), ("mlp.up_proj", "ffn", "ffn")):
        for factor in ("lora_A", "lora_B"):
            name = f"{layer}.{target}.{factor}.default.weight"
            assert plan[name].role == role, name
            assert plan.block_type(name) == block_type, name


@pytest.mark.hf
@pytest.mark.parametrize("arch, ffn", [
    ("bert", ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense")),
    ("opt", ("model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2")),
    ("vit", ("layers.0.mlp.fc1", "layers.0.mlp.fc2")),
])
def test_ffn_linears_have_role_ffn(arch, ffn, zoo):
    plan = zoo(arch).plan
    for layer in ffn:
        assert plan[f"{layer}.weight"].role == "ffn", layer
        assert plan.block_type(f"{layer}.bias") == "ffn", layer


@pytest.mark.hf
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_factors_of_bert_follow_the_block():
    """BERT names its attention output and both FFN Linears ``dense``: the factors' roles come
    from where each adapted layer sits, not from its name."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_bert(), peft.LoraConfig(r=4, target_modules=["query", "dense"]))
    plan, _ = plan_recording(model)
    layer = "base_model.model.bert.encoder.layer.0"
    for target, role in (("attention.self.query", "query"), ("attention.output.dense", "attn_out"),
                         ("intermediate.dense", "ffn"), ("output.dense", "ffn")):
        for factor in ("lora_A", "lora_B"):
            assert plan[f"{layer}.{target}.{factor}.default.weight"].role == role, target
