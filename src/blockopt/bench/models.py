"""Small in-house Llama- and GPT-2-style language models for benchmarks and tests.

The modules follow the conventions the partition engine reads: every attention module is an
`Attention` with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear children and integer
``n_heads``, ``n_kv_heads`` and ``head_dim`` attributes, so heads (and GQA) are detected from
structure rather than from names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import integer, real, validate

INIT_STD = 0.02

# What each field of a config may be (the sizes of both families, the Llama's RoPE base too).
_RULES = {
    **{name: integer(1) for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "max_seq_len")},
    **{name: real(0, low_open=True) for name in ("rope_theta", "norm_eps", "init_std")},
}


def _validate(config: object) -> None:
    validate(_RULES, {name: getattr(config, name) for name in _RULES if hasattr(config, name)})


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """A Llama-style decoder: RMSNorm pre-norms, RoPE, grouped-query attention, SwiGLU MLP.

    ``n_kv_heads`` defaults to ``n_heads`` (plain multi-head attention); ``mlp_hidden`` defaults to
    Llama's 8/3 * dim rounded up to a multiple of 32.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = INIT_STD  # std of every weight matrix and embedding at init

    def __post_init__(self) -> None:
        # Resolve the derived defaults once, so every reader sees concrete ints.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 32 * math.ceil(8 * self.dim / 3 / 32))
        _validate(self)
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """A GPT-2-style decoder: learned positions, LayerNorm pre-norms, GELU MLP, tied output head."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_hidden: int | None = None  # default 4 * dim
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = INIT_STD  # std of every weight matrix and embedding at init

    def __post_init__(self) -> None:
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 4 * self.dim)
        _validate(self)
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


ModelConfig = LlamaConfig | GPT2Config

CONFIGS: dict[str, ModelConfig] = {
    # Sized so that `blockopt demo` trains it twice in about two minutes on a 2-core CPU.
    "demo": LlamaConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "llama-tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
    "gpt2-tiny": GPT2Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=64),
    # GPT-2 small's shape (124M parameters), for memory figures; too big to train on a CPU.
    "gpt2-small": GPT2Config(vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
}


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles, each ``(max_seq_len, head_dim)`` (the half-split layout)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``(..., T, head_dim)``) by position: pairs are (i, i + head_dim/2)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections and optional grouped-query heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.n_kv_heads != self.n_heads:
            # Query head h reads kv head h // group (contiguous groups, as in Llama).
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPT2MLP(nn.Module):
    """GPT-2's feed-forward: ``fc_out(gelu(fc_in(x)))`` with biases and the tanh GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config.dim, config.n_heads, config.n_kv_heads, bias=False)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config.dim, config.mlp_hidden)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary)
        return x + self.mlp(self.mlp_norm(x))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config.dim, config.n_heads, config.n_heads, bias=True)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = GPT2MLP(config.dim, config.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _normal_(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``weight`` with N(0, std^2) drawn on the CPU, so the init is the same on every device."""
    if not weight.is_meta:  # a meta model (shapes only) has nothing to fill
        weight.copy_(torch.randn(weight.shape, generator=generator, device="cpu") * std)


class _LanguageModel(nn.Module):
    """What both models share: loss, parameter count and a seeded, deterministic init."""

    config: ModelConfig
    # Output projections that write into the residual stream; their init is scaled down with depth
    # so the residual's variance does not grow with the number of layers (GPT-2's recipe).
    _RESIDUAL_OUT = ("o_proj", "down_proj", "fc_out")

    def _output(self, hidden: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm_head(hidden)
        if targets is None:
            return logits, None
        # the loss in at least float32 (bf16 logits upcast; float64 models stay float64)
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        return logits, F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), targets.flatten())

    def _check_input(self, idx: torch.Tensor) -> None:
        if idx.ndim != 2:
            raise ValueError(f"idx must be (batch, seq) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialize every weight from ``seed`` alone (the global RNG is neither read nor advanced)."""
        generator = torch.Generator().manual_seed(seed)
        base_std = self.config.init_std
        residual_std = base_std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.rsplit(".", 1)[-1] in self._RESIDUAL_OUT else base_std
                _normal_(module.weight, std, generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, base_std, generator)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def num_params(self) -> int:
        """Number of trainable parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class Llama(_LanguageModel):
    """Llama-style decoder-only language model. ``forward(idx, targets) -> (logits, loss)``."""

    def __init__(self, config: LlamaConfig, *, seed: int = 0):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_input(idx)
        seq = idx.shape[1]
        rotary = (self.rope_cos[:seq], self.rope_sin[:seq])
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, rotary)
        return self._output(self.norm(x), targets)


class GPT2(_LanguageModel):
    """GPT-2-style decoder-only language model. ``forward(idx, targets) -> (logits, loss)``."""

    def __init__(self, config: GPT2Config, *, seed: int = 0):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters(seed)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_input(idx)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for layer in self.layers:
            x = layer(x)
        return self._output(self.ln_f(x), targets)


def build_model(config: ModelConfig | str, *, seed: int = 0) -> Llama | GPT2:
    """The model for a config (or the name of a built-in one in `CONFIGS`), initialized from ``seed``."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model config {config!r}; built-in ones: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    if isinstance(config, LlamaConfig):
        return Llama(config, seed=seed)
    if isinstance(config, GPT2Config):
        return GPT2(config, seed=seed)
    raise TypeError(f"expected a LlamaConfig, GPT2Config or config name, got {type(config).__name__}")


def config_dict(config: ModelConfig) -> dict:
    """The config as plain JSON-ready data, with its architecture named."""
    return {"arch": type(config).__name__.removesuffix("Config").lower(), **asdict(config)}
