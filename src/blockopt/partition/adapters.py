"""Architecture adapters: small functions that recognise a module by its structure and say how
its parameters split into blocks (Principle 1: one block per smallest dense Hessian sub-block).

An adapter is ``fn(path, module, ctx) -> iterable of BlockSpec`` for parameters it recognises
(its own or its children's; names are full dotted names). The engine asks every adapter about
every module, outermost module first, and the first claim on a parameter wins. So an attention
adapter claims ``q_proj``/``k_proj`` as heads before the generic Linear adapter would call them
rows. Adding an architecture = writing one adapter and registering it; no optimizer changes.

The built-in adapters share one module (over 600 lines) because their order of registration in
this file is the order in which they claim parameters: split up, that precedence would be hidden.
What they share and is no adapter lives beside it (`context`: head counts; `experts`: the
orientation of stacked expert tensors; `usage`: reading a forward; `qkv_order`: the row order of a
fused q/k/v projection).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch.nn as nn

from . import qkv_order
from .context import Context, Heads, _int_attr
from .experts import expert_output_dims, expert_rows_spec
from .spec import BlockSpec, make_spec

Adapter = Callable[[str, nn.Module, Context], Iterable[BlockSpec]]

ADAPTERS: list[Adapter] = []


def register_adapter(fn: Adapter | None = None, *, first: bool = False):
    """Register an adapter (usable as a decorator). ``first=True`` puts it before the built-ins."""

    def add(f: Adapter) -> Adapter:
        if f in ADAPTERS:
            ADAPTERS.remove(f)
        ADAPTERS.insert(0, f) if first else ADAPTERS.append(f)
        return f

    return add(fn) if fn is not None else add


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _bias_spec(path: str, module: nn.Module, attr: str = "bias") -> Iterator[BlockSpec]:
    p = getattr(module, attr, None)
    if isinstance(p, nn.Parameter):
        yield make_spec(_join(path, attr), p.shape, "coordinate", "bias: per-coordinate (Adam)", role="bias")


# Child names that mark the projections of an attention module. Recognition needs the module to
# look like attention (a query, a key and a value child side by side), not just one name.
Q_NAMES = ("q_proj", "query", "q", "wq", "Wq", "q_lin", "to_q", "query_proj", "q_gate_proj", "linear_q", "project_q",
           "to_query", "q_linear")
K_NAMES = ("k_proj", "key", "k", "wk", "Wk", "k_lin", "to_k", "key_proj", "linear_k", "project_k", "to_key", "k_linear")
V_NAMES = ("v_proj", "value", "v", "wv", "Wv", "v_lin", "to_v", "value_proj", "linear_v", "project_v", "to_value",
           "v_linear")
KV_NAMES = ("to_kv", "kv_proj", "kv", "wkv", "Wkv", "kv_linear")  # a fused key/value beside a separate query
O_NAMES = ("o_proj", "out_proj", "o", "wo", "out_lin", "c_proj", "proj", "dense", "linear_out", "attention_out",
           "output_proj", "post", "to_out", "out_layer")
# A class name that says attention: used to decide when an unrecognised module deserves a
# warning, and to confirm a weak fused name (`in_proj`), never to pick a layout.
ATTENTION_CLASS = re.compile("attention|attn", re.IGNORECASE)


def _conv1d_like(m: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2 family): a Linear that stores its weight as (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), nn.Parameter)


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and _conv1d_like(m))


def _wrapped(m: nn.Module) -> str | None:
    """The child name of the Linear a wrapper holds: PEFT LoRA's ``base_layer``, or the only child
    of a module with no parameters of its own (Moshi's and Gemma's ``...Linear`` around a Linear)
    but low-rank factors of that Linear (a LoRA written by hand)."""
    if _is_linear(m._modules.get("base_layer")):
        return "base_layer"
    children = [(n, c) for n, c in m._modules.items() if c is not None]
    if len(children) == 1 and isinstance(children[0][1], nn.Linear) and m._parameters and \
            _lora_pair(m, children[0][1]) is not None:
        return children[0][0]
    if len(children) == 1 and _is_linear(children[0][1]) and not m._parameters:
        return children[0][0]
    return None


_A_NAMES, _B_NAMES = ("lora_a", "a", "lora_down", "down"), ("lora_b", "b", "lora_up", "up")


def _lora_pair(module: nn.Module, base: nn.Linear) -> dict[str, int] | None:
    """``{name: output dim}`` of the two low-rank factors ``module`` holds of ``base`` (its own
    2-D parameters besides a weight and bias), LoRA written by hand: ``A`` (r, in) or (in, r),
    ``B`` (out, r) or (r, out), one rank r below both widths. The names (``lora_A``/``A``/
    ``lora_down``...) settle the orientation where the shapes cannot (in == out). Else None."""
    own = {n: p for n, p in module._parameters.items() if p is not None and n not in ("weight", "bias")}
    if len(own) != 2 or any(p.ndim != 2 for p in own.values()):
        return None
    d_in, d_out = base.in_features, base.out_features
    small = min(d_in, d_out)
    readings = []  # (name of A, its output dim, name of B, its output dim)
    for (a, pa), (b, pb) in ((x, y) for x in own.items() for y in own.items() if x[0] != y[0]):
        for a_out in (0, 1):
            r = pa.shape[0] if a_out == 0 else pa.shape[1]
            if pa.shape[1 - a_out] != d_in or not 0 < r < small:
                continue
            for b_out in (0, 1):
                if pb.shape[b_out] == d_out and pb.shape[1 - b_out] == r:
                    readings.append((a, a_out, b, b_out))
    if len(readings) > 1:  # (in == out: named A and B decide)
        readings = [x for x in readings if x[0].lower() in _A_NAMES and x[2].lower() in _B_NAMES]
    if len(readings) != 1:
        return None
    a, a_out, b, b_out = readings[0]
    return {a: a_out, b: b_out}


def _linear_like(m: nn.Module | None) -> nn.Module | None:
    """The Linear (or Conv1D) holding ``m``'s weight: ``m`` itself or the layer it wraps."""
    if m is None or _is_linear(m):
        return m
    inner = _wrapped(m)
    return m._modules[inner] if inner else None


