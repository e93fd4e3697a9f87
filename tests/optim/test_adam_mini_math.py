"""AdamMini against math done independently: torch.optim.AdamW, a float64 loop of the paper's
Algorithm 1, and the official adam-mini 1.1.1 package."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import random
import types

import pytest
import torch

import blockopt
import torch.nn as nn
from blockopt.partition import BlockSpec, Plan

from .conftest import batches, lm_loss, make_tiny, max_param_diff, train


def _named_groups(model):
    """Two groups with different lr and weight decay: matrices and vectors."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.ndim >= 2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "lr": 3e-3, "weight_decay": 0.05},
    ]


def test_size_one_blocks_equal_adamw_with_groups_and_weight_decay():
    # Note: no biases in the attention here. The key bias of softmax attention has an exactly-zero
    # true gradient, so its computed gradient is rounding noise that Adam divides by ~eps: a 1-ulp
    # difference anywhere would then show as ~1e-13 in that bias for *any* two implementations.
    # The shared-gradient test below covers biases.
    ours_model = make_tiny(bias=False)
    ref_model = copy.deepcopy(ours_model)
    ours = blockopt.AdamMini(_named_groups(ours_model), betas=(0.9, 0.95), eps=1e-8, rules={"*": "coordinate"}, decay_1d=True)
    ref = torch.optim.AdamW(_named_groups(ref_model), betas=(0.9, 0.95), eps=1e-8)
    assert all(spec.n_blocks == spec.numel for spec in ours.plan.values())
    data = batches(50)
    train(ours_model, ours, data)
    train(ref_model, ref, data)
    assert max_param_diff(ours_model, ref_model) <= 1e-12
    # and the trajectory moved: the comparison is not between two idle models
    assert max_param_diff(ours_model, make_tiny(bias=False)) > 1e-2


def test_size_one_blocks_equal_adamw_step_by_step_with_biases():
    """Same gradients fed to both at every step (biases included): the steps agree to rounding."""
    ours_model = make_tiny(bias=True)
    ref_model = copy.deepcopy(ours_model)
    ours = blockopt.AdamMini(_named_groups(ours_model), rules={"*": "coordinate"}, decay_1d=True)
    ref = torch.optim.AdamW(_named_groups(ref_model))
    for idx in batches(50):
        ours.zero_grad()
        lm_loss(ours_model, idx).backward()
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert max_param_diff(ours_model, ref_model) <= 1e-12


