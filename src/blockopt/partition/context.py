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

    def geometry(self, module: nn.Module) -> tuple[int | None, int | None, int | None, str]:
        """(n_heads, n_kv_heads, head_dim, where from): the user's values, then the module's own
        attributes, then configs, each filling only what is still unknown. A user ``n_heads``
        without ``head_dim`` defines the head size itself (from the width): the model's own
        ``head_dim`` and KV count are then not mixed in (the KV count follows from the key width)."""
        user = (self.n_heads, self.n_kv_heads, self.head_dim)
        keep_head_dim_unknown = self.n_heads is not None and self.head_dim is None
        values = list(user)
        sources = ["user"] if any(v is not None for v in user) else []
        candidates = [(module, f"{type(module).__name__} attributes")] + [(c, "config") for c in self.configs(module)]
        for owner, label in candidates:
            found = [_int_attr(owner, _HEADS_ATTRS), _int_attr(owner, _KV_HEADS_ATTRS), _int_attr(owner, _HEAD_DIM_ATTRS)]
            if keep_head_dim_unknown:  # the model's own head size and KV count belong to its own n_heads
                found[1] = found[2] = None
            filled = [v if v is not None else f for v, f in zip(values, found)]
            if filled != values and label not in sources:
                sources.append(label)
            values = filled
        return values[0], values[1], values[2], " + ".join(sources)

    def attention_heads(self, module: nn.Module, q_width: int, k_width: int, path: str = "") -> Heads:
        """Head counts for an attention module whose query/key outputs are ``q_width``/``k_width``.

        Known values come from `geometry`; what is missing is derived from the widths. Raises
        ValueError when user-given values do not fit; returns counts that divide the widths.
        """
        n_heads, n_kv, head_dim, source = self.geometry(module)
        user_given = any(v is not None for v in (self.n_heads, self.n_kv_heads, self.head_dim))
        if self.n_heads and self.head_dim is None:
            if q_width % self.n_heads:
                raise ValueError(
                    f"{path or 'attention'}: n_heads={self.n_heads} does not divide the query width {q_width}; "
                    "pass the model's real head counts to partition()/AdamMini"
                )
            head_dim = q_width // self.n_heads
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
            if user_given:
                raise ValueError(f"{path or 'attention'}: {problem}; pass the model's real head counts to partition()/AdamMini")
            raise LookupError(problem)
        return Heads(n_heads, n_kv, source or "widths")
