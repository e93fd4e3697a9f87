"""`blockopt.audit`: a plan with heads of the wrong size is flagged from either side and the right
head count proposed; the proposal, applied, agrees with the measurement; the mass rule on
matrices whose structure is known; the loss finder and the errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.bench.models import LlamaConfig, build_model
from blockopt.hessian.audit import AuditReport, audit, batch_loss, candidates, fused_parts
from blockopt.partition import make_spec

pytestmark = pytest.mark.usefixtures("one_thread")

QK = ["layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight"]


@pytest.fixture(scope="module")
def tiny():
    """A one-layer Llama with 4 heads of 8 and its batch."""
    model = build_model(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, mlp_hidden=32, max_seq_len=16))
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    return model, (idx[:, :-1], idx[:, 1:])


def heads_plan(model, n_heads):
    """The plan with query and key forced to ``n_heads`` heads by ``rules=``."""
    return blockopt.partition(model, n_heads=n_heads, rules={name: "heads" for name in QK})


def test_right_heads_agree(tiny):
    model, batch = tiny
    report = audit(model, batch, names=QK, samples=64)
    for row in report:
        assert (row.plan, row.best, row.verdict) == ("heads(4)", "heads(4)", "agrees")
        # the right heads keep the mass; half-heads cut it (the rule's reason, not an accident)
        assert row.mass["heads(4)"].value >= 0.9 > row.mass["heads(8)"].value
    assert report.override() == {} and not report.flagged()


@pytest.mark.parametrize("wrong, verdict", [(2, "too coarse"), (8, "too fine")])
def test_wrong_head_size_is_flagged_and_the_right_one_proposed(tiny, wrong, verdict):
    model, batch = tiny
    report = audit(model, batch, heads_plan(model, wrong), names=QK, samples=64)
    for row in report:
        assert row.plan == f"heads({wrong})"
        assert (row.best, row.verdict) == ("heads(4)", verdict)
    assert [r.name for r in report.flagged()] == QK
    override = report.override()
    assert override == {"rules": {"layers.*.attn.q_proj.weight": "heads", "layers.*.attn.k_proj.weight": "heads"},
                        "n_heads": 4, "n_kv_heads": 4} or override == {
        "rules": {QK[0]: "heads", QK[1]: "heads"}, "n_heads": 4, "n_kv_heads": 4}
    text = str(report)
    assert "2 tensor(s) flagged" in text and "n_heads=4" in text
    # the proposal, applied, is what the measurement asked for
    fixed = audit(model, batch, blockopt.partition(model, **override), names=QK, samples=64)
    assert [r.verdict for r in fixed] == ["agrees", "agrees"]


def test_plan_that_matches_no_candidate_is_measured_as_itself():
    # stacked experts (E, out, in): one block per expert per output row, which no simple rule spells
    model = nn.Module()
    model.experts = nn.Parameter(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    spec = blockopt.BlockSpec(name="experts", shape=(2, 3, 4), rule="rows", reason="test", block_dims=(0, 1),
                              segments=((6, 1),))
    report = audit(model, x, blockopt.Plan([spec]), samples=100,
                   loss_fn=lambda m, b: torch.einsum("eoi,ni->neo", m.experts, b).tanh().square().sum())
    row = report.row("experts")
    assert row.plan == "plan:6 units" and row.exact and row.layouts[row.plan].n_blocks == 6
    assert set(row.mass) >= {row.plan, "rows", "cols", "whole", "coordinate"}
    # each expert's output row is an independent least-squares-like block: the plan holds it all
    assert row.mass[row.plan].value == pytest.approx(1.0) and row.verdict == "agrees"


def test_independent_rows_are_measured_as_rows():
    # a linear least-squares layer: H = I (x) X^T X / n, exactly one dense block per output row
    model = nn.Linear(5, 3, bias=False)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 5, generator=g), torch.randn(20, 3, generator=g)
    plan = blockopt.partition(model, rules={"weight": "whole"})
    report = audit(model, (x, y), plan, loss_fn=lambda m, b: (m(b[0]) - b[1]).square().mean(), samples=100)
    row = report.row("weight")
    assert row.exact and row.mass["rows"].value == pytest.approx(1.0)
    assert (row.best, row.verdict) == ("rows", "too coarse")
    assert report.override() == {"rules": {"weight": "rows"}}


def test_candidates_cover_heads_of_every_size_along_both_dims():
    labels = set(candidates(make_spec("w", (8, 6), "rows", "test")))
    assert labels == {"whole", "coordinate", "rows", "cols", "heads(2)", "heads(4)", "col-heads(2)", "col-heads(3)"}


def test_report_table_and_dict(tiny):
    model, batch = tiny
    report = audit(model, batch, names=["layers.0.attn_norm.weight", QK[0]], samples=16)
    assert isinstance(report, AuditReport) and len(report) == 2
    lines = str(report).splitlines()
    assert lines[0].split() == ["tensor", "shape", "columns", "plan", "blocks", "mass", "measured", "blocks", "mass", "verdict"]
    assert lines[2].startswith(QK[0]) and "/1024" in lines[2]  # sampled: 1024 nonzero columns, at most 16 drawn
    d = report.to_dict()
    assert d["tensors"][1]["name"] == QK[0] and "heads(4)" in d["tensors"][1]["mass"]
    assert model.training  # restored after the measurement


def test_batch_loss_finds_the_loss():
    class HFLike(nn.Module):
        def forward(self, x):
            return type("Out", (), {"loss": x.sum()})()

    assert batch_loss(HFLike(), {"x": torch.ones(2)}).item() == 2.0
    assert batch_loss(lambda a, b: (a, (a * b).sum()), (torch.ones(2), torch.ones(2))).item() == 2.0
    with pytest.raises(TypeError, match="pass loss_fn="):
        batch_loss(nn.Linear(2, 2), torch.ones(3, 2))


def test_stale_plan_and_bad_settings_are_refused(tiny):
    model, batch = tiny
    other = blockopt.partition(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="build the plan from this model"):
        audit(model, batch, other)
    with pytest.raises(ValueError, match="keep must be"):
        audit(model, batch, keep=1.5)
    with pytest.raises(ValueError, match="not in the plan"):
        audit(model, batch, names=["nope"])


def test_exported_from_the_package():
    assert blockopt.audit is audit


def test_fused_tensor_is_audited_part_by_part():
    # a fused projection [q (2 heads) | k (2 heads) | v (4 neurons)] of 4 inputs each
    spec = blockopt.BlockSpec(name="weight", shape=(12, 4), rule="heads", reason="test", role="qkv", block_dims=(0,),
                              segments=((4, 2), (4, 2), (4, 1)), n_heads=2)
    assert fused_parts(spec).tolist() == [0] * 16 + [1] * 16 + [2] * 16
    interleaved = replace(spec, segments=((2, 2), (2, 2), (2, 1)) * 2)
    assert fused_parts(interleaved).tolist() == ([0] * 8 + [1] * 8 + [2] * 8) * 2
    assert fused_parts(make_spec("w", (12, 4), "heads", "test", n_heads=3)) is None

    model = nn.Linear(4, 12, bias=False)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    report = audit(model, x, blockopt.Plan([spec]), loss_fn=lambda m, b: m(b).tanh().square().sum(), samples=100)
    row = report.row("weight")
    assert row.plan.startswith("plan:") and all(label.endswith("/part") for label in row.mass if label != row.plan)
    # a block of each part is the finest that can hold a part's mass, and the parts' cross terms are left out
    assert row.mass["whole/part"].value == pytest.approx(1.0)
    if row.flagged:
        assert "rules" not in report.override() and "fuses several tensors" in str(report)
