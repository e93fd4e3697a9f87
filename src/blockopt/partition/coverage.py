"""The partition engine over every model type of the installed transformers: right or warned.

For each model type, `cover` builds the model from its default config on the ``meta`` device
(no memory, nothing downloaded), partitions it, and checks invariants written here from the
model's own modules and configs, independently of the engine's adapters:

* every trainable tensor has a spec of its shape (and no crash);
* every attention query/key whose module states its head size (attributes, else the config of
  the sub-model it sits in: a vision tower's own, not the text model's) is cut by heads of that
  size: no block crosses a head, and each query/key head is one block;
* every stacked expert tensor ``(E, a, b)`` is cut per expert per output neuron, the output dim
  being the hidden size for a down projection and the other dim for a gate/up projection;
* the token embedding and an output head onto the vocabulary are cut per token row;
* no matrix (other than a convolution) is one block, and a module whose class says attention
  has some part (query, key, value, output) recognised as attention.

A violation that a `PartitionWarning` names (tensor or module) is a *warned* fallback; one that
no warning names is *silent*, the outcome the engine must never produce. Used by
``benchmarks/studies/partition_coverage`` (every type) and ``tests/partition/test_coverage.py``
(a fixed sample). Needs ``transformers``.
"""

from __future__ import annotations

import fnmatch
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .engine import PartitionWarning, partition
from .plan import Plan
from .spec import BlockSpec

# Auto-class mappings by family, in the order a model type is assigned to one; the classes tried
# for a build follow `_CLASS_ORDER` (a head class first: it carries the output head to check).
FAMILIES = {
    "multimodal": ("IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM", "VISUAL_QUESTION_ANSWERING", "DOCUMENT_QUESTION_ANSWERING",
                   "ZERO_SHOT_IMAGE_CLASSIFICATION", "ZERO_SHOT_OBJECT_DETECTION", "RETRIEVAL"),
    "audio": ("SPEECH_SEQ_2_SEQ", "CTC", "AUDIO_CLASSIFICATION", "AUDIO_FRAME_CLASSIFICATION", "AUDIO_XVECTOR",
              "TEXT_TO_WAVEFORM", "TEXT_TO_SPECTROGRAM", "RNNT", "TDT"),
    "seq2seq": ("SEQ_TO_SEQ_CAUSAL_LM",),
    "causal-lm": ("CAUSAL_LM",),
    "vision": ("IMAGE_CLASSIFICATION", "IMAGE", "OBJECT_DETECTION", "SEMANTIC_SEGMENTATION", "INSTANCE_SEGMENTATION",
               "UNIVERSAL_SEGMENTATION", "DEPTH_ESTIMATION", "VIDEO_CLASSIFICATION", "BACKBONE", "MASKED_IMAGE_MODELING",
               "IMAGE_TO_IMAGE", "KEYPOINT_DETECTION", "MASK_GENERATION"),
    "encoder": ("MASKED_LM", "SEQUENCE_CLASSIFICATION", "TOKEN_CLASSIFICATION", "TEXT_ENCODING"),
    "time-series": ("TIME_SERIES_PREDICTION", "TIME_SERIES_CLASSIFICATION", "TIME_SERIES_REGRESSION"),
}
_CLASS_ORDER = ("CAUSAL_LM", "SEQ_TO_SEQ_CAUSAL_LM", "SPEECH_SEQ_2_SEQ", "IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM", "MASKED_LM",
                "IMAGE_CLASSIFICATION", "CTC", "AUDIO_CLASSIFICATION", "")  # "" = MODEL_MAPPING (the base model)
STATUSES = ("structural", "warned", "silent", "crash", "unbuildable")

# The checker's own reading of attention modules (it must not borrow the engine's tables).
_Q = ("q_proj", "query", "q", "wq", "q_lin", "to_q", "query_proj", "q_gate_proj", "q_b_proj", "to_query", "q_linear")
_K = ("k_proj", "key", "k", "wk", "k_lin", "to_k", "key_proj", "to_key", "k_linear")
_FUSED = ("qkv", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "to_qkv", "c_qkv", "qkv_linear")
_HEAD_SIZE = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv", "d_head", "dim_head")
_N_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads", "heads")
_N_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts")
_HIDDEN = ("hidden_dim", "hidden_size", "d_model", "n_embd", "embed_dim")
_ATTENTION = re.compile("attention|attn", re.IGNORECASE)


@dataclass
class Violation:
    tensor: str
    what: str
    warned: bool = False


