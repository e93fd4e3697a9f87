"""Hugging Face models on the meta device, for planning without memory (needs ``transformers``).

    model = blockopt.hf.meta_model("llama-2-7b")          # a named shape, or a config.json path
    print(blockopt.partition(model))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Public model shapes (numbers from the models' published configs), for planning and memory figures.
NAMED_CONFIGS: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", vocab_size=50257, n_embd=1280, n_layer=36, n_head=20, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2),
}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face models need transformers: pip install 'blockopt[hf]'") from e
    return transformers


def config_fields(name_or_path: str, *, model_types: bool = False) -> dict:
    """The fields of a config, ``model_type`` included: a named shape (`NAMED_CONFIGS`), a
    ``config.json`` (or the folder holding one), or, with ``model_types``, a transformers
    model_type alone (``"llama"``: its defaults).

    Raises:
        FileNotFoundError: none of these.
        ValueError: a JSON file without ``model_type``.
    """
    if name_or_path in NAMED_CONFIGS:
        return dict(NAMED_CONFIGS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        fields = json.loads(path.read_text())
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
        return fields
    if model_types and path.suffix != ".json":
        _transformers()
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if name_or_path in CONFIG_MAPPING:
            return {"model_type": name_or_path}
    known = f"a named config ({', '.join(NAMED_CONFIGS)})"
    if model_types:
        known += ", a transformers model_type (llama, mistral, qwen2, ...)"
    raise FileNotFoundError(f"{name_or_path!r} is neither {known} nor a config.json file")


def config_from_fields(fields: dict):
    """The transformers config of ``fields`` (``model_type`` plus any of that config's fields)."""
    fields = dict(fields)
    return _transformers().AutoConfig.for_model(fields.pop("model_type"), **fields)


def load_config(name_or_path: str):
    """A transformers config from a named shape (`NAMED_CONFIGS`) or a ``config.json`` path."""
    _transformers()
    return config_from_fields(config_fields(name_or_path))


def meta_model(name_or_path_or_config):
    """Build a causal-LM (or base) model on the meta device: shapes and structure, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig

    config = name_or_path_or_config
    if not isinstance(config, PretrainedConfig):
        config = load_config(config)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # encoders and other families without a causal-LM head
            return AutoModel.from_config(config)
