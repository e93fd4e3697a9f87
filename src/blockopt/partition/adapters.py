"""Architecture adapters: small functions that recognise a module by its structure and say how
its parameters split into blocks (Principle 1: one block per smallest dense Hessian sub-block).

An adapter is ``fn(path, module, ctx) -> iterable of BlockSpec`` for parameters it recognises
(its own or its children's; names are full dotted names). The engine asks every adapter about
every module, outermost module first, and the first claim on a parameter wins. So an attention
adapter claims ``q_proj``/``k_proj`` as heads before the generic Linear adapter would call them
rows. Adding an architecture = writing one adapter and registering it; no optimizer changes.

The built-in adapters share one module (over 400 lines) because their order of registration in
this file is the order in which they claim parameters: split up, that precedence would be hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch.nn as nn

from .context import Context, _int_attr
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
Q_NAMES = ("q_proj", "query", "q", "wq", "q_lin", "to_q", "query_proj")
K_NAMES = ("k_proj", "key", "k", "wk", "k_lin", "to_k", "key_proj")
V_NAMES = ("v_proj", "value", "v", "wv", "v_lin", "to_v", "value_proj")
O_NAMES = ("o_proj", "out_proj", "o", "wo", "out_lin", "c_proj", "proj", "dense")


def _conv1d_like(m: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2 family): a Linear that stores its weight as (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), nn.Parameter)


def _projection(m: nn.Module | None) -> tuple[int, int] | None:
    """(neuron dim, out width) of a Linear-like module, or None."""
    if isinstance(m, nn.Linear):
        return 0, m.out_features
    if m is not None and _conv1d_like(m):
        return 1, m.weight.shape[1]
    return None


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        c = module._modules.get(n)
        if c is not None and _projection(c) is not None:
            return n, c
    return None


def _heads_spec(path, child_name, child, n_heads, role, why) -> BlockSpec:
    dim, _ = _projection(child)
    return make_spec(_join(path, child_name + ".weight"), child.weight.shape, "heads", why, role=role,
                     n_heads=n_heads, neuron_dim=dim)


def _neuron_spec(path, child_name, child, role, why, rule=None) -> BlockSpec:
    dim, _ = _projection(child)
    rule = rule or ("rows" if dim == 0 else "cols")
    return make_spec(_join(path, child_name + ".weight"), child.weight.shape, rule, why, role=role)


@register_adapter
def separate_qkv_attention(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Attention with separate query/key/value projections (Llama, Mistral, Qwen2, Gemma, BERT,
    ViT, OPT, T5, in-house models): query and key by heads (key by KV heads under GQA), value by
    output neuron (or whole), output projection by output neuron."""
    q, k, v = _child(module, Q_NAMES), _child(module, K_NAMES), _child(module, V_NAMES)
    if not (q and k and v):
        return
    (qn, qm), (kn, km), (vn, vm) = q, k, v
    try:
        heads = ctx.attention_heads(module, _projection(qm)[1], _projection(km)[1], _join(path, qn + ".weight"))
    except LookupError as e:
        ctx.warnings.append(f"{path}: attention heads unknown ({e}); query/key fall back to one block per neuron")
        heads = None
    kind = type(module).__name__
    if heads:
        gqa = f", GQA {heads.n_heads}/{heads.n_kv_heads}" if heads.n_kv_heads != heads.n_heads else ""
        yield _heads_spec(path, qn, qm, heads.n_heads, "query", f"{kind} query: {heads.n_heads} heads ({heads.source}{gqa})")
        yield _heads_spec(path, kn, km, heads.n_kv_heads, "key", f"{kind} key: {heads.n_kv_heads} heads ({heads.source}{gqa})")
    else:
        yield _neuron_spec(path, qn, qm, "query", f"{kind} query: per neuron (head count unknown: safe fallback)")
        yield _neuron_spec(path, kn, km, "key", f"{kind} key: per neuron (head count unknown: safe fallback)")
    if ctx.value == "whole":
        yield _neuron_spec(path, vn, vm, "value", f"{kind} value: whole (value='whole')", rule="whole")
    else:
        yield _neuron_spec(path, vn, vm, "value", f"{kind} value: per output neuron")
    o = _child(module, O_NAMES)
    if o:
        yield _neuron_spec(path, o[0], o[1], "attn_out", f"{kind} output projection: per output neuron")
    for child in (q, k, v, o):
        if child:
            yield from _bias_spec(_join(path, child[0]), child[1])


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