@dataclass
class Coverage:
    """One model type's row of the coverage table."""

    model_type: str
    family: str
    model_class: str | None = None
    status: str = "unbuildable"
    params: int = 0
    tensors: int = 0
    rules: dict[str, int] = field(default_factory=dict)
    heads: int = 0  # tensors split by heads
    attention_checked: int = 0  # query/key tensors whose heads the checker verified
    warnings: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    error: str | None = None
    build_s: float = 0.0
    plan_s: float = 0.0


# ---- model types and how to build them -------------------------------------------------------
def _auto():
    from transformers.models.auto import configuration_auto, modeling_auto

    return configuration_auto, modeling_auto


def model_types() -> list[str]:
    """Every model type the installed transformers registers (``CONFIG_MAPPING``)."""
    return list(_auto()[0].CONFIG_MAPPING_NAMES)


def _mapping(key: str) -> dict:
    name = f"MODEL_FOR_{key}_MAPPING_NAMES" if key else "MODEL_MAPPING_NAMES"
    return getattr(_auto()[1], name, {})


def family(model_type: str) -> str:
    """The first family (`FAMILIES`) whose auto classes know ``model_type``; ``other`` if none."""
    for fam, keys in FAMILIES.items():
        if any(model_type in _mapping(k) for k in keys):
            return fam
    return "other"


def model_classes(model_type: str) -> list[str]:
    """Class names to try for a model type: its head classes, its base model, and for a sub-model
    config (``clip_vision_model``) the ``...Model`` class named after its config class."""
    names = []
    for key in _CLASS_ORDER:
        cls = _mapping(key).get(model_type)
        names.extend(cls if isinstance(cls, (list, tuple)) else [cls] if cls else [])
    config_class = _auto()[0].CONFIG_MAPPING_NAMES.get(model_type, "")
    names.append(config_class.removesuffix("Config") + "Model")
    return list(dict.fromkeys(names))


def build(model_type: str) -> tuple[nn.Module, str]:
    """(model on the meta device from the default config, class name); raises what transformers
    raises when no class can be built from the default config."""
    import transformers

    first_error: Exception | None = None
    for name in model_classes(model_type):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            config = transformers.AutoConfig.for_model(model_type)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(config), name
        except Exception as e:  # transformers' own failure to build from defaults: try the next class
            first_error = first_error or e
    raise first_error or LookupError(f"no model class for {model_type!r}")


