"""Architecture adapters: small functions that recognise a module by its structure and say how
its parameters split into blocks (Principle 1: one block per smallest dense Hessian sub-block).

An adapter is ``fn(path, module, ctx) -> iterable of BlockSpec`` for parameters it recognises
(its own or its children's; names are full dotted names). The engine asks every adapter about
every module, outermost module first, and the first claim on a parameter wins. So an attention
adapter claims ``q_proj``/``k_proj`` as heads before the generic Linear adapter would call them
rows. Adding an architecture = writing one adapter and registering it; no optimizer changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch.nn as nn

from .context import Context
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


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
_MLP_HINTS = ("mlp", "feedforward", "ffn", "expert", "intermediate", "swiglu", "geglu")


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
