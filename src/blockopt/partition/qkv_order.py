"""The order of query, key and value rows inside a fused projection (``qkv``, ``Wqkv``, ...).

Shapes cannot tell it: ``[q heads | k heads | v heads]`` (timm, nanoGPT, Phi-3, MPT, Qwen2-VL's
vision tower), ``[q k v]`` per head (GPT-NeoX, Bloom, Persimmon, DeBERTa's ``in_proj``, MiniMax's
lightning attention), per KV group (Falcon), or CodeGen's four partitions of ``[q | v | k]`` all
have the same shape. Read wrongly, q/k heads get one block per row and value heads one block per
head (with ``value="whole"``, one block holding q and k heads too), and nothing says so.

`qkv_layout` answers from, in order: the families whose order is known (`_KNOWN`, read from their
forward code), then the module's own source, where a concatenated order shows in how the
projection's output is split (`_reads_concatenated`). ``None`` means it could not tell: the
caller plans one block per row and warns (``rules={name: "heads"}`` confirms ``[q | k | v]``).
The reader errs towards None: a wrong ``"concat"`` is silent, a wrong None only warns.
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

_SPLITS = ("split", "chunk", "tensor_split")
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
    first thing done to it (chained, or to the name it is bound to; order-keeping calls such as
    ``.contiguous()`` looked through) is one of ``.split(width)`` / ``.split([w_q, w_k, w_v])``
    (a width that does not mention heads), ``.chunk(3)``, a slice of its last dim, or a reshape
    whose bare ``3`` comes before two sizes or more, heads and head size (``reshape(b, n, 3,
    heads, hd)``). Anything else is not read as concatenated: a reshape with a single size after
    the 3 (``(b, t, heads, 3, hd)`` is per head, whatever its names), heads or a folded 3 before
    it (``3 * head_dim``), a call into a function other than the class's own methods (followed),
    or no source that is surely the class's."""
    source = _class_source(cls)
    if source is None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):
        return False
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    methods = {f.name: f for f in functions}
    verdicts = [v for func in functions for v in _verdicts_in(func, attr, parts, methods)]
    return bool(verdicts) and all(verdicts)


def _class_source(cls: type) -> str | None:
    """``cls``'s source, only when its own methods' code lies in it: ``inspect`` finds a class by
    name in its file, and a file defining the name twice (``if flash: class Attention ... else:
    class Attention ...``) hands back the first."""
    try:
        lines, start = inspect.getsourcelines(cls)
        path = inspect.getsourcefile(cls)
    except (OSError, TypeError):
        return None
    codes = [inspect.unwrap(f).__code__ for f in vars(cls).values() if inspect.isfunction(f)]
    here = [code.co_firstlineno for code in codes if code.co_filename == path]  # (a decorator's own code lies elsewhere)
    if not here or not all(start <= line < start + len(lines) for line in here):
        return None
    return "".join(lines)


def _is_projection_call(node: ast.AST, attr: str, me: str, methods: dict) -> bool:
    """``self.<attr>(...)`` (``me``: the method's first argument), possibly wrapped in one call
    (``self.act(self.qkv(x))``) that is not one of the class's methods (those are followed)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    on_me = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == me
    if on_me and f.attr == attr:
        return True
    if on_me and f.attr in methods:
        return False
    return len(node.args) == 1 and _is_projection_call(node.args[0], attr, me, methods)


def _verdicts_in(func: ast.FunctionDef, attr: str, parts: int, methods: dict) -> list[bool]:
    """One verdict per use of ``self.<attr>(...)`` in ``func``: whether its first use reads as concatenated."""
    if not func.args.args:
        return []
    me = func.args.args[0].arg
    parents = _parents(func)
    return [_verdict(node, func, parents, parts, methods) for node in ast.walk(func)
            if _is_projection_call(node, attr, me, methods) and not _is_projection_call(parents.get(node), attr, me, methods)]


def _parents(func: ast.AST) -> dict:
    return {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}


def _verdict(node: ast.AST, func: ast.FunctionDef, parents: dict, parts: int, methods: dict, depth: int = 0) -> bool:
    """Whether what is first done to ``node`` (an expression holding the projection's output)
    reads it as concatenated; into a method of the class it is handed to (``self._split_heads(x)``)
    too, where its parameter's first use says."""
    while True:  # look through order-keeping calls chained on it: x.contiguous().view(...)
        parent = parents.get(node)
        if not (isinstance(parent, ast.Attribute) and parent.attr in _KEEP_ORDER):
            break
        call = parents.get(parent)
        if not (isinstance(call, ast.Call) and call.func is parent):
            break
        node = call
    if isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call) and parents[parent].func is parent:
        return _concatenated_use(parent.attr, parents[parent], parts)
    if isinstance(parent, ast.Subscript) and parent.value is node:
        return _concatenated_slice(parent)
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:  # torch.split(x, ...)
        f = parent.func
        method = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        me = func.args.args[0].arg if func.args.args else None
        helper = methods.get(method) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
            and f.value.id == me else None
        if helper is not None and len(helper.args.args) >= 2 and depth < 8:  # self._split_heads(x)
            return _name_verdict(helper.args.args[1].arg, (helper.lineno, helper.col_offset), helper,
                                 _parents(helper), parts, methods, depth + 1)
        rest = ast.Call(func=f, args=parent.args[1:], keywords=parent.keywords)
        return method in _SPLITS and _concatenated_use(method, rest, parts)
    if isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name) \
            and depth < 8:  # bound to a name: every use of that value says (x = x.clamp(...) included)
        return _name_verdict(parent.targets[0].id, (parent.end_lineno, parent.end_col_offset), func, parents, parts,
                             methods, depth + 1)
    return False


