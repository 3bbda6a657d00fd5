"""What the worker loop trains: token rows for the decoder LM, or images for a ViT objective.

:class:`trainers.loop.Trainer` is the same for both; a workload supplies the parts that differ:

| | :class:`TextWorkload` | :class:`ImageWorkload` |
|---|---|---|
| stream columns | ``tokens`` | ``images`` (flattened uint8), ``labels`` |
| model | :class:`models.decoder.DecoderLM` | :class:`objectives.vision.model.VisionModel` (encoder + the objective's parts) |
| objective input | ``{"tokens"}`` | ``{"images": uint8 (B, C, H, W), "labels"}`` |
| throughput unit | tokens (MFU from the model's FLOPs per token) | images |
| extra evaluation | none | k-NN / nearest-class-mean probes (and CLIP zero-shot) on frozen embeddings |
| export | ``model.safetensors`` + config + tokenizer | encoder + ViT config + image processor (:mod:`models.vit_io`) |
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.config import RunConfig


class TextWorkload:
    columns = ("tokens", "row_id")
    unit = "tokens"

    def __init__(self, cfg: RunConfig, plan):
        import models

        self.cfg, self.plan = cfg, plan
        self.model_cfg = cfg.model.resolve(vocab_size=plan.vocab_size, max_seq_len=plan.seq_len)
        self.units_per_row = plan.seq_len
        self.flops_per_unit = models.flops_per_token(self.model_cfg, plan.seq_len)

    def build_model(self) -> nn.Module:
        import models

        return models.build(self.model_cfg)

    def build_objective(self):
        import objectives

        obj = objectives.get(self.cfg.objective.name, **self.cfg.objective.params)
        if hasattr(obj, "setup"):  # objectives that need token ids or the vocabulary
            obj.setup(special_tokens=self.plan.special_tokens, vocab_size=self.plan.vocab_size)
        return obj

    def init_weights(self, model: nn.Module, path: str) -> None:
        """Weights only (continual pre-training start): a checkpoint folder's consolidated weights."""
        from models.io import load_pretrained

        src, _ = load_pretrained(path)
        model.load_state_dict(src.state_dict())

    def inputs(self, parts: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = parts[0]["tokens"] if len(parts) == 1 else torch.cat([p["tokens"] for p in parts])
        return {"tokens": tokens.to(device, dtype=torch.long, non_blocking=True)}

    def extra_eval(self, trainer, name: str, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def export(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        from models.io import save_pretrained

        save_pretrained(state, self.model_cfg, directory)
        if self.plan.tokenizer_path:
            shutil.copy(self.plan.tokenizer_path, directory / "tokenizer.json")


class ImageWorkload:
    """A ViT trained by a vision objective (issue 5) on image rows ``{images, labels, row_id}``."""

    columns = ("images", "labels", "row_id")
    unit = "images"

    def __init__(self, cfg: RunConfig, plan):
        from models.vit import ViTConfig, resolve_vit_config

        self.cfg, self.plan = cfg, plan
        self.image = plan.image  # image_size, channels, n_classes, class_names (from the manifest)
        self.vit = resolve_vit_config(cfg.vit or ViTConfig())
        self.units_per_row = 1
        self.flops_per_unit = 0.0  # no MFU for images: FLOPs per image depend on the objective (masking, views)

    def build_model(self) -> nn.Module:
        from objectives.vision import build_model

        return build_model(self.cfg.objective.name, self.cfg.objective.params, self.vit)

    def build_objective(self):
        import objectives

        self.objective = objectives.get(self.cfg.objective.name, **self.cfg.objective.params).bind(self.vit)
        return self.objective

    def init_weights(self, model: nn.Module, path: str) -> None:
        """The whole model when ``path`` was trained with the same objective, else the encoder only."""
        from models.vit_io import FULL_WEIGHTS, load_encoder, load_full_state, load_processor

        if load_processor(path).objective == self.cfg.objective.name and Path(path, FULL_WEIGHTS).is_file():
            model.load_state_dict(load_full_state(path), strict=True)
        else:
            encoder, _ = load_encoder(path)
            model.encoder.load_state_dict(encoder.state_dict(), strict=True)

    def inputs(self, parts: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
        im = self.image
        images = torch.cat([p["images"] for p in parts]) if len(parts) > 1 else parts[0]["images"]
        labels = torch.cat([p["labels"] for p in parts]) if len(parts) > 1 else parts[0]["labels"]
        images = images.view(-1, im["channels"], im["image_size"], im["image_size"])
        return {"images": images.to(device, non_blocking=True), "labels": labels.to(device, dtype=torch.long)}

    # ---- probes -----------------------------------------------------------------------------------
    def extra_eval(self, trainer, name: str, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        """k-NN and nearest-class-mean accuracy of the frozen encoder on validation set ``name`` (queries)
        against the probe bank (the first ``data.probe_rows`` training rows); CLIP adds zero-shot accuracy.

        Every rank embeds its slice; embeddings are all-gathered so every rank computes the same figures.
        """
        from trainers import probes

        if name != "val" or trainer.probe_rows is None:
            return {}
        bank_emb, bank_labels = self._embed_all(trainer, trainer.probe_rows, self.objective.embed)
        q_emb, q_labels = self._embed_all(trainer, rows, self.objective.embed)
        out = probes.probe_metrics(bank_emb, bank_labels, q_emb, q_labels, k=self.cfg.data.probe_k)
        if hasattr(self.objective, "class_text_embeddings"):  # CLIP: captions of every class as prompts
            img, labels = self._embed_all(trainer, rows, self.objective.image_embeddings)
            text = self.objective.class_text_embeddings(trainer.engine, trainer.device)
            out["probe/zero_shot_acc"] = probes.zero_shot_accuracy(img, text, labels)
        return out

    def _embed_all(self, trainer, rows: dict[str, torch.Tensor], embed) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        mb = self.cfg.trainer.micro_batch_size * 4
        chunks = []
        for i in range(0, len(rows["labels"]), mb):
            x = self.inputs([{k: v[i : i + mb] for k, v in rows.items()}], trainer.device)
            chunks.append(embed(trainer.engine, x["images"]))
        emb = torch.cat(chunks)
        labels = rows["labels"].to(trainer.device, dtype=torch.long)
        if trainer.world == 1:
            return emb.cpu(), labels.cpu()
        embs = [torch.empty_like(emb) for _ in range(trainer.world)]
        labs = [torch.empty_like(labels) for _ in range(trainer.world)]
        dist.all_gather(embs, emb.contiguous())
        dist.all_gather(labs, labels.contiguous())
        return torch.cat(embs).cpu(), torch.cat(labs).cpu()

    def export(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        from models.vit_io import ImageProcessor, save_vision

        aug = self.objective.params.augment
        processor = ImageProcessor(
            image_size=self.vit.image_size, channels=self.vit.in_channels, mean=aug.mean, std=aug.std,
            class_names=list(self.image["class_names"]), objective=self.cfg.objective.name,
            objective_params=self.objective.params.model_dump(mode="json"),
        )
        save_vision(state, self.vit, processor, directory)


def workload_for(cfg: RunConfig, plan) -> TextWorkload | ImageWorkload:
    return ImageWorkload(cfg, plan) if getattr(plan, "image", None) else TextWorkload(cfg, plan)


def is_image_objective(name: str, params: dict[str, Any]) -> bool:
    """Whether objective ``name`` trains a ViT on images (objectives.vision) rather than the decoder LM."""
    import objectives
    from objectives.vision import VisionObjective

    return isinstance(objectives.get(name, **params), VisionObjective)
