"""selfsup core: one trainer, typed configs, checkpoints, Hub export — for every modality."""

from sslcore.config import ConfigError, load
from sslcore.objective import Objective
from sslcore.registry import get_objective, list_objectives, register_objective
from sslcore.run_config import HubConfig, RunConfig, TrainConfig
from sslcore.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["ConfigError", "HubConfig", "NonFiniteLossError", "Objective", "RunConfig", "TrainConfig", "TrainResult",
           "Trainer", "get_objective", "list_objectives", "load", "register_objective"]
