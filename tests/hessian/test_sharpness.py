"""The sharpness meter against explicit Hessians: quadratics with known matrices, and the full
Hessian of a tiny model from ``torch.autograd.functional.hessian``."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import blockopt
from blockopt.bench.models import LlamaConfig, build_model
from blockopt.hessian import block_sharpness, hutchinson_trace, hvp_operator, power_iteration


pytestmark = pytest.mark.usefixtures("one_thread")


def symmetric(eigenvalues, seed=0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic_operator(a: torch.Tensor, shapes):
    """params shaped ``shapes`` (concatenated they are z), loss 0.5 z^T A z + b^T z: its HVP operator."""
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    z = torch.cat([p.reshape(-1) for p in params])
    b = torch.arange(len(z), dtype=torch.float64)  # a linear term changes the gradient, not the Hessian
    loss = 0.5 * z @ a @ z + b @ z
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, grads


# ---- power iteration and Hutchinson on explicit matrices ----------------------------------------
def test_hvp_is_the_matrix_product():
    a = symmetric([5.0, 3.0, -1.0, 0.5, 2.0, 1.0])
    params, grads = quadratic_operator(a, [(2,), (2, 2)])
    v = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([[0.5, 3.0], [-1.0, 2.0]], dtype=torch.float64)]
    hv = hvp_operator(grads, params)(v)
    expected = a @ torch.cat([x.reshape(-1) for x in v])
    torch.testing.assert_close(torch.cat([x.reshape(-1) for x in hv]), expected)


def test_power_iteration_finds_the_top_eigenvalue():
    a = symmetric([9.0, 4.0, 2.0, 1.0, 0.5, 0.1, -0.3, 3.0])
    params, grads = quadratic_operator(a, [(8,)])
    result = power_iteration(hvp_operator(grads, params), params, iters=200, tol=1e-12)
    assert result.converged and result.iterations < 200
    assert result.eigenvalue == pytest.approx(9.0, rel=1e-9)
    # the vector is the top eigenvector (up to sign)
    top = torch.linalg.eigh(a).eigenvectors[:, -1]
    assert abs(torch.dot(result.vector[0], top).item()) == pytest.approx(1.0, abs=1e-6)


def test_negative_dominant_eigenvalue_is_shifted_away():
    a = symmetric([-20.0, 5.0, 1.0, 0.2, -3.0])
    params, grads = quadratic_operator(a, [(5,)])
    matvec = hvp_operator(grads, params)
    assert power_iteration(matvec, params, iters=500, tol=1e-13, top=False).eigenvalue == pytest.approx(-20.0, rel=1e-8)
    assert power_iteration(matvec, params, iters=500, tol=1e-13).eigenvalue == pytest.approx(5.0, rel=1e-7)


def test_restriction_to_some_tensors_is_the_principal_submatrix():
    a = symmetric([10.0, 6.0, 3.0, 2.0, 1.0, 0.7, 0.4], seed=3)
    params, grads = quadratic_operator(a, [(3,), (2, 2)])  # z = [x (3) | y (4)]
    x_only = hvp_operator(grads[:1], params[:1])
    y_only = hvp_operator(grads[1:], params[1:])
    for matvec, like, idx in ((x_only, params[:1], slice(0, 3)), (y_only, params[1:], slice(3, 7))):
        sub = a[idx, idx]
        exact = torch.linalg.eigvalsh(sub).max().item()
        got = power_iteration(matvec, like, iters=1000, tol=1e-14).eigenvalue
        assert got == pytest.approx(exact, rel=1e-7)
        assert got < 10.0 - 1e-3  # not the whole matrix's
        mean, err = hutchinson_trace(matvec, like, probes=400, seed=2)
        assert abs(mean - torch.trace(sub).item()) < 4 * err
    # the operator restricted to y ignores x's part of the matrix
    v = [torch.ones(2, 2, dtype=torch.float64)]
    torch.testing.assert_close(y_only(v)[0].reshape(-1), a[3:, 3:] @ torch.ones(4, dtype=torch.float64))


def test_hutchinson_is_exact_on_a_diagonal_and_unbiased_otherwise():
    d = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=torch.float64)
    params, grads = quadratic_operator(torch.diag(d), [(4,)])
    mean, err = hutchinson_trace(hvp_operator(grads, params), params, probes=3)
    assert mean == pytest.approx(d.sum().item(), rel=1e-12) and err == pytest.approx(0.0, abs=1e-12)

    a = symmetric([4.0, 2.0, 1.0, -1.0, 3.0, 0.5], seed=1)
    params, grads = quadratic_operator(a, [(6,)])
    mean, err = hutchinson_trace(hvp_operator(grads, params), params, probes=400, seed=5)
    assert err > 0
    assert abs(mean - torch.trace(a).item()) < 4 * err


def test_power_iteration_rejects_bad_settings():
    params, grads = quadratic_operator(torch.eye(2, dtype=torch.float64), [(2,)])
    with pytest.raises(ValueError, match=r"iters must be an int >= 1, got 0"):
        power_iteration(hvp_operator(grads, params), params, iters=0)
    with pytest.raises(ValueError, match=r"probes must be an int >= 1, got 0"):
        hutchinson_trace(hvp_operator(grads, params), params, probes=0)


# ---- a tiny model against its full Hessian ------------------------------------------------------
TINY = LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=8, max_seq_len=8)
# which tensors of the tiny Llama are which block type, written from its layout
TINY_TYPES = {
    "embedding": ["embed_tokens.weight"],
    "head": ["lm_head.weight"],
    "qk": ["layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight"],
    "vo": ["layers.0.attn.v_proj.weight", "layers.0.attn.o_proj.weight"],
    "ffn": [f"layers.0.mlp.{x}_proj.weight" for x in ("gate", "up", "down")],
    "norm": ["layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "norm.weight"],
}


@pytest.fixture(scope="module")
def tiny_exact():
    """The tiny model (float64, weights perturbed off init), a batch, and its exact Hessian."""
    torch.manual_seed(0)
    model = build_model(TINY).double()
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1: move everything off the init
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, TINY.vocab_size, (3, TINY.max_seq_len + 1), generator=g)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        tensors = dict(zip(names, flat.split([s.numel() for s in shapes])))
        params = {n: t.view(s) for (n, t), s in zip(tensors.items(), shapes)}
        return functional_call(model, params, (batch[:, :-1], batch[:, 1:]))[1]

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss_of, flat0)
    offsets, start = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = torch.arange(start, start + s.numel())
        start += s.numel()
    return model, batch, hessian, offsets


def _indices(offsets, names):
    return torch.cat([offsets[n] for n in names])


def test_tiny_model_block_types_are_the_expected_tensors(tiny_exact):
    model, batch, _, _ = tiny_exact
    report = block_sharpness(model, lambda: model(batch[:, :-1], batch[:, 1:])[1], measures=["trace"], probes=1)
    assert {t: list(e.param_names) for t, e in report.items()} == TINY_TYPES
    assert list(report) == ["embedding", "head", "qk", "vo", "ffn", "norm"]


def test_restricted_hvp_matches_the_hessian_submatrix(tiny_exact):
    model, batch, hessian, offsets = tiny_exact
    named = dict(model.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss = model(batch[:, :-1], batch[:, 1:])[1]
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), create_graph=True)))
    g = torch.Generator().manual_seed(1)
    for block_type, names in TINY_TYPES.items():
        ps = [named[n] for n in names]
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]
        hv = hvp_operator([grads[n] for n in names], ps)(v)
        idx = _indices(offsets, names)
        expected = hessian[idx][:, idx] @ torch.cat([x.reshape(-1) for x in v])
        torch.testing.assert_close(torch.cat([x.reshape(-1) for x in hv]), expected, rtol=1e-9, atol=1e-12, msg=block_type)


def test_tiny_model_sharpness_matches_the_exact_hessian(tiny_exact):
    model, batch, hessian, offsets = tiny_exact
    report = block_sharpness(
        model, lambda: model(batch[:, :-1], batch[:, 1:])[1], iters=3000, tol=1e-12, probes=64, seed=3,
    )
    for block_type, names in TINY_TYPES.items():
        idx = _indices(offsets, names)
        sub = hessian[idx][:, idx]
        eig = torch.linalg.eigvalsh(sub)
        entry = report[block_type]
        assert entry.n_params == len(idx)
        assert entry.lambda_max == pytest.approx(eig.max().item(), rel=1e-4, abs=1e-9), block_type
        exact_avg = torch.trace(sub).item() / len(idx)
        assert abs(entry.trace_per_param - exact_avg) <= 4 * entry.trace_stderr + 1e-12, block_type
        # each tensor's own diagonal block, from the same probes
        assert list(entry.tensor_traces) == names
        for name in names:
            t_idx = offsets[name]
            t_exact = torch.trace(hessian[t_idx][:, t_idx]).item() / len(t_idx)
            t_est, t_err = entry.tensor_traces[name]
            assert abs(t_est - t_exact) <= 4 * t_err + 1e-12, name
        # the estimate is not some other type's value
        others = [torch.linalg.eigvalsh(hessian[_indices(offsets, n)][:, _indices(offsets, n)]).max().item()
                  for t, n in TINY_TYPES.items() if t != block_type]
        assert all(entry.lambda_max != pytest.approx(o, rel=1e-3) for o in others)


def test_report_api(tiny_exact):
    model, batch, _, _ = tiny_exact
    loss_fn = lambda: model(batch[:, :-1], batch[:, 1:])[1]  # noqa: E731
    report = block_sharpness(model, loss_fn, types=["qk", "norm"], measures=["lambda_max"], iters=50)
    assert list(report) == ["qk", "norm"]
    assert report["qk"].trace_per_param is None and report["qk"].lambda_max is not None
    values = report.values_of("lambda_max")
    assert report.ordering("lambda_max") == sorted(values, key=values.get)
    assert "qk" in str(report) and report.to_dict()["types"]["norm"]["n_params"] == 3 * TINY.dim
    again = block_sharpness(model, loss_fn, types=["qk", "norm"], measures=["lambda_max"], iters=50)
    assert again.values_of("lambda_max") == values  # fixed seed: deterministic
    # a type's result does not depend on which other types are measured
    alone = block_sharpness(model, loss_fn, types=["norm"], measures=["lambda_max"], iters=50)
    assert alone["norm"].lambda_max == report["norm"].lambda_max
    # one type or measure as a string is that one (it was iterated as letters: "n", "o", ...)
    named = block_sharpness(model, loss_fn, types="norm", measures="lambda_max", iters=50)
    assert list(named) == ["norm"] and named["norm"].lambda_max == report["norm"].lambda_max


def test_meter_errors(tiny_exact):
    model, batch, _, _ = tiny_exact
    loss_fn = lambda: model(batch[:, :-1], batch[:, 1:])[1]  # noqa: E731
    with pytest.raises(ValueError, match=r"block type\(s\) \['pos_embedding'\] not in this model"):
        block_sharpness(model, loss_fn, types=["pos_embedding"])
    with pytest.raises(ValueError, match=r"measures must be a non-empty subset"):
        block_sharpness(model, loss_fn, measures=["fisher"])
    with pytest.raises(ValueError, match=r"scalar loss tensor"):
        block_sharpness(model, lambda: model(batch[:, :-1])[0])
    with pytest.raises(ValueError, match=r"not in the plan"):
        block_sharpness(model, loss_fn, plan=blockopt.partition(build_model("llama-tiny")))


def test_meter_leaves_gradients_alone(tiny_exact):
    model, batch, _, _ = tiny_exact
    before = [p.grad for p in model.parameters()]
    block_sharpness(model, lambda: model(batch[:, :-1], batch[:, 1:])[1], types=["norm"], iters=3, probes=1)
    assert [p.grad for p in model.parameters()] == before


# ---- the Gauss-Newton trace ----------------------------------------------------------------------
class SoftmaxRegression(torch.nn.Module):
    """logits = W x + c: linear in the parameters, so the Gauss-Newton matrix is the Hessian."""

    def __init__(self, dim=5, classes=7):
        super().__init__()
        self.head = torch.nn.Linear(dim, classes).double()

    def forward(self, x):
        return self.head(x)


def test_gauss_newton_trace_matches_its_closed_form():
    """For logits W x_t + c over N positions, Tr(G_WW) = (1/N) sum_t (1 - |p_t|^2) |x_t|^2 and
    Tr(G_cc) = (1/N) sum_t (1 - |p_t|^2): the sampled estimate must agree within its error."""
    torch.manual_seed(0)
    model = SoftmaxRegression()
    x = torch.randn(3, 40, 5, dtype=torch.float64)  # (..., dim): leading dims are positions
    report = block_sharpness(model, lambda: None, measures=["gauss_newton"], logits_fn=lambda: model(x),
                             gn_samples=400, seed=1, bias="separate")
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1).reshape(-1, 7)
        spread = 1 - p.square().sum(-1)
        exact = {"head.weight": (spread * x.reshape(-1, 5).square().sum(-1)).mean().item() / 35,
                 "head.bias": spread.mean().item() / 7}
    entries = {e.param_names: e for e in report.values()}
    for name, value in exact.items():
        got = entries[(name,)]
        assert abs(got.gauss_newton_per_param - value) <= 4 * got.gauss_newton_stderr, name
        assert got.gauss_newton_stderr < 0.1 * value  # (the test has the power to see a wrong answer)
        # a one-tensor type: its tensor's value is the type's (summed along another path, so to rounding)
        assert list(got.tensor_gauss_newton) == [name]
        assert got.tensor_gauss_newton[name] == pytest.approx((got.gauss_newton_per_param, got.gauss_newton_stderr), rel=1e-12)
    # one type holding both tensors: each tensor's own value, from the same samples
    joint = block_sharpness(model, lambda: None, measures=["gauss_newton"], logits_fn=lambda: model(x),
                            gn_samples=400, seed=1)
    (entry,) = joint.values()
    assert list(entry.tensor_gauss_newton) == ["head.weight", "head.bias"]
    for name, value in exact.items():
        t_mean, t_err = entry.tensor_gauss_newton[name]
        assert abs(t_mean - value) <= 4 * t_err and t_err < 0.1 * value, name
    total = sum(entry.tensor_gauss_newton[n][0] * p.numel() for n, p in model.named_parameters())
    assert entry.gauss_newton_per_param == pytest.approx(total / 42, rel=1e-12)


def test_gauss_newton_agrees_with_the_exact_trace_where_they_coincide():
    torch.manual_seed(1)
    model = SoftmaxRegression()
    x = torch.randn(64, 5, dtype=torch.float64)
    y = torch.randint(0, 7, (64,))
    report = block_sharpness(
        model, lambda: torch.nn.functional.cross_entropy(model(x), y), measures=["trace", "gauss_newton"],
        logits_fn=lambda: model(x), probes=200, gn_samples=400, seed=2,
    )
    for entry in report.values():
        err = 4 * (entry.trace_stderr ** 2 + entry.gauss_newton_stderr ** 2) ** 0.5
        assert abs(entry.trace_per_param - entry.gauss_newton_per_param) <= err
    assert report.ordering("gauss_newton")  # usable like the other measures


def test_gauss_newton_needs_logits():
    model = SoftmaxRegression()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs logits_fn"):
        block_sharpness(model, lambda: model(x).sum(), measures=["gauss_newton"])
    with pytest.raises(ValueError, match=r"gn_samples must be an int >= 2, got 1"):
        block_sharpness(model, lambda: None, measures=["gauss_newton"], logits_fn=lambda: model(x), gn_samples=1)
