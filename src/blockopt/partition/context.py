"""What adapters may ask while they look at a model: user options, head counts, ancestry.

Head counts come from *sources*, each one coherent description of the module: the user's
values; the module's own attributes with its own ``config``; then the configs of the enclosing
models, innermost first, each with its sub-configs (``text_config``, ``vision_config``, ...).
Values are never mixed across sources (a vision tower never borrows the text model's KV heads),
and a source that does not describe the module itself (an enclosing model's config) must match
the projection's widths exactly before it is believed. A multimodal model's vision tower thus
takes its own sub-config's heads, never the language model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.nn as nn

# Attribute spellings used across PyTorch and Hugging Face code for attention geometry.
_HEADS_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "attention_heads", "heads", "num_k_heads")
_KV_HEADS_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head", "n_local_heads",
                   "num_key_value_groups_total")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv", "d_head", "dim_head",
                   "head_k_dim")
_WIDTH_ATTRS = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim")
# Where composite configs keep the configs of their sub-models (besides HF's ``sub_configs``).
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "decoder", "encoder", "language_config", "llm_config",
                "vision_tower_config", "speech_config", "qformer_config")


def _int_attr(obj, names) -> int | None:
    for n in names:
        try:
            v = getattr(obj, n, None)
        except Exception:  # HF configs raise their own errors for fields that vary per layer
            v = None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _is_config(obj) -> bool:
    return obj is not None and not isinstance(obj, (int, float, str, bool, dict, list, tuple, nn.Module))


@dataclass
class Heads:
    """Head geometry of one attention module, with where it came from. ``gated``: the query
    projection carries a gate of one head's width after every query head."""

    n_heads: int
    n_kv_heads: int
    source: str
    head_dim: int | None = None
    gated: bool = False


@dataclass
class _Source:
    """(n_heads, n_kv_heads, head_dim) as one description gives them; ``strict`` when the
    description is not the module's own and must match the widths exactly."""

    label: str
    n_heads: int | None
    n_kv: int | None
    head_dim: int | None
    strict: bool


