"""Exact Hessian blocks against closed forms (linear and softmax regression, a one-head attention's
value block) and against ``torch.autograd.functional.hessian``; the sampled mass estimator
against the exact mass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockopt.hessian.blocks import Columns, block_mass, hessian_block, sample_columns

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def test_linear_regression_hessian_is_the_gram_matrix():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g, dtype=f64), torch.randn(20, 1, generator=g, dtype=f64)
    model = nn.Linear(5, 1, bias=False).double()
    h = hessian_block(model, lambda: 0.5 * F.mse_loss(model(x), y, reduction="sum") / len(x), "weight", chunk_size=2)
    torch.testing.assert_close(h, x.T @ x / len(x))


def test_softmax_regression_hessian_is_the_kronecker_sum():
    # H = 1/n sum_t (diag p_t - p_t p_t^T) (x) x_t x_t^T for W (C, d) flattened row by row
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=g, dtype=f64), torch.randint(0, 3, (7,), generator=g)
    model = nn.Linear(4, 3, bias=False).double()
    nn.init.normal_(model.weight, generator=g)
    h = hessian_block(model, lambda: F.cross_entropy(model(x), y), "weight", chunk_size=5)
    expected = torch.zeros(12, 12, dtype=f64)
    for xt in x:
        p = torch.softmax(model.weight.detach() @ xt, dim=0)
        expected += torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(xt, xt)) / len(x)
    torch.testing.assert_close(h, expected)


class OneHead(nn.Module):
    """One attention head with separate q/k/v projections (no output projection), squared error."""

    def __init__(self, dim: int, head: int):
        super().__init__()
        self.q = nn.Linear(dim, head, bias=False)
        self.k = nn.Linear(dim, head, bias=False)
        self.v = nn.Linear(dim, head, bias=False)

    def attention(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.q.out_features), dim=-1)

    def forward(self, x, y):
        return 0.5 * (self.attention(x) @ self.v(x) - y).square().sum() / x.shape[0]


def one_head(seed=2):
    g = torch.Generator().manual_seed(seed)
    model = OneHead(4, 3).double()
    for p in model.parameters():
        nn.init.normal_(p, generator=g)
    x, y = torch.randn(6, 4, generator=g, dtype=f64), torch.randn(6, 3, generator=g, dtype=f64)
    return model, x, y


def test_one_head_value_block_is_one_gram_matrix_per_output_neuron():
    # out_t = W_v z_t with z_t = sum_s a_ts x_s: the loss is quadratic in W_v, and its Hessian is
    # I (x) Z^T Z / n, one identical dense block per output neuron (row of W_v), zero between them.
    model, x, y = one_head()
    h = hessian_block(model, lambda: model(x, y), "v.weight")
    z = model.attention(x).detach() @ x
    torch.testing.assert_close(h, torch.kron(torch.eye(3, dtype=f64), z.T @ z / len(x)))


def test_one_head_cross_blocks_match_autograd():
    model, x, y = one_head()
    names = ["q.weight", "k.weight", "v.weight"]

    def loss(q, k, v):
        attention = torch.softmax((x @ q.T) @ (x @ k.T).T / math.sqrt(3), dim=-1)
        return 0.5 * (attention @ (x @ v.T) - y).square().sum() / len(x)

    full = torch.autograd.functional.hessian(loss, tuple(dict(model.named_parameters())[n].detach() for n in names))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            torch.testing.assert_close(hessian_block(model, lambda: model(x, y), a, b, chunk_size=5),
                                       full[i][j].reshape(12, 12))


def test_tiny_net_full_hessian_matches_autograd_including_tied_and_unused_tensors():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, generator=g, dtype=f64), torch.randint(0, 2, (5,), generator=g)
    names = [n for n, _ in net.named_parameters()]
    h = hessian_block(net, lambda: F.cross_entropy(net(x), y), names, chunk_size=7)

    def loss(w1, b1, w2, b2):
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    params = tuple(p.detach() for p in net.parameters())
    full = torch.autograd.functional.hessian(loss, params)
    sizes = [p.numel() for p in params]
    expected = torch.cat([torch.cat([full[i][j].reshape(sizes[i], sizes[j]) for j in range(4)], 1) for i in range(4)], 0)
    torch.testing.assert_close(h, expected)


def test_a_loss_the_hessian_tools_cannot_reach_is_refused_or_named():
    """torch.func differentiated such losses to an all-zero Hessian, silently: a loss computed under
    no_grad (refused), or one through a tensor taken from the model before the call (warned)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=f64), torch.randint(0, 2, (5,))

    def no_grad_loss():
        with torch.no_grad():
            return F.cross_entropy(net(x), y)

    with pytest.raises(ValueError, match="loss_fn's loss carries no gradient"):
        hessian_block(net, no_grad_loss, "2.bias")
    with pytest.raises(ValueError, match="loss_fn's loss carries no gradient"):
        sample_columns(net, no_grad_loss, "2.weight", 4)
    w, b = net[2].weight, net[2].bias
    captured = lambda: F.cross_entropy(torch.tanh(net[0](x)) @ w.T + b, y)  # noqa: E731
    with pytest.warns(UserWarning, match=r"loss_fn does not reach '2\.bias' through the model, so its Hessian rows are zero"):
        h = hessian_block(net, captured, "2.bias")
    assert not h.any()  # (what the warning says)


