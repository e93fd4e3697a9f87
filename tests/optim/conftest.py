"""Small models and data shared by the optimizer tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

VOCAB = 50


class TinyTransformer(nn.Module):
    """Embedding -> one encoder layer (packed MHA, MLP, LayerNorms with biases) -> norm -> head."""

    def __init__(self, width: int = 16, heads: int = 4, bias: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, bias=bias)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(idx))))


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    if isinstance(logits, tuple):  # the bench models return (logits, loss)
        logits = logits[0]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def batches(n: int, seed: int = 0, batch: int = 4, seq: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def make_tiny(dtype=torch.float64, seed: int = 0, bias: bool = True) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(bias=bias).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for idx in data:
        opt.zero_grad()
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


class ScalingCollectives:
    """Collectives for a world of ``ranks`` identical ranks, in one process: every block counts as
    cut, and summing a block sum over the ranks multiplies it by ``ranks``. Records what it sums."""

    def __init__(self, ranks: int):
        self.ranks, self.calls = ranks, []

    def cuts_blocks(self, layouts) -> bool:
        return True

    def sum_blocks(self, sums, layouts) -> None:
        self.calls.append([s.clone() for s in sums])
        for s in sums:
            s.mul_(self.ranks)

    def max_(self, values, layouts) -> None:
        pass

    def rows(self, layout):
        return None


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A one-rank gloo process group, for DTensor parameters in this process."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('dist') / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
