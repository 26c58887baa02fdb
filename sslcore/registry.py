"""Registries: objectives (a config's `objective: name` picks the class, and so the config schema) and
each modality's built-in downstream tasks (`TaskRegistry`).

Modality packages register their objectives at import; `sslcore` imports none of them, so
`get_objective` imports the modules named in `PLUGIN_MODULES` lazily by name.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

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


Spec = TypeVar("Spec")


class TaskRegistry(dict, Generic[Spec]):
    """One modality's built-in tasks by name. A spec has `name`, `description` and `needs` (what its first
    build must reach, or None); it is a dict, so `registry.get(name)` finds one."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, spec: Any) -> Any:
        """Make `spec.name` loadable; a taken name is an error."""
        if spec.name in self and self[spec.name] != spec:
            raise ValueError(f"{self.kind} name {spec.name!r} is already registered")
        self[spec.name] = spec
        return spec

    def names(self) -> list[str]:
        """Names of the built-in tasks."""
        return sorted(self)

    def describe(self) -> dict[str, str]:
        """One line per built-in task: what it is and what its first build needs."""
        return {name: spec.description + (f" (first build needs {spec.needs})" if spec.needs else "")
                for name, spec in sorted(self.items())}
