"""The single module a vision objective trains, and its builder.

DeepSpeed wraps one ``nn.Module``; a vision objective needs several parts (encoder, decoder, heads, a
text tower). :class:`VisionModel` owns them as named sub-modules, reachable as attributes
(``model.encoder``, ``model.decoder``, ...) and callable through ``model(part, *args, **kwargs)``, which is
how the objectives call them so that a wrapping engine sees every forward.

Parts per objective (all have ``encoder``, a :class:`models.vit.ViTEncoder`):

| objective | other parts |
|---|---|
| ``mae`` | ``decoder`` (:class:`models.vit.MAEDecoder`) |
| ``hpm`` | ``decoder``, ``loss_predictor`` (an ``MAEDecoder`` with one output per patch), ``teacher`` (:class:`objectives.vision.masked.HPMTeacher`: frozen EMA copies of ``encoder`` and ``loss_predictor``) |
| ``simclr``, ``barlow_twins``, ``mixed_barlow_twins`` | ``projector`` (:class:`models.heads.ProjectionHead`) |
| ``amcl`` | ``projectors`` (:class:`models.heads.MultiHeadProjector`), ``temperature`` (:class:`models.heads.PairTemperature`) |
| ``clip`` | ``image_proj`` (Linear), ``text_encoder`` (:class:`models.vit.TextEncoder`), ``logit_scale`` (:class:`models.heads.LogitScale`) |

For export and probes only ``model.encoder`` matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from torch import nn

from models.vit import ResolvedViTConfig, ViTConfig, resolve_vit_config


class VisionModel(nn.Module):
    """Named parts of a vision objective; ``forward(part, *args, **kwargs)`` runs ``getattr(self, part)``."""

    def __init__(self, parts: Mapping[str, nn.Module], *, vit_cfg: ResolvedViTConfig, objective_name: str):
        super().__init__()
        if "encoder" not in parts:
            raise ValueError("a vision model needs an 'encoder' part")
        for part_name, module in parts.items():
            self.add_module(part_name, module)
        self.vit_cfg = vit_cfg
        self.objective_name = objective_name

    @property
    def part_names(self) -> list[str]:
        return list(self._modules)

    def forward(self, part: str, *args: Any, **kwargs: Any) -> Any:
        module = self._modules.get(part)
        if module is None:
            raise ValueError(
                f"vision model for {self.objective_name!r} has no part {part!r}; parts: {', '.join(self._modules)}"
            )
        return module(*args, **kwargs)


def build_model(
    objective_name: str,
    params: BaseModel | Mapping[str, Any] | None = None,
    vit_cfg: str | Mapping[str, Any] | ViTConfig | ResolvedViTConfig = "tiny",
) -> VisionModel:
    """A freshly initialised :class:`VisionModel` with the parts objective ``objective_name`` trains.

    ``params``: the objective's ``Params`` (or a dict of them; None = defaults), validated as
    ``objectives.get`` does; ``vit_cfg``: a ViT preset name, a ``vit:`` dict or config.
    """
    from objectives import registry
    from objectives.vision.base import VisionObjective, registered_vision_objectives

    if isinstance(params, BaseModel):
        params = params.model_dump()
    objective = registry.get(objective_name, **dict(params or {}))
    if not isinstance(objective, VisionObjective):
        raise ValueError(
            f"objective {objective_name!r} is not a vision objective; vision objectives: "
            f"{', '.join(registered_vision_objectives())}"
        )
    vit = resolve_vit_config(vit_cfg)
    parts = type(objective).build_modules(objective.params, vit)
    return VisionModel(parts, vit_cfg=vit, objective_name=objective_name)
