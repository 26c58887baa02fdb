"""Objective registry: a config's `objective: name` picks the class (and so the config schema).

Modality packages register their objectives at import; `sslcore` imports none of them, so
`get_objective` imports the modules named in `PLUGIN_MODULES` lazily by name.
"""

from __future__ import annotations

import importlib

from sslcore.config import ConfigError
from sslcore.objective import Objective

_OBJECTIVES: dict[str, type[Objective]] = {}

# Packages whose import registers objectives. Missing ones (not installed) are skipped.
PLUGIN_MODULES = ("textssl", "speechssl", "visionssl")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` reachable as `objective: <cls.name>` in configs."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    existing = _OBJECTIVES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"objective name {cls.name!r} is taken by {existing.__module__}.{existing.__name__}")
    _OBJECTIVES[cls.name] = cls
    return cls


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a real import error inside the package: surface it
                raise


def list_objectives() -> list[str]:
    _load_plugins()
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    if name not in _OBJECTIVES:
        _load_plugins()
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; registered objectives: {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name]
