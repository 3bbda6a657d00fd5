"""UL2's Mixture-of-Denoisers on a decoder-only model."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from objectives import corruption as C
from objectives import functional as F
from objectives import special_tokens as st
from objectives.base import TokenObjective, generator_or_default
from objectives.registry import register
from objectives.span_corruption import denoising_attention

log = logging.getLogger(__name__)

KINDS = ("R", "X", "S")


class Denoiser(BaseModel):
    """One denoiser of the mixture: R/X are span corruption (mean span length, noise density), S a prefix LM."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["R", "X", "S"] = Field(description="paradigm: R regular, X extreme span corruption, S prefix LM")
    mean_span_length: float | None = Field(None, ge=1.0, description="R/X only: mean corrupted span length")
    noise_density: float | None = Field(None, gt=0.0, lt=1.0, description="R/X only: share of tokens corrupted")
    weight: float = Field(1.0, ge=0.0, description="mixture weight (normalised over the denoisers in use)")
    name: str | None = Field(None, description="metric name; default e.g. R_mu3_r0.15, or S")

    @model_validator(mode="after")
    def _check(self) -> Denoiser:
        spans = (self.mean_span_length, self.noise_density)
        if self.kind == "S":
            if any(v is not None for v in spans):
                raise ValueError(
                    "an S denoiser is a prefix LM (the split point is uniform over the row); leave "
                    "mean_span_length and noise_density unset"
                )
        elif any(v is None for v in spans):
            raise ValueError(f"a {self.kind} denoiser needs mean_span_length and noise_density")
        if self.name is None:
            self.name = "S" if self.kind == "S" else f"{self.kind}_mu{self.mean_span_length:g}_r{self.noise_density:g}"
        return self


def default_denoisers() -> list[Denoiser]:
    """UL2's final mixture of seven denoisers (Tay et al., arXiv 2205.05131, section 3.1.2), equal weights.

    R: (mu 3, r 0.15) and (mu 8, r 0.15); X: (mu 3, r 0.5), (mu 8, r 0.5), (mu 64, r 0.15) and
    (mu 64, r 0.5); S: one prefix-LM denoiser. Every denoiser has ``weight`` 1, so each one, the S
    denoiser included, is drawn for 1/7 of the examples. What this code runs for each:

    - R/X: T5 span corruption of the row (``objectives/corruption.py``): ``round(n r)`` noise tokens in
      ``round(n r / mu)`` spans, span lengths a uniformly random composition (mean ``mu``), placed
      uniformly; the window ``n`` is the longest whose encoding fits the row (``corruption.fit_window``).
    - S: a prefix LM over the whole row whose split point is uniform over ``1 .. n-1``
      (``corruption.prefix_lm_plan``), so the target is half the row on average.

    To weight the paradigms differently, list ``denoisers:`` with their own ``weight`` fields.
    """
    spans = [("R", 3, 0.15), ("R", 8, 0.15), ("X", 3, 0.5), ("X", 8, 0.5), ("X", 64, 0.15), ("X", 64, 0.5)]
    return [Denoiser(kind=k, mean_span_length=m, noise_density=r, weight=1.0) for k, m, r in spans] + [
        Denoiser(kind="S", weight=1.0)
    ]