_NEUTRAL = ("size", "shape", "dim", "ndim", "dtype", "device", "numel", "is_contiguous")


def _name_verdict(name: str, after: tuple[int, int], func: ast.FunctionDef, parents: dict, parts: int, methods: dict,
                  depth: int) -> bool:
    """Whether every use of the value bound to ``name`` at ``after`` reads it as concatenated, in
    every branch (``if mqa: x.split([...]) else: x.view(heads, 3 * hd)`` reads per head in one):
    the uses up to the name's next binding, less those that read only its size."""
    def at(n):
        return (n.lineno, n.col_offset)

    rebound = [(a.end_lineno, a.end_col_offset) for a in ast.walk(func) if isinstance(a, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == name for t in ast.walk(ast.Tuple(elts=a.targets)))
               and (a.end_lineno, a.end_col_offset) > after]
    uses = sorted((n for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                   and at(n) > after), key=at)
    verdicts = []
    for use in uses:
        if any(after < end <= at(use) for end in rebound):
            break  # (a new value from here on)
        parent = parents.get(use)
        if isinstance(parent, ast.Attribute) and parent.attr in _NEUTRAL:
            continue
        verdicts.append(_verdict(use, func, parents, parts, methods, depth))
        top = use  # `x = x.clamp(...)`: the verdict above followed the new value already
        while isinstance(parents.get(top), ast.Attribute) and isinstance(parents.get(parents[top]), ast.Call):
            top = parents[parents[top]]
        if isinstance(parents.get(top), ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                            for t in parents[top].targets):
            break
    return bool(verdicts) and all(verdicts)


def _mentions_heads(node: ast.AST) -> bool:
    return "head" in ast.unparse(node).lower()


def _concatenated_use(method: str, call: ast.Call, parts: int) -> bool:
    args = call.args
    if not args:
        return False
    size = args[0]
    if method == "split":  # explicit sizes in order, or a width (not a head's size)
        return _along_features(call, 1) and (
            (isinstance(size, (ast.Tuple, ast.List)) and len(size.elts) == parts) or
            (not isinstance(size, (ast.Tuple, ast.List)) and not _mentions_heads(size)))
    if method in ("chunk", "tensor_split"):
        return _along_features(call, 1) and isinstance(size, ast.Constant) and size.value == parts
    if method == "unflatten":  # unflatten(dim, sizes): the sizes of the fused dim alone
        inner = args[1] if len(args) > 1 else next((k.value for k in call.keywords if k.arg == "sizes"), None)
        return not (isinstance(size, ast.Constant) and size.value == 0) and \
            isinstance(inner, (ast.Tuple, ast.List)) and bool(inner.elts) and \
            isinstance(inner.elts[0], ast.Constant) and inner.elts[0].value == parts
    if method in _RESHAPES:
        sizes = size.elts if len(args) == 1 and isinstance(size, (ast.Tuple, ast.List)) else args
        at = next((i for i, s in enumerate(sizes) if isinstance(s, ast.Constant) and s.value == parts), None)
        if at is None:
            return False
        before, after = sizes[:at], sizes[at + 1:]
        if any(_mentions_heads(s) or str(parts) in ast.unparse(s) for s in before):
            return False  # heads before the 3, or a 3 folded into a size (3 * head_dim)
        # (3, heads, head size): the 3 splits the width before the heads do; a single size
        # after it, (heads, 3, hd), is per head whatever the names say
        return len(after) >= 2 and not any(isinstance(s, ast.Starred) for s in after)
    return False


def _along_features(call: ast.Call, position: int) -> bool:
    """Whether a split's ``dim`` (keyword, or argument ``position``) is given and is not 0: a
    split without one cuts dim 0, the batch, not the projection's features."""
    dim = call.args[position] if len(call.args) > position else next((k.value for k in call.keywords if k.arg == "dim"), None)
    return dim is not None and not (isinstance(dim, ast.Constant) and dim.value == 0)


def _concatenated_slice(sub: ast.Subscript) -> bool:
    """``out[..., a:b]``: a range of the last dim, in the order the rows are stored (a step,
    ``out[..., 0::3]``, takes every third row: interleaved)."""
    index = sub.slice
    elts = index.elts if isinstance(index, ast.Tuple) else [index]
    last = elts[-1]
    return len(elts) >= 2 and isinstance(elts[0], ast.Constant) and elts[0].value is Ellipsis and \
        isinstance(last, ast.Slice) and last.step is None
