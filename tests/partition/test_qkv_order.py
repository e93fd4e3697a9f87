"""The order of q/k/v rows in a fused projection: read from known families, else from the
module's own forward code; an order that cannot be read is planned [q | k | v] with v by rows,
under a warning that a rule answers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt import PartitionWarning
from blockopt.partition import qkv_order

D, H = 32, 4
HD = D // H


def plan_of(attention: nn.Module, **kw) -> tuple[blockopt.Plan, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = blockopt.partition(nn.ModuleDict({"attn": attention}), n_heads=H, **kw)
    return plan, [str(w.message) for w in caught if issubclass(w.category, PartitionWarning)]


def concat_segments(value_whole: bool = False) -> tuple:
    return ((H * HD, HD), (H * HD, HD), (H * HD, H * HD) if value_whole else (H * HD, 1))


class Fused(nn.Module):
    """A fused attention without a forward: nothing says the order of its rows."""

    def __init__(self, name: str = "qkv"):
        super().__init__()
        self.name = name
        setattr(self, name, nn.Linear(D, 3 * D))
        self.proj = nn.Linear(D, D)


class NanoGPT(Fused):
    def __init__(self):
        super().__init__("c_attn")
        self.n_embd = D

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return self.proj(q + k + v)


class Timm(Fused):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = H, HD

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj((q + k + v).transpose(1, 2).reshape(B, N, C))


class VitPytorch(Fused):
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(q * k + v)


class ClampedThenChunked(Fused):  # MPT: the first use keeps the order, the next one splits
    def forward(self, x):
        mixed = self.qkv(x)
        mixed = mixed.clamp(min=-8, max=8)
        q, k, v = mixed.chunk(3, dim=2)
        return self.proj(q + k + v)


class Sliced(Fused):  # Phi-3
    def forward(self, x):
        qkv = self.qkv(x)
        query_states = qkv[..., :D]
        key_states = qkv[..., D : 2 * D]
        value_states = qkv[..., 2 * D :]
        return self.proj(query_states + key_states + value_states)


class PerHead(Fused):  # GPT-NeoX's order in a class the engine does not know
    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, H, 3, HD)
        return self.proj((qkv[..., 0, :] + qkv[..., 1, :] + qkv[..., 2, :]).reshape(B, T, D))


class FoldedThree(Fused):  # MiniMax's order: 3 folded into the head size
    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = torch.split(self.qkv(x).reshape(B, T, H, 3 * HD), HD, dim=3)
        return self.proj((q + k + v).reshape(B, T, D))


class PerHeadOpaqueNames(Fused):  # heads under a name that does not say so: the shape still does
    def __init__(self):
        super().__init__()
        self.nh = H

    def forward(self, x):
        qkv = self.qkv(x).view(*x.shape[:2], self.nh, 3, HD)
        return self.proj(qkv.sum(-2).flatten(-2))


class ContiguousThenPerHead(Fused):  # an order-keeping call chained into the reshape that decides
    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(x)
        qkv = qkv.contiguous().view(B, T, H, 3 * HD)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj((q + k + v).reshape(B, T, D))


@pytest.mark.parametrize("cls", [NanoGPT, Timm, VitPytorch, ClampedThenChunked, Sliced])
def test_a_forward_that_splits_the_rows_in_order_is_planned_concatenated_without_a_warning(cls):
    module = cls()
    assert qkv_order.qkv_layout(module, module.name) == "concat"
    for value in ("rows", "whole"):
        plan, caught = plan_of(module, value=value)
        assert plan[f"attn.{module.name}.weight"].segments == concat_segments(value == "whole")
        assert caught == []
    x = torch.randn(2, 3, D)
    assert module(x).shape == x.shape  # (the forwards above are real code, not just text)


@pytest.mark.parametrize("cls", [PerHead, FoldedThree, Fused, PerHeadOpaqueNames, ContiguousThenPerHead])
def test_an_order_that_cannot_be_read_is_planned_by_rows_and_a_rule_confirms_or_keeps_it(cls):
    module = cls()
    name = f"attn.{module.name}.weight"
    assert qkv_order.qkv_layout(module, module.name) is None
    plan, caught = plan_of(module, value="whole")
    # rows: finer than any right plan (read as [q | k | v], a per-head order puts value heads in
    # one block each, and with value="whole" query and key heads in the value's block)
    assert (plan[name].rule, plan[name].n_blocks, plan[name].role) == ("rows", 3 * D, "qkv")
    assert len(caught) == 1 and name in caught[0] and "could not be read from its forward: one block per row" in caught[0]
    assert f"rules={{{name!r}: 'heads'}}" in caught[0] and f"rules={{{name!r}: 'rows'}}" in caught[0]

    for value in ("rows", "whole"):  # the rule confirms the [q | k | v] order, value= applies
        confirmed, caught = plan_of(module, value=value, rules={name: "heads"})
        assert confirmed[name].segments == concat_segments(value == "whole") and caught == []
    rows, caught = plan_of(module, rules={name: "rows"})
    assert rows[name].rule == "rows" and rows[name].n_blocks == 3 * D and caught == []


def test_a_class_whose_source_inspect_cannot_place_is_not_read(tmp_path, monkeypatch):
    """A file defining the class name twice (``if flash: ... else: ...``): ``inspect`` hands back
    the first definition's source, which read [q | k | v] for the per-head class in use."""
    (tmp_path / "twice_defined.py").write_text(
        "import torch.nn as nn\n"
        "FIRST = False\n"
        "if FIRST:\n"
        "    class Attention(nn.Module):\n"
        "        def forward(self, x):\n"
        "            q, k, v = self.qkv(x).chunk(3, dim=-1)\n"
        "            return q\n"
        "else:\n"
        "    class Attention(nn.Module):\n"
        "        def forward(self, x):\n"
        "            return self.qkv(x).view(x.shape[0], x.shape[1], 4, 3, 8)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import twice_defined

    module = twice_defined.Attention()
    module.qkv = nn.Linear(D, 3 * D)
    assert qkv_order.qkv_layout(module, "qkv") is None


def test_a_rule_answers_the_warnings_that_advise_it_and_no_other():
    """The warning for unknown heads advised rules={...: 'rows'} 'to accept rows'; the rule
    changed nothing and the warning stayed."""
    module = Fused()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockopt.partition(nn.ModuleDict({"attn": module}), rules={"attn.qkv.weight": "rows"})
    assert [w for w in caught if issubclass(w.category, PartitionWarning)] == []
    with pytest.warns(PartitionWarning, match="unknown heads"):  # a rule on another tensor does not answer it
        blockopt.partition(nn.ModuleDict({"attn": module}), rules={"attn.proj.weight": "rows"})


# ---- transformers families, whose order is a convention of their forward code --------------------


def _fused_spec(model_type: str):
    pytest.importorskip("transformers")
    from blockopt.partition import coverage

    model, _ = coverage.build(model_type)  # default config, on the meta device
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(model)
    return model, plan


def _first_attention(model, kind: str) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in model.named_modules() if type(m).__name__ == kind)


