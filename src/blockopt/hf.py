"""Hugging Face configs and models on the meta device, for planning without memory (needs ``transformers``).

    model = blockopt.hf.meta_model("llama-2-7b")          # a named shape, or a config.json path
    print(blockopt.partition(model))

The one reader of configs: `config_fields` (a named shape or a config.json), `config_from_fields`
(the transformers config, its sizes checked), `load_config` (the two), `find_config` (those, or
a Hub model id) and `model_from_config`. Each failure is one line naming the config and what is
wrong (`ConfigError`), so that ``blockopt plan FILE`` and ``blockopt compare --model FILE`` say
the same thing.

For transformers' ``Trainer`` (docs/integrations.md): `create_optimizer` (an optimizer for the
model, hyperparameters from ``TrainingArguments``), `optimizer_cls_and_kwargs` (the same for the
Trainer's ``optimizer_cls_and_kwargs=``, keeping the structural plan), `optimizer_metrics` and
`BlockoptCallback` (the plan and the state's bytes in the Trainer's logs). Both halves live here,
near 400 lines, as blockopt's one door to transformers, which is imported only when used (it takes
seconds to import).
"""

from __future__ import annotations

import difflib
import json
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .optim.adam_mini import AdamMini
from .optim.adapm import AdaPM
from .optim.sgd_sai import SGDSaI
from .optim.state import state_bytes
from .validation import check, choice, integer

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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "meta-llama/Llama-3.1-8B"
_SIZE_FIELD = re.compile(r"(n|num)_\w+|\w+_(size|dim|heads|layers|experts)")  # counts and widths


