"""What adapters may ask while they look at a model: user options, head counts, ancestry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

# Attribute spellings used across PyTorch and Hugging Face code for attention geometry.
_HEADS_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "attention_heads", "heads")
_KV_HEADS_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head", "num_key_value_groups_total")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv", "d_head")


def _int_attr(obj, names) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass
class Heads:
    """Head geometry of one attention module, with where it came from."""

    n_heads: int
    n_kv_heads: int
    source: str


@dataclass
class Context:
    """Options of one `partition` call plus facts about the model being planned."""

    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    value: str = "rows"
    conv: str = "whole"
    root: nn.Module | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    token_vocab: int | None = None  # rows of the token embedding, if one was found
    warnings: list[str] = field(default_factory=list)

    # ---- model facts ------------------------------------------------------------------
    def ancestors(self, path: str) -> list[nn.Module]:
        """Modules enclosing ``path``, innermost first (excluding the module itself)."""
        out, parts = [], path.split(".") if path else []
        for i in range(len(parts) - 1, -1, -1):
            out.append(self.modules.get(".".join(parts[:i]), None))
        return [m for m in out if m is not None]

    def configs(self, module: nn.Module) -> list[object]:
        """HF-style configs that describe ``module``: its own, then the root model's (and nested)."""
        found = []
        for owner in (module, self.root):
            cfg = getattr(owner, "config", None)
            if cfg is not None and not isinstance(cfg, (int, float, str, bool)):
                found.append(cfg)
                for sub in ("text_config", "decoder", "language_config", "llm_config"):
                    nested = getattr(cfg, sub, None)
                    if nested is not None and not isinstance(nested, (int, float, str, bool, dict)):
                        found.append(nested)
        return found

    def geometry(self, module: nn.Module) -> tuple[int | None, int | None, int | None]:
        """(n_heads, n_kv_heads, head_dim) as known from the user, else the module, else configs."""
        n_heads, n_kv, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        for source in (module, *self.configs(module)):
            n_heads = n_heads or _int_attr(source, _HEADS_ATTRS)
            n_kv = n_kv or _int_attr(source, _KV_HEADS_ATTRS)
            head_dim = head_dim or _int_attr(source, _HEAD_DIM_ATTRS)
        return n_heads, n_kv, head_dim

    def attention_heads(self, module: nn.Module, q_width: int, k_width: int, path: str = "") -> Heads:
        """Head counts for an attention module whose query/key outputs are ``q_width``/``k_width``.

        Order: the user's explicit ``n_heads``/``n_kv_heads``/``head_dim``, the module's own
        attributes, its (or the model's) config, then widths divided by a known ``head_dim``.
        Raises ValueError when user-given values do not fit; returns counts that divide the widths.
        """
        sources = []
        n_heads, n_kv, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        if n_heads or n_kv or head_dim:
            sources.append("user")
        if n_heads and head_dim is None:
            # the user's head count defines the head size; don't mix it with the module's own
            if q_width % n_heads:
                raise ValueError(
                    f"{path or 'attention'}: n_heads={n_heads} does not divide the query width {q_width}; "
                    "pass the model's real head counts to partition()/AdamMini"
                )
            head_dim = q_width // n_heads
        n_heads = n_heads or _int_attr(module, _HEADS_ATTRS)
        n_kv = n_kv or _int_attr(module, _KV_HEADS_ATTRS)
        head_dim = head_dim or _int_attr(module, _HEAD_DIM_ATTRS)
        if any(v is not None for v in (n_heads, n_kv, head_dim)) and not sources:
            sources.append(f"{type(module).__name__} attributes")
        if n_heads is None or (n_kv is None and k_width != q_width and head_dim is None):
            for cfg in self.configs(module):
                n_heads = n_heads or _int_attr(cfg, _HEADS_ATTRS)
                n_kv = n_kv or _int_attr(cfg, _KV_HEADS_ATTRS)
                head_dim = head_dim or _int_attr(cfg, _HEAD_DIM_ATTRS)
            if n_heads:
                sources.append("config")
        if n_heads is None and head_dim:
            n_heads = q_width // head_dim if q_width % head_dim == 0 else None
        if n_kv is None:
            if head_dim and k_width % head_dim == 0:
                n_kv = k_width // head_dim
            elif n_heads and k_width == q_width:
                n_kv = n_heads
            elif n_heads and q_width % n_heads == 0 and k_width % (q_width // n_heads) == 0:
                n_kv = k_width // (q_width // n_heads)
        if n_heads is None or n_kv is None:
            raise LookupError("head count unknown")
        if q_width % n_heads:
            problem = f"n_heads={n_heads} does not divide the query width {q_width}"
        elif k_width % n_kv:
            problem = f"n_kv_heads={n_kv} does not divide the key width {k_width}"
        elif n_heads % n_kv:
            problem = f"n_kv_heads={n_kv} does not divide n_heads={n_heads}"
        else:
            problem = None
        if problem:
            if "user" in sources:
                raise ValueError(f"{path or 'attention'}: {problem}; pass the model's real head counts to partition()/AdamMini")
            raise LookupError(problem)
        return Heads(n_heads, n_kv, " + ".join(sources) or "widths")