@pytest.mark.parametrize("model_type, kind, attr", [
    ("persimmon", "PersimmonAttention", "query_key_value"),   # _split_heads: view(b, t, heads, 3, hd)
    ("deberta", "DisentangledSelfAttention", "in_proj"),      # transpose_for_scores(qp).chunk(3, dim=-1)
    ("minimax", "MiniMaxLightningAttention", "qkv_proj"),     # reshape(b, t, heads, 3 * hd), split(hd)
])
def test_families_that_interleave_per_head_are_planned_per_head(model_type, kind, attr):
    model, plan = _fused_spec(model_type)
    path, attention = _first_attention(model, kind)
    spec = plan[f"{path}.{attr}.weight"]
    rows = spec.shape[0]
    hd = rows // 3 // spec.n_heads
    assert spec.segments == ((hd, hd), (hd, hd), (hd, 1)) * spec.n_heads


def test_codegen_is_planned_as_its_four_partitions_of_query_value_key():
    # CodeGenAttention: qkv_proj(x).view(..., mp_num, 3 * local_dim).split(local_dim) -> query, value, key
    model, plan = _fused_spec("codegen")
    path, attention = _first_attention(model, "CodeGenAttention")
    spec = plan[f"{path}.qkv_proj.weight"]
    n, hd, mp = attention.num_attention_heads, attention.head_dim, attention.mp_num
    local = n * hd // mp
    assert spec.segments == ((local, hd), (local, 1), (local, hd)) * mp
    assert spec.n_blocks == mp * (n // mp + local + n // mp)


# ---- a query beside a fused key/value (perceiver / cross-attention style) -----------------------
class QueryAndFusedKV(nn.Module):
    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.heads = H
        self.to_q = nn.Linear(D, D, bias=False)
        self.to_kv = nn.Linear(D, 2 * kv_heads * HD, bias=False)
        self.to_out = nn.Linear(D, D)

    def forward(self, x, context):
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.to_out(self.to_q(x) + (k + v).repeat(1, 1, D // k.shape[-1]))


class QueryAndFusedKVPerHead(QueryAndFusedKV):
    def forward(self, x, context):
        B, T, _ = context.shape
        kv = self.to_kv(context).view(B, T, H, 2, HD)
        return self.to_out(self.to_q(x) + kv.sum(-2).reshape(B, T, D))


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_a_fused_key_value_beside_a_query_is_split_into_key_heads_and_value_rows(kv_heads):
    """``to_kv`` was one block per row with role ``linear``: keys never split by heads."""
    module = QueryAndFusedKV(kv_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(nn.ModuleDict({"attn": module}))
    spec = plan["attn.to_kv.weight"]
    assert spec.role == "qkv" and spec.segments == ((kv_heads * HD, HD), (kv_heads * HD, 1))
    assert plan["attn.to_q.weight"].n_blocks == H and plan["attn.to_out.weight"].role == "attn_out"
    x = torch.randn(2, 3, D)
    assert module(x, x).shape == x.shape


def test_a_fused_key_value_whose_order_cannot_be_read_warns_and_a_rule_answers_it():
    module = QueryAndFusedKVPerHead()
    plan, caught = plan_of(module, value="whole")
    assert plan["attn.to_kv.weight"].rule == "rows" and plan["attn.to_kv.weight"].n_blocks == 2 * D
    assert len(caught) == 1 and "attn.to_kv.weight: the order of key/value rows" in caught[0]
    confirmed, caught = plan_of(module, rules={"attn.to_kv.weight": "heads"})
    assert confirmed["attn.to_kv.weight"].segments == ((H * HD, HD), (H * HD, 1)) and caught == []


class Baichuan(Fused):  # W_pack, unflattened into (3, width): [q | k | v]
    def __init__(self):
        super().__init__("W_pack")

    def forward(self, x):
        proj = self.W_pack(x)
        proj = proj.unflatten(-1, (3, D)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        query_states, key_states = proj[0].contiguous(), proj[1]
        value_states = proj[2]
        return self.proj(query_states + key_states + value_states)


class LitGPTOldAttention(Fused):  # litgpt before 2024: `attn`, viewed per KV group (here one head each)
    def __init__(self):
        super().__init__("attn")
        self.n_head = H

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.attn(x).view(B, T, H, 3, HD)
        return self.proj(qkv.sum(-2).reshape(B, T, D))


def test_baichuans_w_pack_reads_as_concatenated_and_litgpts_attn_is_a_fused_projection():
    plan, caught = plan_of(Baichuan())
    assert plan["attn.W_pack.weight"].segments == concat_segments() and caught == []
    plan, caught = plan_of(LitGPTOldAttention())
    assert plan["attn.attn.weight"].rule == "rows" and plan["attn.attn.weight"].role == "qkv"
    assert len(caught) == 1 and "order of query/key/value rows" in caught[0]  # (per group: not read, rows)


class SplitInAHelper(Fused):  # the split in a method of the class the output is handed to
    def _split_heads(self, fused):
        q, k, v = fused.chunk(3, dim=-1)
        return q, k, v

    def forward(self, x):
        q, k, v = self._split_heads(self.qkv(x))
        return self.proj(q + k + v)


class PerHeadInAHelper(SplitInAHelper):
    def _split_heads(self, fused):
        B, T, _ = fused.shape
        fused = fused.view(B, T, H, 3, HD)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]


def test_a_split_in_a_method_the_output_is_handed_to_is_read_there():
    assert qkv_order.qkv_layout(SplitInAHelper(), "qkv") == "concat"
    assert qkv_order.qkv_layout(PerHeadInAHelper(), "qkv") is None
    x = torch.randn(2, 3, D)
    assert SplitInAHelper()(x).shape == x.shape


class BranchesDisagree(Fused):  # ChatGLM: [q | k | v] under multi-query, per head otherwise
    def __init__(self, multi_query: bool):
        super().__init__("query_key_value")
        self.multi_query = multi_query

    def forward(self, x):
        mixed = self.query_key_value(x)
        if self.multi_query:
            q, k, v = mixed.split([D, D, D], dim=-1)
        else:
            shape = mixed.size()[:-1] + (H, 3 * HD)
            mixed = mixed.view(*shape)
            q, k, v = mixed.chunk(3, dim=-1)
            q, k, v = (t.flatten(-2) for t in (q, k, v))
        return self.proj(q + k + v)


def test_every_branch_the_instance_can_take_must_read_the_rows_as_concatenated():
    """Only the first use in source order was read: the multi-query branch's split, while the
    other branch's reshape reads the rows per head (a silently wrong plan). The instance's flag
    decides which branch counts: the split reads; the per-head view, under an opaque shape, does not."""
    assert qkv_order.qkv_layout(BranchesDisagree(True), "query_key_value") == "concat"
    assert qkv_order.qkv_layout(BranchesDisagree(False), "query_key_value") is None
    x = torch.randn(2, 3, D)
    assert BranchesDisagree(True)(x).shape == BranchesDisagree(False)(x).shape == x.shape


class FlagSetAsItRuns(BranchesDisagree):  # a flag the forward itself changes is no configuration
    def forward(self, x):
        out = super().forward(x)
        self.multi_query = not self.multi_query
        return out


class BranchOnTraining(Fused):  # `training` changes between plan and step: never decides a branch
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if not self.training:
            q, v, k = self.qkv(x).chunk(3, dim=-1)
        return self.proj(q + k + v)


def test_flags_the_module_changes_do_not_decide_a_branch():
    assert qkv_order.qkv_layout(FlagSetAsItRuns(True), "query_key_value") is None
    assert qkv_order.qkv_layout(BranchOnTraining(), "qkv") is None
    assert qkv_order.qkv_layout(BranchOnTraining().eval(), "qkv") is None


class StridedSlices(Fused):  # every third row: q, k, v interleaved row by row
    def forward(self, x):
        out = self.qkv(x)
        return self.proj(out[..., 0::3] + out[..., 1::3] + out[..., 2::3])


class SplitWithoutDim(Fused):  # (on a 2-D input only) a split without dim= cuts dim 0
    def forward(self, x):
        q, k, v = self.qkv(x).T.contiguous().chunk(3)
        return self.proj((q + k + v).T)


def test_strided_slices_and_splits_of_another_dim_are_not_read_as_concatenated():
    for cls in (StridedSlices, SplitWithoutDim):
        assert qkv_order.qkv_layout(cls(), "qkv") is None, cls.__name__


class PartsNamedOutOfOrder(Fused):  # CodeGen's part order, [q | v | k], through a timm-style reshape
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = H, HD

    def forward(self, x):
        B, N, C = x.shape
        q, v, k = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj((q + k + v).transpose(1, 2).reshape(B, N, C))


class Sam2Style(Timm):  # torch.unbind(qkv, 2) of the reshaped output
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1)
        query, key, value = torch.unbind(qkv, 2)
        return self.proj((query + key + value).reshape(B, N, C))


def test_a_reshape_reads_as_concatenated_only_when_its_parts_are_named_in_order():
    assert qkv_order.qkv_layout(PartsNamedOutOfOrder(), "qkv") is None
    assert qkv_order.qkv_layout(Sam2Style(), "qkv") == "concat"
    x = torch.randn(2, 3, D)
    assert PartsNamedOutOfOrder()(x).shape == Sam2Style()(x).shape == x.shape


# ---- pieces that travel before they are named: vit-pytorch, CaiT ---------------------------------
def per_head(t):  # 'b n (h d) -> b h n d', as vit-pytorch's einops rearrange
    return t.unflatten(-1, (H, -1)).transpose(1, 2)


class ChunkedThenMapped(Fused):  # vit-pytorch's Attention
    def forward(self, x):
        qkv = self.qkv(x).chunk(3, dim=-1)
        q, k, v = map(lambda t: per_head(t), qkv)
        return self.proj((q + k + v).transpose(1, 2).flatten(2))


class ChunkedThenGenerator(Fused):
    def forward(self, x):
        pieces = self.qkv(x).chunk(3, dim=-1)
        query, key, value = (per_head(t) for t in pieces)
        return self.proj((query + key + value).transpose(1, 2).flatten(2))


class ChunkedThenIndexed(Fused):
    def forward(self, x):
        qkv = self.qkv(x).chunk(3, dim=-1)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.proj(q + k + v)


class ScaledQuery(Timm):  # timm's CaiT (TalkingHeadAttn): the query scaled as it is taken
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * 0.5, qkv[1], qkv[2]
        return self.proj((q + k + v).transpose(1, 2).reshape(B, N, C))


class QueryBesideStarredKV(QueryAndFusedKV):  # vit-pytorch's CaiT, CrossViT, NaViT
    def forward(self, x, context):
        qkv = (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        q, k, v = map(lambda t: per_head(t), qkv)
        return self.to_out((q + k + v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("cls", [ChunkedThenMapped, ChunkedThenGenerator, ChunkedThenIndexed, ScaledQuery])
def test_pieces_named_in_order_after_a_map_a_generator_an_index_or_a_scale_read_as_concatenated(cls):
    module = cls()
    assert qkv_order.qkv_layout(module, "qkv") == "concat"
    plan, caught = plan_of(module)
    assert plan["attn.qkv.weight"].segments == concat_segments() and caught == []
    x = torch.randn(2, 3, D)
    assert module(x).shape == x.shape


def test_a_fused_key_value_starred_beside_a_query_reads_as_concatenated():
    module = QueryBesideStarredKV()
    assert qkv_order.qkv_layout(module, "to_kv", parts=2) == "concat"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        plan = blockopt.partition(nn.ModuleDict({"attn": module}))
    assert plan["attn.to_kv.weight"].segments == ((D, HD), (D, 1))
    x = torch.randn(2, 3, D)
    assert module(x, x).shape == x.shape


class MappedOutOfOrder(Fused):  # the pieces mapped, then named q, v, k
    def forward(self, x):
        q, v, k = map(per_head, self.qkv(x).chunk(3, dim=-1))
        return self.proj((q + k + v).transpose(1, 2).flatten(2))


class SplitByHeadThenIndexed(Fused):  # split by a head's size: qkv[0..2] are three heads of the query
    def forward(self, x):
        qkv = self.qkv(x).split(HD, dim=-1)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.proj((q + k + v).repeat(1, 1, H))


class MappedReversed(Fused):
    def forward(self, x):
        qkv = self.qkv(x).chunk(3, dim=-1)
        q, k, v = map(per_head, reversed(qkv))
        return self.proj((q + k + v).transpose(1, 2).flatten(2))


class MappedAndSliced(Fused):  # split by a head's size, then the first three pieces taken
    def forward(self, x):
        pieces = self.qkv(x).split(HD, dim=-1)
        q, k, v = map(per_head, pieces[:3])
        return self.proj((q + k + v).transpose(1, 2).flatten(2).repeat(1, 1, H))


class TwoStarred(QueryAndFusedKV):  # where the key/value pieces sit depends on another sequence's length
    def forward(self, x, context):
        extra = [self.to_q(x)]
        q, k, v = (*extra, *self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(q + k + v)


def test_pieces_whose_order_or_count_is_not_proven_are_not_read():
    x = torch.randn(2, 3, D)
    for cls in (MappedOutOfOrder, SplitByHeadThenIndexed, MappedReversed, MappedAndSliced):
        assert qkv_order.qkv_layout(cls(), "qkv") is None, cls.__name__
        assert cls()(x).shape == x.shape
    assert qkv_order.qkv_layout(TwoStarred(), "to_kv", parts=2) is None
    assert TwoStarred()(x, x).shape == x.shape



# ---- [q k v] per head, read from a view that folds the parts under the head count ---------------
class MaxViTStyle(nn.Module):
    """timm's MaxViT attention: per head or concatenated, by a flag set at construction."""

    def __init__(self, head_first: bool = False):
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = H, HD, head_first
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        B = x.shape[0]
        if self.head_first:
            q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        self.last = (q, k, v)  # (B, heads, N, head size)
        return self.proj((q * k + v).transpose(1, 2).reshape(B, -1, D))


class SplitPerHead(MaxViTStyle):  # torch.split along the folded dim, the view bound to a name first
    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1)
        q, k, v = torch.split(qkv.transpose(1, 2), self.dim_head, dim=-1)
        self.last = (q, k, v)
        return self.proj((q * k + v).transpose(1, 2).reshape(B, N, D))


def true_parts(module: nn.Module, x: torch.Tensor | None = None) -> list[tuple[str, int]]:
    """The (part, head) each output row of ``module.qkv`` feeds, measured: perturb the row's bias
    and see which of the q, k, v (head on dim 1) the forward hands on changes, and in which head."""
    x = torch.randn(2, 5, D) if x is None else x
    with torch.no_grad():
        module(x)
        base = module.last
        labels = []
        for row in range(3 * D):
            kept = module.qkv.bias[row].clone()
            module.qkv.bias[row] += 1.0
            module(x)
            module.qkv.bias[row] = kept
            (hit,) = [(part, head) for part, a, b in zip("qkv", base, module.last)
                      for head in range(H) if not torch.equal(a[:, head], b[:, head])]
            labels.append(hit)
    return labels


@pytest.mark.parametrize("module, layout", [(MaxViTStyle(True), "per_head"), (MaxViTStyle(False), "concat"),
                                            (SplitPerHead(True), "per_head")])
def test_a_per_head_order_is_read_and_its_plan_matches_the_rows_the_forward_uses(module, layout):
    assert qkv_order.qkv_layout(module, "qkv") == layout
    plan, caught = plan_of(module)
    assert caught == []
    block = plan["attn.qkv.weight"].block_index()[:, 0]
    labels = true_parts(module)
    for b in block.unique().tolist():  # no block mixes parts or heads
        assert len({labels[r] for r in range(3 * D) if block[r] == b}) == 1
    for label in {lab for lab in labels if lab[0] in "qk"}:  # a query/key head is one block
        assert len({int(block[r]) for r in range(3 * D) if labels[r] == label}) == 1
    assert sum(lab[0] == "v" for lab in labels) == D and len(set(block.tolist())) == 2 * H + D  # value by rows


class PerHeadUnequalParts(MaxViTStyle):  # timm's TinyViT: sizes as a list, q/k narrower than v could be
    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([HD, HD, HD], dim=3)
        return self.proj((q * k + v).reshape(B, N, D))


class PerHeadCountNotAHead(MaxViTStyle):  # the count is three per head: the last dim is one head's size
    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads * 3, -1).chunk(3, dim=-1)
        return self.proj(torch.cat([q, k, v], -1).reshape(B, N, -1)[..., :D])


class PerHeadSplitAlongHeads(MaxViTStyle):  # chunked along the heads, not the folded parts
    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, self.dim_head * 3).transpose(2, 3).chunk(3, dim=3)
        return self.proj(torch.cat([q, k, v], -1).reshape(B, N, 3 * D)[..., :D])


class KeyValueUnderAQkvName(MaxViTStyle):  # timm's GCViT with a global query: `qkv` holds k and v only
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.qkv = nn.Linear(D, 2 * D)
        self.head_dim = HD

    def forward(self, x):
        B, N, _ = x.shape
        k, v = self.qkv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj((k * v).transpose(1, 2).reshape(B, N, D))


def test_per_head_views_that_do_not_prove_the_order_are_not_read():
    x = torch.randn(2, 5, D)
    for cls in (PerHeadUnequalParts, PerHeadCountNotAHead, KeyValueUnderAQkvName):
        assert qkv_order.qkv_layout(cls(True), "qkv") is None, cls.__name__
        assert cls(True)(x).shape == x.shape
    module = PerHeadSplitAlongHeads(True)
    with pytest.raises(ValueError):  # (H = 4 heads cannot be unpacked into three: the forward is not real)
        module(x)
    assert qkv_order.qkv_layout(module, "qkv") is None



# ---- more leading dims than tokens need: windows (timm's NesT, Hiera) -----------------------------
class WindowedNest(MaxViTStyle):  # timm's NesT: (B, T blocks, N tokens, C)
    def forward(self, x):
        B, T, N, C = x.shape
        qkv = self.qkv(x).reshape(B, T, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        self.last = tuple(t.flatten(2, 3) for t in (q, k, v))
        return self.proj((q * k + v).permute(0, 2, 3, 1, 4).reshape(B, T, N, C))


class WindowedHiera(MaxViTStyle):  # timm's Hiera mask units: sizes all the module's own
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.heads, self.num_windows = H, 2

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, -1, self.num_windows, 3, self.heads, self.dim_head).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)
        self.last = tuple(t.flatten(2, 3) for t in (q, k, v))
        return self.proj((q * k + v).permute(0, 3, 2, 1, 4).reshape(B, N, D))


class PerShard(MaxViTStyle):  # [q | k | v] inside each of two shards: the shards split the features
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.n_shards, self.heads_per_shard = 2, H // 2

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.n_shards, 3, self.heads_per_shard, self.dim_head)
        q, k, v = (z.flatten(2, 3) for z in qkv.unbind(3))
        return self.proj((q * k + v).flatten(2))


class WidthOfARebound(MaxViTStyle):  # C read before x is rebound: it proves nothing of qkv's input
    def forward(self, x):
        B, N, C = x.shape
        x = torch.cat([x, x], dim=1)
        qkv = self.qkv(x).reshape(B, 2, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        return self.proj((q * k + v).permute(0, 2, 3, 1, 4).reshape(B, 2 * N, C)[:, :N])


@pytest.mark.parametrize("module, x", [(WindowedNest(), torch.randn(2, 3, 4, D)), (WindowedHiera(), torch.randn(2, 6, D))])
def test_a_reshape_after_window_dims_reads_as_concatenated_when_its_sizes_fill_the_width(module, x):
    assert qkv_order.qkv_layout(module, "qkv") == "concat"
    plan, caught = plan_of(module)
    assert caught == [] and plan["attn.qkv.weight"].segments == concat_segments()
    labels = true_parts(module, x)
    assert labels == [(part, head) for part in "qkv" for head in range(H) for _ in range(HD)]


def test_leading_dims_that_may_split_the_features_are_not_read():
    x = torch.randn(2, 6, D)
    for module in (PerShard(), WidthOfARebound()):
        assert module(x).shape == x.shape
        assert qkv_order.qkv_layout(module, "qkv") is None, type(module).__name__



def test_code_the_reader_trips_on_is_unread_not_a_crash(monkeypatch):
    def trip(*args, **kwargs):
        raise ValueError("unexpected code")

    monkeypatch.setattr(qkv_order._Reader, "verdict", trip)
    qkv_order._reads.cache_clear()
    try:
        assert qkv_order.qkv_layout(Timm(), "qkv") is None
        plan, caught = plan_of(Timm())
        assert plan["attn.qkv.weight"].rule == "rows" and "could not be read from its forward" in caught[0]
    finally:
        qkv_order._reads.cache_clear()


class PerGroupView(MaxViTStyle):  # per head by a count the engine does not plan with: heads of 16 rows
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.group_heads = H // 2

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.group_heads, -1).chunk(3, dim=-1)
        return self.proj((q * k + v).reshape(B, N, D))


class ConcatByAnotherCount(MaxViTStyle):  # [q | k | v] cut into 2 heads of 16 while the module says 4
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.group_heads = H // 2

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.group_heads, 2 * HD).unbind(2)
        return self.proj((q * k + v).reshape(B, N, C))


def test_a_split_by_another_head_count_than_the_module_plans_with_is_not_read():
    """Read as per head (or concatenated) with the module's 4 heads of 8, a block of the plan would
    hold half of one of the code's heads of 16 and half of the next part."""
    x = torch.randn(2, 5, D)
    for cls in (PerGroupView, ConcatByAnotherCount):
        assert cls()(x).shape == x.shape
        assert qkv_order.qkv_layout(cls(), "qkv") is None, cls.__name__
    module = PerGroupView()
    module.num_heads = H // 2  # the same code, with the module's own count agreeing
    assert qkv_order.qkv_layout(module, "qkv") == "per_head"


# ---- what the code says must also hold on the instance (found by an adversarial audit) ----------
class SplitNotInThirds(MaxViTStyle):  # three names prove three pieces, not equal ones: 40 + 40 + 16
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.qk_width = 5 * HD

    def forward(self, x):
        q, k, v = self.qkv(x).split(self.qk_width, dim=-1)
        return self.proj(torch.cat([q, k, v], -1)[..., :D])


class PerHeadSplitNotInThirds(SplitNotInThirds):  # each head's 24 rows cut 10 + 10 + 4
    def __init__(self, head_first: bool = False):
        super().__init__(head_first)
        self.qk_width = 10

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).transpose(1, 2).split(self.qk_width, dim=-1)
        return self.proj(torch.cat([q, k, v], -1).transpose(1, 2).reshape(B, N, -1)[..., :D])


