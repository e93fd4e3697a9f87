"""The in-house Llama and GPT-2 models: shapes, GQA, causality, tying, init, config validation."""

import math

from dataclasses import replace

import pytest
import torch

from blockopt.bench.models import (
    CONFIGS,
    GPT2,
    Attention,
    GPT2Config,
    Llama,
    LlamaConfig,
    apply_rotary,
    build_model,
    rotary_tables,
)

TINY = ["llama-tiny", "gpt2-tiny"]


def tokens(config, batch=2, seq=16, seed=0):
    return torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_initial_loss(name):
    model = build_model(name)
    config = CONFIGS[name]
    idx = tokens(config)
    logits, loss = model(idx)
    assert logits.shape == (2, 16, config.vocab_size) and loss is None
    _, loss = model(idx, tokens(config, seed=1))
    # Small init: predictions start near uniform.
    assert loss.ndim == 0 and abs(loss.item() - math.log(config.vocab_size)) < 0.1
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_gqa_projections_and_head_attributes():
    config = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=8, n_kv_heads=2)
    attn = Llama(config).layers[0].attn
    assert isinstance(attn, Attention)
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (8, 2, 8)
    assert attn.q_proj.out_features == 64
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * 8
    assert all(getattr(attn, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_gqa_equals_multi_head_attention_with_shared_kv_heads():
    """Query head h reads kv head h // group: the same as MHA with each kv head copied group times."""
    torch.manual_seed(0)
    gqa = Attention(32, n_heads=4, n_kv_heads=2, bias=False)
    mha = Attention(32, n_heads=4, n_kv_heads=4, bias=False)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            per_head = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(per_head.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gqa(x), mha(x))


@pytest.mark.parametrize("name", TINY)
def test_causal(name):
    model = build_model(name).eval()
    idx = tokens(CONFIGS[name])
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % CONFIGS[name].vocab_size
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(head_dim=8, max_seq_len=32, theta=10000.0)
    q, k = torch.randn(8, dtype=torch.float32), torch.randn(8)

    def score(m, n):
        return (apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])).item()

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert apply_rotary(q, cos[5], sin[5]).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_gpt2_head_is_tied_to_the_token_embedding():
    model = build_model("gpt2-tiny")
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = GPT2(GPT2Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=False))
    assert untied.num_params() == model.num_params() + 512 * 64
    attn = model.layers[0].attn
    assert attn.n_kv_heads == attn.n_heads == 4 and attn.q_proj.bias is not None


def test_llama_can_tie_embeddings():
    config = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, tie_embeddings=True)
    model = Llama(config)
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("name", TINY)
def test_init_depends_on_the_seed_only(name):
    torch.manual_seed(123)
    first = build_model(name, seed=7).state_dict()
    torch.manual_seed(999)  # a different global RNG state must not matter
    second = build_model(name, seed=7).state_dict()
    other = build_model(name, seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_residual_projections_start_smaller():
    model = build_model("llama-tiny")
    layer = model.layers[0]
    assert layer.attn.o_proj.weight.std() < 0.6 * layer.attn.q_proj.weight.std()
    assert layer.mlp.down_proj.weight.std() < 0.6 * layer.mlp.up_proj.weight.std()


@pytest.mark.parametrize("arch", ["llama-tiny", "gpt2-tiny"])
def test_init_std_scales_every_weight(arch):
    config = CONFIGS[arch]
    base = build_model(config, seed=3).state_dict()
    scaled = build_model(replace(config, init_std=3 * config.init_std), seed=3).state_dict()
    for name, tensor in base.items():
        if tensor.ndim >= 2:  # matrices and embeddings: the same draw, 3x the scale
            torch.testing.assert_close(scaled[name], 3 * tensor)
        else:  # norm scales and biases keep their own init
            assert torch.equal(scaled[name], tensor), name


def test_gpt2_small_has_the_124m_shape():
    config = CONFIGS["gpt2-small"]
    shape = (config.vocab_size, config.n_layers, config.dim, config.n_heads, config.max_seq_len)
    assert shape == (50257, 12, 768, 12, 1024)
    with torch.device("meta"):
        model = build_model(config)
    assert model.num_params() == 124_439_808  # GPT-2 small with its tied head


@pytest.mark.parametrize("config", [LlamaConfig, GPT2Config])
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dim=30, n_heads=4), ValueError, r"dim \(30\) must be divisible by n_heads \(4\)"),
        (dict(n_layers=0), ValueError, "^n_layers must be an int >= 1, got 0$"),
        (dict(max_seq_len=-1), ValueError, "^max_seq_len must be an int >= 1, got -1$"),
        (dict(vocab_size=True), TypeError, r"^vocab_size must be an int >= 1, got True \(bool\)$"),
        (dict(dim=32.0), TypeError, r"^dim must be an int >= 1, got 32.0 \(float\)$"),
        (dict(norm_eps=0.0), ValueError, "^norm_eps must be a number > 0, got 0.0$"),
        (dict(init_std=0.0), ValueError, "^init_std must be a number > 0, got 0.0$"),
        (dict(init_std=float("nan")), ValueError, "^init_std must be a number > 0, got nan$"),
    ],
)
def test_config_validation_names_the_field_the_rule_and_the_value(config, kwargs, error, message):
    settings = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4) | kwargs
    with pytest.raises(error, match=message):
        config(**settings)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_heads=4, n_kv_heads=3), ValueError, "multiple of n_kv_heads"),
        (dict(dim=12, n_heads=4), ValueError, "even for RoPE"),
        (dict(n_kv_heads=0), ValueError, "^n_kv_heads must be an int >= 1, got 0$"),
        (dict(rope_theta=-1.0), ValueError, "^rope_theta must be a number > 0, got -1.0$"),
    ],
)
def test_llama_config_validation(kwargs, error, message):
    settings = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4) | kwargs
    with pytest.raises(error, match=message):
        LlamaConfig(**settings)


def test_config_defaults_and_errors():
    config = LlamaConfig(vocab_size=64, dim=96, n_layers=1, n_heads=4)
    assert config.n_kv_heads == 4 and config.mlp_hidden == 256  # 8/3 * 96 rounded up to 32
    assert GPT2Config(vocab_size=64, dim=32, n_layers=1, n_heads=4).mlp_hidden == 128
    with pytest.raises(TypeError):
        LlamaConfig(64, 32, 1, 4)  # keyword-only
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model("llama-tiny")(torch.zeros(1, 65, dtype=torch.long))