# ---- fused query/key/value stored in one Linear (out = rows) -------------------------------
# The order of q, k and v inside a fused projection is a convention of each family's forward
# code; shapes alone can't tell it, so each layout is named here and chosen by structure.
def _qkv_segments(layout: str, n_heads: int, n_kv: int, hd: int, value_whole: bool) -> tuple[tuple[int, int], ...]:
    def v(rows: int) -> tuple[int, int]:
        return (rows, rows) if value_whole else (rows, 1)

    if layout == "concat":  # [q heads | k heads | v]: Phi-3 qkv_proj, timm qkv, MPT Wqkv
        return ((n_heads * hd, hd), (n_kv * hd, hd), v(n_kv * hd))
    if layout == "per_head":  # [q k v] for each head: GPT-NeoX, Bloom, Falcon-RW
        return ((hd, hd), (hd, hd), v(hd)) * n_heads
    if layout == "per_group":  # [q x (n/n_kv) | k | v] for each KV group: Falcon (new / multi-query)
        return ((n_heads // n_kv * hd, hd), (hd, hd), v(hd)) * n_kv
    raise ValueError(layout)


_FUSED_QKV_NAMES = ("query_key_value", "qkv_proj", "qkv", "Wqkv", "c_qkv", "in_proj")


def _fused_qkv_layout(module: nn.Module) -> str | None:
    kind = type(module).__name__
    if hasattr(module, "new_decoder_architecture"):  # Falcon
        if module.new_decoder_architecture:
            return "per_group"
        return "per_group" if getattr(module, "multi_query", False) else "per_head"
    if kind.startswith(("GPTNeoX", "Bloom", "GPTNeoXJapanese")):
        return "per_head"
    return "concat"


def _fused_geometry(module: nn.Module, ctx: Context, layout: str, out: int) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) of a fused projection with ``out`` rows: what is known
    (user, module, config) first; the rest derived from the width."""
    n_heads, n_kv, hd, _ = ctx.geometry(module)
    if layout == "per_head":
        n_kv = n_heads if n_heads else n_kv
    elif layout == "per_group" and not getattr(module, "new_decoder_architecture", True):
        n_kv = 1  # Falcon multi-query: one shared key and value
    per_q_head_units = {"per_head": 3}.get(layout)
    if hd is None and n_heads:
        kv = n_kv or n_heads
        rows_per = n_heads * per_q_head_units if per_q_head_units else n_heads + 2 * kv
        hd = out // rows_per if out % rows_per == 0 else None
    if n_heads is None and hd:
        n_heads = out // (3 * hd) if per_q_head_units else None
    if n_heads is None or hd is None:
        return None
    return n_heads, n_kv or n_heads, hd


@register_adapter
def fused_qkv_linear(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Attention whose query/key/value live in one Linear (GPT-NeoX and Bloom interleave them per
    head; Falcon groups them per KV head; Phi-3, timm ViT and MPT concatenate them)."""
    found = next(((n, module._modules[n]) for n in _FUSED_QKV_NAMES if isinstance(module._modules.get(n), nn.Linear)), None)
    if found is None or _child(module, Q_NAMES):
        return
    name, lin = found
    out, layout, kind = lin.out_features, _fused_qkv_layout(module), type(module).__name__
    heads = _fused_geometry(module, ctx, layout, out)
    if heads is None:
        ctx.warnings.append(f"{path}: head counts of fused {name} unknown; it falls back to one block per row")
    if heads is not None:
        n_heads, n_kv, hd = heads
        if (n_heads + 2 * n_kv) * hd != out or n_heads % n_kv:
            ctx.warnings.append(
                f"{path}.{name}: {out} rows do not fit {n_heads} query + 2x{n_kv} key/value heads of {hd}; one block per row"
            )
            heads = None
    if heads is None:
        yield make_spec(_join(path, name + ".weight"), lin.weight.shape, "rows",
                        f"{kind} fused {name}: per row (layout unsure: safe fallback)", role="qkv")
    else:
        value_whole = ctx.value == "whole" and layout == "concat"
        segs = _qkv_segments(layout, n_heads, n_kv, hd, value_whole)
        gqa = f", {n_kv} KV heads" if n_kv != n_heads else ""
        v_txt = "v whole" if value_whole else "v rows" + (" (per head: interleaved)" if ctx.value == "whole" else "")
        yield BlockSpec(
            name=_join(path, name + ".weight"), shape=tuple(lin.weight.shape), rule="heads", role="qkv",
            reason=f"{kind} fused {name} ({layout.replace('_', ' ')}): {n_heads} q heads{gqa}, {v_txt}",
            block_dims=(0,), segments=segs, n_heads=n_heads,
        )
    yield from _bias_spec(_join(path, name), lin)
    o = _child(module, O_NAMES)
    if o:
        yield _neuron_spec(path, o[0], o[1], "attn_out", f"{kind} output projection: per output neuron")
        yield from _bias_spec(_join(path, o[0]), o[1])


@register_adapter
def sibling_attention_output(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """BERT/ViT/RoBERTa: the attention's output projection sits in a sibling ``output.dense``."""
    inner = module._modules.get("self") or module._modules.get("attention")
    out = module._modules.get("output")
    if inner is None or out is None or not (_child(inner, Q_NAMES) and _child(inner, K_NAMES) and _child(inner, V_NAMES)):
        return
    dense = out._modules.get("dense")
    if isinstance(dense, nn.Linear):
        yield _neuron_spec(_join(path, "output"), "dense", dense, "attn_out",
                           f"{type(out).__name__} (attention output projection): per output neuron")


@register_adapter
def stacked_experts(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Mixture-of-experts weights stored as one 3-D tensor per projection, (E, out, in) (or
    (E, in, out) when the module says ``is_transposed``): one block per expert per output neuron."""
    n_experts = _int_attr(module, ("num_experts", "num_local_experts", "n_experts", "n_routed_experts"))
    if not n_experts:
        return
    out_dim = 2 if getattr(module, "is_transposed", False) else 1
    kind = type(module).__name__
    for attr, p in module.named_parameters(recurse=False):
        if p.ndim == 3 and p.shape[0] == n_experts:
            yield BlockSpec(
                name=_join(path, attr), shape=tuple(p.shape), rule="rows", role="ffn",
                reason=f"{kind} {attr}: one block per expert per output neuron ({n_experts} experts)",
                block_dims=(0, out_dim), segments=((n_experts * p.shape[out_dim], 1),),
            )
        elif p.ndim == 2 and p.shape[0] == n_experts and "bias" in attr:
            yield make_spec(_join(path, attr), p.shape, "coordinate", f"{kind} {attr}: expert biases per-coordinate", role="bias")
        elif p.ndim == 2 and p.shape[0] == n_experts:  # a router: (E, hidden) scores one expert per row
            yield make_spec(_join(path, attr), p.shape, "rows", f"{kind} router: one block per expert", role="router")
        elif p.ndim == 1 and "bias" in attr:
            yield make_spec(_join(path, attr), p.shape, "coordinate", "bias: per-coordinate (Adam)", role="bias")


@register_adapter
def embedding_tables(path: str, module: nn.Module, ctx: Context) -> Iterator[BlockSpec]:
    """Embedding modules that hold raw tables (ViT ``cls_token`` (1, 1, D), ``position_embeddings``
    (1, T, D), ...): one block per token vector. Patch projections (a conv applied to patches is a
    Linear on them) get one block per output channel."""
    if "embed" not in type(module).__name__.lower():
        return
    for attr, p in module.named_parameters(recurse=False):
        if p.ndim >= 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            yield BlockSpec(name=_join(path, attr), shape=tuple(p.shape), rule="rows", role="pos_embedding",
                            reason=f"{type(module).__name__}.{attr}: one block per token vector",
                            block_dims=tuple(range(p.ndim - 1)), segments=((p.numel() // p.shape[-1], 1),))
    for attr, child in module._modules.items():
        if isinstance(child, nn.modules.conv._ConvNd) and not child.transposed:
            yield make_spec(_join(path, attr + ".weight"), child.weight.shape, "rows",
                            f"{type(module).__name__} patch projection ({type(child).__name__}): one block per output channel",
                            role="embedding")


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
    """The standard layers: Embedding/Linear/Conv1D/norms/convolutions."""
    kind = type(module).__name__
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
        else:
            yield make_spec(_join(path, "weight"), w.shape, "whole", f"{kind}: one block (conv='whole')", role="conv")
        yield from _bias_spec(path, module)
