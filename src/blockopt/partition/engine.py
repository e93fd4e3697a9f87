"""`partition()`: a model (or its named parameters) -> a `Plan`.

The engine is pure: it reads shapes and module structure (so it works on the ``meta`` device)
and touches no optimizer. Steps: (1) ask the adapters about every module, outermost first, first
claim wins; (2) give every unclaimed parameter a safe fallback (never a silent ``whole`` on a
matrix); (3) apply the user's ``rules`` overrides, first matching glob wins; (4) warn about
every module whose class says attention but in which no adapter recognised any part of
attention, unless the user's rules set its tensors.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
import torch.nn as nn

from ..validation import boolean, caller_stacklevel, choice, integer, validate
from .adapters import ADAPTERS, ATTENTION_CLASS
from .context import Context
from .experts import expert_output_dim, expert_rows_spec
from .plan import Plan
from .spec import RULES, BlockSpec, make_spec

# partition()'s arguments other than the model and the rules
ARGUMENTS = {
    **{name: integer(1, optional=True) for name in ("n_heads", "n_kv_heads", "head_dim", "dim")},
    "value": choice("rows", "whole"),
    "conv": choice("whole", "channel"),
    "frozen": boolean(),
}


class PartitionWarning(UserWarning):
    """Detection was unsure and fell back to a safe (finer) layout."""


def partition(
    model: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    rules: Mapping[str, str] | None = None,
    value: str = "rows",
    conv: str = "whole",
    dim: int | None = None,
    frozen: bool = False,
) -> Plan:
    """Partition a model's trainable parameters into Adam-mini blocks (Principle 1).

    Args:
        model: an ``nn.Module`` (structure is read: module types, attention geometry, HF config,
            tied weights), or ``named_parameters()`` pairs (then names and shapes are all there is,
            as in the official adam-mini package).
        n_heads / n_kv_heads / head_dim: override the detected attention geometry (all attention
            modules). Needed with named parameters for query/key to be split by head. A user
            ``n_heads`` alone sets the head size from the width, ``head_dim`` alone the head
            counts; both must make the query width (``n_heads * head_dim``), else ValueError.
        rules: ``{glob on parameter names: rule}``, first match wins; rules are ``rows``, ``cols``,
            ``heads``, ``whole``, ``coordinate`` (``{"*": "coordinate"}`` gives AdamW).
            ``rows``/``cols`` are storage dims (dim 0 / dim 1).
        value: ``"rows"`` (one block per output neuron, default) or ``"whole"`` for attention values.
        conv: ``"whole"`` (one block per conv weight, default) or ``"channel"`` (per output channel).
        dim: the model width (adam-mini's argument). Head sizes come from widths; with named
            parameters it tells which side of a stacked expert tensor is the hidden size.
        frozen: also plan the module's parameters with ``requires_grad=False``, from the same
            structure (an optimizer built from a module does this, so a layer unfrozen later
            trains with its own blocks). Detection doubts about frozen tensors are not warned
            about. (Default: False: trainable parameters only)
    """
    validate(ARGUMENTS, dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, value=value, conv=conv,
                             frozen=frozen))
    if n_heads and n_kv_heads and n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (each KV head serves a group of query heads)")
    if dim and n_heads and dim % n_heads and head_dim is None:
        raise ValueError(f"n_heads={n_heads} does not divide dim={dim}; pass head_dim= if heads are not dim/n_heads wide")
    ctx = Context(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, value=value, conv=conv)

    unsure: list[str] = []  # parameters no adapter recognised (each got a safe fallback)
    if isinstance(model, torch.jit.ScriptModule):  # (its submodules are not nn.Modules' structure)
        raise TypeError(f"cannot plan a TorchScript module ({type(model).__name__}): pass the model before "
                        "torch.jit.script, or its named_parameters() (blocks from names and shapes)")
    if model is None or isinstance(model, (str, bytes, torch.Tensor)):
        raise TypeError(f"partition takes an nn.Module or (name, tensor) pairs, got {type(model).__name__}")
    if isinstance(model, nn.Module):
        specs = _detect_module(model, ctx, unsure, frozen=frozen)
    else:
        specs = _detect_named(list(model), ctx, unsure)
    overridden: set[str] = set()
    if rules:
        specs, overridden = _apply_rules(specs, rules, ctx)
        unsure = [n for n in unsure if n not in overridden]
        ctx.drop_answered(overridden)
    if isinstance(model, nn.Module):
        quiet = overridden | {n for n, p in model.named_parameters() if not p.requires_grad}
        ctx.warnings.extend(_unrecognised_attention(ctx, {s.name: s for s in specs if s.name not in quiet}))
    if unsure:
        names = collapse_names(unsure)
        ctx.warnings.append(
            f"no adapter recognised {', '.join(names)}: one block per vector along the last dim (per output neuron "
            "only for a weight stored (out, in) as nn.Linear's; for one the forward uses as (in, out), or stacked "
            f"experts (E, in, out), pass rules={{{names[0]!r}: 'coordinate'}} (always safe) or the rule that fits)")
    found = tuple(collapse_names(ctx.warnings))
    if found:
        warnings.warn("blockopt.partition fell back to safe layouts: " + "; ".join(found), PartitionWarning,
                      stacklevel=caller_stacklevel())
    return Plan(specs, found)


def _glob(path: str) -> str:
    """``layers.3.attn`` -> ``layers.*.attn``: the path of every layer of a stack."""
    return ".".join("*" if part.isdigit() else part for part in path.split(".")) if path else path


_INDEX = re.compile(r"(?<![^.\s(,'\"{])\d+(?=\.)|(?:^|(?<=\.))\d+(?=:)")  # a numeric path component: the 3 of layers.3.mlp


def collapse_names(texts: list[str]) -> list[str]:
    """Texts that differ only in numeric path components (the layers of a stack) said once, with
    the differing numbers as ``*`` (a glob that `rules` accepts) and how many there were."""
    groups: dict[str, list[str]] = {}
    for t in texts:
        groups.setdefault(_INDEX.sub("*", t), []).append(t)
    out = []
    for key, members in groups.items():
        members = list(dict.fromkeys(members))
        out.append(members[0] if len(members) == 1 else f"{key} (x{len(members)})")
    return out


# ---- modules -----------------------------------------------------------------------------
def _detect_module(model: nn.Module, ctx: Context, unsure: list[str], *, frozen: bool = False) -> list[BlockSpec]:
    # Every name of every tensor; tied tensors keep their first name as canonical. Frozen tensors
    # are claimed too (a LoRA factor takes the role of the frozen layer it adapts), and planned
    # only with ``frozen``.
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    canonical = {n: ns[0] for ns in names.values() for n in ns}
    planned = names if frozen else {pid: ns for pid, ns in names.items() if tensors[pid].requires_grad}
    if not planned:
        raise ValueError("the model has no parameters" if frozen else
                         "the model has no trainable parameters (all have requires_grad=False)")

    ctx.root = model
    ctx.modules = dict(model.named_modules(remove_duplicate=False))
    ctx.token_vocab = _token_vocab(model)

    claims = ctx.claimed  # canonical name -> spec
    for path, module in ctx.modules.items():
        for adapter in ADAPTERS:
            for spec in adapter(path, module, ctx):
                key = canonical.get(spec.name)
                if key is not None and key not in claims:
                    claims[key] = spec  # else: claimed by an outer/earlier adapter

    specs = []
    for pid, ns in planned.items():
        p, key = tensors[pid], ns[0]
        spec = claims.get(key) or _fallback(key, tuple(p.shape), unsure if p.requires_grad else [])
        if tuple(spec.shape) != tuple(p.shape):
            raise RuntimeError(f"adapter produced shape {spec.shape} for {key} of shape {tuple(p.shape)}")
        specs.append(replace(spec, name=key, aliases=tuple(ns[1:])))
    return specs


# Roles that show an adapter understood a module as attention, and the generic roles of what no
# adapter understood (embedding-like tables in an attention module, such as relative position
# biases, are understood).
ATTENTION_ROLES = ("query", "key", "qkv", "value", "attn_out")
GENERIC_ROLES = ("linear", "other", "conv")


def _unrecognised_attention(ctx: Context, specs: dict[str, BlockSpec]) -> list[str]:
    """A warning for each module that says it is attention (its class name) but holds no tensor an
    adapter recognised as part of attention, only generic matrices (one block per row or
    neuron): naming the tensors and what to pass. ``specs``: the trainable tensors still to warn
    about (the user's rules answer the warning)."""
    recognised = set()
    for name, spec in ctx.claimed.items():
        if spec.role in ATTENTION_ROLES:
            parts = name.split(".")
            recognised.update(".".join(parts[:i]) for i in range(len(parts)))
    hits = []
    for path, module in ctx.modules.items():
        if path in recognised or not ATTENTION_CLASS.search(type(module).__name__):
            continue
        prefix = f"{path}." if path else ""
        mats = [prefix + n for n, p in module.named_parameters()
                if p.ndim >= 2 and prefix + n in specs and specs[prefix + n].role in GENERIC_ROLES]
        if mats:
            hits.append((path, mats))
    # an outer module holding an unrecognised inner one is reported for its own tensors only (a
    # bottleneck block around an attention: its convs); the layers of a stack once, as a glob
    paths = [path for path, _ in hits]
    stacks: dict[str, list[tuple[str, list[str]]]] = {}
    for path, mats in hits:
        inner = [q for q in paths if q != path and (not path or q.startswith(f"{path}."))]
        own = [m for m in mats if not any(m.startswith(f"{q}.") for q in inner)]
        if own:
            stacks.setdefault(_glob(path), []).append((path, own))
    out = []
    for glob, members in stacks.items():
        path, mats = members[0]
        by_layout: dict[str, list[str]] = {}  # what each tensor got, said as it is
        for m in mats:
            by_layout.setdefault(_GOT.get(specs[m].rule, f"rule {specs[m].rule!r}"), []).append(glob + m[len(path):])
        got = "; ".join(f"{', '.join(names)} get {layout}" for layout, names in by_layout.items())
        count = f" ({len(members)} modules)" if len(members) > 1 else ""
        out.append(
            f"{glob or 'the model'} ({type(ctx.modules[path]).__name__}{count}) looks like attention but no adapter "
            f"recognised its query/key: {got}; pass n_heads=/n_kv_heads= if it has q/k/v "
            "projections, or rules={...} for these tensors, or register an adapter"
        )
    return out


# what a generic tensor of an unrecognised attention got, for its warning
_GOT = {"rows": "one block per row", "cols": "one block per column",
        "whole": "one block each, across any heads they hold (a convolution: conv='channel' gives one per output "
                 "channel, the safe side)"}


def _token_vocab(model: nn.Module) -> int | None:
    """Rows of the token embedding: the model's own input embedding, else the largest Embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
            if isinstance(emb, nn.Embedding):
                return emb.num_embeddings
        except (NotImplementedError, AttributeError, TypeError):
            pass
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


_RELATIVE_POSITION = re.compile(r"rel(ative)?_?pos")
_MODULATION = re.compile(r"scale_shift|shift_scale|modulation")


def _fallback(name: str, shape: tuple[int, ...], unsure: list[str]) -> BlockSpec:
    """Layouts for parameters no adapter recognised. Finer than the Hessian blocks is safe (it
    moves toward Adam); coarser is what causes loss spikes. So: matrices by rows, with a warning;
    vectors, scalars and tables named as biases, relative positions or norm modulations per
    coordinate (exactly Adam), with none."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) <= 1 or math.prod(shape) in shape:  # a scalar, or one vector in any size-1 dims: (1, 1, D)
        why = "bias: per-coordinate (Adam)" if "bias" in leaf else "unrecognised vector/scalar: per-coordinate (Adam, the safe choice)"
        return make_spec(name, shape, "coordinate", why, role="bias" if "bias" in leaf else "other")
    if "bias" in leaf.lower() or _RELATIVE_POSITION.search(leaf.lower()):
        # attention's small learned tables: relative position biases (Swin, BEiT: positions x heads),
        # relative position embeddings (SAM's rel_pos_h), per-head content biases (conformer's
        # bias_u): nothing says their blocks, and per coordinate is Adam, never wrong
        return make_spec(name, shape, "coordinate", "bias / relative-position table: per-coordinate (Adam, the safe choice)",
                         role="bias")
    if _MODULATION.search(leaf.lower()):  # adaLN's shift/scale/gate vectors (PixArt, Sana, Wan: (6, D)): norm scales and shifts
        return make_spec(name, shape, "coordinate", "adaptive-norm modulation table: per-coordinate (Adam, the safe choice)",
                         role="norm")
    unsure.append(name)
    if len(shape) == 2:
        return make_spec(name, shape, "rows", "unrecognised: one block per row (safe fallback)", role="other")
    # N-D: one block per vector along the last dim, so a leading dim of size 1 (ViT's (1, T, D)
    # position table) can't collapse the tensor into one block.
    return BlockSpec(name=name, shape=shape, rule="rows", role="other",
                     reason="unrecognised: one block per last-dim vector (safe fallback)",
                     block_dims=tuple(range(len(shape) - 1)), segments=((math.prod(shape[:-1]), 1),))


# ---- named parameters (no module) -----------------------------------------------------
# With only names there is no structure to read; these are the conventions of the official
# package and of common model code, matched on whole dotted components, not substrings.
_NAME_ROLES = (
    ("embedding", ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed", "embd", "embedding", "embeddings")),
    ("head", ("lm_head", "output", "final_layer")),
    ("query", ("q_proj", "wq", "query", "q")),
    ("key", ("k_proj", "wk", "key", "k")),
    ("value", ("v_proj", "wv", "value", "v")),
    ("attn_out", ("o_proj", "wo", "out_proj")),
)


# MLP layers whose names say nn.Linear, (out, in): per row is one block per output neuron. Other
# names under an MLP (GPT-2's c_fc/c_proj are Conv1D, (in, out), in transformers, but nn.Linear
# in nanoGPT) say nothing of the orientation: planned per row, with a warning.
_LINEAR_FFN_NAMES = frozenset({
    "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "fc_in", "fc_out",
    "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1", "gate_up_proj",
    "gate", "router", "shared_expert_gate",  # MoE routers: nn.Linear (experts, hidden)
})


def _owner(name: str) -> str:
    """The name of the module holding parameter ``name`` (``""`` at the top)."""
    parts = name.lower().split(".")
    return parts[-2] if len(parts) > 1 else ""


def _named_role(name: str, shape: tuple[int, ...]) -> str:
    parts = name.lower().split(".")
    leaf, owners = parts[-1], parts[:-1]
    if "bias" in leaf:
        return "bias"
    for role, keys in _NAME_ROLES:
        if any(o in keys for o in owners[-1:]):
            return role
    if any("norm" in o or o.startswith("ln") for o in owners[-1:]) and len(shape) == 1:
        return "norm"
    if any(h in o for o in owners for h in ("mlp", "feed_forward", "ffn")):
        return "ffn"
    return "other"


def _detect_named(named: list, ctx: Context, unsure: list[str]) -> list[BlockSpec]:
    if not named:
        raise ValueError("named parameters are empty: pass model.named_parameters() of a model with parameters")
    specs, seen, unoriented = [], set(), []
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, tensor) pairs such as model.named_parameters(), got {type(item).__name__}")
        name, p = item
        if name in seen:
            raise ValueError(f"parameter {name!r} is given twice; pass each parameter once")
        seen.add(name)
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        role = _named_role(name, shape)
        why = "its name (no module given)"  # (the name is the row's: a reason without it lets identical layers collapse)
        if role == "bias" or len(shape) == 0:
            specs.append(make_spec(name, shape, "coordinate", f"bias by {why}: per-coordinate", role="bias"))
        elif role == "norm":
            specs.append(make_spec(name, shape, "whole", f"norm by {why}: one block", role="norm"))
        elif len(shape) == 1:
            specs.append(make_spec(name, shape, "coordinate", f"vector by {why}: per-coordinate (safe)", role="other"))
        elif role in ("query", "key") and (ctx.n_heads or ctx.head_dim):
            heads = _named_heads(name, shape[0], role, ctx)
            specs.append(make_spec(name, shape, "heads", f"{role} by {why}: {heads} heads", role=role, n_heads=heads))
        elif role == "value" and ctx.value == "whole":
            specs.append(make_spec(name, shape, "whole", f"value by {why}: whole (value='whole')", role=role))
        elif len(shape) == 3 and shape[0] > 1 and role in ("ffn", "other"):
            specs.append(_named_experts(name, shape, why, ctx))
        else:
            if role in ("query", "key"):
                ctx.warnings.append(f"{name}: no n_heads given, split per neuron (pass n_heads=/n_kv_heads=, or the model itself)")
            elif role == "other":
                unsure.append(name)
            elif role == "ffn" and len(shape) == 2 and _owner(name) not in _LINEAR_FFN_NAMES:
                unoriented.append(name)
            specs.append(make_spec(name, shape, "rows", f"{role} by {why}: per row", role=role))
    if unoriented:
        ctx.warn(
            f"{', '.join(collapse_names(unoriented))}: MLP weights whose names do not say their orientation, planned per "
            "row as nn.Linear (out, in) stores them; a Conv1D (transformers' GPT-2) stores (in, out), whose blocks are "
            "its columns: pass the model itself, or rules={'*.mlp.*.weight': 'cols'}", *unoriented
        )
    if not specs:
        raise ValueError("no trainable parameters (all have requires_grad=False)")
    return specs


def _named_experts(name: str, shape: tuple[int, ...], why: str, ctx: Context) -> BlockSpec:
    """A 3-D tensor seen by name only: stacked experts ``(E, ., .)``, one block per expert per
    output neuron, as the module path gives them. The output dim is the one name and ``dim`` (the
    hidden size) confirm; else dim 1, the (E, out, in) convention, with a warning."""
    out_dim = expert_output_dim(name, shape, ctx.dim)
    if out_dim is not None:
        return expert_rows_spec(name, shape, out_dim, f"experts by {why}: one block per expert per output neuron "
                                f"(dim {out_dim}: the name and dim={ctx.dim} say so)")
    ctx.warn(
        f"{name}: a 3-D tensor seen by name only, taken as stacked experts (E, out, in): one block per expert per "
        f"dim-1 row; pass the model instead of named_parameters() (its forward says which dim is the output), "
        f"or dim= (the hidden size), or rules={{{name!r}: 'coordinate'}}", name
    )
    return expert_rows_spec(name, shape, 1, f"3-D by {why}: one block per expert per dim-1 row (assumed (E, out, in))")


def _named_heads(name: str, width: int, role: str, ctx: Context) -> int:
    hd = ctx.head_dim
    if role == "key":
        heads, label = ctx.n_kv_heads or ctx.n_heads, "n_kv_heads" if ctx.n_kv_heads else "n_heads"
        if hd and not ctx.n_kv_heads:
            heads = width // hd if width % hd == 0 else None  # (GQA: the width says how many heads of hd)
    else:
        heads, label = ctx.n_heads, "n_heads"
        if hd and not heads:
            heads = width // hd if width % hd == 0 else None
    if hd and (not heads or heads * hd != width):
        problem = (f"{label}={heads} heads of head_dim={hd} make {heads * hd} rows, not the width {width} of {name}"
                   if heads else f"head_dim={hd} does not divide the width {width} of {name}")
        raise ValueError(f"{problem}; pass the model's real head geometry")
    if not heads or width % heads:
        raise ValueError(
            f"{label}={heads} does not divide the width {width} of {name}; pass the model's real head counts "
            "(n_kv_heads for keys under grouped-query attention)"
        )
    return heads


# ---- overrides --------------------------------------------------------------------------
def _apply_rules(specs: list[BlockSpec], rules: Mapping[str, str], ctx: Context) -> tuple[list[BlockSpec], set[str]]:
    """Specs with the user's rules applied, and the names those rules matched."""
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping {{glob: rule}}, got {type(rules).__name__}")
    for pattern, rule in rules.items():
        if rule not in RULES:
            raise ValueError(f"rules[{pattern!r}] = {rule!r} is not a rule; use one of {RULES}")
    used, matched = set(), set()
    out = []
    for spec in specs:
        for pattern, rule in rules.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in (spec.name, *spec.aliases)):
                used.add(pattern)
                matched.add(spec.name)
                if rule != spec.rule or rule == "heads":
                    spec = _override(spec, rule, pattern, ctx)
                else:
                    spec = replace(spec, reason=f"{spec.reason} (rules[{pattern!r}])")
                break
        out.append(spec)
    unused = [p for p in rules if p not in used]
    if unused:
        names = [n for s in specs for n in (s.name, *s.aliases)]
        shadowed = [p for p in unused if any(fnmatch.fnmatchcase(n, p) for n in names)]
        if shadowed:
            raise ValueError(
                f"rules pattern(s) {shadowed} only match parameters an earlier pattern already claimed "
                "(first match wins): put the more specific pattern first"
            )
        raise ValueError(f"rules pattern(s) {unused} match no trainable parameter; check the names in print(plan)")
    return out, matched


def _override(spec: BlockSpec, rule: str, pattern: str, ctx: Context) -> BlockSpec:
    why = f"user rule {pattern!r} -> {rule}"
    if rule == "heads" and spec.name in ctx.confirmable:  # a fused projection whose order the rule confirms
        confirmed = ctx.confirmable[spec.name]
        return replace(confirmed, reason=f"{confirmed.reason} ({why})")
    if rule == "heads":
        n = spec.n_heads or (ctx.n_kv_heads if spec.role in ("key", "value") and ctx.n_kv_heads else ctx.n_heads)
        neuron_dim = spec.block_dims[0] if len(spec.block_dims) == 1 else 0
        if spec.uniform or n is None:
            return spec.with_rule("heads", reason=why, n_heads=n, neuron_dim=neuron_dim)
        # a fused tensor already split by heads: keep its layout, note the rule matched
        return replace(spec, reason=f"{spec.reason} ({why})")
    return spec.with_rule(rule, reason=why)
