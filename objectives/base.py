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
from objectives.hooks import ObjectiveHooks

VAL_SEED = 1234
"""Seed of the generator ``prepare`` uses when given none (validation): the same corruption every eval."""


def generator_or_default(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(VAL_SEED)


class TokenObjective(ObjectiveHooks):
    """Base class; subclasses set ``Params`` and implement ``prepare``, ``model_inputs``, ``loss_from_logits``."""

    name: str
    Params: type[BaseModel]

    def __init__(self, params: BaseModel):
        self.params = params
        self.special_ids: dict[str, int] | None = None
        self.vocab_size: int | None = None
        self.eos_id: int | None = None
        self.pad_id: int | None = None

    # ---- hooks the driver and the worker call ------------------------------------------------
    def required_special_tokens(self) -> list[str]:
        """Special tokens the tokenizer must have (``data.prepare.special_tokens``)."""
        return []

    def check_data(self, data: dict[str, Any]) -> None:
        """The tokenizer must hold every special token this objective needs."""
        have = data.get("special_tokens", {})
        missing = [tok for tok in self.required_special_tokens() if tok not in have]
        if missing:  # every missing token is named (the worker-side lookup shortens long lists)
            raise ValueError(
                f"objective {self.name!r} needs special tokens {missing} that the tokenizer lacks (it has "
                f"{sorted(have)}); prepare the data with data.prepare.special_tokens including them (a "
                "released model's tokenizer gets them after its vocabulary, so its vocab_size grows)"
            )

    def setup(self, *, special_tokens: dict[str, int], vocab_size: int, eos_id: int, pad_id: int) -> None:
        """Record the tokenizer's special tokens, vocabulary, EOS and PAD ids (on the worker, once built).

        ``eos_id`` and ``pad_id`` are the manifest's ``tokenizer.eos_id`` / ``pad_id``, whatever the tokens
        are called (``<|eos|>``, ``</s>``, ``<|endoftext|>``; a tokenizer without a pad token pads with EOS);
        only the objective's own tokens (mask, sentinels, mode tokens) are looked up by name in
        ``special_tokens``.
        """
        st.lookup(special_tokens, self.required_special_tokens(), objective=self.name)
        vocab_size = int(vocab_size)
        for field, value in (("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= int(value) < vocab_size:
                raise ValueError(
                    f"objective {self.name!r}: {field}={value} is outside the vocabulary [0, {vocab_size}); "
                    f"pass the manifest's tokenizer.{field}"
                )
        self.special_ids = {k: int(v) for k, v in special_tokens.items()}
        self.vocab_size, self.eos_id, self.pad_id = vocab_size, int(eos_id), int(pad_id)

    def _check_setup(self) -> None:
        if self.special_ids is None:
            raise RuntimeError(
                f"objective {self.name!r}: call setup(special_tokens=..., vocab_size=..., eos_id=..., "
                "pad_id=...) before prepare (the training loop does; in your own loop pass the manifest's "
                "tokenizer.special_tokens, vocab_size, eos_id and pad_id)"
            )

    def _ids(self, names: list[str]) -> list[int]:
        self._check_setup()
        return st.lookup(self.special_ids, names, objective=self.name)

    def _pad_id(self) -> int:
        """The tokenizer's pad id (its EOS id when it has no pad token)."""
        self._check_setup()
        return int(self.pad_id)

    def special_id_set(self) -> set[int]:
        """Ids of every special token, EOS and PAD included (never masked, never drawn as random tokens)."""
        self._check_setup()
        return {*self.special_ids.values(), int(self.eos_id), int(self.pad_id)}

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
