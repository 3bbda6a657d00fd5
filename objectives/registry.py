"""A small registry of named pre-training objectives.

Each objective is a class with a pydantic ``Params`` model (its YAML fields under ``objective:``), a
``prepare(batch, generator)`` step that runs on CPU (in the data stream or the worker) and a
``loss(model, batch) -> (loss, metrics)`` step that runs on the worker's device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from pydantic import BaseModel, ValidationError


class Objective(Protocol):
    """What the training loop relies on; nothing objective-specific leaks into the loop."""

    name: str

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: register an objective under ``name`` (a duplicate name is an error)."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_REGISTRY)


def objective_class(name: str) -> type:
    """The class registered as ``name`` (to ask what kind of objective it is without building one)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def params_model(name: str) -> type[BaseModel]:
    """The pydantic model of an objective's parameters (used to validate configs on the driver)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name].Params


def get(name: str, **params: Any) -> Objective:
    """Build the objective ``name`` with validated parameters."""
    model = params_model(name)
    try:
        p = model(**params)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ValueError(
            f"objective {name!r}: field {field!r} = {err.get('input')!r}: {err['msg']} "
            f"(fields: {', '.join(model.model_fields)})"
        ) from None
    return _REGISTRY[name](p)