@register("ul2")
class UL2(TokenObjective):
    """Mixture-of-Denoisers (UL2, Tay et al., arXiv 2205.05131) for a decoder with prefix-LM attention.

    Every example (a packed row, treated as one sequence) draws one denoiser with probability
    proportional to its ``weight`` (the default mixture, :func:`default_denoisers`: the paper's seven
    denoisers, 1/7 each). R and X denoisers are T5 span corruption (see ``span_corruption``:
    ``[mode] inputs-with-sentinels | sentinel + span ...``), S is a prefix LM (``[mode] prefix | suffix``,
    the split uniform over the row). The paradigm's mode token ``<|R|>``, ``<|X|>`` or ``<|S|>`` is
    prepended (UL2's [R]/[X]/[S]; turn off with ``mode_tokens: false``); the prefix (mode token included)
    is bidirectional, the target part causal, and the loss is the cross-entropy of the targets. Rows are
    padded to the longest denoiser's length.

    Mode switching: ``mode: S`` (or R, X) keeps only that paradigm's denoisers, for fine-tuning or
    evaluating in one mode; at inference, prepend ``UL2.mode_token(kind)`` to the prompt.

    Metrics: ``ce`` and ``z`` over all targets, and per denoiser ``<name>/ce_sum`` (summed target
    cross-entropy) and ``<name>/tokens`` (target count), present (0 when unused) on every call so they
    all-reduce safely; the denoiser's mean cross-entropy is their ratio.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        denoisers: list[Denoiser] = Field(default_factory=default_denoisers, description="the mixture")
        mode: Literal["R", "X", "S"] | None = Field(None, description="use only this paradigm's denoisers")
        mode_tokens: bool = Field(True, description="prepend <|R|>/<|X|>/<|S|> to every example")
        num_sentinels: int = Field(100, ge=1, le=10_000, description="sentinel tokens <|sentinel_0|>..")
        z_loss: float = Field(0.0, ge=0.0, le=1.0, description="weight of the log²Z regulariser (PaLM: 1e-4)")

        @model_validator(mode="after")
        def _check(self):
            names = [d.name for d in self.denoisers]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"denoiser names {dupes} repeat; give each denoiser a distinct name")
            active = [d for d in self.denoisers if self.mode is None or d.kind == self.mode]
            if not active or sum(d.weight for d in active) <= 0:
                raise ValueError(
                    f"no denoiser with a positive weight{' of kind ' + self.mode if self.mode else ''}; "
                    f"denoisers: {names}"
                )
            return self

    def __init__(self, params: Params):
        super().__init__(params)
        p = self.params
        self.active = [d for d in p.denoisers if p.mode is None or d.kind == p.mode]
        self.weights = torch.tensor([d.weight for d in self.active], dtype=torch.float64)
        self._warned = False

    @staticmethod
    def mode_token(kind: str) -> str:
        """The paradigm token to prepend to a prompt for mode switching (``<|R|>``, ``<|X|>``, ``<|S|>``)."""
        return st.MODE_TOKENS[kind]

    def _uses_sentinels(self) -> bool:
        return any(d.kind != "S" for d in self.active)

    def required_special_tokens(self) -> list[str]:
        p = self.params
        names: list[str] = []
        if self._uses_sentinels():
            names += st.sentinel_tokens(p.num_sentinels)
        if p.mode_tokens:
            names += [st.MODE_TOKENS[k] for k in KINDS if any(d.kind == k for d in self.active)]
        return names

    def table(self) -> C.TokenTable:
        p = self.params
        pad = self._pad_id()
        sentinels = self._ids(st.sentinel_tokens(p.num_sentinels)) if self._uses_sentinels() else []
        used = {d.kind for d in self.active}
        # one slot per paradigm (indexed by KINDS); paradigms not in use need no token in the tokenizer
        modes = [self._ids([st.MODE_TOKENS[k]])[0] if k in used else pad for k in KINDS] if p.mode_tokens else []
        return C.TokenTable(pad=pad, sentinels=tuple(sentinels), modes=tuple(modes))

    def _plan(self, d: Denoiser, rows: int, row_len: int, table: C.TokenTable, g: torch.Generator) -> C.DenoisingPlan:
        mode = KINDS.index(d.kind) if self.params.mode_tokens else None
        if d.kind == "S":
            return C.prefix_lm_plan(rows, row_len, table=table, generator=g, mode=mode)
        return C.span_plan(
            rows, row_len, noise_density=d.noise_density, mean_span_length=d.mean_span_length, table=table,
            generator=g, mode=mode,
        )

    def _length(self, d: Denoiser, row_len: int) -> int:
        extra = int(self.params.mode_tokens)
        if d.kind == "S":
            return row_len
        n = C.fit_window(row_len, d.noise_density, d.mean_span_length, extra)
        k = C.span_counts(n, d.noise_density, d.mean_span_length)[1]
        if k > self.params.num_sentinels and not self._warned:
            log.warning(
                "ul2: denoiser %s has %d spans on rows of %d tokens but num_sentinels=%d; sentinels are "
                "reused cyclically", d.name, k, row_len, self.params.num_sentinels,
            )
            self._warned = True
        return extra + n + 2 * k

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens = batch["tokens"]  # (B, L)
        B, L = tokens.shape
        g = generator_or_default(generator)
        table = self.table()
        choice = torch.multinomial(self.weights, B, replacement=True, generator=g)  # (B,) denoiser per example
        width = max(self._length(d, L) for d in self.active)  # fixed for a row length: steady shapes
        plans = []
        for i, d in enumerate(self.active):  # a handful of denoisers, each vectorised over its rows
            rows = (choice == i).nonzero()[:, 0]
            if len(rows):
                plans.append((rows, self._plan(d, len(rows), L, table, g)))
        plan = C.stack_plans(plans, B, width, table.pad_index(L))
        out = C.materialise(tokens, torch.tensor(table.ids()), plan)
        out["denoiser"] = choice.to(tokens.device)
        return out

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return denoising_attention(batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        targets = batch["targets"]  # (B, T)
        valid = targets != -100
        per = F.token_cross_entropy(logits, targets)  # (B, T), 0 off target
        ce = per.sum() / valid.sum().clamp(min=1)
        zl = F.z_loss(logits, valid)
        loss = ce + self.params.z_loss * zl if self.params.z_loss > 0 else ce
        with torch.no_grad():  # per-denoiser sums without a host sync
            onehot = torch.nn.functional.one_hot(batch["denoiser"], len(self.active)).float()  # (B, D)
            ce_sum = per.detach().sum(dim=1) @ onehot  # (D,)
            tokens = valid.sum(dim=1).float() @ onehot  # (D,)
        metrics = {"ce": ce.detach(), "z": zl.detach()}
        for i, d in enumerate(self.active):
            metrics[f"{d.name}/ce_sum"] = ce_sum[i]
            metrics[f"{d.name}/tokens"] = tokens[i]
        return loss, metrics

    def reduce_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Each denoiser's mean target cross-entropy over the logging window: ``ce_sum / tokens`` of the
        rank-averaged sums (a ratio of sums, not a mean of per-batch ratios)."""
        out = dict(means)
        for d in self.active:
            if f"{d.name}/ce_sum" in means and f"{d.name}/tokens" in means:
                out[f"{d.name}/ce"] = means[f"{d.name}/ce_sum"] / max(means[f"{d.name}/tokens"], 1e-9)
        return out
