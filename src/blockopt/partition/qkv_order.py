"""The order of query, key and value rows inside a fused projection (``qkv``, ``Wqkv``, ...).

Shapes cannot tell it: ``[q heads | k heads | v heads]`` (timm, nanoGPT, Phi-3, MPT, Qwen2-VL's
vision tower), ``[q k v]`` per head (GPT-NeoX, Bloom, Persimmon, DeBERTa's ``in_proj``, MiniMax's
lightning attention), per KV group (Falcon), or CodeGen's four partitions of ``[q | v | k]`` all
have the same shape. Read wrongly, q/k heads get one block per row and value heads one block per
head (with ``value="whole"``, one block holding q and k heads too), and nothing says so.

`qkv_layout` answers from, in order: the families whose order is known (`_KNOWN`, read from their
forward code), then the module's own source, where a concatenated order shows in how the
projection's output is split (`_reads_concatenated`). ``None`` means it could not tell: the
caller plans the concatenated order and warns.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch.nn as nn

# Class-name prefixes -> layout, from each family's forward (transformers 5.x):
#   per_head: GPT-NeoX/Bloom `view(b, t, heads, 3, hd)`; Persimmon `_split_heads` the same;
#     MiniMax lightning `reshape(b, t, heads, 3 * hd)` then `split(hd)`; DeBERTa (v1)
#     `transpose_for_scores(qp).chunk(3, dim=-1)` on (b, heads, t, 3 * hd).
#   codegen: `view(..., mp_num, 3 * local_dim).split(local_dim)` into query, value, key.
#   concat: Ergo `view(..., -1, hd).split((heads, kv, kv), dim=-2)` (the source reader cannot see it).
_KNOWN = (
    (("GPTNeoX", "Bloom", "Persimmon", "MiniMaxLightning", "DisentangledSelfAttention"), "per_head"),
    (("CodeGen",), "codegen"),
    (("Ergo",), "concat"),
)

_SPLITS = ("split", "chunk", "unbind", "tensor_split")
_RESHAPES = ("view", "reshape", "unflatten")
# elementwise methods that keep the row order: looked through
_KEEP_ORDER = ("clamp", "clamp_", "to", "float", "half", "bfloat16", "contiguous", "clone", "type", "type_as")


def qkv_layout(module: nn.Module, attr: str, parts: int = 3) -> str | None:
    """The row order of ``module.<attr>``, a fused q/k/v projection (``parts=2``: a fused k/v):
    ``"concat"``, ``"per_head"``, ``"per_group"``, ``"multi_query"``, ``"codegen"``, or None
    when unknown."""
    if parts != 3:
        return "concat" if _reads_concatenated(type(module), attr, parts) else None
    kind = type(module).__name__
    if hasattr(module, "new_decoder_architecture"):  # Falcon
        if module.new_decoder_architecture:
            return "per_group"
        return "multi_query" if getattr(module, "multi_query", False) else "per_head"
    if kind.startswith("GPTBigCode"):  # multi-query: [q | k | v]; else [q k v] per head
        return "concat" if getattr(module, "multi_query", True) else "per_head"
    for prefixes, layout in _KNOWN:
        if kind.startswith(prefixes):
            return layout
    return "concat" if _reads_concatenated(type(module), attr, parts) else None


@functools.lru_cache(maxsize=256)
def _reads_concatenated(cls: type, attr: str, parts: int) -> bool:
    """Whether ``cls``'s code splits the output of ``self.<attr>(...)`` as ``[q | k | v]``: the
    first thing done to it (chained, or to the name it is assigned to) is one of
    ``.split(width)`` / ``.split([w_q, w_k, w_v])`` (a size that does not mention heads),
    ``.chunk(3)``, a slice of its last dim, or a reshape with a bare ``3`` right after the token
    dims or before a head count (``reshape(b, n, 3, heads, hd)``). A reshape that puts heads first
    (``(b, t, heads, 3, hd)``, ``3 * head_dim``), a call into another function, or no source at
    all: False."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return False
    verdicts = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            verdicts += _verdicts_in(func, attr, parts)
    return bool(verdicts) and all(verdicts)