# ---- the checker -------------------------------------------------------------------------------
def _int(objs, names) -> int | None:
    for obj in objs:
        for n in names:
            try:
                v = getattr(obj, n, None)
            except Exception:
                v = None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _nearest_config(path: str, modules: dict[str, nn.Module]):
    """The config of the innermost module at or above ``path`` that has one: its sub-model's."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        cfg = getattr(modules.get(".".join(parts[:i])), "config", None)
        if cfg is not None and not isinstance(cfg, (int, float, str, bool, dict)):
            return cfg
    return None


def _row_blocks(spec: BlockSpec, dim: int) -> list[int] | None:
    """Block id of each index along ``dim`` when ``dim`` is the spec's only block dim."""
    if spec.block_dims != (dim,):
        return None
    ids, base = [], 0
    for units, per in spec.segments:
        ids.extend(base + u // per for u in range(units))
        base += units // per
    return ids


def _head_blocks(spec: BlockSpec, dim: int, hd: int) -> tuple[bool, int]:
    """(no block crosses an aligned slot of ``hd`` rows, number of slots that are one whole block)."""
    ids = _row_blocks(spec, dim)
    if ids is None:
        return False, 0
    slot_of: dict[int, int] = {}
    for r, b in enumerate(ids):
        if slot_of.setdefault(b, r // hd) != r // hd:
            return False, 0
    sizes = Counter(ids)
    return True, sum(1 for s in range(0, len(ids), hd) if sizes[ids[s]] == hd and ids[s] == ids[s + hd - 1])


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    w = getattr(module, "weight", None) if isinstance(module, nn.Module) else None
    return w if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def _head_size(own, n_heads, q_width) -> int | None:
    """The head size the module or its sub-model's config states; else the query width over the
    head count."""
    stated = _int(own, _HEAD_SIZE)
    if stated:
        return stated
    return q_width // n_heads if n_heads and q_width and q_width % n_heads == 0 else None


def _in(path: str, name: str) -> str:
    """The name of ``name`` inside the module at ``path`` (the model itself: ``""``)."""
    return f"{path}.{name}" if path else name


def _check_attention(path, module, modules, plan, out) -> int:
    """Heads of the query/key tensors of ``module`` (see the module docstring); returns how many
    tensors were verified."""
    cfg = _nearest_config(path, modules)
    own = [module, getattr(module, "config", None) or cfg]
    n_heads = _int(own, _N_HEADS)
    checked = 0
    children = module._modules
    tasks = []  # (tensor name, neuron dim, head size, minimum whole-slot blocks)
    q, k = (next((n for n in names if _weight(children.get(n)) is not None), None) for names in (_Q, _K))
    if q and k:
        conv1d = type(children[q]).__name__ == "Conv1D"
        q_width, k_width = (children[n].weight.shape[1 if conv1d else 0] for n in (q, k))
        hd = _head_size(own, n_heads, q_width)
        if hd and q_width % hd == 0 and k_width % hd == 0:
            gated = bool(n_heads) and q_width == 2 * n_heads * hd
            tasks.append((_in(path, f"{q}.weight"), int(conv1d), hd, q_width // hd // (2 if gated else 1), "query"))
            tasks.append((_in(path, f"{k}.weight"), int(conv1d), hd, k_width // hd, "key"))
    if _weight(children.get("kv_b_proj")) is not None:  # latent attention: per-head rows after the latents
        # the module's own numbers first (layers differ: some have no rotary part, rope = 0)
        nope, rope, v_hd = (next((v for o in own if isinstance(v := getattr(o, k, None), int)), None)
                            for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        q = next((n for n in ("q_b_proj", "q_proj") if _weight(children.get(n)) is not None), None)
        if nope and rope is not None and v_hd and n_heads and q:
            tasks.append((_in(path, f"{q}.weight"), 0, nope + rope, n_heads, "latent-attention query"))
            tasks.append((_in(path, "kv_b_proj.weight"), 0, nope + v_hd, 0, "latent-attention key/value"))
    fused = next((n for n in _FUSED if _weight(children.get(n)) is not None), None)
    if fused and not tasks:
        child = children[fused]
        conv1d = type(child).__name__ == "Conv1D"
        out_width = child.weight.shape[1 if conv1d else 0]
        hd = _head_size(own, n_heads, out_width // 3 if out_width % 3 == 0 else 0)
        if hd and n_heads and out_width % hd == 0:
            tasks.append((_in(path, f"{fused}.weight"), 1 if conv1d else 0, hd, n_heads, "fused query/key/value"))
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        hd = module.embed_dim // module.num_heads
        tasks.append((_in(path, "in_proj_weight"), 0, hd, 2 * module.num_heads, "packed in_proj"))
    for name, dim, hd, want, what in tasks:
        if name not in plan:
            continue
        checked += 1
        inside, whole_slots = _head_blocks(plan[name], dim, hd)
        if not inside:
            out.append(Violation(name, f"{what}: a block crosses a head of {hd} rows (or not cut along the neurons)"))
        elif whole_slots < want:
            out.append(Violation(name, f"{what}: {whole_slots} whole heads of {hd} rows, expected at least {want}"))
    return checked


def _check_experts(path, module, modules, plan, out) -> None:
    cfg = _nearest_config(path, modules)
    n_exp = _int([module, getattr(module, "config", None) or cfg], _N_EXPERTS)
    hidden = _int([module, getattr(module, "config", None) or cfg], _HIDDEN)
    if not n_exp:
        return
    for attr, p in module.named_parameters(recurse=False):
        name = f"{path}.{attr}" if path else attr
        if p.ndim != 3 or p.shape[0] != n_exp or name not in plan or not hidden:
            continue
        leaf, (a, b) = attr.lower(), p.shape[1:]
        if (a == hidden) == (b == hidden):
            continue  # the checker cannot tell the sides apart by size: unverified
        h_dim = 1 if a == hidden else 2
        if any(k in leaf for k in ("down", "w2")):
            out_dim = h_dim
        elif any(k in leaf for k in ("gate", "up", "w1", "w3")):
            out_dim = 3 - h_dim
        else:
            continue
        spec = plan[name]
        if spec.block_dims != (0, out_dim) or spec.segments != ((n_exp * p.shape[out_dim], 1),):
            out.append(Violation(name, f"experts: expected one block per expert per output neuron along dim {out_dim}, "
                                       f"got block dims {spec.block_dims}"))


def _check_token_rows(model: nn.Module, plan: Plan, out: list[Violation]) -> None:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(model, getter)()
        except Exception:
            continue
        w = _weight(emb)
        if not isinstance(emb, (nn.Embedding, nn.Linear)) or w is None or names.get(id(w)) not in plan:
            continue
        spec = plan[names[id(w)]]
        if spec.block_dims != (0,) or spec.segments != ((w.shape[0], 1),):
            out.append(Violation(names[id(w)], f"{getter[4:]}: expected one block per token row, got {spec.describe()}"))


def check(model: nn.Module, plan: Plan) -> tuple[list[Violation], int]:
    """(violations of the invariants, query/key tensors verified); ``warned`` is left False."""
    out: list[Violation] = []
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        if name not in plan:
            out.append(Violation(name, "no spec"))
        elif tuple(plan[name].shape) != tuple(p.shape):
            out.append(Violation(name, f"spec of shape {plan[name].shape} for a tensor of shape {tuple(p.shape)}"))
    modules = dict(model.named_modules())
    checked, with_qk = 0, set()
    for name in plan:
        if plan[name].role in ("query", "key", "qkv", "value", "attn_out"):
            parts = name.split(".")
            with_qk.update(".".join(parts[:i]) for i in range(len(parts)))
    seen = set()  # identical modules (the layers of a stack) are checked once
    for path, module in modules.items():
        signature = (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))
        if signature in seen:
            continue
        seen.add(signature)
        checked += _check_attention(path, module, modules, plan, out)
        _check_experts(path, module, modules, plan, out)
        owner = modules.get(path.partition(".parametrizations")[0]) if ".parametrizations" in path else module
        if isinstance(owner, nn.modules.conv._ConvNd):  # one block per conv weight is the rule (conv="whole")
            continue
        for attr, p in module.named_parameters(recurse=False):
            name = f"{path}.{attr}" if path else attr
            spec = plan[name] if name in plan else None
            if spec is not None and spec.rule == "whole" and p.ndim >= 2 and sorted(p.shape)[-2] > 1:
                out.append(Violation(name, "a matrix in one block"))
        if _ATTENTION.search(type(module).__name__) and path not in with_qk:
            prefix = f"{path}." if path else ""
            mats = [prefix + n for n, p in module.named_parameters()
                    if p.ndim >= 2 and prefix + n in plan and plan[prefix + n].role in ("linear", "other", "conv")]
            if mats:
                out.append(Violation(mats[0], f"{type(module).__name__} looks like attention; no part of it recognised"))
    _check_token_rows(model, plan, out)
    return out, checked


def _named_in(v: Violation, warnings_: list[str]) -> bool:
    """Whether a warning names the tensor or a module holding it (as a path or a ``*`` glob)."""
    parts = v.tensor.split(".")
    owners = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    for w in warnings_:
        for token in re.findall(r"[\w.*]+", w):
            if token in owners or ("*" in token and any(fnmatch.fnmatchcase(o, token) for o in owners)):
                return True
    return False


# ---- one model type --------------------------------------------------------------------------
def cover(model_type: str, builder: Callable[[str], tuple[nn.Module, str]] | None = None,
          family_name: str | None = None) -> Coverage:
    """Build, partition and check one model type (see the module docstring). ``builder`` builds
    a model of another library by name (returning it and its class name), ``family_name`` its row's family."""
    row = Coverage(model_type, family_name or family(model_type))
    t0 = time.perf_counter()
    try:
        model, row.model_class = (builder or build)(model_type)
    except Exception as e:
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        return row
    row.build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = partition(model)
    except Exception as e:
        row.status, row.error = "crash", f"{type(e).__name__}: {e}"
        return row
    row.plan_s = time.perf_counter() - t0
    row.warnings = [str(w.message) for w in caught if issubclass(w.category, PartitionWarning)]
    summary = plan.summary()
    row.params, row.tensors, row.rules = summary.n_params, summary.n_tensors, dict(summary.tensors_per_rule)
    row.heads = sum(1 for s in plan.values() if s.rule == "heads")
    row.violations, row.attention_checked = check(model, plan)
    for v in row.violations:
        v.warned = _named_in(v, row.warnings)
    if any(not v.warned for v in row.violations):
        row.status = "silent"
    else:
        row.status = "warned" if row.warnings else "structural"
    return row


def sweep_results(rows: list[Coverage], seconds: float, text_limit: int = 600) -> dict:
    """What a sweep study writes: the totals, its time, and every row (warnings cut at ``text_limit``
    characters; the plan has the whole text)."""
    return {
        "totals": totals(rows),
        "sweep_seconds": round(seconds, 1),
        "slowest_plan_seconds": max((r.plan_s for r in rows), default=0.0),
        "models": [{**asdict(r), "warnings": [w[:text_limit] for w in r.warnings],
                    "build_s": round(r.build_s, 3), "plan_s": round(r.plan_s, 4)} for r in rows],
    }


def totals(rows: list[Coverage]) -> dict[str, int]:
    """Model types per status (`STATUSES`) and in all."""
    counts = Counter(r.status for r in rows)
    return {"types": len(rows), **{s: counts.get(s, 0) for s in STATUSES}}
