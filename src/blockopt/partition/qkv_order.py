"""The order of query, key and value rows inside a fused projection (``qkv``, ``Wqkv``, ...).

Shapes cannot tell it: ``[q heads | k heads | v heads]`` (timm, nanoGPT, Phi-3, MPT, Qwen2-VL's
vision tower), ``[q k v]`` per head (GPT-NeoX, Bloom, Persimmon, DeBERTa's ``in_proj``, MiniMax's
lightning attention), per KV group (Falcon), or CodeGen's four partitions of ``[q | v | k]`` all
have the same shape. Read wrongly, q/k heads get one block per row and value heads one block per
head (with ``value="whole"``, one block holding q and k heads too), and nothing says so.

`qkv_layout` answers from, in order: the families whose order is known (`_KNOWN`, read from their
forward code), then the module's own source, where the order shows in how the projection's
output is split (`_reads`: concatenated, else per head), reading only the branches the instance's
configuration flags take. ``None`` means it could not tell: the caller plans one block per row
and warns (``rules={name: "heads"}`` confirms ``[q | k | v]``). The reader errs towards None: a
wrong layout is silent, a wrong None only warns.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch.nn as nn

from .context import _HEADS_ATTRS, _int_attr

# Class-name prefixes -> layout, from each family's forward (transformers 5.x):
#   per_head: GPT-NeoX/Bloom `view(b, t, heads, 3, hd)`; Persimmon `_split_heads` the same;
#     MiniMax lightning `reshape(b, t, heads, 3 * hd)` then `split(hd)`; DeBERTa (v1)
#     `transpose_for_scores(qp).chunk(3, dim=-1)` on (b, heads, t, 3 * hd).
#   codegen: `view(..., mp_num, 3 * local_dim).split(local_dim)` into query, value, key.
#   concat, in forms the source reader does not accept: Ergo `view(..., -1, hd).split((heads, kv,
#     kv), dim=-2)`; Hiera `reshape(b, tokens, windows, 3, heads, hd)`; Florence-2's channel
#     attention `reshape(b, n, 3, groups, c // groups)`.
# Matched only on transformers' own classes (a user class of a similar name is read from its source).
_KNOWN = (
    (("GPTNeoX", "Bloom", "Persimmon", "MiniMaxLightning", "DisentangledSelfAttention"), "per_head"),
    (("CodeGen",), "codegen"),
    (("Ergo", "HieraMaskUnitAttention", "Florence2VisionChannelAttention"), "concat"),
)

# elementwise methods that keep the row order: looked through
_KEEP_ORDER = ("clamp", "clamp_", "to", "float", "half", "bfloat16", "contiguous", "clone", "type", "type_as")
_NEUTRAL = ("size", "shape", "dim", "ndim", "dtype", "device", "numel", "is_contiguous")  # reads of the size only
_PART_LETTERS = {3: "qkv", 2: "kv"}


def qkv_layout(module: nn.Module, attr: str, parts: int = 3) -> str | None:
    """The row order of ``module.<attr>``, a fused q/k/v projection (``parts=2``: a fused k/v):
    ``"concat"``, ``"per_head"``, ``"per_group"``, ``"multi_query"``, ``"codegen"``, or None
    when unknown."""
    cls = type(module)
    if parts == 3 and cls.__module__.startswith("transformers."):  # (a user class of a similar name is read)
        kind = cls.__name__
        if hasattr(module, "new_decoder_architecture"):  # Falcon
            if module.new_decoder_architecture:
                return "per_group"
            return "multi_query" if getattr(module, "multi_query", False) else "per_head"
        if kind.startswith("GPTBigCode") and hasattr(module, "multi_query"):  # multi-query: [q | k | v]; else per head
            return "concat" if module.multi_query else "per_head"
        for prefixes, layout in _KNOWN:
            if kind.startswith(prefixes):
                return layout
    # the instance's configuration flags decide its `if self.<flag>:` branches (not `training`, which changes)
    flags = tuple((name, value) for name in _tested_flags(cls) if name != "training"
                  for value in [getattr(module, name, None)] if isinstance(value, bool))
    try:
        projection = getattr(module, attr, None)
        for layout in ("concat", "per_head") if parts == 3 else ("concat",):
            read, claims = _reads(cls, attr, parts, layout, flags)
            if read and all(_claim_holds(claim, module, projection, parts) for claim in claims):
                return layout
        return None
    except Exception:  # (the reader meets any code people write: what it cannot follow is unread, and warned)
        return None


@functools.lru_cache(maxsize=512)
def _reads(cls: type, attr: str, parts: int, layout: str, flags: tuple = ()) -> tuple[bool, tuple]:
    """Whether ``cls``'s code proves the output of ``self.<attr>(...)`` is ``[q | k | v]``
    (``parts=2``: ``[k | v]``). Every use of it, in every branch (order-keeping calls such as
    ``.clamp`` or ``.contiguous()`` looked through, the class's own helper methods followed), must
    be one of these idioms, whose structure is the proof:

    - split into exactly ``parts`` pieces, unpacked at once into names that say q, k, v in that
      order: ``q, k, v = out.split(width, dim=-1)``, ``.chunk(3, dim=-1)``, ``torch.split(...)``
      (unpacking into three names is what proves three pieces, so the width is a third);
    - a reshape whose 3 follows at most two token dims and comes before the head count and the
      head size: ``out.reshape(b, n, 3, heads, hd)`` (``heads`` named so, or ``-1`` before a head
      size), or ``out.unflatten(-1, (3, width))``; after more leading dims (windows: timm's NesT,
      Hiera) only where the instance's sizes show the last three dims fill the projection's
      width (the second item returned: claims `_sizes_fill` checks);
    - slices of the last dim, each assigned to the name of its part, in order:
      ``q = out[..., :a]``, ``k = out[..., a:b]``, ``v = out[..., b:]``.

    ``layout="per_head"`` reads ``[q k v]`` per head instead, from one idiom: a view whose last two
    sizes are the head count and the three parts folded together (``view(b, n, heads, 3 * hd)`` or
    ``(b, n, heads, -1)``), then (through transposes that leave the last dim alone) split along
    that last dim into equal parts named q, k, v in order (timm's MaxViT, MiniMax's lightning
    attention).

    Branches under ``if self.<flag>:`` that ``flags`` (this instance's boolean attributes) never
    takes are not read.

    Returns whether the code reads so, and the size claims that must hold on the instance.

    Anything else is not read (the caller plans rows and warns): the reader errs towards None,
    since a wrong layout is silent and a wrong None only warns."""
    source = _class_source(cls)
    if source is None:
        return False, ()
    try:
        tree = ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):
        return False, ()
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    reader = _Reader(attr, parts, {f.name: f for f in functions}, layout, flags)
    verdicts = [v for func in functions for v in reader.verdicts_in(func)]
    return bool(verdicts) and all(verdicts), tuple(reader.claims)


def _claim_holds(claim: tuple, module: nn.Module, projection, parts: int) -> bool:
    """What the code read must also hold on the instance (the sizes are evaluated from the
    module's int attributes, constants, and names the forward bound to its input's last dim,
    ``B, N, C = x.shape`` before ``self.qkv(x)``):

    - ``("fill", count, size, ...)``: a reshape ``(..., 3, count, size)`` after more than two
      leading dims reads as ``[q | k | v]`` only if ``parts * count * size`` is the projection's
      width: then the leading dims split the tokens, never the features (a per-shard
      ``(b, t, shards, 3, heads_per_shard, hd)`` fails it);
    - ``("fill_if_known", ...)``: the same for a reshape after at most two token dims, where the
      sizes are known (``(b, n * 2, 3, heads, hd // 2)`` splits each token's features);
    - ``("count", count, ...)``: the head count the code splits by is the one the engine plans with
      (the module's first head-count attribute, `context._HEADS_ATTRS`), where both are known: a
      view by another count (``self.kv_heads``) would put blocks across the code's heads;
    - ``("part", width, ...)``: a per-head ``split(width)`` into three names cuts each head's rows
      in thirds (three names prove three pieces, not equal ones), known on the instance;
      ``("part_if_known", ...)``: a ``split(width)`` of the whole output, in thirds where known."""
    kind, count, size, me, input_width_names = claim
    if not isinstance(projection, nn.Linear):
        return False

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me:
            found = getattr(module, node.attr, None)
            return found if type(found) is int else None
        if isinstance(node, ast.Name) and node.id in input_width_names:
            return projection.in_features
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.FloorDiv)):
            a, b = value(node.left), value(node.right)
            if a is None or b is None or (isinstance(node.op, ast.FloorDiv) and b <= 0):
                return None
            return a * b if isinstance(node.op, ast.Mult) else a // b
        return None

    n = value(ast.parse(count, mode="eval").body)
    out = projection.out_features
    if kind == "count":
        planned = _int_attr(module, _HEADS_ATTRS)
        return n is None or planned is None or n == planned
    if kind in ("part", "part_if_known"):  # `count` is a split's width: a part of every head, or of the whole
        heads = _int_attr(module, _HEADS_ATTRS) if kind == "part" else 1
        if n is None or heads is None:
            return kind == "part_if_known"
        return parts * n * heads == out
    d = value(ast.parse(size, mode="eval").body)
    if kind == "fill_if_known" and (n is None or d is None):
        return True
    return n is not None and d is not None and n > 0 and d > 0 and parts * n * d == out


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


def _at(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset


def _mentions_heads(node: ast.AST) -> bool:
    return "head" in ast.unparse(node).lower()


def _is_head_count(node: ast.AST) -> bool:
    """A size named as a number of heads (``self.num_heads``, ``n_head``), not a head's size."""
    text = ast.unparse(node).lower()
    return "head" in text and not any(w in text for w in ("dim", "size", "width", "channel", "//", "/"))


class _Reader:
    def __init__(self, attr: str, parts: int, methods: dict, layout: str = "concat", flags: tuple = ()):
        self.attr, self.parts, self.methods, self.letters = attr, parts, methods, _PART_LETTERS[parts]
        self.layout, self.flags, self._dead = layout, dict(flags), {}
        self.claims: list[tuple] = []  # sizes `_sizes_fill` must confirm on the instance

    def uses(self, name: str, after: tuple[int, int], func: ast.FunctionDef) -> list[ast.Name]:
        """The reads of ``name`` after ``after`` in ``func``, in order, less those in branches this
        instance never takes."""
        dead = self.dead(func)
        return sorted((n for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == name
                       and isinstance(n.ctx, ast.Load) and _at(n) > after and id(n) not in dead), key=_at)

    def dead(self, func: ast.FunctionDef) -> set[int]:
        """The nodes of ``func`` in the branches of ``if self.<flag>:`` (or ``if not self.<flag>:``)
        that this instance's boolean ``<flag>`` never takes: timm's MaxViT reads its projection per
        head or concatenated by ``self.head_first``."""
        if id(func) not in self._dead:
            me = func.args.args[0].arg if func.args.args else None
            dead: set[int] = set()
            for node in ast.walk(func):
                flag = _flag_tested(node.test, me) if isinstance(node, ast.If) else None
                if flag is None or flag[0] not in self.flags:
                    continue
                taken = self.flags[flag[0]] != flag[1]
                dead.update(id(n) for stmt in (node.orelse if taken else node.body) for n in ast.walk(stmt))
            self._dead[id(func)] = dead
        return self._dead[id(func)]

    def verdicts_in(self, func: ast.FunctionDef) -> list[bool]:
        """One verdict per call of ``self.<attr>(...)`` in ``func``."""
        if not func.args.args:
            return []
        me = func.args.args[0].arg
        parents, dead = _parents(func), self.dead(func)
        if self.renames_parts(func):  # (`k, v = v, k`: the names no longer say the parts)
            return [False]
        return [self.verdict(node, func, parents) for node in ast.walk(func) if id(node) not in dead
                and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == self.attr
                and isinstance(node.func.value, ast.Name) and node.func.value.id == me]

    def renames_parts(self, func: ast.FunctionDef) -> bool:
        """Whether ``func`` moves one part's name into another's (``k, v = v, k``, ``k = v``)."""
        for assign in ast.walk(func):
            if not isinstance(assign, ast.Assign):
                continue
            for target in assign.targets:
                pairs = zip(target.elts, assign.value.elts) if isinstance(target, (ast.Tuple, ast.List)) and \
                    isinstance(assign.value, (ast.Tuple, ast.List)) and len(target.elts) == len(assign.value.elts) \
                    else [(target, assign.value)]
                for t, v in pairs:
                    if isinstance(t, ast.Name) and isinstance(v, ast.Name) and t.id != v.id:
                        said = [{letter for letter in self.letters if _names_part(n, letter)} for n in (t.id, v.id)]
                        if said[0] and said[1] and said[0] != said[1]:
                            return True
        return False

    def verdict(self, node: ast.AST, func: ast.FunctionDef, parents: dict, depth: int = 0) -> bool:
        """Whether what is done to ``node`` (an expression holding the projection's output) is an idiom."""
        if depth > 8:
            return False
        parent = parents.get(node)
        while isinstance(parent, ast.Attribute) and parent.attr in _KEEP_ORDER:  # x.contiguous().view(...)
            call = parents.get(parent)
            if not (isinstance(call, ast.Call) and call.func is parent):
                return False
            node, parent = call, parents.get(call)
        if isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call) and parents[parent].func is parent:
            call = parents[parent]
            if not self.idiom(parent.attr, call.args, call.keywords, call, func, parents):
                return False
            # a reshape puts the parts on an axis: what takes them apart must name them in order
            if parent.attr not in ("view", "reshape", "unflatten"):
                return True
            if self.layout == "per_head":  # the parts are folded into the last dim: split along it
                sizes = call.args[0].elts if len(call.args) == 1 and isinstance(call.args[0], (ast.Tuple, ast.List)) \
                    else call.args
                last = len(sizes) - 1 if not any(isinstance(x, ast.Starred) for x in sizes) else None
                return self.split_along_last(call, last, func, parents)
            return self.parts_named_in_order(call, func, parents)
        if isinstance(parent, ast.Subscript) and parent.value is node:  # (slices of a bound name, one per part)
            return isinstance(node, ast.Name) and self.part_slice(parent, parents)
        if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
            f = parent.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch" and \
                    f.attr in ("split", "chunk", "tensor_split"):  # torch.split(out, ...)
                return self.idiom(f.attr, parent.args[1:], parent.keywords, parent, func, parents)
            me = func.args.args[0].arg if func.args.args else None
            helper = self.methods.get(f.attr) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                and f.value.id == me else None
            if helper is not None:  # self._split_heads(out): its parameter's uses say
                first = 0 if any(ast.unparse(d) == "staticmethod" for d in helper.decorator_list) else 1
                if len(helper.args.args) > first:
                    return self.name_verdict(helper.args.args[first].arg, _at(helper), helper, _parents(helper), depth + 1)
            return False
        if isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name):
            return self.name_verdict(parent.targets[0].id, (parent.end_lineno, parent.end_col_offset), func, parents,
                                     depth + 1)
        return False

    def name_verdict(self, name: str, after: tuple[int, int], func: ast.FunctionDef, parents: dict, depth: int) -> bool:
        """Every use of ``name`` after ``after`` in ``func`` (in every branch: rebinding the name
        ends nothing, so a use of a later value must be an idiom too, which errs towards None),
        less reads of its size; ``x = x.clamp(...)`` is followed as the same value."""
        uses = self.uses(name, after, func)
        verdicts, covered = [], set()
        for use in uses:
            parent = parents.get(use)
            if id(use) in covered or (isinstance(parent, ast.Attribute) and parent.attr in _NEUTRAL):
                continue
            top = use  # the expression the use heads: through order-keeping calls and one more method call
            while isinstance(parents.get(top), ast.Attribute) and parents[top].attr in _KEEP_ORDER \
                    and isinstance(parents.get(parents[top]), ast.Call):
                top = parents[parents[top]]
            if top is not use and self._rebinds(top, name, parents):
                continue  # x = x.clamp(...): the same rows under the same name; its later uses are in `uses`
            verdicts.append(self.verdict(use, func, parents, depth))
            # x = x.reshape(b, n, 3, heads, hd)...: the statements after it in its block see the new value
            while isinstance(parents.get(top), (ast.Attribute, ast.Call, ast.Subscript)):
                top = parents[top]
            if self._rebinds(top, name, parents):
                covered |= {id(n) for n in _after_in_block(parents[top], parents)}
        return bool(verdicts) and all(verdicts)

    @staticmethod
    def _rebinds(expr: ast.AST, name: str, parents: dict) -> bool:
        """Whether ``expr`` is the whole value of an assignment to ``name`` alone."""
        assign = parents.get(expr)
        return isinstance(assign, ast.Assign) and assign.value is expr and [ast.unparse(t) for t in assign.targets] == [name]

    def parts_named_in_order(self, reshaped: ast.AST, func: ast.FunctionDef, parents: dict, depth: int = 0) -> bool:
        """After ``out.reshape(b, n, 3, heads, hd)``: the parts are taken apart (through any chain
        of calls: permute, unbind) by an unpacking into q, k, v names in order, directly or from
        the name the result is bound to, or by ``name[i]`` bound to the i-th part's name."""
        top = self._chain_top(reshaped, parents)
        if self.unpacked_in_order(top, parents):
            return True
        assign = parents.get(top)
        if depth > 4 or not (isinstance(assign, ast.Assign) and assign.value is top and len(assign.targets) == 1
                             and isinstance(assign.targets[0], ast.Name)):
            return False
        name = assign.targets[0].id
        uses = self.uses(name, (assign.end_lineno, assign.end_col_offset), func)
        verdicts = []
        for use in sorted(uses, key=_at):
            parent = parents.get(use)
            if isinstance(parent, ast.Attribute) and parent.attr in _NEUTRAL:
                continue
            if isinstance(parent, ast.Subscript) and isinstance(parent.slice, ast.Constant) and \
                    isinstance(parent.slice.value, int) and 0 <= parent.slice.value < self.parts:
                verdicts.append(self._bound_to_part(self._chain_top(parent, parents), self.letters[parent.slice.value],
                                                    parents))
                continue
            call = parent if isinstance(parent, ast.Call) and parent.args and parent.args[0] is use else None
            if call is not None and ast.unparse(call.func) in ("torch.unbind", "torch.permute", "torch.transpose"):
                verdicts.append(self.parts_named_in_order(call, func, parents, depth + 1))  # torch.unbind(x, 2)
            else:  # x.permute(...).unbind(0) unpacked, or x = x.permute(...) and its uses
                verdicts.append(self.parts_named_in_order(use, func, parents, depth + 1))
            if verdicts[-1] and self._rebinds(self._chain_top(use, parents), name, parents):
                break  # (rebound: its uses were read as the new value's)
        return bool(verdicts) and all(verdicts)

    @staticmethod
    def _chain_top(node: ast.AST, parents: dict) -> ast.AST:
        """The outermost call of a chain of method calls on ``node`` (``x.permute(...).unbind(0)``)."""
        while isinstance(parents.get(node), ast.Attribute) and isinstance(parents.get(parents[node]), ast.Call):
            node = parents[parents[node]]
        return node

    def _bound_to_part(self, expr: ast.AST, letter: str, parents: dict) -> bool:
        """``expr`` assigned to a name of part ``letter`` (``q = x[0]``, or ``q, k, v = x[0], x[1], x[2]``),
        perhaps scaled on the way (``q = x[0] * self.scale``)."""
        while isinstance(parents.get(expr), ast.BinOp) and isinstance(parents[expr].op, (ast.Mult, ast.Div)) \
                and (parents[expr].left is expr or isinstance(parents[expr].op, ast.Mult)):
            expr = parents[expr]
        owner = parents.get(expr)
        if isinstance(owner, ast.Assign) and owner.value is expr and isinstance(owner.targets[0], ast.Name):
            return _names_part(owner.targets[0].id, letter)
        if isinstance(owner, ast.Tuple) and isinstance(parents.get(owner), ast.Assign):
            targets = parents[owner].targets[0]
            if isinstance(targets, ast.Tuple) and len(targets.elts) == len(owner.elts):
                target = targets.elts[owner.elts.index(expr)]
                return isinstance(target, ast.Name) and _names_part(target.id, letter)
        return False

    def unpacked_in_order(self, value: ast.AST, parents: dict, at: int = 0, others: int = 0) -> bool:
        """``value`` unpacked at once into names (Python checks their count), items ``at ..`` of
        which say q, k, v in order, beside ``others`` items that are not parts."""
        assign = parents.get(value)
        if not (isinstance(assign, ast.Assign) and assign.value is value and len(assign.targets) == 1
                and isinstance(assign.targets[0], (ast.Tuple, ast.List))):
            return False
        names = [t.id if isinstance(t, ast.Name) else "" for t in assign.targets[0].elts]
        return len(names) == others + self.parts and \
            all(_names_part(names[at + i], letter) for i, letter in enumerate(self.letters))

    def input_width_names(self, func: ast.FunctionDef) -> tuple[str, ...]:
        """Names ``func`` binds to the last dim of the projection's input (``B, N, C = x.shape``
        before ``self.qkv(x)``, with ``x`` not rebound between), the same at every call."""
        me = func.args.args[0].arg if func.args.args else None
        calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == self.attr and isinstance(n.func.value, ast.Name) and n.func.value.id == me]
        found = None
        for call in calls:
            if len(call.args) != 1 or call.keywords or not isinstance(call.args[0], ast.Name):
                return ()
            x = call.args[0].id
            stores = [_at(n) for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == x and isinstance(n.ctx, ast.Store)]
            names = set()
            for assign in ast.walk(func):
                if not (isinstance(assign, ast.Assign) and len(assign.targets) == 1 and _at(assign) < _at(call)
                        and isinstance(assign.targets[0], ast.Tuple) and ast.unparse(assign.value) == f"{x}.shape"
                        and isinstance(assign.targets[0].elts[-1], ast.Name)):
                    continue
                width = assign.targets[0].elts[-1]
                rebound = any(isinstance(n, ast.Name) and n.id == width.id and isinstance(n.ctx, ast.Store)
                              and n is not width for n in ast.walk(func))
                if not rebound and not any(_at(assign) < at < _at(call) for at in stores):
                    names.add(width.id)
            found = names if found is None else found & names
        return tuple(sorted(found or ()))

    def split_along_last(self, node: ast.AST, last: int | None, func: ast.FunctionDef, parents: dict,
                         depth: int = 0) -> bool:
        """After a per-head view (``last``: the index of its last dim, None when unknown): the value
        is split along its last dim into ``parts`` equal pieces named in order, through transposes
        of other dims, order-keeping calls and names it is bound to."""
        if depth > 6:
            return False
        parent = parents.get(node)
        if isinstance(parent, ast.Assign) and parent.value is node and len(parent.targets) == 1 \
                and isinstance(parent.targets[0], ast.Name):
            after = (parent.end_lineno, parent.end_col_offset)
            uses = self.uses(parent.targets[0].id, after, func)
            verdicts = [self.split_along_last(use, last, func, parents, depth + 1) for use in uses
                        if not (isinstance(parents.get(use), ast.Attribute) and parents[use].attr in _NEUTRAL)]
            return bool(verdicts) and all(verdicts)
        if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node \
                and ast.unparse(parent.func) in ("torch.split", "torch.chunk"):  # torch.split(x, hd, dim=-1)
            call, method, args = parent, parent.func.attr, parent.args[1:]
        elif isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call) \
                and parents[parent].func is parent:
            call, method, args = parents[parent], parent.attr, parents[parent].args
        else:
            return False
        if method in _KEEP_ORDER:
            return self.split_along_last(call, last, func, parents, depth + 1)
        ints = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, int) else None for a in args]
        if method == "transpose":  # of two other dims
            lasts = {-1} | ({last} if last is not None else set())
            return len(ints) == 2 and None not in ints and not lasts & set(ints) and last is not None \
                and self.split_along_last(call, last, func, parents, depth + 1)
        if method not in ("chunk", "split"):
            return False
        dim = args[1] if len(args) > 1 else next((k.value for k in call.keywords if k.arg == "dim"), None)
        along_last = isinstance(dim, ast.UnaryOp) and ast.unparse(dim) == "-1" or \
            (isinstance(dim, ast.Constant) and last is not None and dim.value == last)
        if not (along_last and args) or isinstance(args[0], (ast.List, ast.Tuple)):
            return False  # (sizes as a list may differ: q/k heads narrower than v's)
        if method == "chunk" and not (isinstance(args[0], ast.Constant) and args[0].value == self.parts):
            return False
        if method == "split":  # (three names prove three pieces, not equal ones: the width must be a third)
            self.claims.append(("part", ast.unparse(args[0]), "", func.args.args[0].arg, ()))
        return self.pieces_named(call, 0, counted=method == "chunk", func=func, parents=parents)

    def pieces_named(self, seq: ast.AST, at: int = 0, others: int = 0, *, counted: bool, func: ast.FunctionDef,
                     parents: dict, depth: int = 0) -> bool:
        """The pieces of a split are items ``at ..`` of the sequence ``seq``, beside ``others`` items
        that are not pieces; whether they end up in names saying q, k, v in order. Followed through
        what keeps positions: a tuple holding them starred after single items
        (``(self.to_q(x), *kv.chunk(2, dim=-1))``), ``map(f, seq)``, a generator over ``seq``, and a
        name it is bound to (every later use of it). They end in an unpacking into names (which
        proves the count: Python checks it) or, where the count is known without one (``counted``:
        ``chunk(3)``), in ``seq[i]`` bound to the name of its part."""
        if depth > 6:
            return False
        parent = parents.get(seq)
        if isinstance(parent, ast.Assign) and parent.value is seq and len(parent.targets) == 1:
            target = parent.targets[0]
            if isinstance(target, (ast.Tuple, ast.List)):
                return self.unpacked_in_order(seq, parents, at, others)
            if not isinstance(target, ast.Name):
                return False
            after = (parent.end_lineno, parent.end_col_offset)
            uses = self.uses(target.id, after, func)
            verdicts = []
            for use in uses:
                sub = parents.get(use)
                if isinstance(sub, ast.Subscript) and sub.value is use and isinstance(sub.ctx, ast.Load) \
                        and isinstance(sub.slice, ast.Constant) and isinstance(sub.slice.value, int) and sub.slice.value >= 0:
                    i = sub.slice.value - at
                    if i < 0 or (counted and i >= self.parts):
                        continue  # (an item that is not a piece: the query of a separate to_q)
                    verdicts.append(counted and i < self.parts and
                                    self._bound_to_part(self._chain_top(sub, parents), self.letters[i], parents))
                    continue
                verdicts.append(self.pieces_named(use, at, others, counted=counted, func=func, parents=parents,
                                                  depth=depth + 1))
            return bool(verdicts) and all(verdicts)
        if isinstance(parent, ast.Starred) and isinstance(parents.get(parent), (ast.Tuple, ast.List)) and at == others == 0:
            items = parents[parent].elts
            if sum(isinstance(x, ast.Starred) for x in items) != 1:
                return False
            return self.pieces_named(parents[parent], items.index(parent), len(items) - 1, counted=counted, func=func,
                                     parents=parents, depth=depth + 1)
        if isinstance(parent, ast.Call) and ast.unparse(parent.func) == "map" and len(parent.args) == 2 \
                and parent.args[1] is seq and not parent.keywords:
            return self.pieces_named(parent, at, others, counted=counted, func=func, parents=parents, depth=depth + 1)
        if isinstance(parent, ast.comprehension) and parent.iter is seq and not parent.ifs and not parent.is_async:
            generator = parents.get(parent)
            if isinstance(generator, (ast.GeneratorExp, ast.ListComp)) and len(generator.generators) == 1:
                return self.pieces_named(generator, at, others, counted=counted, func=func, parents=parents,
                                         depth=depth + 1)
        return False

    def idiom(self, method: str, args: list, keywords: list, call: ast.Call, func: ast.FunctionDef, parents: dict) -> bool:
        if self.layout == "per_head":  # only a view that folds the parts under the head count
            sizes = args[0].elts if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else args
            if method not in ("view", "reshape") or len(sizes) < 3:
                return False
            count, folded = sizes[-2], sizes[-1]
            if not (isinstance(count, (ast.Name, ast.Attribute)) and _is_head_count(count)):
                return False
            if any(_mentions_heads(x) or str(self.parts) in ast.unparse(x) for x in sizes[:-2]):
                return False
            self.claims.append(("count", ast.unparse(count), "", func.args.args[0].arg, ()))
            if ast.unparse(folded) == "-1":
                return True
            if not (isinstance(folded, ast.BinOp) and isinstance(folded.op, ast.Mult)):
                return False  # (the last dim one head's size: the parts are not folded into it)
            sides = (folded.left, folded.right)
            return any(isinstance(x, ast.Constant) and x.value == self.parts and not _is_head_count(y)
                       for x, y in (sides, sides[::-1]))
        if method in ("split", "chunk", "tensor_split"):
            dim = args[1] if len(args) > 1 else next((k.value for k in keywords if k.arg == "dim"), None)
            if dim is None or (isinstance(dim, ast.Constant) and dim.value == 0) or not args:
                return False  # (no dim: dim 0, the batch)
            if method != "split" and not (isinstance(args[0], ast.Constant) and args[0].value == self.parts):
                return False
            if method == "split" and not isinstance(args[0], (ast.List, ast.Tuple)):
                self.claims.append(("part_if_known", ast.unparse(args[0]), "", func.args.args[0].arg,
                                    self.input_width_names(func)))
            return self.pieces_named(call, 0, counted=method != "split", func=func, parents=parents)
        if method == "unflatten":  # unflatten(-1, (3, width))
            sizes = args[1] if len(args) > 1 else next((k.value for k in keywords if k.arg == "sizes"), None)
            return bool(args) and not (isinstance(args[0], ast.Constant) and args[0].value == 0) and \
                isinstance(sizes, (ast.Tuple, ast.List)) and len(sizes.elts) == 2 and \
                isinstance(sizes.elts[0], ast.Constant) and sizes.elts[0].value == self.parts and \
                not _mentions_heads(sizes.elts[1])
        if method in ("view", "reshape"):
            sizes = args[0].elts if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else args
            at = next((i for i, x in enumerate(sizes) if isinstance(x, ast.Constant) and x.value == self.parts), None)
            if at is None or len(sizes) != at + 3:
                return False  # (3, heads, head size) after the token dims, nothing after
            before, (count, size) = sizes[:at], sizes[at + 1:]
            if any(_mentions_heads(x) or str(self.parts) in ast.unparse(x) for x in before):
                return False
            if at > 2:  # more leading dims than tokens need: the instance's sizes must show they split no feature
                if not (_is_head_count(count) and not _is_head_count(size)):
                    return False
            self.claims.append(("fill" if at > 2 else "fill_if_known", ast.unparse(count), ast.unparse(size),
                                func.args.args[0].arg, self.input_width_names(func)))
            if _is_head_count(count):
                self.claims.append(("count", ast.unparse(count), "", func.args.args[0].arg, ()))
            if at > 2:
                return True
            minus_one = isinstance(count, ast.UnaryOp) and ast.unparse(count) == "-1"
            return (_is_head_count(count) and not _is_head_count(size)) or (minus_one and _mentions_heads(size)
                                                                            and not _is_head_count(size))
        return False

    def part_slice(self, sub: ast.Subscript, parents: dict) -> bool:
        """``q = out[..., :a]`` (first part: no start), ``k = out[..., a:b]``, ``v = out[..., b:]`` (last part: no end)."""
        index = sub.slice
        elts = index.elts if isinstance(index, ast.Tuple) else [index]
        last = elts[-1]
        if not (len(elts) == 2 and isinstance(elts[0], ast.Constant) and elts[0].value is Ellipsis
                and isinstance(last, ast.Slice) and last.step is None):
            return False
        assign = parents.get(sub)
        if not (isinstance(assign, ast.Assign) and assign.value is sub and len(assign.targets) == 1
                and isinstance(assign.targets[0], ast.Name)):
            return False
        name = assign.targets[0].id
        part = self.letters[0] if last.lower is None else self.letters[-1] if last.upper is None else self.letters[1]
        if self.parts == 2 and last.lower is not None and last.upper is not None:
            return False
        return _names_part(name, part)


