"""The optimizers `blockopt compare` can run, by name, and how each is built from hyperparameters.

A *peer* is a registered factory ``factory(model, hyperparameters) -> torch.optim.Optimizer``
plus what it needs (pip packages) and which hyperparameters it reads::

    from blockopt.bench.peers import register_optimizer

    register_optimizer(
        "my-sgd",
        lambda model, hp: torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"]),
        shared=("lr",),                 # read from the comparison's common settings
        defaults={"momentum": 0.9},     # its own, overridable per run: --opt my-sgd:momentum=0.8
        description="torch.optim.SGD with momentum",
    )

Three modules: `registry` (`Peer`, register/get, how hyperparameters resolve), `spec` (the run
grammar ``"sgd-sai:lr=1e-2,momentum=0.8"``) and `catalogue` (the built-in peers, registered on
import of this package).
"""

from .registry import (
    SHARED_KEYS,
    OptimizerFactory,
    Peer,
    PeerError,
    PeerUnavailableError,
    get_peer,
    register_family,
    register_optimizer,
    registered_optimizers,
    unregister_optimizer,
)
from .spec import OptimizerSpec, as_spec, build_optimizer, format_spec, parse_optimizer_spec, parse_value
# last: importing the catalogue registers the built-in peers
from .catalogue import PYTORCH_OPTIMIZER_PREFIX, adamw, attention_geometry, decay_groups

__all__ = [
    "PYTORCH_OPTIMIZER_PREFIX", "SHARED_KEYS", "OptimizerFactory", "OptimizerSpec", "Peer", "PeerError",
    "PeerUnavailableError", "adamw", "as_spec", "attention_geometry", "build_optimizer", "decay_groups", "format_spec",
    "get_peer", "parse_optimizer_spec", "parse_value", "register_family", "register_optimizer",
    "registered_optimizers", "unregister_optimizer",
]