class TokensSplitInTwo(MaxViTStyle):  # (B, N * 2, 3, heads, hd // 2): each token's features cut in two
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N * 2, 3, self.num_heads, self.dim_head // 2).unbind(2)
        return self.proj((q * k + v).reshape(B, N, C))


class WidthRebound(MaxViTStyle):  # C halved after it is read: (..., 3, heads, C // heads) no longer fills the width
    def forward(self, x):
        B, N, C = x.shape
        C = C // 2
        qkv = self.qkv(x).reshape(B, -1, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        return self.proj((q * k + v).permute(0, 3, 1, 2, 4).reshape(B, N, -1))


class PartsSwapped(Fused):  # named in order, then swapped
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k, v = v, k
        return self.proj(q * k + v)


class PartsRenamedByIndex(Fused):
    def forward(self, x):
        parts = self.qkv(x).chunk(3, dim=-1)
        q, k, v = parts[0], parts[1], parts[2]
        tmp = k
        k = v
        v = tmp
        return self.proj(q * k + v)


class FlagSetWithSetattr(MaxViTStyle):  # the forward flips its flag with setattr: no configuration
    def forward(self, x):
        out = super().forward(x)
        setattr(self, "head_first", not self.head_first)
        return out


def test_sizes_and_names_that_do_not_hold_on_the_instance_are_not_read():
    x = torch.randn(2, 6, D)
    for module in (SplitNotInThirds(), PerHeadSplitNotInThirds(), TokensSplitInTwo(), WidthRebound(),
                   PartsSwapped(), PartsRenamedByIndex(), FlagSetWithSetattr(True)):
        assert module(x).shape == x.shape
        assert qkv_order.qkv_layout(module, "qkv") is None, type(module).__name__
    agreeing = SplitNotInThirds()
    agreeing.qk_width = D  # the same code, its width a third: read
    assert qkv_order.qkv_layout(agreeing, "qkv") == "concat"
