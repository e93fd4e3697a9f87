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


def load_config(name_or_path: str):
    """A transformers config from a named shape (`NAMED_CONFIGS`) or a ``config.json`` path."""
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("planning Hugging Face models needs transformers: pip install 'blockopt[hf]'") from e
    if name_or_path in NAMED_CONFIGS:
        fields = dict(NAMED_CONFIGS[name_or_path])
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) nor a config.json file"
            )
        fields = json.loads(path.read_text())
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


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
