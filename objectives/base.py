"""Shared plumbing of the token objectives: special-token setup, seeding, one forward, one loss.

An objective splits its ``loss(model, batch)`` into :meth:`TokenObjective.model_inputs` (the keyword
arguments of ``DecoderLM.forward``: ids and the attention mode) and :meth:`TokenObjective.loss_from_logits`,
so that a wrapper such as ``self_distillation`` can run the same forward with ``return_hidden=True``
and reuse the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from objectives import special_tokens as st

VAL_SEED = 1234
"""Seed of the generator ``prepare`` uses when given none (validation): the same corruption every eval."""


def generator_or_default(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(VAL_SEED)


class TokenObjective:
    """Base class; subclasses set ``Params`` and implement ``prepare``, ``model_inputs``, ``loss_from_logits``."""

    name: str
    Params: type[BaseModel]

    def __init__(self, params: BaseModel):
        self.params = params
        self.special_ids: dict[str, int] | None = None
        self.vocab_size: int | None = None

    # ---- hooks the driver and the worker call ------------------------------------------------
    def required_special_tokens(self) -> list[str]:
        """Special tokens the tokenizer must have (``data.prepare.special_tokens``)."""
        return []

    def setup(self, *, special_tokens: dict[str, int], vocab_size: int) -> None:
        """Record the tokenizer's special-token ids and vocabulary (called on the worker after construction)."""
        st.lookup(special_tokens, self.required_special_tokens(), objective=self.name)
        self.special_ids = {k: int(v) for k, v in special_tokens.items()}
        self.vocab_size = int(vocab_size)

    def _ids(self, names: list[str]) -> list[int]:
        if self.special_ids is None:
            raise RuntimeError(
                f"objective {self.name!r}: call setup(special_tokens=..., vocab_size=...) before prepare "
                "(the training loop does; in your own loop pass the manifest's tokenizer.special_tokens)"
            )
        return st.lookup(self.special_ids, names, objective=self.name)

    # ---- the two steps -----------------------------------------------------------------------
    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``DecoderLM.forward`` for a prepared batch."""
        raise NotImplementedError

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        logits = model(**self.model_inputs(batch))  # (B, T, V)
        return self.loss_from_logits(logits, batch)