@dataclass
class Context:
    """Options of one `partition` call plus facts about the model being planned."""

    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    dim: int | None = None  # the model width, as the official package's ``dim=``
    value: str = "rows"
    conv: str = "whole"
    root: nn.Module | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    token_vocab: int | None = None  # rows of the token embedding, if one was found
    warnings: list[str] = field(default_factory=list)
    answered_by: dict = field(default_factory=dict)  # warning -> the tensors whose user rules answer it
    confirmable: dict = field(default_factory=dict)  # tensor -> the heads spec a user rule 'heads' confirms
    claimed: dict = field(default_factory=dict)  # every parameter name (frozen too) -> its spec so far
    cache: dict = field(default_factory=dict)  # per-call memo for adapters (e.g. forward probes by module type)

    def warn(self, text: str, *tensors: str) -> None:
        """A warning whose advice is a rule for ``tensors``: a user rule on all of them answers it."""
        self.warnings.append(text)
        self.answered_by[text] = frozenset(tensors)

    def drop_answered(self, ruled: set[str]) -> None:
        """Forget the warnings whose tensors the user's rules all set."""
        self.warnings = [w for w in self.warnings if not (w in self.answered_by and self.answered_by[w] <= ruled)]

    # ---- model facts ------------------------------------------------------------------
    def ancestors(self, path: str) -> list[nn.Module]:
        """Modules enclosing ``path``, innermost first (excluding the module itself)."""
        out, parts = [], path.split(".") if path else []
        for i in range(len(parts) - 1, -1, -1):
            out.append(self.modules.get(".".join(parts[:i]), None))
        return [m for m in out if m is not None]

    @property
    def user_geometry(self) -> bool:
        return any(v is not None for v in (self.n_heads, self.n_kv_heads, self.head_dim))

    def _sources(self, module: nn.Module, path: str) -> Iterator[_Source]:
        """The module's own description first, then enclosing models' configs (strict)."""
        own_cfg = getattr(module, "config", None)
        owners = [module] + ([own_cfg] if _is_config(own_cfg) else [])
        values = [next((v for o in owners if (v := _int_attr(o, names)) is not None), None)
                  for names in (_HEADS_ATTRS, _KV_HEADS_ATTRS, _HEAD_DIM_ATTRS)]
        label = f"{type(module).__name__} attributes" + (" + config" if len(owners) > 1 else "")
        yield _Source(label, *values, strict=False)
        seen = {id(own_cfg)}
        for owner in self.ancestors(path):
            cfg = getattr(owner, "config", None)
            if not _is_config(cfg) or id(cfg) in seen:
                continue
            seen.add(id(cfg))
            subs = list(getattr(cfg, "sub_configs", None) or {}) + [s for s in _SUB_CONFIGS]
            nested = []
            for name in dict.fromkeys(subs):
                try:
                    sub = getattr(cfg, name, None)
                except Exception:
                    sub = None
                if _is_config(sub) and id(sub) not in seen:
                    seen.add(id(sub))
                    nested.append((f"{type(owner).__name__}.config.{name}", sub))
            for label, c in [(f"{type(owner).__name__}.config", cfg), *nested]:
                n = _int_attr(c, _HEADS_ATTRS)
                width = _int_attr(c, _WIDTH_ATTRS)
                hd = _int_attr(c, _HEAD_DIM_ATTRS) or (width // n if n and width and width % n == 0 else None)
                if n and hd:
                    yield _Source(label, n, _int_attr(c, _KV_HEADS_ATTRS), hd, strict=True)

    def _candidates(self, module: nn.Module, path: str) -> Iterator[_Source]:
        """Sources with the user's values laid over them (user values win field by field). A user
        ``n_heads`` without ``head_dim`` defines the head size itself (from the width): a source's
        head size and KV count belong to its own head count and are then not mixed in; likewise a
        user ``head_dim`` without ``n_heads`` defines the head counts."""
        own_size = self.n_heads is not None and self.head_dim is None
        own_count = self.head_dim is not None and self.n_heads is None
        for s in self._sources(module, path):
            if self.user_geometry:
                n, n_kv, hd = s.n_heads, s.n_kv, s.head_dim
                if own_size:
                    n_kv, hd = None, None
                if own_count:  # a user head_dim sets the head count (from the width) just as well
                    n, n_kv = None, None
                s = _Source(f"user + {s.label}" if (n, n_kv, hd) != (None, None, None) else "user",
                            self.n_heads or n, self.n_kv_heads or n_kv, self.head_dim or hd, strict=False)
            yield s

    def attention_heads(self, module: nn.Module, q_width: int, k_width: int | None, path: str = "") -> Heads:
        """Head counts for an attention module whose query/key outputs are ``q_width``/``k_width``
        (``None``: no key of its own; keys then count as many heads as queries).

        The first source that fits the widths wins; what a source leaves open is derived from the
        widths. Raises ValueError when user-given values do not fit; LookupError when no source
        does (the message says why the closest one failed).
        """
        return self._first_fit(module, path, lambda s: _fit_separate(s, q_width, k_width, user=self.user_geometry))

    def fused_heads(self, module: nn.Module, out: int, layout: str, path: str = "") -> Heads:
        """Head counts of a fused query/key/value projection with ``out`` rows in ``layout``
        (``concat``: [q | k | v]; ``per_head``: [q k v] per head; ``per_group``: per KV group;
        ``codegen``: [q | v | k] per model-parallel partition).
        Errors as `attention_heads`."""
        return self._first_fit(module, path, lambda s: _fit_fused(s, out, layout))

    def _first_fit(self, module: nn.Module, path: str, fit) -> Heads:
        problem = "no head count found on the module or its configs"
        for s in self._candidates(module, path):
            heads, why = fit(s)
            if heads is not None:
                return heads
            problem = why or problem
            if self.user_geometry and why:  # the user's values failed over the first source that had any
                break
        if self.user_geometry:
            raise ValueError(f"{path or 'attention'}: {problem}; pass the model's real head counts to partition()/AdamMini")
        raise LookupError(problem)


def _fit_separate(s: _Source, q_width: int, k_width: int | None, user: bool = False) -> tuple[Heads | None, str | None]:
    """Complete ``s`` from separate query/key widths and check it; (heads, None) or (None, why).
    User counts are taken as given: they need only divide the widths (a user ``n_kv_heads`` may
    make key heads narrower than query heads, as in the official package)."""
    n, n_kv, hd = s.n_heads, s.n_kv, s.head_dim
    if n is None and hd is None:
        return None, None
    if user:
        return _fit_counts(s, q_width, k_width)
    if hd is None:
        if q_width % n:
            return None, f"n_heads={n} does not divide the query width {q_width}"
        hd = q_width // n
    if n is None:
        if q_width % hd:
            return None, f"head_dim={hd} does not divide the query width {q_width}"
        n = q_width // hd
    gated = q_width == 2 * n * hd
    if q_width != n * hd and not gated:
        return None, f"{n} heads of {hd} do not make the query width {q_width}"
    if k_width is None:
        return Heads(n, n, s.label, hd, gated), None
    if n_kv is not None and k_width != n_kv * hd and not s.strict:
        n_kv = None  # the module's layers may differ in KV heads (sliding-window layers): the width says
    if n_kv is None:
        if k_width % hd:
            return None, f"head_dim={hd} does not divide the key width {k_width}"
        n_kv = k_width // hd
    if k_width != n_kv * hd:
        return None, f"n_kv_heads={n_kv} heads of {hd} do not make the key width {k_width}"
    if n % n_kv:
        return None, f"n_kv_heads={n_kv} does not divide n_heads={n}"
    return Heads(n, n_kv, s.label, hd, gated), None


def _fit_counts(s: _Source, q_width: int, k_width: int | None) -> tuple[Heads | None, str | None]:
    n, n_kv, hd = s.n_heads, s.n_kv, s.head_dim
    if n is None:
        if q_width % hd:
            return None, f"head_dim={hd} does not divide the query width {q_width}"
        n = q_width // hd
    if q_width % n:
        return None, f"n_heads={n} does not divide the query width {q_width}"
    if hd is not None and q_width not in (n * hd, 2 * n * hd):  # (2x: a gate per query head)
        return None, f"{n} heads of head_dim={hd} do not make the query width {q_width}"
    if k_width is None:
        return Heads(n, n, s.label, q_width // n), None
    if n_kv is None:
        if hd and k_width % hd == 0:
            n_kv = k_width // hd
        elif k_width % (q_width // n) == 0:
            n_kv = k_width // (q_width // n)
    if n_kv is None or k_width % n_kv:
        return None, f"n_kv_heads={n_kv} does not divide the key width {k_width}"
    if n % n_kv:
        return None, f"n_kv_heads={n_kv} does not divide n_heads={n}"
    return Heads(n, n_kv, s.label, q_width // n), None


def _fit_fused(s: _Source, out: int, layout: str) -> tuple[Heads | None, str | None]:
    n, n_kv, hd = s.n_heads, s.n_kv, s.head_dim
    if n is None and hd is None:
        return None, None
    if layout in ("per_head", "codegen"):  # [q k v] per head (or per partition): as many KV heads as query heads
        n_kv = n
    elif layout == "multi_query":  # one key and one value head shared by every query head
        n_kv = 1
    if hd is None:
        parts = n + 2 * (n_kv or n)
        if out % parts:
            return None, f"{out} rows do not split into {n} query + 2x{n_kv or n} key/value heads"
        hd = out // parts
    if n is None:
        if n_kv is None and out % (3 * hd) == 0:
            n = n_kv = out // (3 * hd)
        else:
            return None, "query head count unknown"
    if n_kv is None:
        rest = out // hd - n if out % hd == 0 else -1
        n_kv = rest // 2 if rest > 0 and rest % 2 == 0 else None
    if n_kv is None or (n + 2 * n_kv) * hd != out:
        return None, f"{out} rows do not fit {n} query + 2x{n_kv} key/value heads of {hd}"
    if n % n_kv:
        return None, f"n_kv_heads={n_kv} does not divide n_heads={n}"
    return Heads(n, n_kv, s.label, hd), None
