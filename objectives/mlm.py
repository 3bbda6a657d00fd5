"""BERT masked language modelling on the decoder run bidirectionally."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from objectives import functional as F
from objectives import special_tokens as st
from objectives.base import TokenObjective, generator_or_default
from objectives.registry import register


@register("mlm")
class MaskedLM(TokenObjective):
    """Masked language modelling (Devlin et al., BERT, arXiv 1810.04805, section 3.1 and appendix A.1).

    The first ``seq_len`` tokens of each packed row (several EOS-separated documents, treated as one
    sequence) are the input. ``round(mask_prob * n)`` of its ``n`` non-special positions are chosen
    uniformly at random per row (BERT's exact count; special tokens, EOS, PAD and BOS included, are
    never chosen, like BERT's [SEP]); each chosen position becomes ``<|mask|>`` with probability
    ``mask_token_frac``, a random non-special token with ``random_token_frac``, and stays as it is
    otherwise (80/10/10). The model attends bidirectionally (``is_causal=False``, across the documents
    of a row) and the loss is the cross-entropy of the original tokens at the chosen positions only.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mask_prob: float = Field(0.15, gt=0.0, lt=1.0, description="share of positions predicted (BERT: 0.15)")
        mask_token_frac: float = Field(0.8, ge=0.0, le=1.0, description="of those, replaced by <|mask|>")
        random_token_frac: float = Field(0.1, ge=0.0, le=1.0, description="of those, replaced by a random token")
        z_loss: float = Field(0.0, ge=0.0, le=1.0, description="weight of the log²Z regulariser (PaLM: 1e-4)")

        @model_validator(mode="after")
        def _fracs(self):
            if self.mask_token_frac + self.random_token_frac > 1.0:
                raise ValueError(
                    f"mask_token_frac + random_token_frac = {self.mask_token_frac + self.random_token_frac} "
                    "exceeds 1; allowed: a sum <= 1 (the rest of the chosen tokens stay unchanged)"
                )
            return self

    def __init__(self, params: Params):
        super().__init__(params)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def required_special_tokens(self) -> list[str]:
        return [st.MASK_TOKEN]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(special ids, non-special ids) on ``device``: never chosen / what random replacements draw from."""
        if device not in self._cache:
            special = torch.tensor(sorted(self.special_id_set()), dtype=torch.long)  # needs setup()
            keep = torch.ones(self.vocab_size, dtype=torch.bool)
            keep[special[special < self.vocab_size]] = False
            self._cache[device] = (special.to(device), keep.nonzero()[:, 0].to(device))
        return self._cache[device]

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        p = self.params
        g = generator_or_default(generator)
        inp = batch["tokens"][:, :-1]  # (B, T): a row holds seq_len + 1 tokens
        dev = inp.device
        B, T = inp.shape
        special, normal = self._tables(dev)
        mask_id = self._ids([st.MASK_TOKEN])[0]
        # the random draws happen on the CPU generator, whatever the device
        u_pick = torch.rand(B, T, generator=g).to(dev)
        u_kind = torch.rand(B, T, generator=g).to(dev)
        r_tok = torch.randint(0, len(normal), (B, T), generator=g).to(dev)

        candidate = ~torch.isin(inp, special)  # (B, T)
        n_cand = candidate.sum(dim=1)  # (B,)
        n_pick = torch.floor(n_cand * p.mask_prob + 0.5).long().clamp(min=1).minimum(n_cand)
        rank = u_pick.masked_fill(~candidate, 2.0).argsort(dim=1).argsort(dim=1)  # (B, T): 0 = lowest draw
        picked = rank < n_pick[:, None]  # (B, T): exactly n_pick per row, all candidates
        to_mask = picked & (u_kind < p.mask_token_frac)
        to_rand = picked & (u_kind >= p.mask_token_frac) & (u_kind < p.mask_token_frac + p.random_token_frac)
        corrupted = torch.where(to_mask, mask_id, torch.where(to_rand, normal[r_tok], inp))
        return {"input_ids": corrupted, "targets": inp.masked_fill(~picked, -100)}

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": batch["input_ids"], "is_causal": False}

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        loss, ce, zl = F.cross_entropy(logits, batch["targets"], z_loss=self.params.z_loss, return_parts=True)
        return loss, {"ce": ce.detach(), "z": zl.detach()}