def _projection(m: nn.Module | None) -> tuple[int, int] | None:
    """(neuron dim, out width) of a Linear-like module, or None."""
    m = _linear_like(m)
    if isinstance(m, nn.Linear):
        return 0, m.out_features
    if m is not None:
        return 1, m.weight.shape[1]
    return None


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """(dotted name, layer) of the first child called one of ``names`` that is Linear-like; for a
    wrapped layer the name leads to the wrapped Linear (``q_proj.base_layer``)."""
    for n in names:
        c = module._modules.get(n)
        lin = _linear_like(c)
        if lin is not None:
            return (n if lin is c else f"{n}.{_wrapped(c)}"), lin
    return None


def _heads_spec(path, child_name, child, n_heads, role, why) -> BlockSpec:
    dim, _ = _projection(child)
    return make_spec(_join(path, child_name + ".weight"), child.weight.shape, "heads", why, role=role,
                     n_heads=n_heads, neuron_dim=dim)


def _neuron_spec(path, child_name, child, role, why, rule=None) -> BlockSpec:
    dim, _ = _projection(child)
    rule = rule or ("rows" if dim == 0 else "cols")
    return make_spec(_join(path, child_name + ".weight"), child.weight.shape, rule, why, role=role)


def _own_int(module: nn.Module, name: str) -> int | None:
    """A non-negative int attribute of the module, else of its own config (0 counts: no rotary part)."""
    for owner in (module, getattr(module, "config", None)):
        v = getattr(owner, name, None) if owner is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


