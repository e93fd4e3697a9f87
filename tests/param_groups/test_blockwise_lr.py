"""blockwise_lr: one param group per block type with the sharpness-disparity multipliers.

Expected types are written here from the models' known layouts (which module is what), never
with the library's own role table.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import blockopt
from blockopt.bench.models import CONFIGS, build_model
from blockopt.param_groups import DEFAULT_RATIOS, resolve_ratios
from blockopt.partition import BLOCK_TYPES
from tests.optim.conftest import VOCAB, make_tiny

BASE = 1e-3
PAPER = {"embedding": 10, "qk": 8, "ffn": 6, "vo": 4, "norm": 1}


def llama_expected(model) -> dict[str, float]:
    """name -> ratio for the in-house Llama, from its module layout."""
    out = {"embed_tokens.weight": 10, "norm.weight": 1, "lm_head.weight": 1}
    for i in range(model.config.n_layers):
        p = f"layers.{i}."
        out.update({p + "attn_norm.weight": 1, p + "mlp_norm.weight": 1})
        out.update({p + f"attn.{x}_proj.weight": 8 for x in "qk"})
        out.update({p + f"attn.{x}_proj.weight": 4 for x in "vo"})
        out.update({p + f"mlp.{x}_proj.weight": 6 for x in ("gate", "up", "down")})
    return out


def gpt2_expected(model, bias_follows_owner: bool = True) -> dict[str, float]:
    """name -> ratio for the in-house GPT-2 (tied wte = lm_head, learned positions, biases)."""
    b = (lambda r: r) if bias_follows_owner else (lambda r: 1)
    out = {"wte.weight": 10, "wpe.weight": 1, "ln_f.weight": 1, "ln_f.bias": b(1)}
    for i in range(model.config.n_layers):
        p = f"layers.{i}."
        for ln in ("ln_1", "ln_2"):
            out.update({p + ln + ".weight": 1, p + ln + ".bias": b(1)})
        for x, r in (("q", 8), ("k", 8), ("v", 4), ("o", 4)):
            out.update({p + f"attn.{x}_proj.weight": r, p + f"attn.{x}_proj.bias": b(r)})
        for x in ("fc_in", "fc_out"):
            out.update({p + f"mlp.{x}.weight": 6, p + f"mlp.{x}.bias": b(6)})
    return out


def lr_by_name(groups) -> dict[str, float]:
    out = {}
    for g in groups:
        for n in g["param_names"]:
            assert n not in out, f"{n} is in two groups"
            out[n] = g["lr"]
    return out


def assert_each_param_once(model, groups):
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"]) > 0  # no empty group
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"]))


# ---- groups and multipliers ---------------------------------------------------------------------
def test_llama_groups_follow_the_paper():
    model = build_model("llama-tiny")
    groups = blockopt.blockwise_lr(model, lr=BASE)
    assert_each_param_once(model, groups)
    expected = llama_expected(model)
    got = lr_by_name(groups)
    assert got.keys() == expected.keys()
    for name, ratio in expected.items():
        assert got[name] == pytest.approx(BASE * ratio), name
    # one group per type present, in a fixed order, each labelled with its type and ratio
    assert [g["block_type"] for g in groups] == ["embedding", "head", "qk", "vo", "ffn", "norm"]
    for g in groups:
        assert g["lr_ratio"] == pytest.approx(g["lr"] / BASE)
        if g["block_type"] in PAPER:
            assert g["lr_ratio"] == PAPER[g["block_type"]]


def test_demo_llama_with_gqa():
    model = build_model("demo")  # 4 query heads, 2 KV heads: k/v are narrower
    got = lr_by_name(blockopt.blockwise_lr(model, lr=BASE))
    expected = llama_expected(model)
    assert got == pytest.approx({n: BASE * r for n, r in expected.items()})


def test_gpt2_tied_head_positions_and_biases():
    model = build_model("gpt2-tiny")
    assert model.lm_head.weight is model.wte.weight
    groups = blockopt.blockwise_lr(model, lr=BASE)
    assert_each_param_once(model, groups)  # the tied tensor is in exactly one group
    got = lr_by_name(groups)
    expected = gpt2_expected(model)
    assert got.keys() == expected.keys()
    for name, ratio in expected.items():
        assert got[name] == pytest.approx(BASE * ratio), name


def test_gpt2_separate_biases():
    model = build_model("gpt2-tiny")
    groups = blockopt.blockwise_lr(model, lr=BASE, bias="separate")
    got = lr_by_name(groups)
    expected = gpt2_expected(model, bias_follows_owner=False)
    assert got == pytest.approx({n: BASE * r for n, r in expected.items()})
    bias_group = next(g for g in groups if g["block_type"] == "bias")
    assert set(bias_group["param_names"]) == {n for n, p in model.named_parameters() if n.endswith(".bias")}
    groups = blockopt.blockwise_lr(model, lr=BASE, ratios={"bias": 3}, bias="separate")
    assert next(g for g in groups if g["block_type"] == "bias")["lr"] == pytest.approx(3 * BASE)


def test_packed_attention_qkv_defaults_to_the_smaller_of_qk_and_vo():
    model = make_tiny()  # nn.TransformerEncoderLayer: packed in_proj_weight (q | k | v rows)
    groups = blockopt.blockwise_lr(model, lr=BASE)
    assert_each_param_once(model, groups)
    got = lr_by_name(groups)
    assert got["block.self_attn.in_proj_weight"] == pytest.approx(4 * BASE)  # min(8, 4)
    assert got["block.self_attn.in_proj_bias"] == pytest.approx(4 * BASE)  # follows its weight
    assert got["block.self_attn.out_proj.weight"] == pytest.approx(4 * BASE)
    assert got["embed.weight"] == pytest.approx(10 * BASE)
    assert got["block.norm1.weight"] == pytest.approx(BASE)
    # qkv follows the qk/vo ratios unless given itself
    got = lr_by_name(blockopt.blockwise_lr(model, lr=BASE, ratios={"qk": 12, "vo": 5}))
    assert got["block.self_attn.in_proj_weight"] == pytest.approx(5 * BASE)
    got = lr_by_name(blockopt.blockwise_lr(model, lr=BASE, ratios={"qkv": 7}))
    assert got["block.self_attn.in_proj_weight"] == pytest.approx(7 * BASE)


@pytest.mark.hf
def test_hf_gpt2_fused_c_attn():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    groups = blockopt.blockwise_lr(model, lr=BASE, ratios={"qkv": 6})
    assert_each_param_once(model, groups)
    got = lr_by_name(groups)
    for i in range(2):
        p = f"transformer.h.{i}."
        assert got[p + "attn.c_attn.weight"] == pytest.approx(6 * BASE)
        assert got[p + "attn.c_attn.bias"] == pytest.approx(6 * BASE)
        assert got[p + "attn.c_proj.weight"] == pytest.approx(4 * BASE)
        assert got[p + "mlp.c_fc.weight"] == pytest.approx(6 * BASE)
        assert got[p + "mlp.c_proj.bias"] == pytest.approx(6 * BASE)
        assert got[p + "ln_1.weight"] == pytest.approx(BASE)
    assert got["transformer.wte.weight"] == pytest.approx(10 * BASE)  # tied with lm_head
    assert got["transformer.wpe.weight"] == pytest.approx(BASE)


def test_ratios_override_only_the_types_given():
    model = build_model("llama-tiny")
    got = lr_by_name(blockopt.blockwise_lr(model, lr=BASE, ratios={"head": 2.5, "norm": 0.5}))
    expected = llama_expected(model)
    expected.update({"lm_head.weight": 2.5, "norm.weight": 0.5})
    expected.update({n: 0.5 for n in expected if n.endswith("norm.weight")})
    assert got == pytest.approx({n: BASE * r for n, r in expected.items()})


def test_frozen_parameters_are_left_out():
    model = build_model("llama-tiny")
    model.embed_tokens.weight.requires_grad_(False)
    groups = blockopt.blockwise_lr(model, lr=BASE)
    assert_each_param_once(model, groups)
    assert "embedding" not in [g["block_type"] for g in groups]


def test_every_block_type_has_a_ratio():
    assert set(DEFAULT_RATIOS) | {"qkv"} == set(BLOCK_TYPES)
    assert resolve_ratios().keys() == set(BLOCK_TYPES)


# ---- a Plan plus tensors ------------------------------------------------------------------------
def test_plan_with_model_or_named_parameters_equals_model():
    model = build_model("gpt2-tiny")
    plan = blockopt.partition(model)
    ref = blockopt.blockwise_lr(model, lr=BASE, weight_decay=0.1)
    for params in (model, model.named_parameters()):
        groups = blockopt.blockwise_lr(plan, lr=BASE, params=params, weight_decay=0.1)
        assert [(g["block_type"], g["param_names"], g["lr"], g["weight_decay"]) for g in groups] == [
            (g["block_type"], g["param_names"], g["lr"], g["weight_decay"]) for g in ref
        ]


def test_plan_with_rules_keeps_roles():
    model = build_model("llama-tiny")
    plan = blockopt.partition(model, rules={"*": "coordinate"})  # AdamW layout, same roles
    got = lr_by_name(blockopt.blockwise_lr(plan, lr=BASE, params=model))
    assert got == pytest.approx({n: BASE * r for n, r in llama_expected(model).items()})


# ---- weight decay -------------------------------------------------------------------------------
def test_weight_decay_splits_one_dimensional_tensors():
    model = build_model("gpt2-tiny")
    groups = blockopt.blockwise_lr(model, lr=BASE, weight_decay=0.1)
    assert_each_param_once(model, groups)
    for g in groups:
        dims = {p.ndim for p in g["params"]}
        assert g["weight_decay"] == (0.1 if dims <= {2, 3, 4} else 0.0)
        assert dims <= {1} or 1 not in dims  # never mixed
    # same type, same LR, whether decayed or not
    ffn = [g for g in groups if g["block_type"] == "ffn"]
    assert len(ffn) == 2 and ffn[0]["lr"] == ffn[1]["lr"] == pytest.approx(6 * BASE)
    assert {g["weight_decay"] for g in ffn} == {0.1, 0.0}
    # without weight_decay, groups carry none (the optimizer's own applies)
    assert all("weight_decay" not in g for g in blockopt.blockwise_lr(model, lr=BASE))


# ---- optimizers accept the groups ---------------------------------------------------------------
def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=g)


def _step_delta(model, opt):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _batch(model)
    opt.zero_grad()
    model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["AdamW", "AdamMini"])
def test_first_step_is_the_base_step_times_the_ratio(kind):
    # Adam's first update is -lr * m/(sqrt(v)+eps) with m/sqrt(v) independent of lr, so each
    # tensor's step under the groups is its ratio times its step under one group at the base LR.
    model = build_model("gpt2-tiny").double()
    base_model = copy.deepcopy(model)
    if kind == "AdamW":
        opt = torch.optim.AdamW(blockopt.blockwise_lr(model, lr=BASE), lr=BASE, weight_decay=0.0)
        base_opt = torch.optim.AdamW(base_model.parameters(), lr=BASE, weight_decay=0.0)
    else:
        plan = blockopt.partition(model)
        opt = blockopt.AdamMini(blockopt.blockwise_lr(plan, lr=BASE, params=model), plan=plan)
        base_opt = blockopt.AdamMini(base_model, lr=BASE)
        assert opt.plan == base_opt.plan
    delta = _step_delta(model, opt)
    base = _step_delta(base_model, base_opt)
    for name, ratio in gpt2_expected(model).items():
        torch.testing.assert_close(delta[name], ratio * base[name], rtol=1e-9, atol=1e-15, msg=name)
        assert delta[name].abs().max() > 0, name


def test_adamw_first_step_moves_each_coordinate_by_its_group_lr():
    # independent of any reference optimizer: Adam's first step is lr * sign(g) (|g| >> eps)
    model = build_model("llama-tiny").double()
    opt = torch.optim.AdamW(blockopt.blockwise_lr(model, lr=BASE), eps=1e-30, weight_decay=0.0)
    delta = _step_delta(model, opt)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, ratio in llama_expected(model).items():
        moved = grads[name] != 0
        assert moved.any(), name
        torch.testing.assert_close(delta[name][moved].abs(), torch.full_like(delta[name][moved], BASE * ratio))
        assert (delta[name][moved].sign() == -grads[name][moved].sign()).all()


def test_adam_mini_takes_the_groups_with_their_plan():
    model = build_model("demo")
    plan = blockopt.partition(model)
    groups = blockopt.blockwise_lr(plan, lr=BASE, params=model, weight_decay=0.1)
    opt = blockopt.AdamMini(groups, betas=(0.9, 0.95), plan=plan)
    assert len(opt.param_groups) == len(groups)
    assert opt.plan["layers.0.attn.k_proj.weight"].n_blocks == CONFIGS["demo"].n_kv_heads  # heads kept
    for g, og in zip(groups, opt.param_groups):
        assert og["lr"] == g["lr"] and og["block_type"] == g["block_type"] and og["weight_decay"] == g["weight_decay"]
    x = _batch(model)
    model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    assert all(opt.state[p] for g in groups for p in g["params"])
    fresh = blockopt.AdamMini(blockopt.blockwise_lr(plan, lr=BASE, params=model, weight_decay=0.1), plan=plan)
    fresh.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in groups]


@pytest.mark.parametrize("make", [blockopt.AdamMini, blockopt.AdaPM, blockopt.SGDSaI], ids=lambda c: c.__name__)
def test_the_groups_alone_carry_the_model_plan(make):
    """Without plan= the groups hand the optimizer the plan they were made from: planned again
    from the names alone, query and key lost their heads (split per neuron, with a warning)."""
    model = build_model("llama-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = make(blockopt.blockwise_lr(model, lr=BASE))
    assert opt.plan == blockopt.partition(model)
    x = _batch(model)
    model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    assert all(opt.state[p] for g in opt.param_groups for p in g["params"])


def test_partition_options_or_a_bare_list_plan_the_names_again():
    model = build_model("llama-tiny")
    groups = blockopt.blockwise_lr(model, lr=BASE)
    q = "layers.0.attn.q_proj.weight"
    opt = blockopt.AdamMini(groups, n_heads=2, n_kv_heads=1)  # options asked for: they decide
    assert opt.plan[q].n_blocks == 2
    with pytest.warns(blockopt.PartitionWarning, match="no n_heads given"):
        opt = blockopt.AdamMini(list(groups))  # (a copy into a plain list holds no plan)
    assert opt.plan[q].role == "query" and opt.plan[q].n_blocks == model.config.dim


def test_a_group_added_to_the_list_is_planned_beside_the_carried_plan():
    model = build_model("llama-tiny")
    groups = blockopt.blockwise_lr(model, lr=BASE)
    extra = torch.nn.Parameter(torch.zeros(3, 5))
    groups.append({"params": [("extra.weight", extra)], "lr": BASE})
    with pytest.warns(blockopt.PartitionWarning, match="extra.weight"):  # planned from its name and shape alone
        opt = blockopt.AdamMini(groups)
    assert opt.plan["extra.weight"].shape == (3, 5)
    assert opt.plan["layers.0.attn.q_proj.weight"] == blockopt.partition(model)["layers.0.attn.q_proj.weight"]


def test_lambda_lr_keeps_the_ratios():
    model = build_model("llama-tiny")
    opt = torch.optim.AdamW(blockopt.blockwise_lr(model, lr=BASE, weight_decay=0.1), betas=(0.9, 0.95))
    peaks = [g["lr"] for g in opt.param_groups]
    steps, warmup = 20, 4

    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for s in range(steps):
        for g, peak in zip(opt.param_groups, peaks):
            assert g["lr"] == pytest.approx(peak * factor(s))
            assert g["lr"] / (BASE * factor(s)) == pytest.approx(g["lr_ratio"])
        opt.step()
        sched.step()


# ---- errors -------------------------------------------------------------------------------------
ERRORS = [
    (dict(ratios={"emb": 3}), ValueError, r"unknown block type\(s\) \['emb'\]"),
    (dict(ratios={"query": 3, "value": 2}), ValueError, r"\['query', 'value'\].*'query' is a role: use 'qk'.*'value' is a role: use 'vo'"),
    (dict(ratios={"qk": 0}), ValueError, r"ratios\['qk'\] must be a number > 0, got 0"),
    (dict(ratios={"qk": -1.0}), ValueError, r"ratios\['qk'\] must be a number > 0, got -1.0"),
    (dict(ratios={"qk": float("inf")}), ValueError, r"ratios\['qk'\] must be a number > 0, got inf"),
    (dict(ratios={"qk": "8"}), TypeError, r"ratios\['qk'\] must be a number > 0, got '8' \(str\)"),
    (dict(ratios=[("qk", 8)]), TypeError, r"ratios must be a mapping"),
    (dict(lr=0.0), ValueError, r"lr must be a number > 0, got 0.0"),
    (dict(lr=True), TypeError, r"lr must be a number > 0, got True"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a number >= 0 or None, got -0.1"),
    (dict(bias="shared"), ValueError, r"bias must be one of 'owner', 'separate', got 'shared'"),
]


@pytest.mark.parametrize("kwargs, exc, match", ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_bad_arguments(kwargs, exc, match):
    kwargs = {"lr": BASE, **kwargs}
    with pytest.raises(exc, match=match):
        blockopt.blockwise_lr(build_model("llama-tiny"), **kwargs)


def test_plan_needs_tensors_and_model_takes_none():
    model = build_model("llama-tiny")
    plan = blockopt.partition(model)
    with pytest.raises(TypeError, match=r"a Plan holds no tensors: pass them too"):
        blockopt.blockwise_lr(plan, BASE)
    with pytest.raises(TypeError, match=r"params= is only for a Plan"):
        blockopt.blockwise_lr(model, BASE, params=model)
    with pytest.raises(TypeError, match=r"takes an nn.Module or a blockopt.Plan, got generator.*not a parameter list"):
        blockopt.blockwise_lr(model.named_parameters(), BASE)


def test_plan_for_another_model():
    plan = blockopt.partition(build_model("llama-tiny"))
    with pytest.raises(ValueError, match=r"plan says 'embed_tokens.weight' has shape \(512, 64\) but the parameter has \(2048, 128\)"):
        blockopt.blockwise_lr(plan, BASE, params=build_model("demo"))
    with pytest.raises(ValueError, match=r"'wte.weight' is not in the plan"):
        blockopt.blockwise_lr(plan, BASE, params=build_model("gpt2-tiny"))
    model = build_model("llama-tiny")
    partial = [(n, p) for n, p in model.named_parameters() if n != "norm.weight"]
    with pytest.raises(ValueError, match=r"the plan has parameters that were not given \(norm.weight\)"):
        blockopt.blockwise_lr(plan, BASE, params=partial)
    twice = list(model.named_parameters()) + [("again", model.norm.weight)]
    with pytest.raises(ValueError, match=r"'again' is given twice \(also as 'norm.weight'\)"):
        blockopt.blockwise_lr(plan, BASE, params=twice)


def test_vocab_constant_is_the_optim_tiny_model():
    # guards the fused-qkv test above: the tiny model's embedding is the token embedding
    assert make_tiny().embed.num_embeddings == VOCAB