def test_default_1d_params_are_not_decayed():
    """Without decay_1d, vectors get weight_decay=0 (AdamW with such groups agrees)."""
    model = make_tiny(bias=False)
    ref_model = copy.deepcopy(model)
    ours = blockopt.AdamMini(model, lr=1e-2, weight_decay=0.5, rules={"*": "coordinate"})
    named = list(ref_model.named_parameters())
    ref = torch.optim.AdamW(
        [{"params": [p for _, p in named if p.ndim >= 2]}, {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, weight_decay=0.5,
    )
    data = batches(10)
    train(model, ours, data)
    train(ref_model, ref, data)
    assert max_param_diff(model, ref_model) <= 1e-12


# ---- Algorithm 1, written from the paper as a plain float64 loop -----------------------------
def _random_layout(shape, rng):
    """A random partition of a tensor of ``shape``, as (BlockSpec, list of index tuples per block)."""
    rows, cols = shape
    kind = rng.choice(["rows", "cols", "heads", "whole", "coordinate", "fused"])
    all_idx = [(i, j) for i in range(rows) for j in range(cols)]
    if kind == "rows":
        blocks = [[(i, j) for j in range(cols)] for i in range(rows)]
        layout = dict(block_dims=(0,), segments=((rows, 1),))
    elif kind == "cols":
        blocks = [[(i, j) for i in range(rows)] for j in range(cols)]
        layout = dict(block_dims=(1,), segments=((cols, 1),))
    elif kind == "heads":
        k = rng.choice([d for d in range(1, rows + 1) if rows % d == 0])
        blocks = [[(i, j) for i in range(h * k, (h + 1) * k) for j in range(cols)] for h in range(rows // k)]
        layout = dict(block_dims=(0,), segments=((rows, k),))
    elif kind == "whole":
        blocks = [all_idx]
        layout = dict(block_dims=(), segments=((1, 1),))
    elif kind == "coordinate":
        blocks = [[ij] for ij in all_idx]
        layout = dict(block_dims=(0, 1), segments=((rows * cols, 1),))
    else:  # columns cut into two grouped segments and a per-column tail, like a fused QKV
        a = rng.choice([1, 2])
        blocks, segs, start = [], [], 0
        for units, per in ((2 * a, a), (2 * a, 2), (cols - 4 * a, 1)):
            for b in range(units // per):
                blocks.append([(i, j) for j in range(start + b * per, start + (b + 1) * per) for i in range(rows)])
            segs.append((units, per))
            start += units
        layout = dict(block_dims=(1,), segments=tuple(segs))
        kind = "heads"
    return kind, layout, blocks


def _algorithm1(params, grads_per_step, blocks_of, lr, beta1, beta2, eps, wd):
    """Algorithm 1 of the paper (with Algorithm 2's eps placement), coordinate by coordinate."""
    p = {n: [[float(x) for x in row] for row in t.tolist()] for n, t in params.items()}
    m = {n: [[0.0] * len(row) for row in p[n]] for n in p}
    v = {n: [0.0] * len(blocks_of[n]) for n in p}
    for t, grads in enumerate(grads_per_step, start=1):
        for n in p:
            g = grads[n].tolist()
            for i, row in enumerate(p[n]):
                for j in range(len(row)):
                    row[j] -= lr * wd * row[j]
                    m[n][i][j] = beta1 * m[n][i][j] + (1 - beta1) * g[i][j]
            for b, idx in enumerate(blocks_of[n]):
                mean_sq = sum(g[i][j] ** 2 for i, j in idx) / len(idx)
                v[n][b] = beta2 * v[n][b] + (1 - beta2) * mean_sq
                v_hat = v[n][b] / (1 - beta2**t)
                for i, j in idx:
                    m_hat = m[n][i][j] / (1 - beta1**t)
                    p[n][i][j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return {n: torch.tensor(x, dtype=torch.float64) for n, x in p.items()}


@pytest.mark.parametrize("seed", range(6))
def test_matches_paper_algorithm_on_random_partitions(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params, specs, blocks_of = {}, [], {}
    for k in range(4):
        shape = (rng.choice([2, 4, 6]), rng.choice([8, 12]))
        name = f"layer{k}.weight"
        rule, layout, blocks = _random_layout(shape, rng)
        params[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
        specs.append(BlockSpec(name=name, shape=shape, rule=rule, reason="test", **layout))
        blocks_of[name] = blocks
    grads_per_step = [{n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in params.items()} for _ in range(8)]
    hp = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, wd=0.1)

    tensors = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    opt = blockopt.AdamMini(list(tensors.items()), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["wd"], plan=Plan(specs))
    for grads in grads_per_step:
        for n, t in tensors.items():
            t.grad = grads[n].clone()
        opt.step()

    expected = _algorithm1(params, grads_per_step, blocks_of, **hp)
    for n in params:
        torch.testing.assert_close(tensors[n].detach(), expected[n], rtol=0, atol=1e-12)
        assert opt.state[tensors[n]]["exp_avg_sq"].shape == (len(blocks_of[n]),)


# ---- the official package ------------------------------------------------------------------
@pytest.mark.hf
def test_default_plan_on_llama_gqa_follows_official_adam_mini():
    transformers = pytest.importorskip("transformers")
    official = pytest.importorskip("adam_mini")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    ours_model = transformers.LlamaForCausalLM(cfg).to(torch.float64)
    ref_model = copy.deepcopy(ours_model)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = blockopt.AdamMini(ours_model, **hp)
    ref = official.Adam_mini(ref_model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False, **hp)

    # the plan is the official one: q by 4 heads, k by 2 KV heads, everything else as the paper says
    assert ours.plan["model.layers.0.self_attn.q_proj.weight"].n_blocks == 4
    assert ours.plan["model.layers.0.self_attn.k_proj.weight"].n_blocks == 2
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(30)]
    for idx in data:
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(input_ids=idx, labels=idx).loss.backward()
            opt.step()
    diffs = {n: (p - q).abs().max().item() for (n, p), (_, q) in zip(ours_model.named_parameters(), ref_model.named_parameters())}
    assert max(diffs.values()) <= 1e-9, diffs
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), transformers.LlamaForCausalLM(cfg).parameters()))
    assert moved > 1e-3


# The usage block of adam-mini's README, as its users write it; only the import line differs.
OFFICIAL_README_USAGE = """
optimizer = Adam_mini(
            named_parameters = model.named_parameters(),
            lr = lr,
            betas = (beta1,beta2),
            eps = eps,
            weight_decay = weight_decay,
            model_sharding = True,
            dim = model_config.dim,
            n_heads = model_config.n_heads,
            n_kv_heads = model_config.n_kv_heads,
            )
"""


def _run_readme_usage(import_line: str, transformers):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64)
    model_config = types.SimpleNamespace(dim=32, n_heads=4, n_kv_heads=2)
    scope = dict(model=model, model_config=model_config, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    with contextlib.redirect_stdout(io.StringIO()):  # the official optimizer prints as it plans
        exec(import_line + "\n" + OFFICIAL_README_USAGE, scope)
    optimizer = scope["optimizer"]
    g = torch.Generator().manual_seed(1)
    for idx in [torch.randint(0, 64, (2, 12), generator=g) for _ in range(10)]:
        optimizer.zero_grad()
        model(input_ids=idx, labels=idx).loss.backward()
        optimizer.step()
    return optimizer, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.hf
def test_the_official_readme_usage_runs_with_only_the_import_swapped():
    """adam-mini's README example, with `from blockopt import Adam_mini` in place of its import,
    builds blockopt's AdamMini and follows the official trajectory (1e-9, float64)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("adam_mini")
    ours, ours_params = _run_readme_usage("from blockopt import Adam_mini", transformers)
    _, official_params = _run_readme_usage("from adam_mini import Adam_mini", transformers)
    assert isinstance(ours, blockopt.AdamMini)
    assert ours.plan["model.layers.0.self_attn.k_proj.weight"].n_blocks == 2  # n_kv_heads heeded
    for n, p in official_params.items():
        torch.testing.assert_close(ours_params[n], p, rtol=0, atol=1e-9)


def test_official_keywords_are_accepted_and_checked(capsys):
    model = nn.Sequential(nn.Linear(4, 4))
    opt = blockopt.AdamMini(named_parameters=model.named_parameters(), model_sharding=False, verbose=True)
    assert "0.weight" in capsys.readouterr().out  # verbose prints the plan
    assert set(opt.plan) == {"0.weight", "0.bias"}
    with pytest.raises(TypeError, match="pass the parameters once"):
        blockopt.AdamMini(model.parameters(), named_parameters=model.named_parameters())
    with pytest.raises(TypeError, match="AdamMini needs parameters"):
        blockopt.AdamMini()
    with pytest.raises(TypeError, match="verbose must be True or False"):
        blockopt.AdamMini(model, verbose="yes")
    with pytest.raises(AttributeError, match=r"no 'wqk_names': blockopt plans blocks at construction.*rules="):
        opt.wqk_names.add("query")
    with pytest.raises(AttributeError, match=r"no 'wqk_names': blockopt plans blocks at construction.*rules="):
        opt.wqk_names = {"query"}  # (assigned, the set would sit unread)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


def test_the_official_call_prints_identical_layers_collapsed(capsys):
    """``verbose=True`` with ``named_parameters=`` (no module: blocks from names) collapses the
    layers as the table of a model does: the reasons do not carry the parameter's name."""
    model = nn.Module()
    model.layers = nn.ModuleList(_Block() for _ in range(3))
    blockopt.AdamMini(named_parameters=model.named_parameters(), n_heads=2, verbose=True)
    out = capsys.readouterr().out
    assert "layers.{0..2}.q_proj.weight" in out and "layers.1." not in out