@register_adapter
def latent_attention(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, ...): queries and keys/values pass
    through low-rank latents shared by every head. Per head: the rows of ``q_b_proj`` (each head's
    ``nope + rope`` query dims: one block) and of ``kv_b_proj`` (each head's ``nope`` key dims: one
    block; its value dims: one block per row). Shared: the latent rows of ``q_a_proj`` and
    ``kv_a_proj_with_mqa`` (one block per row) and the rotary key ``k_pe`` every head shares (the
    last ``rope`` rows of ``kv_a_proj_with_mqa``: one block)."""
    kv_a, kv_b = _child(module, ("kv_a_proj_with_mqa",)), _child(module, ("kv_b_proj",))
    q = _child(module, ("q_b_proj",)) or _child(module, ("q_proj",))
    if not (kv_a and kv_b and q):
        return
    n = ctx.n_heads or _own_int(module, "num_heads") or _own_int(module, "num_attention_heads")
    nope, rope, v_hd, rank = (_own_int(module, a) for a in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                             "kv_lora_rank"))
    kind = type(module).__name__
    fits = (n and nope and rope is not None and v_hd and rank and _projection(q[1])[1] == n * (nope + rope)
            and _projection(kv_b[1])[1] == n * (nope + v_hd) and _projection(kv_a[1])[1] == rank + rope)
    if not fits:
        ctx.warnings.append(
            f"{path}: latent attention ({kind}) whose widths do not fit its head geometry "
            f"(heads={n}, nope={nope}, rope={rope}, v={v_hd}, kv_lora_rank={rank}): its projections get one block "
            "per row; pass rules= to set them"
        )
        return
    (qn, qm), (an, am), (bn, bm) = q, kv_a, kv_b
    yield BlockSpec(name=_join(path, qn + ".weight"), shape=tuple(qm.weight.shape), rule="heads", role="query",
                    reason=f"{kind} latent attention query: {n} heads of {nope}+{rope} rows (nope + rope), one block each",
                    block_dims=(0,), segments=((n * (nope + rope), nope + rope),), n_heads=n)
    rotary = f" | {rope} rotary key rows shared by all heads (one block)" if rope else ""
    yield BlockSpec(name=_join(path, an + ".weight"), shape=tuple(am.weight.shape), rule="heads", role="key",
                    reason=f"{kind} kv latent: {rank} latent rows shared by all heads (one block per row){rotary}",
                    block_dims=(0,), segments=((rank, 1),) + (((rope, rope),) if rope else ()), n_heads=1)
    yield BlockSpec(name=_join(path, bn + ".weight"), shape=tuple(bm.weight.shape), rule="heads", role="qkv",
                    reason=f"{kind} kv up-projection: per head, {nope} key rows (one block) | {v_hd} value rows "
                    f"(one block each); {n} heads",
                    block_dims=(0,), segments=((nope, nope), (v_hd, 1)) * n, n_heads=n)
    q_a = _child(module, ("q_a_proj",))
    if q_a and qn != "q_proj":
        yield _neuron_spec(path, q_a[0], q_a[1], "query", f"{kind} query latent: {q_a[1].weight.shape[0]} latent rows "
                           "shared by all heads, one block per row")
    yield from _output_and_biases(path, module, kind, q, q_a, kv_a, kv_b)


def _gated_query_spec(path: str, child_name: str, child: nn.Module, heads: Heads, why: str) -> BlockSpec:
    """A query projection that carries a gate after every head (``[q_h | gate_h]`` per head, as
    its forward views it: ``(..., n_heads, 2 * head_dim)`` then chunks): each query head one
    block, each gate row its own block (a gate scales one output neuron, like a value row)."""
    dim, _ = _projection(child)
    hd = heads.head_dim
    return BlockSpec(
        name=_join(path, child_name + ".weight"), shape=tuple(child.weight.shape), rule="heads", role="query",
        reason=f"{why}: each of {heads.n_heads} heads = {hd} query rows (one block) + {hd} gate rows (one block each)",
        block_dims=(dim,), segments=((hd, hd), (hd, 1)) * heads.n_heads, n_heads=heads.n_heads,
    )


def _output_and_biases(path: str, module: nn.Module, kind: str, *projections) -> Iterator[BlockSpec]:
    """An attention's output projection (one block per output neuron), then the biases of its
    ``projections`` (``(name, layer)`` or None) and of the output projection."""
    o = _child(module, O_NAMES)
    if o:
        yield _neuron_spec(path, o[0], o[1], "attn_out", f"{kind} output projection: per output neuron")
    for child in (*projections, o):
        if child:
            yield from _bias_spec(_join(path, child[0]), child[1])


def _query_and_fused_kv(path: str, q: tuple[str, nn.Module], kv: tuple[str, nn.Linear], ctx: Context
                        ) -> Iterator[BlockSpec]:
    """A query beside a fused key/value (``to_kv``, perceiver and cross-attention style): the query
    by heads, the fused projection as [k heads | v rows] when its forward reads it that way
    (`qkv_order` with two parts), else one block per row under a warning (`_order_unread`)."""
    module = ctx.modules[path]
    kind = type(module).__name__
    qname, kvname = _join(path, q[0] + ".weight"), _join(path, kv[0] + ".weight")
    try:
        heads = ctx.attention_heads(module, _projection(q[1])[1], kv[1].out_features // 2, qname)
    except LookupError as e:
        ctx.warn(f"{path}: attention heads unknown ({e}): {qname} and {kvname} fall back to one block per neuron; "
                 "pass n_heads= (and n_kv_heads=) to partition()/AdamMini", qname, kvname)
        yield _neuron_spec(path, q[0], q[1], "query", f"{kind} query: per neuron (head count unknown: safe fallback)")
        yield _neuron_spec(path, kv[0], kv[1], "qkv", f"{kind} fused key/value: per neuron (head count unknown)")
    else:
        yield _heads_spec(path, q[0], q[1], heads.n_heads, "query", f"{kind} query: {heads.n_heads} heads ({heads.source})")
        rows, hd = kv[1].out_features // 2, heads.head_dim
        known = qkv_order.qkv_layout(module, kv[0], parts=2) == "concat"
        if rows != heads.n_kv_heads * hd:
            hd = rows // heads.n_kv_heads  # (user n_kv_heads: key heads narrower than query heads)
        value = (rows, rows) if ctx.value == "whole" else (rows, 1)
        spec = BlockSpec(
            name=kvname, shape=tuple(kv[1].weight.shape), rule="heads", role="qkv",
            reason=f"{kind} fused key/value {kv[0]} (k | v): {heads.n_kv_heads} key heads of {hd}, "
            f"v {'whole' if value[1] == rows else 'rows'} ({heads.source})",
            block_dims=(0,), segments=((rows, hd), value), n_heads=heads.n_kv_heads,
        )
        yield spec if known else _order_unread(spec, kind, kv[0], "key/value", "[k heads | v]",
                                               f"k, v = {kv[0]}(x).chunk(2, dim=-1)", ctx)
    yield from _output_and_biases(path, module, kind, q, kv)


def _one_head_per_module(path: str, module: nn.Module, projections: list[tuple[str, nn.Module]], k_width: int | None,
                         ctx: Context) -> Heads | None:
    """One head, for an attention module that is one of the heads (the per-head ``Head`` modules of
    Karpathy's nanoGPT lecture): it holds no weights but its query, key and value, and it sits in a
    ModuleList of N modules of its class whose query and key widths, N times over, tile the width
    the query reads. A stack of attention layers has an output projection in each layer; without
    that proof, None."""
    parent_path, _, index = path.rpartition(".")
    parent = ctx.modules.get(parent_path)
    query = projections[0][1]
    width = _projection(query)[1]
    own = {name.split(".")[0] for name, _ in projections}  # (the direct children holding q, k, v)
    if any(True for _ in module.parameters(recurse=False)) or any(
            any(True for _ in c.parameters()) for n, c in module.named_children() if n not in own):
        return None  # weights beside q/k/v (an output projection): a layer, not one head
    n = len(parent) if isinstance(parent, nn.ModuleList) and index.isdigit() else 0
    if n < 2 or not all(type(m) is type(module) for m in parent) or k_width not in (None, width):
        return None
    lin = _linear_like(query)
    reads = lin.in_features if isinstance(lin, nn.Linear) else None
    if reads != n * width:
        return None
    return Heads(1, 1, f"one head per module: {n} {type(module).__name__} modules tile the width {reads}", width)


@register_adapter
def separate_qkv_attention(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Attention with separate query/key/value projections (Llama, Mistral, Qwen2, Gemma, BERT,
    ViT, OPT, T5, in-house models): query and key by heads (key by KV heads under GQA), value by
    output neuron (or whole), output projection by output neuron. A query twice as wide as its
    heads (Qwen3-Next) carries a gate per head: split as `_gated_query_spec` says. A query and
    key without a value (a pointer head) and, in a module whose class says attention, a query
    alone (keys shared from another layer) are split by heads too."""
    q, k, v = _child(module, Q_NAMES), _child(module, K_NAMES), _child(module, V_NAMES)
    kind = type(module).__name__
    kv = _child(module, KV_NAMES) if q and not (k or v) else None
    if kv and isinstance(kv[1], nn.Linear) and kv[1].out_features % 2 == 0:
        yield from _query_and_fused_kv(path, q, kv, ctx)
        return
    # a query with a key is attention (a pointer head has no value); a query or a key alone, only
    # in a module that says so (keys shared from another layer; a pooling head's learned query)
    if not (q and k) and not ((q or k) and ATTENTION_CLASS.search(kind)):
        return
    first = q or k
    k_width = _projection(k[1])[1] if (k and q) else None
    qk_names = " and ".join(f"{_join(path, c[0])}.weight" for c in (q, k) if c)
    try:
        heads = ctx.attention_heads(module, _projection(first[1])[1], k_width, _join(path, first[0] + ".weight"))
    except LookupError as e:
        heads, problem = _one_head_per_module(path, module, [c for c in (first, k, v) if c], k_width, ctx), str(e)
        if heads is None:
            ctx.warnings.append(
                f"{path}: attention heads unknown ({problem}): {qk_names} fall back to one block per neuron; pass "
                "n_heads= (and n_kv_heads=) to partition()/AdamMini"
            )
    if heads:
        gqa = f", GQA {heads.n_heads}/{heads.n_kv_heads}" if heads.n_kv_heads != heads.n_heads else ""
        q_why = f"{kind} query: {heads.n_heads} heads ({heads.source}{gqa})"
        if q and heads.gated:
            yield _gated_query_spec(path, q[0], q[1], heads, f"{kind} gated query ({heads.source}{gqa})")
        elif q:
            yield _heads_spec(path, q[0], q[1], heads.n_heads, "query", q_why)
        if k:
            yield _heads_spec(path, k[0], k[1], heads.n_kv_heads, "key",
                              f"{kind} key: {heads.n_kv_heads} heads ({heads.source}{gqa})")
    else:
        if q:
            yield _neuron_spec(path, q[0], q[1], "query", f"{kind} query: per neuron (head count unknown: safe fallback)")
        if k:
            yield _neuron_spec(path, k[0], k[1], "key", f"{kind} key: per neuron (head count unknown: safe fallback)")
    if v and ctx.value == "whole":
        yield _neuron_spec(path, v[0], v[1], "value", f"{kind} value: whole (value='whole')", rule="whole")
    elif v:
        yield _neuron_spec(path, v[0], v[1], "value", f"{kind} value: per output neuron")
    yield from _output_and_biases(path, module, kind, q, k, v)


@register_adapter
def fused_qkv_conv1d(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """GPT-2-style attention: ``c_attn`` is a Conv1D (in, 3*E) holding query | key | value columns
    (cross-attention: ``q_attn`` (in, E) + ``c_attn`` (in, 2*E) holding key | value)."""
    c_attn = module._modules.get("c_attn")
    if c_attn is None or not _conv1d_like(c_attn):
        return
    embed = getattr(module, "embed_dim", None) or getattr(module, "split_size", None)
    width = c_attn.weight.shape[1]
    q_attn = module._modules.get("q_attn")
    parts = 2 if (q_attn is not None and _conv1d_like(q_attn)) else 3
    if not isinstance(embed, int) or width != parts * embed:
        return
    try:
        heads = ctx.attention_heads(module, embed, embed, _join(path, "c_attn.weight"))
    except LookupError as e:
        ctx.warnings.append(f"{path}: attention heads unknown ({e}); fused c_attn falls back to one block per column")
        heads = None
    kind = type(module).__name__
    if heads is None:
        yield make_spec(_join(path, "c_attn.weight"), c_attn.weight.shape, "cols",
                        f"{kind} fused qkv: per column (head count unknown: safe fallback)", role="qkv")
    else:
        hd = embed // heads.n_heads
        v_seg = (embed, embed) if ctx.value == "whole" else (embed, 1)
        segs = ((embed, hd),) * (parts - 1) + (v_seg,)
        layout = " | ".join(["q heads", "k heads"][3 - parts :] + ["v " + ("whole" if ctx.value == "whole" else "cols")])
        yield BlockSpec(
            name=_join(path, "c_attn.weight"), shape=tuple(c_attn.weight.shape), rule="heads",
            reason=f"{kind} fused Conv1D (in, out) split {layout}: {heads.n_heads} heads ({heads.source})",
            role="qkv", block_dims=(1,), segments=segs, n_heads=heads.n_heads,
        )
        if parts == 2:
            yield _heads_spec(path, "q_attn", q_attn, heads.n_heads, "query",
                              f"{kind} cross-attention query: {heads.n_heads} heads ({heads.source})")
    c_proj = module._modules.get("c_proj")
    if c_proj is not None and _projection(c_proj):
        yield _neuron_spec(path, "c_proj", c_proj, "attn_out", f"{kind} output projection: per output neuron")
    for name in ("c_attn", "q_attn", "c_proj"):
        sub = module._modules.get(name)
        if sub is not None:
            yield from _bias_spec(_join(path, name), sub)


@register_adapter
def torch_multihead_attention(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """``nn.MultiheadAttention``: packed ``in_proj_weight`` (3E, E) = query heads | key heads |
    value neurons, or separate ``q/k/v_proj_weight`` when kdim/vdim differ."""
    if not isinstance(module, nn.MultiheadAttention):
        return
    E = module.embed_dim
    try:
        heads = ctx.attention_heads(module, E, E, _join(path, "in_proj_weight"))
    except LookupError as e:  # nn.MultiheadAttention always knows num_heads; kept for symmetry
        raise ValueError(f"{path}: {e}") from None
    hd = E // heads.n_heads
    v_per_block = E if ctx.value == "whole" else 1
    if module.in_proj_weight is not None:
        yield BlockSpec(
            name=_join(path, "in_proj_weight"), shape=tuple(module.in_proj_weight.shape), rule="heads",
            reason=f"nn.MultiheadAttention packed in_proj: {heads.n_heads} q heads | {heads.n_heads} k heads | "
            + ("v whole" if ctx.value == "whole" else f"{E} v rows"),
            role="qkv", block_dims=(0,), segments=((E, hd), (E, hd), (E, v_per_block)), n_heads=heads.n_heads,
        )
    else:
        for attr, role in (("q_proj_weight", "query"), ("k_proj_weight", "key")):
            w = getattr(module, attr)
            yield make_spec(_join(path, attr), w.shape, "heads", f"nn.MultiheadAttention {role}: {heads.n_heads} heads",
                            role=role, n_heads=heads.n_heads)
        w = module.v_proj_weight
        yield make_spec(_join(path, "v_proj_weight"), w.shape, "whole" if ctx.value == "whole" else "rows",
                        "nn.MultiheadAttention value: " + ("whole" if ctx.value == "whole" else "per output neuron"), role="value")
    yield from _bias_spec(path, module, "in_proj_bias")
    for attr in ("bias_k", "bias_v"):
        yield from _bias_spec(path, module, attr)
    yield _neuron_spec(path, "out_proj", module.out_proj, "attn_out", "nn.MultiheadAttention output projection: per output neuron")
    yield from _bias_spec(_join(path, "out_proj"), module.out_proj)


@register_adapter
def model_embeddings(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Models that name their own input/output embeddings (HF ``get_input_embeddings``)."""
    if not (hasattr(module, "get_input_embeddings") and hasattr(module, "get_output_embeddings")):
        return
    for getter, role in (("get_input_embeddings", "embedding"), ("get_output_embeddings", "head")):
        try:
            emb = getattr(module, getter)()
        except (NotImplementedError, AttributeError, TypeError):
            continue
        w = getattr(emb, "weight", None)
        if not isinstance(w, nn.Parameter) or w.ndim != 2:
            continue
        name = next((n for n, m in module.named_modules(prefix=path) if m is emb), None)
        if name is None:
            continue
        what = "token embedding: one block per token" if role == "embedding" else "output head: one block per token"
        yield make_spec(_join(name, "weight"), w.shape, "rows", f"{what} ({type(module).__name__}.{getter})", role=role)


def _adapted_role(base_path: str, base: nn.Module, ctx: Context) -> str:
    """The role the adapters give the weight of ``base`` (claimed already by an enclosing
    attention adapter, or asked of the adapters now: ``base`` is visited after its wrapper)."""
    name = _join(base_path, "weight")
    spec = ctx.claimed.get(name)
    if spec is None:
        spec = next((s for adapter in ADAPTERS for s in adapter(base_path, base, ctx) if s.name == name), None)
    return spec.role if spec is not None else "linear"


@register_adapter
def lora_factors(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """PEFT LoRA: the factors ``A`` (r, in) and ``B`` (out, r) of an adapted layer, one block per
    row (for ``B``: per output neuron of the adapted layer), with the *role* of the layer they
    adapt (query, value, ffn, ...), so blockwise LR and AdaPM treat them like that layer."""
    base, lora_a, lora_b = (module._modules.get(n) for n in ("base_layer", "lora_A", "lora_B"))
    if base is None or not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return
    role = _adapted_role(_join(path, "base_layer"), base, ctx)
    for group, factors in (("lora_A", lora_a), ("lora_B", lora_b)):
        for key, factor in factors.items():
            if isinstance(factor, nn.Linear):
                fpath = _join(path, f"{group}.{key}")
                yield make_spec(_join(fpath, "weight"), factor.weight.shape, "rows",
                                f"LoRA {group[-1]} of a {role} layer: one block per row (role of the adapted layer)",
                                role=role)
                yield from _bias_spec(fpath, factor)


@register_adapter
def lora_by_hand(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """LoRA written by hand: two low-rank factors held by a Linear subclass (loralib's
    ``lora.Linear``) or by a wrapper around a Linear (`_lora_pair`), one block per output neuron
    of each (``A``: per rank row; ``B``: per output neuron of the adapted layer, rows or columns
    as stored), with the role of the layer they adapt."""
    if isinstance(module, nn.Linear):
        base, base_path = module, path
    else:
        inner = _wrapped(module)
        base = module._modules[inner] if inner else None
        base_path = _join(path, inner) if inner else path
    if not isinstance(base, nn.Linear):
        return
    factors = _lora_pair(module, base)
    if factors is None:
        return
    role = _adapted_role(base_path, base, ctx) if base is not module else \
        (ctx.claimed[_join(path, "weight")].role if _join(path, "weight") in ctx.claimed else "linear")
    for attr, out_dim in factors.items():
        p = module._parameters[attr]
        yield make_spec(_join(path, attr), p.shape, "rows" if out_dim == 0 else "cols",
                        f"LoRA factor {attr} of a {role} layer (written by hand): one block per output neuron "
                        f"({'rows' if out_dim == 0 else 'columns'}; role of the adapted layer)", role=role)


# ---- fused query/key/value stored in one Linear (out = rows) -------------------------------
# The order of q, k and v inside a fused projection is a convention of each family's forward
# code; shapes alone can't tell it (`qkv_order`: known families, else the module's own source).
def _qkv_segments(layout: str, n_heads: int, n_kv: int, hd: int, value_whole: bool, partitions: int = 1
                  ) -> tuple[tuple[int, int], ...]:
    def v(rows: int) -> tuple[int, int]:
        return (rows, rows) if value_whole else (rows, 1)

    if layout == "concat":  # [q heads | k heads | v]: Phi-3 qkv_proj, timm qkv, MPT Wqkv
        return ((n_heads * hd, hd), (n_kv * hd, hd), v(n_kv * hd))
    if layout == "per_head":  # [q k v] for each head: GPT-NeoX, Bloom, Persimmon
        return ((hd, hd), (hd, hd), v(hd)) * n_heads
    if layout in ("per_group", "multi_query"):  # [q x (n/n_kv) | k | v] per KV group: Falcon (new / multi-query)
        return ((n_heads // n_kv * hd, hd), (hd, hd), v(hd)) * n_kv
    if layout == "codegen":  # [q heads | v | k heads] per model-parallel partition
        rows = n_heads // partitions * hd
        return ((rows, hd), v(rows), (rows, hd)) * partitions
    raise ValueError(layout)


# Names of fused query/key/value projections. `in_proj` and `attn` are weak: state-space layers
# (Mamba) and MLPs (Bark) use `in_proj` for other things, so they count only inside a module whose
# class says attention and whose own head geometry fits its width.
_FUSED_QKV_NAMES = ("query_key_value", "qkv_proj", "qkv", "Wqkv", "wqkv", "c_qkv", "to_qkv", "qkv_linear", "c_attn", "att_proj",
                    "W_pack")
_WEAK_FUSED_NAMES = ("in_proj", "attn")  # (litgpt's fused projection was `attn`)


def _order_unread(spec: BlockSpec, kind: str, attr: str, parts: str, order: str, example: str, ctx: Context) -> BlockSpec:
    """One block per row for a fused projection whose row order its forward did not show (finer
    than any right plan: planned as ``order``, a per-head order would put value heads, or with
    ``value="whole"`` query and key heads, into blocks of the wrong rows), and a warning;
    ``rules={name: "heads"}`` confirms ``order`` and gets ``spec``."""
    ctx.confirmable[spec.name] = replace(spec, reason=spec.reason + " (order confirmed by a rule)")
    ctx.warn(
        f"{spec.name}: the order of {parts} rows in {kind}.{attr} could not be read from its forward: one block "
        f"per row; if it is {order} (e.g. {example}), pass rules={{{spec.name!r}: 'heads'}} to plan it so, or "
        f"rules={{{spec.name!r}: 'rows'}} to keep rows", spec.name
    )
    return make_spec(spec.name, spec.shape, "rows", f"{kind} fused {attr}: per row (order of {parts} not read from "
                     "its forward: safe fallback)", role=spec.role)


@register_adapter
def fused_qkv_linear(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Attention whose query/key/value live in one Linear (GPT-NeoX and Bloom interleave them per
    head; Falcon groups them per KV head; Phi-3, timm ViT and MPT concatenate them). The head
    counts must fit the width exactly; otherwise one block per row, with a warning."""
    found = next(((n, module._modules[n]) for n in _FUSED_QKV_NAMES if isinstance(module._modules.get(n), nn.Linear)), None)
    weak = found is None
    if weak:
        found = next(((n, module._modules[n]) for n in _WEAK_FUSED_NAMES if isinstance(module._modules.get(n), nn.Linear)), None)
    if found is None or _child(module, Q_NAMES) or "q_attn" in module._modules:
        return
    name, lin = found
    kind = type(module).__name__
    layout = qkv_order.qkv_layout(module, name)
    order_known, layout = layout is not None, layout or "concat"
    partitions = (_int_attr(module, ("mp_num",)) or 4) if layout == "codegen" else 1
    out = lin.out_features
    try:
        heads, problem = ctx.fused_heads(module, out, layout, _join(path, name + ".weight")), None
    except LookupError as e:
        heads, problem = None, str(e)
    except ValueError:
        if weak:  # user head counts are for attention; a non-attention `in_proj` is no reason to fail
            return
        raise
    if weak and (heads is None or not ATTENTION_CLASS.search(kind)):
        return  # an unconfirmed `in_proj` is an ordinary Linear (leaf_layers: one block per row)
    wname = _join(path, name + ".weight")
    if heads is not None and heads.n_heads % partitions:
        heads, problem = None, f"{heads.n_heads} heads do not split into its {partitions} partitions"
    if heads is None:
        ctx.warn(
            f"{wname}: fused query/key/value of {kind} with unknown heads ({problem}): one block per row; "
            f"pass n_heads= (and n_kv_heads=), or rules={{{wname!r}: 'rows'}} to accept rows", wname
        )
        yield make_spec(wname, lin.weight.shape, "rows", f"{kind} fused {name}: per row (heads unknown: safe fallback)",
                        role="qkv")
    else:
        n_heads, n_kv, hd = heads.n_heads, heads.n_kv_heads, heads.head_dim
        value_whole = ctx.value == "whole" and layout == "concat"
        segs = _qkv_segments(layout, n_heads, n_kv, hd, value_whole, partitions)
        gqa = f", {n_kv} KV heads" if n_kv != n_heads else ""
        v_txt = "v whole" if value_whole else "v rows" + (" (per head: interleaved)" if ctx.value == "whole" else "")
        spec = BlockSpec(
            name=wname, shape=tuple(lin.weight.shape), rule="heads", role="qkv",
            reason=f"{kind} fused {name} ({layout.replace('_', ' ')}): {n_heads} q heads of {hd}{gqa}, {v_txt} "
            f"({heads.source})",
            block_dims=(0,), segments=segs, n_heads=n_heads,
        )
        yield spec if order_known else _order_unread(spec, kind, name, "query/key/value", "[q heads | k heads | v]",
                                                     f"q, k, v = {name}(x).split(width)", ctx)
    yield from _bias_spec(_join(path, name), lin)
    yield from _output_and_biases(path, module, kind)


@register_adapter
def sibling_attention_output(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """BERT/ViT/RoBERTa: the attention's output projection sits in a sibling ``output.dense``."""
    inner = module._modules.get("self") or module._modules.get("attention")
    out = module._modules.get("output")
    if inner is None or out is None or not (_child(inner, Q_NAMES) and _child(inner, K_NAMES) and _child(inner, V_NAMES)):
        return
    dense = _child(out, ("dense",))
    if dense:
        yield _neuron_spec(_join(path, "output"), dense[0], dense[1], "attn_out",
                           f"{type(out).__name__} (attention output projection): per output neuron")


def _attention_width(m: nn.Module) -> int | None:
    """Model width of the attention ``m`` is (or directly holds): its query's input width."""
    for a in (m, *m._modules.values()):
        if isinstance(a, nn.MultiheadAttention):
            return a.embed_dim
        if a is None:
            continue
        q = _child(a, Q_NAMES) if _child(a, K_NAMES) else None
        q = q or next(((n, c) for n in _FUSED_QKV_NAMES if isinstance(c := a._modules.get(n), nn.Linear)), None)
        if q:
            lin = q[1]
            return lin.in_features if isinstance(lin, nn.Linear) else lin.weight.shape[0]
    return None


@register_adapter
def block_ffn(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """The feed-forward Linears of a Transformer block that does not name its MLP (BERT's
    intermediate/output, OPT's fc1/fc2, ``nn.TransformerEncoderLayer``'s linear1/linear2): in a
    block holding an attention of width D, the Linears outside it (children and grandchildren)
    mapping D -> F and F -> D, for one F != D, are the FFN: one block per output neuron."""
    attention = {n for n, c in module._modules.items() if c is not None and _attention_width(c) is not None}
    if not attention:
        return
    width = next(_attention_width(module._modules[n]) for n in attention)
    linears = []
    for n, c in module._modules.items():
        if n in attention or c is None:
            continue
        for sub_name, sub in [(n, c), *((f"{n}.{k}", g) for k, g in c._modules.items())]:
            lin = _linear_like(sub)
            if isinstance(lin, nn.Linear):  # a wrapped one (LoRA) too: its factors then read its role
                linears.append((sub_name if lin is sub else f"{sub_name}.{_wrapped(sub)}", lin))
    up = {m.out_features for _, m in linears if m.in_features == width}
    down = {m.in_features for _, m in linears if m.out_features == width}
    hidden = (up & down) - {width}
    for sub_name, m in linears:
        if (m.in_features == width and m.out_features in hidden) or (m.out_features == width and m.in_features in hidden):
            yield _neuron_spec(path, sub_name, m, "ffn", f"{type(module).__name__} feed-forward "
                               f"({m.in_features} -> {m.out_features}): one block per output neuron")
            yield from _bias_spec(_join(path, sub_name), m)


@register_adapter
def stacked_experts(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Mixture-of-experts weights stored as one 3-D tensor per projection, ``(E, out, in)`` or
    ``(E, in, out)``: one block per expert per output neuron. Which dim holds the outputs is read
    from how the module's forward uses the tensor; a shape cannot tell the two apart."""
    n_experts = _int_attr(module, ("num_experts", "num_local_experts", "n_experts", "n_routed_experts"))
    if not n_experts:
        return
    kind = type(module).__name__
    stacked = [n for n, p in module.named_parameters(recurse=False) if p.ndim == 3 and p.shape[0] == n_experts]
    out_dims = expert_output_dims(path, module, stacked, ctx) if stacked else {}
    for attr, p in module.named_parameters(recurse=False):
        name = _join(path, attr)
        if attr in out_dims:
            d, how = out_dims[attr]
            side = "(E, out, in)" if d == 1 else "(E, in, out)"
            yield expert_rows_spec(name, p.shape, d, f"{kind} {attr} {side}: one block per expert per output neuron "
                                   f"({n_experts} experts; {how})")
        elif attr in stacked:
            ctx.warn(
                f"{name}: stacked expert weights whose output dim could not be established (forward not followed, "
                f"no is_transposed, name/shape ambiguous): one block per expert per dim-1 row, as if (E, out, in); "
                f"if it is (E, in, out) pass rules={{{name!r}: 'coordinate'}}", name
            )
            yield expert_rows_spec(name, p.shape, 1, f"{kind} {attr}: one block per expert per dim-1 row (orientation "
                                   "unknown: assumed (E, out, in))")
        elif p.ndim == 2 and p.shape[0] == n_experts and "bias" in attr:
            yield make_spec(name, p.shape, "coordinate", f"{kind} {attr}: expert biases per-coordinate", role="bias")
        elif p.ndim == 2 and p.shape[0] == n_experts:  # a router: (E, hidden) scores one expert per row
            yield make_spec(name, p.shape, "rows", f"{kind} router: one block per expert", role="router")
        elif p.ndim == 1 and "bias" in attr:
            yield make_spec(name, p.shape, "coordinate", "bias: per-coordinate (Adam)", role="bias")


_POSITION_TABLE = re.compile(r"pos(ition(al)?)?_?emb|tokens?$")  # pos_embed, position_embeddings, reg_token, ...


@register_adapter
def embedding_tables(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Raw tables of token vectors: one block per vector. In an embedding module (its class says
    ``Embed``) every table (ViT ``cls_token`` (1, 1, D), ``position_embeddings`` (1, T, D), ...),
    and its patch projection (a conv applied to patches is a Linear on them) one block per output
    channel. Elsewhere (timm's and vit-pytorch's ViTs hold ``pos_embed`` on the model itself), a
    table named as a position embedding whose last dim is a width the model normalises (its
    residual stream's), so that its rows are vectors of that stream; a table of another shape
    stays unrecognised (the fallback, with a warning)."""
    in_embedding = "embed" in type(module).__name__.lower()
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return
    for attr, p in module.named_parameters(recurse=False):
        if p.ndim < 2:
            continue
        if in_embedding:
            why = f"{type(module).__name__}.{attr}: one block per token vector"
        elif _POSITION_TABLE.search(attr.lower()) and p.shape[-1] in _normalised_widths(ctx) and p.shape[-2] != p.shape[-1]:
            why = f"position table (its last dim, {p.shape[-1]}, is a width the model normalises): one block per position"
        else:
            continue
        yield BlockSpec(name=_join(path, attr), shape=tuple(p.shape), rule="rows", role="pos_embedding", reason=why,
                        block_dims=tuple(range(p.ndim - 1)), segments=((p.numel() // p.shape[-1], 1),))
    if not in_embedding:
        return
    for attr, child in module._modules.items():
        if isinstance(child, nn.modules.conv._ConvNd) and not child.transposed:
            yield make_spec(_join(path, attr + ".weight"), child.weight.shape, "rows",
                            f"{type(module).__name__} patch projection ({type(child).__name__}): one block per output channel",
                            role="embedding")


def _normalised_widths(ctx: Context) -> frozenset[int]:
    """The widths the model's token norms act on (the last dim of each norm's shape or weight; not
    the channels of batch, group or instance norms, which a channels-first table could match)."""
    if "normalised_widths" not in ctx.cache:
        widths = set()
        channel_norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
        for m in ctx.modules.values():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                widths.add(m.normalized_shape[-1])
            elif _is_norm(m) and not isinstance(m, channel_norms):
                widths.update(p.shape[-1] for p in m.parameters(recurse=False) if p.ndim >= 1)
        ctx.cache["normalised_widths"] = frozenset(widths)
    return ctx.cache["normalised_widths"]


def _is_patch_projection(conv: nn.Module) -> bool:
    """A convolution over non-overlapping patches (ViT's and MLP-Mixer's stem, ConvNeXt's): each
    output is a Linear map of one patch, so it is planned as a Linear, per output channel, by its
    structure (an ``*Embed*`` class holding one is found by `embedding_tables` too)."""
    kernel, stride, padding = tuple(conv.kernel_size), tuple(conv.stride), conv.padding
    no_padding = padding == "valid" or (isinstance(padding, tuple) and not any(padding))
    return (not conv.transposed and conv.groups == 1 and kernel == stride and max(kernel) > 1 and no_padding
            and all(d == 1 for d in conv.dilation))


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
_MLP_HINTS = ("mlp", "feedforward", "ffn", "expert", "intermediate", "swiglu", "geglu", "layerff", "denseact", "densereludense")


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    # HF/user norms (LlamaRMSNorm, T5LayerNorm, ...): a "*Norm" class owning only 1-D parameters.
    params = list(module.parameters(recurse=False))
    return "norm" in type(module).__name__.lower() and bool(params) and all(p.ndim == 1 for p in params)


def _in_mlp(path: str, module: nn.Module, ctx: Context) -> bool:
    for m in [module, *ctx.ancestors(path)[:2]]:
        name = type(m).__name__.lower()
        if any(h in name for h in _MLP_HINTS):
            return True
    return False


@register_adapter
def leaf_layers(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """The standard layers: Embedding/Linear/Conv1D/norms/convolutions/RNNs. A weight under a
    ``torch.nn.utils.parametrize`` parametrization (weight norm) lives in its originals: the one
    shaped like the weight takes its layout, a magnitude vector is per coordinate; so do the older
    ``torch.nn.utils.weight_norm``'s ``weight_v`` and ``weight_g``."""
    originals = getattr(getattr(module, "parametrizations", None), "weight", None)
    # the older torch.nn.utils.weight_norm keeps the weight as weight_v (its direction) and weight_g
    old_style = isinstance(module._parameters.get("weight_v"), nn.Parameter) and "weight_g" in module._parameters
    for spec in _leaf_specs(path, module, ctx):
        if old_style and spec.name == _join(path, "weight"):
            yield replace(spec, name=_join(path, "weight_v"), reason=f"{spec.reason} (weight_norm's direction)")
            yield make_spec(_join(path, "weight_g"), module.weight_g.shape, "coordinate",
                            "weight magnitude (weight_norm): per coordinate", role=spec.role)
            continue
        if originals is None or spec.name != _join(path, "weight"):
            yield spec
            continue
        for attr, p in originals.named_parameters(recurse=False):
            name = _join(path, f"parametrizations.weight.{attr}")
            if tuple(p.shape) == spec.shape:
                yield replace(spec, name=name, reason=f"{spec.reason} (parametrized weight)")
            elif p.numel() in p.shape:
                yield make_spec(name, p.shape, "coordinate", "weight magnitude (parametrization): per coordinate",
                                role=spec.role)


def _leaf_specs(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    kind = type(module).__name__
    if isinstance(module, nn.RNNBase):  # gates stacked along dim 0: one block per gate unit
        for attr, p in module.named_parameters(recurse=False):
            if attr.startswith("weight"):
                yield make_spec(_join(path, attr), p.shape, "rows", f"{kind} {attr}: one block per gate unit", role="linear")
            else:
                yield from _bias_spec(path, module, attr)
        return
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        role = "embedding" if module.num_embeddings == ctx.token_vocab else "pos_embedding"
        what = "one block per token" if role == "embedding" else "one block per position/type row"
        yield make_spec(_join(path, "weight"), module.weight.shape, "rows", f"{kind}: {what}", role=role)
    elif isinstance(module, nn.Linear) or _conv1d_like(module):
        dim, out = _projection(module)
        if ctx.token_vocab and out == ctx.token_vocab and not _in_mlp(path, module, ctx):
            role, what = "head", "output head onto the vocabulary: one block per token"
        elif _in_mlp(path, module, ctx):
            role, what = "ffn", "MLP: one block per output neuron"
        else:
            role, what = "linear", "one block per output neuron"
        store = " (Conv1D stores (in, out): neurons are columns)" if dim == 1 else ""
        yield make_spec(_join(path, "weight"), module.weight.shape, "rows" if dim == 0 else "cols", f"{kind}: {what}{store}", role=role)
        yield from _bias_spec(path, module)
    elif _is_norm(module):
        for attr, p in module.named_parameters(recurse=False):
            if attr == "bias":
                yield from _bias_spec(path, module)
            else:
                yield make_spec(_join(path, attr), p.shape, "whole", f"{kind} scale: one block", role="norm")
    elif isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if ctx.conv == "channel" and module.transposed and module.groups > 1:
            # Grouped ConvTranspose stores (in, out/groups, ...): an output channel is spread over
            # groups, so no contiguous split isolates it. Split finer: per (input, output) pair.
            yield BlockSpec(name=_join(path, "weight"), shape=tuple(w.shape), rule="rows",
                            reason=f"{kind} (grouped): one block per input x output channel pair (conv='channel')",
                            role="conv", block_dims=(0, 1), segments=((w.shape[0] * w.shape[1], 1),))
        elif ctx.conv == "channel":
            # ConvTranspose stores (in, out, ...): its output channels are dim 1.
            rule = "cols" if module.transposed else "rows"
            yield make_spec(_join(path, "weight"), w.shape, rule, f"{kind}: one block per output channel (conv='channel')", role="conv")
        elif _is_patch_projection(module):  # (a Linear on non-overlapping patches, wherever it sits)
            yield make_spec(_join(path, "weight"), w.shape, "rows",
                            f"{kind} patch projection (kernel = stride, no padding): one block per output channel",
                            role="embedding")
        else:
            yield make_spec(_join(path, "weight"), w.shape, "whole", f"{kind}: one block (conv='whole')", role="conv")
        yield from _bias_spec(path, module)
