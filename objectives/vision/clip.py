"""CLIP on image–caption pairs whose captions are generated from class labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from data import augment as A
from models.heads import LogitScale
from models.vit import ResolvedViTConfig, TextEncoder, ViTEncoder
from objectives.registry import register
from objectives.vision import functional as VF
from objectives.vision.base import VisionObjective, call, passthrough_labels

PAD = "<pad>"


class CaptionTokenizer:
    """A word-level tokenizer over a fixed set of captions: lower-cased, split on whitespace.

    Id 0 is padding; the other ids are the sorted distinct words. Encoding a word outside the vocabulary
    is an error (the captions are generated, so the vocabulary is closed).
    """

    def __init__(self, captions: list[str]):
        words = sorted({w for c in captions for w in c.lower().split()})
        self.vocab = [PAD, *words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max(len(c.split()) for c in captions)

    @property
    def pad_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, max_len) int64, right-padded with 0."""
        out = torch.zeros(len(captions), self.max_len, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = caption.lower().split()
            unknown = [w for w in words if w not in self.ids]
            if unknown or len(words) > self.max_len:
                raise ValueError(f"caption {caption!r} is outside the tokenizer's captions (unknown words {unknown})")
            out[i, : len(words)] = torch.tensor([self.ids[w] for w in words])
        return out


def _clip_augment() -> A.AugmentConfig:
    return A.AugmentConfig(crop_scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@register("clip")
class CLIP(VisionObjective):
    """CLIP (Radford et al., arXiv 2103.00020) with the learnable, capped logit scale of the CLIP baselines.

    Captions come from labels: ``caption_template.format(label=name)`` with ``name`` = ``class_names[label]``
    or the label number, e.g. "a fractal of family 12" or "a photo of the digit seven". ``prepare``: one
    augmented view (crop + flip) plus the caption token ids; ``loss``: symmetric cross-entropy of the
    scaled cosine similarities (:func:`objectives.vision.functional.clip_loss`), with negatives from the
    global batch (all_gather with gradients, ``gather``). Images with the same caption are all positives of
    that caption (``same_caption_positives``), since class captions repeat within a batch.
    The logit scale starts at 1/0.07 and is capped at ``logit_scale_max`` (100).
    Parts: ``encoder``, ``image_proj``, ``text_encoder``, ``logit_scale``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n_classes: int = Field(10, ge=1, description="number of labels, one caption each")
        caption_template: str = Field("a fractal of family {label}", description="caption with a {label} field")
        class_names: list[str] | None = Field(None, description="names that replace the label numbers in captions")
        embed_dim: int = Field(64, gt=0, description="width of the joint image-text embedding")
        text_d_model: int = Field(64, gt=0)
        text_n_layers: int = Field(2, ge=1)
        text_n_heads: int = Field(4, ge=1)
        logit_scale_init: float = Field(1 / 0.07, gt=0.0)
        logit_scale_max: float = Field(100.0, gt=0.0)
        same_caption_positives: bool = Field(True, description="all pairs with the same caption are positives")
        gather: bool = Field(True, description="negatives from every data-parallel rank (all_gather with gradients)")
        augment: A.AugmentConfig = Field(default_factory=_clip_augment)

        @model_validator(mode="after")
        def _check(self):
            if "{label}" not in self.caption_template:
                raise ValueError(f"caption_template={self.caption_template!r} must contain '{{label}}'")
            if self.class_names is not None and len(self.class_names) != self.n_classes:
                raise ValueError(f"class_names has {len(self.class_names)} names; n_classes={self.n_classes}")
            if self.text_d_model % self.text_n_heads or (self.text_d_model // self.text_n_heads) % 2:
                raise ValueError(
                    f"text_d_model={self.text_d_model} / text_n_heads={self.text_n_heads} must be an even integer"
                )
            if self.logit_scale_init > self.logit_scale_max:
                raise ValueError(f"logit_scale_init={self.logit_scale_init} exceeds logit_scale_max={self.logit_scale_max}")
            return self

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.tokenizer = self.make_tokenizer(params)
        self.caption_ids = self.tokenizer.encode(self.captions())  # (n_classes, T)

    def fill_params(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """``n_classes`` and ``class_names`` default to the image data's; another explicit n_classes is an error."""
        n = data["n_classes"]
        if params.get("n_classes", n) != n:
            raise ValueError(
                f"objective.n_classes={params['n_classes']} but the data has {n} classes: remove "
                "objective.n_classes (it defaults to the data's)"
            )
        return {**params, "n_classes": n, "class_names": params.get("class_names") or list(data["class_names"])}

    @staticmethod
    def captions_for(params: BaseModel) -> list[str]:
        names = params.class_names or [str(i) for i in range(params.n_classes)]
        return [params.caption_template.format(label=name) for name in names]

    def captions(self) -> list[str]:
        """The caption of every class, in label order."""
        return self.captions_for(self.params)

    @classmethod
    def make_tokenizer(cls, params: BaseModel) -> CaptionTokenizer:
        return CaptionTokenizer(cls.captions_for(params))

    @classmethod
    def build_modules(cls, params: BaseModel, vit: ResolvedViTConfig) -> dict[str, nn.Module]:
        tok = cls.make_tokenizer(params)
        return {
            "encoder": ViTEncoder(vit),
            "image_proj": nn.Linear(vit.d_model, params.embed_dim, bias=False),
            "text_encoder": TextEncoder(
                vocab_size=len(tok), max_len=tok.max_len, d_model=params.text_d_model,
                n_layers=params.text_n_layers, n_heads=params.text_n_heads, out_dim=params.embed_dim,
                pad_id=tok.pad_id,
            ),
            "logit_scale": LogitScale(init=params.logit_scale_init, max_scale=params.logit_scale_max),
        }

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        labels = batch["labels"]
        if labels.dim() != 1:
            raise ValueError(f"clip needs one class label per image (B,), got labels {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.params.n_classes):
            raise ValueError(f"labels must be in [0, n_classes={self.params.n_classes}); got {labels.min()}..{labels.max()}")
        x = A.augment(batch["images"], generator, self.params.augment)
        text_ids = self.caption_ids.to(labels.device)[labels]  # (B, T)
        return passthrough_labels(batch, {"images": x, "text_ids": text_ids})

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        img = call(model, "image_proj", call(model, "encoder", batch["images"], pool=True))
        txt = call(model, "text_encoder", batch["text_ids"])
        scale = call(model, "logit_scale")
        caption_ids = batch["labels"] if self.params.same_caption_positives else None
        loss = VF.clip_loss(img, txt, scale, caption_ids=caption_ids, gather=self.params.gather)
        return loss, {"logit_scale": scale.detach()}

    # ---- zero-shot evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def image_embeddings(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Normalised joint-space image embeddings (B, E) of uint8 images, in eval mode."""
        was_training = model.training
        model.eval()
        try:
            pooled = call(model, "encoder", self.normalize(images), pool=True)
            return F.normalize(call(model, "image_proj", pooled).float(), dim=-1)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def class_text_embeddings(self, model: nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
        """Normalised embeddings (n_classes, E) of every class's caption (the zero-shot prompts)."""
        was_training = model.training
        model.eval()
        try:
            if device is None:
                device = next(model.parameters()).device
            ids = self.caption_ids.to(device)
            return F.normalize(call(model, "text_encoder", ids).float(), dim=-1)
        finally:
            model.train(was_training)