class ConfigError(ValueError):
    """A config that cannot be read, is not a transformers config, or cannot be built; the message
    names where it came from."""


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
        FileNotFoundError: none of these, or a folder without a config.json.
        ConfigError: a file that is not JSON, not UTF-8, not an object, or has no ``model_type``.
    """
    if name_or_path in NAMED_CONFIGS:
        return dict(NAMED_CONFIGS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path}: the folder has no config.json")
        path = path / "config.json"
    if path.is_file():
        return _read_config_file(path)
    known = list(NAMED_CONFIGS)
    if model_types and path.suffix != ".json":
        _transformers()
        from transformers import CONFIG_MAPPING

        if name_or_path in CONFIG_MAPPING:
            return {"model_type": name_or_path}
        known += CONFIG_MAPPING.keys()
    close = difflib.get_close_matches(name_or_path, known, n=3)
    what = f"a named config ({', '.join(NAMED_CONFIGS)})"
    if model_types:
        what += ", a transformers model_type (llama, mistral, qwen2, ...)"
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FileNotFoundError(f"{name_or_path!r} is neither {what} nor a config.json file{hint}")


def _read_config_file(path: Path) -> dict:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; expected a Hugging Face config.json") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{path} holds no JSON object; expected a Hugging Face config.json")
    if "model_type" not in fields:
        raise ConfigError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
    return fields


def config_from_fields(fields: Mapping, *, source: str | None = None):
    """The transformers config of ``fields`` (``model_type`` plus any of that config's fields),
    its counts and widths checked (>= 0: some models build silently from a negative one).

    Raises:
        ConfigError: an unknown ``model_type`` (close matches named), fields the config refuses,
            or a negative size; the message starts with ``source`` (default: the model_type).
    """
    transformers = _transformers()
    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    source = source or (f"the {model_type} config" if isinstance(model_type, str) else "the config")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        known = list(transformers.CONFIG_MAPPING.keys())
        close = difflib.get_close_matches(model_type, known, n=3) if isinstance(model_type, str) else []
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{source}: unknown model_type {model_type!r} ({hint}transformers {transformers.__version__} "
                          f"knows {len(known)}, listed in transformers.CONFIG_MAPPING)")
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # noqa: BLE001 - ValueError, TypeError or the Hub's strict-dataclass errors
        raise ConfigError(f"{source}: not a valid {model_type} config: {_reason(error)}") from error
    _check_sizes(config, source)
    return config


def load_config(name_or_path: str):
    """A transformers config from a named shape (`NAMED_CONFIGS`) or a ``config.json`` path (or
    its folder); errors as `config_fields` and `config_from_fields` raise them."""
    _transformers()
    return config_from_fields(config_fields(name_or_path), source=name_or_path)


def find_config(text: str):
    """The config ``text`` names, as ``blockopt plan MODEL`` reads it: a named shape, a
    config.json or a folder holding one (`load_config`), ``hf:`` and any of those or a
    transformers model_type (as `blockopt compare` reads it), or else a Hugging Face model id (its
    config.json from the Hub, or from the local cache alone when the Hub cannot be reached: its
    retries would take half a minute to say the same).

    Raises:
        FileNotFoundError: no such file, folder, named shape or model id (the message says why).
        ConfigError: as `load_config`; a Hub config that transformers refuses.
    """
    if text.startswith("hf:"):  # as `blockopt compare --model hf:...` reads it: a named shape, a file or a model_type
        return config_from_fields(config_fields(text[3:], model_types=True), source=text)
    path = Path(text).expanduser()
    if text in NAMED_CONFIGS or path.is_file() or path.is_dir():
        return load_config(text)
    if path.exists():
        raise FileNotFoundError(f"{text}: not a file or folder; expected a Hugging Face config.json")
    if not _HUB_ID.fullmatch(text) or text.endswith(".json"):
        raise FileNotFoundError(f"{text}: no such file or folder")
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if offline is None:
        try:
            socket.getaddrinfo(host, 443)
        except OSError as error:
            offline = f"{host} is unreachable ({error.strerror or error})"
    try:
        return _transformers().AutoConfig.from_pretrained(text, local_files_only=offline is not None)
    except OSError as error:  # transformers' lookup failures are OSErrors
        close = difflib.get_close_matches(text, list(NAMED_CONFIGS), n=1)
        named = f" (did you mean {close[0]}?)" if close else ""
        raise FileNotFoundError(f"{text!r} is no file, folder or named shape{named}, and as a Hugging Face model id: "
                                f"{_hub_failure(error, offline)}") from error
    except Exception as error:  # noqa: BLE001 - the config itself: unknown model_type, bad sizes, custom code
        raise ConfigError(f"{text} (Hugging Face Hub): {_reason(error)}") from error


def _hub_failure(error: Exception, offline: str | None) -> str:
    """Why the Hub gave no config, in words (transformers' own message is a paragraph)."""
    from huggingface_hub import errors

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    found = lambda kind: any(isinstance(e, kind) for e in chain)  # noqa: E731
    if offline is not None and found(errors.LocalEntryNotFoundError):
        return f"not in the local cache, and {offline}"
    if found(errors.GatedRepoError):
        return "the model is gated: accept its terms on huggingface.co, then log in (hf auth login)"
    if found(errors.RepositoryNotFoundError):
        return "no such model on the Hub (a private one needs: hf auth login)"
    if found(errors.LocalEntryNotFoundError):
        return f"not in the local cache, and the Hub did not answer ({_reason(chain[-1])})"
    return _reason(error)


def model_from_config(config, *, source: str | None = None, require_lm_head: bool = False) -> nn.Module:
    """The model of a transformers ``config`` on the current default device: its causal LM, else
    (unless ``require_lm_head``) its base model, for encoders and other families without one.

    Raises:
        ConfigError: a negative size, or a config transformers cannot build a model from (sizes
            that are 0 are named as the likely cause).
    """
    transformers = _transformers()
    source = source or f"the {config.model_type} config"
    _check_sizes(config, source)
    try:
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            if require_lm_head:
                raise
            return transformers.AutoModel.from_config(config)
    except Exception as error:  # noqa: BLE001 - transformers checks few fields; a failure here is the config's
        zeros = ", ".join(f"{name}=0" for name, value in _sizes(config.to_dict()) if value == 0)
        raise ConfigError(f"{source}: transformers cannot build a {config.model_type} model from it"
                          f"{f' ({zeros}?)' if zeros else ''}: {_reason(error)}") from error


def meta_model(name_or_path_or_config, *, source: str | None = None) -> nn.Module:
    """Build a causal-LM (or base) model on the meta device: shapes and structure, no memory.
    ``source`` names the config in error messages (default: the name or path given)."""
    config = name_or_path_or_config
    if not isinstance(config, _transformers().PretrainedConfig):
        source = source or str(config)
        config = load_config(config)
    with torch.device("meta"):
        return model_from_config(config, source=source)


def _check_sizes(config, source: str) -> None:
    try:
        for name, value in _sizes(config.to_dict()):
            check(name, value, integer(0))
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def _sizes(fields: Mapping, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Integer counts and widths of a config (``hidden_size``, ``num_heads``, ...), sub-configs included."""
    for name, value in fields.items():
        if isinstance(value, Mapping):
            yield from _sizes(value, f"{prefix}{name}.")
        elif isinstance(name, str) and _SIZE_FIELD.fullmatch(name) and isinstance(value, int) and not isinstance(value, bool):
            yield prefix + name, value


def _reason(error: BaseException) -> str:
    """``error``'s message on one line; huggingface_hub's validation errors quote their cause
    below a header line, and the cause says it."""
    while (cause := error.__cause__) is not None and str(cause) and str(cause) in str(error).partition("\n")[2]:
        error = cause
    return " ".join(str(error).split()) or type(error).__name__


# ---- transformers' Trainer ---------------------------------------------------------------------

OPTIMIZERS = {"adam-mini": AdamMini, "adapm": AdaPM, "sgd-sai": SGDSaI}


def trainer_hyperparameters(training_args, name: str = "adam-mini") -> dict:
    """The keyword arguments of optimizer ``name`` that ``TrainingArguments`` sets: ``lr``
    (``learning_rate``), ``weight_decay``, ``seed`` (the run's: the optimizer's rounding bits,
    AdaPM's initial factors) and the Trainer's decay rule, ``decay_1d=False`` (biases and norms
    are not decayed; SGDSaI's own default, the sgd-sai package's, decays them) for all; ``betas``
    (``adam_beta1``, ``adam_beta2``) and ``eps`` (``adam_epsilon``) for the Adam family only:
    SGD-SaI's ``momentum`` and ``eps`` mean other things, so they keep SGDSaI's defaults unless given."""
    if not all(hasattr(training_args, key) for key in ("learning_rate", "weight_decay", "seed")):
        raise TypeError(f"training_args must be transformers.TrainingArguments (create_optimizer(model, args, ...)), "
                        f"got {type(training_args).__name__}")
    kwargs = dict(lr=training_args.learning_rate, weight_decay=training_args.weight_decay, seed=training_args.seed,
                  decay_1d=False)
    if _optimizer_class(name) is not SGDSaI:
        kwargs.update(betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon)
    return kwargs


def create_optimizer(model: nn.Module, training_args, name: str = "adam-mini", **overrides):
    """Optimizer ``name`` (``"adam-mini"``, ``"adapm"`` or ``"sgd-sai"``) for ``model``, planned
    from its structure (heads, embeddings, LoRA factors), with `trainer_hyperparameters` from
    ``training_args``; ``overrides`` win::

        trainer = Trainer(model, args, ..., optimizers=(blockopt.hf.create_optimizer(model, args), None))

    Decay: the Trainer exempts biases and norms from ``weight_decay``; so does every optimizer made
    here, by exempting every 1-D parameter (``decay_1d=False``, SGD-SaI's included), which covers
    the same tensors.
    """
    return _optimizer_class(name)(model, **{**trainer_hyperparameters(training_args, name), **overrides})


def optimizer_cls_and_kwargs(training_args, name: str = "adam-mini", **overrides) -> tuple:
    """``Trainer(..., optimizer_cls_and_kwargs=...)`` for optimizer ``name``, planned from the
    model's structure, like `create_optimizer`; the model is the Trainer's (so ``model_init`` and
    hyperparameter search work too).

    Note [the Trainer's two forms]: given an optimizer *class*, the Trainer calls it with two
    param groups of bare tensors (decay / no decay): no names and no module, so the plan falls
    back to shapes (a row per matrix, no heads) and blockopt warns (`PartitionWarning`). Given
    anything else, transformers (>= 5, ``trainer_optimizer.is_optimizer_factory``) treats it as a
    factory: ``factory()(model, **kwargs)``. The first element returned here is such a factory,
    so the optimizer gets the module itself.

    Raises:
        ValueError: an unknown ``name``.
        ImportError: a transformers without optimizer factories; use `create_optimizer` there.
    """
    cls = _optimizer_class(name)
    try:
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401 - the protocol's marker
    except ImportError as error:
        raise ImportError(f"transformers {_transformers().__version__} passes optimizer_cls_and_kwargs only bare "
                          "param groups, which lose the model's structure; pass "
                          "optimizers=(blockopt.hf.create_optimizer(model, args), None) instead") from error
    return _OptimizerFactory(cls), {**trainer_hyperparameters(training_args, name), **overrides}


class _OptimizerFactory:
    """What transformers calls with no arguments, then calls the result with ``(model, **kwargs)``
    (Note [the Trainer's two forms])."""

    def __init__(self, cls: type):
        self.cls = cls

    def __call__(self) -> type:
        return self.cls

    def __repr__(self) -> str:
        return f"optimizer factory of {self.cls.__name__}"


def _optimizer_class(name: str) -> type:
    check("name", name, choice(*OPTIMIZERS))
    return OPTIMIZERS[name]


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Scalars for a training log: ``optimizer/state_bytes`` (`blockopt.state_bytes`, this rank's;
    0 before the first step, since state is created then), and for a blockopt optimizer its plan:
    ``optimizer/tensors``, ``optimizer/params``, ``optimizer/blocks`` (second-moment scalars) and
    ``optimizer/v_fraction`` (blocks per parameter: AdamW's is 1). Wrappers (accelerate's
    ``AcceleratedOptimizer``) are looked through."""
    while not hasattr(optimizer, "plan") and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    metrics = {"optimizer/state_bytes": state_bytes(optimizer)}
    plan = getattr(optimizer, "plan", None)
    if plan is not None:
        summary = plan.summary()
        metrics.update({"optimizer/tensors": summary.n_tensors, "optimizer/params": summary.n_params,
                        "optimizer/blocks": summary.n_blocks, "optimizer/v_fraction": summary.v_fraction})
    return metrics


def __getattr__(name: str):
    # `BlockoptCallback` subclasses transformers' TrainerCallback, so it is built on first use
    # rather than making every `import blockopt` import transformers.
    if name == "BlockoptCallback":
        globals()[name] = cls = _callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _callback_class() -> type:
    TrainerCallback = _transformers().TrainerCallback

    class BlockoptCallback(TrainerCallback):
        """Logs `optimizer_metrics` (plan and state bytes) once per ``train()``, after the first
        optimizer step (the state is created by it), through ``trainer.log``, so every
        ``report_to`` sink and ``trainer.state.log_history`` get them::

            trainer.add_callback(blockopt.hf.BlockoptCallback(trainer))

        It needs the trainer because callbacks are not given it, and only ``Trainer.log`` reaches
        the sinks (they come before user callbacks, so adding to another log's ``logs`` would
        miss them).
        """

        def __init__(self, trainer):
            if not callable(getattr(trainer, "log", None)):
                raise TypeError(f"BlockoptCallback takes the Trainer it logs to (BlockoptCallback(trainer)), got "
                                f"{type(trainer).__name__}")
            self.trainer = trainer
            self._logged = False

        def on_train_begin(self, args, state, control, **kwargs):
            self._logged = False

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if not self._logged and optimizer is not None:
                self._logged = True
                self.trainer.log(optimizer_metrics(optimizer))

    BlockoptCallback.__module__, BlockoptCallback.__qualname__ = __name__, "BlockoptCallback"
    return BlockoptCallback
