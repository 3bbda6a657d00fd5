"""Causal language modelling (next-token prediction) with an optional z-loss term."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from objectives import functional as F
from objectives.base import TokenObjective
from objectives.registry import register


@register("causal_lm")
class CausalLM(TokenObjective):
    """GPT-style next-token objective on packed rows of ``seq_len + 1`` tokens.

    ``prepare`` splits a row into inputs ``tokens[:, :-1]`` and targets ``tokens[:, 1:]``; ``loss``
    is cross-entropy plus ``z_loss * log²Z`` (PaLM, arXiv 2204.02311).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        z_loss: float = Field(0.0, ge=0.0, le=1.0, description="weight of the log²Z regulariser (PaLM uses 1e-4)")

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens = batch["tokens"]  # (B, T+1)
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": batch["input_ids"]}  # the fused causal attention path

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        loss, ce, zl = F.causal_lm(logits, batch["targets"], z_loss=self.params.z_loss, return_parts=True)
        # metrics stay tensors: the loop decides when to synchronise with the host
        return loss, {"ce": ce.detach(), "z": zl.detach()}
