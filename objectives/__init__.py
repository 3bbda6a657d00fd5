"""Pre-training objectives, chosen by name: ``objectives.get(name, **params)``."""

from objectives import causal_lm as _causal_lm  # noqa: F401  (registers)
from objectives.registry import Objective, available, get, params_model, register

__all__ = ["Objective", "available", "get", "params_model", "register"]
