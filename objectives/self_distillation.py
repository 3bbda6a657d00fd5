"""Self-distillation for further pre-training: the base objective plus a pull toward a frozen teacher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from objectives import functional as F
from objectives.base import TokenObjective
from objectives.registry import get, register

log = logging.getLogger(__name__)


# Base objectives whose model input is the clean row itself (nothing corrupted): the distance reuses
# the base objective's forward instead of running the student a second time.
_UNCORRUPTED_BASES = frozenset({"causal_lm"})


@register("self_distillation")
class SelfDistillation(TokenObjective):
    """Lee et al., "Self-Distillation for Further Pre-training of Transformers", arXiv 2210.02871.

    Recipe: (1) further pre-train the initial model on the target data (e.g. ``mlm``) and export it
    (a checkpoint folder or ``rpt models pull NAME@ALIAS DIR``: ``model.safetensors`` +
    ``model_config.json``); (2) start the student from the *initial* model again
    (``trainer.init_from``) and train it with ``base`` (``mlm`` as in the paper, or ``causal_lm``) plus
    ``weight`` times the self-distillation term (section 3): the squared L2 distance between the
    student's and the teacher's feature of the *clean* (uncorrupted) input, summed over the hidden
    dimensions and averaged over the batch (``F.squared_distance``), as in the authors' code
    (``SelfPreTrainer``: MSE with reduction sum divided by the batch size), so ``weight: 1.0`` weighs
    it as the paper's lambda = 1 does. The base objective's loss is computed on its corrupted input as
    usual; the clean input is the batch's rows before the base objective's ``prepare`` (kept in the
    prepared batch as ``clean_ids``).

    The feature is taken from the final (normalised) hidden states by ``distill_tokens``: the paper
    uses the [CLS] token's; this decoder has no [CLS] token, and ``mean`` (default: the mean over the
    row's positions, one vector per sequence) is the closest analogue; ``last`` takes the last
    position's (the only one that sees the whole row under causal attention), ``all`` compares every
    position's vector (the distance is then averaged over tokens). ``normalize`` compares unit vectors.
    With ``mlm`` the student runs once on the corrupted and the clean rows together (one forward of
    2B rows, same attention); with ``causal_lm`` the input is the clean row, so one forward serves both.

    The teacher is frozen: eval mode, no gradient, never seen by the optimizer; it is loaded on the CPU
    in ``setup`` and moved to the student's device (and dtype) on the first batch. It must share the
    student's tokenizer and width.

    Metrics: the base objective's, plus ``distance`` (the unweighted self-distillation term).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        teacher: str = Field(description="export folder of the teacher (model.safetensors + model_config.json)")
        base: Literal["mlm", "causal_lm"] = Field("mlm", description="the student's own objective")
        base_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the base objective")
        weight: float = Field(
            1.0, ge=0.0, description="lambda: weight of the distance (squared L2, mean over the batch)"
        )
        distill_tokens: Literal["mean", "last", "all"] = Field(
            "mean",
            description="feature compared: mean over positions (default; the closest analogue of the paper's "
            "[CLS], which this decoder lacks), last position, or all positions",
        )
        normalize: bool = Field(False, description="compare L2-normalised features")

        @model_validator(mode="after")
        def _base(self):
            try:
                get(self.base, **self.base_params)
            except ValueError as e:
                raise ValueError(f"base_params: {e}") from None
            return self

    def __init__(self, params: Params):
        super().__init__(params)
        self.base = get(params.base, **params.base_params)
        self.teacher: torch.nn.Module | None = None

    def required_special_tokens(self) -> list[str]:
        return list(self.base.required_special_tokens())

    def setup(self, *, special_tokens: dict[str, int], vocab_size: int, eos_id: int, pad_id: int) -> None:
        ids = {"special_tokens": special_tokens, "vocab_size": vocab_size, "eos_id": eos_id, "pad_id": pad_id}
        super().setup(**ids)
        self.base.setup(**ids)
        self.teacher = self.load_teacher()
        if self.teacher.cfg.vocab_size != vocab_size:
            raise ValueError(
                f"objective.teacher={self.params.teacher!r} has vocab_size {self.teacher.cfg.vocab_size}, the "
                f"data's tokenizer {vocab_size}: the teacher must be trained on the same tokenizer"
            )

    def check_data(self, data: dict) -> None:
        """The base objective's needs, and a teacher export that shares the data's tokenizer (on the driver)."""
        import json
        from pathlib import Path

        from models.files import LM_CONFIG

        self.base.check_data(data)
        cfg = Path(self.params.teacher, LM_CONFIG)
        if not cfg.is_file():
            raise ValueError(f"objective.teacher={self.params.teacher!r} holds no {LM_CONFIG} (an export or checkpoint folder)")
        if json.loads(cfg.read_text()).get("vocab_size") != data["vocab_size"]:
            raise ValueError(
                f"objective.teacher={self.params.teacher!r} has another vocab_size than the data's tokenizer "
                f"({data['vocab_size']})"
            )

    def load_teacher(self) -> torch.nn.Module:
        from models.io import CONFIG_NAME, WEIGHTS_NAME, load_pretrained

        path = Path(self.params.teacher)
        if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"objective.teacher={self.params.teacher!r} holds no {WEIGHTS_NAME} + {CONFIG_NAME}; point it at "
                "a checkpoint folder of the teacher's run or at `rpt models pull NAME@ALIAS DIR`'s DIR"
            )
        teacher, _ = load_pretrained(path)
        teacher.requires_grad_(False)
        return teacher.eval()

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        out = self.base.prepare(batch, generator)
        # the base objectives read position i of the row at input position i: the clean input is the
        # row's first T tokens, T the base input's length
        out["clean_ids"] = batch["tokens"][:, : out["input_ids"].shape[1]]
        return out

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The base objective's forward (corrupted input), returning the hidden states too."""
        return {**self.base.model_inputs(batch), "return_hidden": True}

    def clean_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The same forward on the clean input: what the student and the teacher are compared on."""
        return {**self.model_inputs(batch), "input_ids": batch["clean_ids"]}

    def _teacher_on(self, like: torch.Tensor) -> torch.nn.Module:
        if self.teacher is None:  # setup() was not called (a user's own loop)
            self.teacher = self.load_teacher()
        p = next(self.teacher.parameters())
        if p.device != like.device or p.dtype != like.dtype:
            self.teacher.to(device=like.device, dtype=like.dtype)
        return self.teacher

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        inputs, clean = self.model_inputs(batch), self.clean_inputs(batch)
        if self.params.base in _UNCORRUPTED_BASES:
            logits, hidden = model(**inputs)  # (B, T, V), (B, T, C): the input is the clean row
        else:  # one forward over [corrupted; clean] (the base objectives take no per-row attention mask)
            B = inputs["input_ids"].shape[0]
            ids = torch.cat([inputs["input_ids"], clean["input_ids"]])  # (2B, T)
            logits, hidden = model(**{**inputs, "input_ids": ids})
            logits, hidden = logits[:B], hidden[B:]  # (B, T, V) on the corrupted rows, (B, T, C) on the clean
        teacher = self._teacher_on(hidden)
        with torch.no_grad():
            _, teacher_hidden = teacher(**clean)  # (B, T, C)
        return self.loss_from_hidden(logits, hidden, teacher_hidden, batch)

    def loss_from_hidden(
        self, logits: torch.Tensor, hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict]:
        """``base loss(logits) + weight * distance``; ``hidden`` and ``teacher_hidden`` (B, T, C) are the
        student's and the teacher's final hidden states on the clean input."""
        base_loss, metrics = self.base.loss_from_logits(logits, batch)
        how = self.params.distill_tokens
        distance = F.squared_distance(
            F.pool_hidden(hidden, how), F.pool_hidden(teacher_hidden, how), normalize=self.params.normalize
        )
        return base_loss + self.params.weight * distance, {**metrics, "distance": distance.detach()}

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        raise TypeError("self_distillation needs hidden states: call loss(model, batch)")