def test_bench_model_block_matches_double_backward():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blockopt.bench.models import LlamaConfig, build_model

    model = build_model(LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, mlp_hidden=16, max_seq_len=8)).double()
    idx = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    loss_fn = lambda: model(idx[:, :-1], idx[:, 1:])[1]  # noqa: E731
    h = hessian_block(model, loss_fn, "layers.0.attn.k_proj.weight", "layers.0.attn.q_proj.weight", chunk_size=64)
    q, k = model.layers[0].attn.q_proj.weight, model.layers[0].attn.k_proj.weight
    with sdpa_kernel(SDPBackend.MATH):
        gk = torch.autograd.grad(loss_fn(), k, create_graph=True)[0].reshape(-1)
    expected = torch.stack([torch.autograd.grad(gk[i], q, retain_graph=True)[0].reshape(-1) for i in range(gk.numel())])
    torch.testing.assert_close(h, expected)


def test_dropout_in_training_mode_is_warned_about():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="model.eval"):
        hessian_block(net, lambda: net(x).square().sum(), "0.weight")


def test_unknown_name_is_refused_with_the_names():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not parameters of Linear.*'weight'"):
        hessian_block(net, lambda: net(torch.ones(2)).sum(), "w")


# ---- the mass estimator ---------------------------------------------------------------------
def test_mass_from_every_column_is_exact():
    model, x, y = one_head()
    columns = sample_columns(model, lambda: model(x, y), "q.weight", 100)
    assert columns.index.tolist() == list(range(12)) and columns.exact
    h = columns.values.double()
    rows = torch.arange(12) // 4  # one block per row of the 3x4 weight
    same = rows.view(-1, 1) == rows.view(1, -1)
    mass = block_mass(columns, rows)
    assert mass.stderr == 0
    assert mass.value == pytest.approx((h.square() * same).sum().item() / h.square().sum().item())
    assert block_mass(columns, torch.zeros(12, dtype=torch.long)).value == pytest.approx(1.0)


def test_zero_columns_are_skipped_and_change_no_mass():
    # an embedding table: rows of tokens absent from the batch have zero Hessian columns
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    ids, y = torch.tensor([[1, 4], [4, 7]]), torch.tensor([0, 1])
    loss_fn = lambda: F.cross_entropy(model(ids), y)  # noqa: E731
    every = sample_columns(model, loss_fn, "0.weight", 30)
    assert sorted({i // 3 for i in every.index.tolist()}) == [1, 4, 7] and every.exact
    full = hessian_block(model, loss_fn, "0.weight")
    rows = torch.arange(30) // 3
    exact = (full.square() * (rows.view(-1, 1) == rows.view(1, -1))).sum() / full.square().sum()
    assert block_mass(every, rows).value == pytest.approx(exact.item())
    some = sample_columns(model, loss_fn, "0.weight", 4, seed=1)
    assert some.population == 9 and not some.exact and set(some.index.tolist()) <= set(every.index.tolist())


def test_sampled_mass_is_within_its_standard_error_of_the_exact_one():
    g = torch.Generator().manual_seed(4)
    d, heads = 240, 4
    # a block-diagonal matrix (4 dense heads) plus weaker noise everywhere
    blocks = torch.block_diag(*[torch.randn(60, 60, generator=g, dtype=f64) for _ in range(heads)])
    h = blocks + 0.3 * torch.randn(d, d, generator=g, dtype=f64)
    h = h + h.T
    block_of = torch.arange(d) // 60
    exact = block_mass(Columns(torch.arange(d), h, d), block_of)
    misses = 0
    for seed in range(20):
        index = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:40]
        estimate = block_mass(Columns(index, h[:, index], d), block_of)
        assert 0 < estimate.stderr < 0.1
        misses += abs(estimate.value - exact.value) > 2 * estimate.stderr
    assert misses <= 4  # about 5% expected outside two standard errors


def test_zero_hessian_has_no_mass():
    mass = block_mass(Columns(torch.tensor([0, 3]), torch.zeros(4, 2), 4), torch.arange(4))
    assert math.isnan(mass.value)


def test_drawing_stops_when_enough():
    model, x, y = one_head()
    seen = []

    def enough(columns):
        seen.append(columns.index.numel())
        return columns.index.numel() >= 4

    columns = sample_columns(model, lambda: model(x, y), "q.weight", 10, chunk_size=2, enough=enough, seed=3)
    assert seen == [2, 4] and columns.values.shape == (12, 4) and columns.population == 12
    full = hessian_block(model, lambda: model(x, y), "q.weight")
    torch.testing.assert_close(columns.values, full[:, columns.index])


def test_an_empty_block_is_refused_naming_it():
    """rows=[] raised a bare StopIteration; cols=[] a torch.cat error."""
    net = nn.Linear(3, 2)
    loss = lambda: net(torch.randn(4, 3)).square().sum()  # noqa: E731
    for rows, cols in (([], None), ("weight", [])):
        with pytest.raises(ValueError, match="hessian_block needs at least one parameter name in rows and in cols"):
            hessian_block(net, loss, rows, cols)