def _flag_tested(test: ast.AST, me: str | None) -> tuple[str, bool] | None:
    """``self.x`` -> ("x", False); ``not self.x`` -> ("x", True); anything else None."""
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    target = test.operand if negated else test
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == me:
        return target.attr, negated
    return None


@functools.lru_cache(maxsize=256)
def _tested_flags(cls: type) -> tuple[str, ...]:
    """The attributes ``cls``'s code tests as ``if self.x:`` (candidates for `_Reader.dead`)."""
    source = _class_source(cls)
    try:
        tree = ast.parse(textwrap.dedent(source)) if source else None
    except (SyntaxError, ValueError):
        tree = None
    if tree is None:
        return ()
    found, changed = set(), set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and func.args.args:
            me = func.args.args[0].arg
            for node in ast.walk(func):
                flag = _flag_tested(node.test, me) if isinstance(node, ast.If) else None
                if flag is not None:
                    found.add(flag[0])
                if func.name != "__init__" and isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                        and isinstance(node.value, ast.Name) and node.value.id == me:
                    changed.add(node.attr)  # (set as the module runs: no configuration)
                if func.name != "__init__" and isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" \
                        and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    changed.add(str(node.args[1].value))  # (setattr(self, "flag", ...), on any object: erring out)
    return tuple(sorted(found - changed))


def _names_part(name: str, letter: str) -> bool:
    """Whether a variable name says part ``letter`` of q/k/v (``q``, ``query_states``, ``k_``),
    and not several (``qkv``, ``kv``: the whole, or a trim of it)."""
    name = name.lower()
    if name.startswith(("qkv", "kv")):
        return False
    return name.startswith({"q": "quer", "k": "key", "v": "val"}[letter]) or \
        (name.startswith(letter) and (len(name) == 1 or not name[1].isalpha()))


def _after_in_block(statement: ast.stmt, parents: dict) -> list[ast.AST]:
    """Every node of the statements that follow ``statement`` in its own block."""
    owner = parents.get(statement)
    for field in ("body", "orelse", "finalbody", "handlers"):
        block = getattr(owner, field, None)
        if isinstance(block, list) and statement in block:
            return [n for later in block[block.index(statement) + 1:] for n in ast.walk(later)]
    return []


def _parents(func: ast.AST) -> dict:
    return {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
