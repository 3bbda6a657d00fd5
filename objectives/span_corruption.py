"""T5 span corruption, formulated for a decoder-only model (prefix LM over ``corrupted input | targets``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from objectives import corruption as C
from objectives import functional as F
from objectives import special_tokens as st
from objectives.base import TokenObjective, generator_or_default
from objectives.registry import register

log = logging.getLogger(__name__)


def denoising_attention(batch: dict[str, Any]) -> dict[str, Any]:
    """``DecoderLM.forward`` keywords of a denoising batch: bidirectional over each row's prefix, causal after.

    One (1, 1, T, T) mask when every row has the same prefix (span corruption), else (B, 1, T, T).
    """
    from models.masks import prefix_lm_mask

    ids = batch["input_ids"]
    prefix = batch["prefix_len"]
    T = ids.shape[1]
    if "uniform_prefix" in batch:
        mask = prefix_lm_mask(int(batch["uniform_prefix"]), T, device=ids.device)  # (1, 1, T, T)
    else:
        mask = prefix_lm_mask(prefix, T, device=ids.device)  # (B, 1, T, T)
    return {"input_ids": ids, "attn_mask": mask, "is_causal": False}


@register("span_corruption")
class SpanCorruption(TokenObjective):
    """T5's span-corruption denoising (Raffel et al., arXiv 1910.10683, section 3.1.4) in a decoder.

    Each packed row (several EOS-separated documents, treated as one sequence) of ``L = seq_len + 1``
    tokens is cut to its first ``n`` tokens, ``n`` the largest window whose encoding fits in ``L``:
    ``noise_density`` of them, in spans of mean length ``mean_span_length``, are replaced by sentinels
    ``<|sentinel_i|>`` (inputs) and listed after their sentinels (targets). The decoder reads
    ``inputs + targets`` (at most ``seq_len`` tokens) with a prefix-LM mask, bidirectional over the
    inputs (Raffel et al. section 3.2.1; the "Never Train from Scratch" recipe denoises the task's own
    data this way), and the loss is the cross-entropy of the targets only. The ``L - n`` tokens at the
    end of each row are not used (about ``2 * noise_density / mean_span_length`` of the row: 10% at the
    defaults). More spans than sentinels reuse them cyclically (with a warning).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        noise_density: float = Field(0.15, gt=0.0, lt=1.0, description="share of the window's tokens corrupted")
        mean_span_length: float = Field(3.0, ge=1.0, description="mean length of a corrupted span (T5: 3)")
        num_sentinels: int = Field(
            100, ge=1, le=10_000, description="sentinel tokens <|sentinel_0|>..; T5 has 100 (<extra_id_i>)"
        )
        z_loss: float = Field(0.0, ge=0.0, le=1.0, description="weight of the log²Z regulariser (PaLM: 1e-4)")

    def __init__(self, params: Params):
        super().__init__(params)
        self._warned = False

    def required_special_tokens(self) -> list[str]:
        return st.sentinel_tokens(self.params.num_sentinels)

    def table(self) -> C.TokenTable:
        sentinels = self._ids(self.required_special_tokens())
        return C.TokenTable(pad=self._pad_id(), sentinels=tuple(sentinels))

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens = batch["tokens"]  # (B, L)
        B, L = tokens.shape
        p = self.params
        table = self.table()
        plan = C.span_plan(
            B, L, noise_density=p.noise_density, mean_span_length=p.mean_span_length, table=table,
            generator=generator_or_default(generator),
        )
        self._check_sentinels(L)
        out = C.materialise(tokens, torch.tensor(table.ids()), plan)
        out["uniform_prefix"] = int(plan.prefix[0])
        return out

    def _check_sentinels(self, row_len: int) -> None:
        p = self.params
        n = C.fit_window(row_len, p.noise_density, p.mean_span_length)
        k = C.span_counts(n, p.noise_density, p.mean_span_length)[1]
        if k > p.num_sentinels and not self._warned:
            log.warning(
                "span_corruption: rows of %d tokens have %d spans but num_sentinels=%d; sentinels are reused "
                "cyclically (raise num_sentinels and add the tokens to data.prepare.special_tokens to avoid it)",
                row_len, k, p.num_sentinels,
            )
            self._warned = True

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return denoising_attention(batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        loss, ce, zl = F.cross_entropy(logits, batch["targets"], z_loss=self.params.z_loss, return_parts=True)
        return loss, {"ce": ce.detach(), "z": zl.detach()}