def _is_projection_call(node: ast.AST, attr: str, me: str) -> bool:
    """``self.<attr>(...)`` (``me``: the method's first argument), possibly wrapped in one call
    (``self.act(self.qkv(x))``)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == attr and isinstance(f.value, ast.Name) and f.value.id == me:
        return True
    return len(node.args) == 1 and _is_projection_call(node.args[0], attr, me)


def _verdicts_in(func: ast.FunctionDef, attr: str, parts: int) -> list[bool]:
    """One verdict per use of ``self.<attr>(...)`` in ``func``: whether its first use reads as concatenated."""
    if not func.args.args:
        return []
    me = func.args.args[0].arg
    parents = {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
    out = []
    for node in ast.walk(func):
        if not _is_projection_call(node, attr, me) or _is_projection_call(parents.get(node), attr, me):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call):
            out.append(_concatenated_use(parent.attr, parents[parent], parts))
        elif isinstance(parent, ast.Subscript):
            out.append(_concatenated_slice(parent))
        elif isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name):
            out.append(_first_use_concatenated(func, parent, parent.targets[0].id, parents, parts))
        else:
            out.append(False)
    return out


def _first_use_concatenated(func: ast.FunctionDef, assign: ast.Assign, name: str, parents: dict, parts: int) -> bool:
    """The verdict on the first use of ``name`` after ``assign`` in ``func``, in source order."""
    uses = sorted((n for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                   and (n.lineno, n.col_offset) > (assign.lineno, assign.col_offset)),
                  key=lambda n: (n.lineno, n.col_offset))
    if not uses:
        return False
    for use in uses:
        parent = parents.get(use)
        if not (isinstance(parent, ast.Attribute) and parent.attr in _KEEP_ORDER and isinstance(parents.get(parent), ast.Call)):
            break  # (`x = x.clamp(...)` keeps the order: the next use says)
    if isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call):
        return _concatenated_use(parent.attr, parents[parent], parts)
    if isinstance(parent, ast.Subscript):
        return _concatenated_slice(parent)
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is use:  # torch.split(name, ...)
        f = parent.func
        method = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        rest = ast.Call(func=f, args=parent.args[1:], keywords=parent.keywords)
        return method in _SPLITS and _concatenated_use(method, rest, parts)
    return False


def _mentions_heads(node: ast.AST) -> bool:
    return "head" in ast.unparse(node).lower()


def _concatenated_use(method: str, call: ast.Call, parts: int) -> bool:
    args = call.args
    if method in ("split", "tensor_split"):
        return bool(args) and not _mentions_heads(args[0])
    if method == "chunk":
        return bool(args) and isinstance(args[0], ast.Constant) and args[0].value == parts
    if method in _RESHAPES:
        sizes = args[0].elts if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else args
        at = next((i for i, size in enumerate(sizes) if isinstance(size, ast.Constant) and size.value == parts), None)
        if at is None:
            return False
        before, after = sizes[:at], sizes[at + 1:]
        if any(_mentions_heads(size) or str(parts) in ast.unparse(size) for size in before):
            return False  # heads before the 3, or a 3 folded into a size (3 * head_dim)
        # the 3 right after the token dims (at most two, or one starred shape), or before a head count
        return len(before) <= 2 or any(_mentions_heads(size) for size in after)
    return False


def _concatenated_slice(sub: ast.Subscript) -> bool:
    """``out[..., :q_end]``: a range of the last dim, in the order the rows are stored."""
    index = sub.slice
    elts = index.elts if isinstance(index, ast.Tuple) else [index]
    return len(elts) >= 2 and isinstance(elts[0], ast.Constant) and elts[0].value is Ellipsis and isinstance(elts[-1], ast.Slice)
