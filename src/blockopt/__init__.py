"""blockopt: memory-efficient blockwise optimizers for PyTorch (Adam-mini and friends)."""

from . import hf
from .optim.adam_mini import AdamMini
from .optim.adam_mini import AdamMini as Adam_mini  # adam-mini's name: `from blockopt import Adam_mini` swaps it in
from .optim.adapm import AdaPM
from .optim.sgd_sai import SGDSaI
from .param_groups import blockwise_lr
from .hessian import audit, sharpness_ratios
from .optim.state import state_bytes
from .partition import BlockSpec, PartitionWarning, Plan, partition, register_adapter

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("bench", "deepspeed")  # imported on first use: `blockopt.deepspeed.load_state(...)`


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'blockopt' has no attribute {name!r}")

__all__ = ["AdaPM", "AdamMini", "Adam_mini", "BlockSpec", "PartitionWarning", "Plan", "audit", "blockwise_lr", "partition", "register_adapter", "SGDSaI", "sharpness_ratios", "state_bytes", "__version__"]
