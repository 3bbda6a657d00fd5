"""Worker side of the image workload: a ViT trained by a vision objective."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainers.config import RunConfig


class ImageWorkload:
    """A ViT trained by a vision objective on image rows ``{images, labels, row_id}``; throughput in images;
    k-NN / nearest-class-mean probes (and zero-shot for objectives with a text tower) at every evaluation;
    export: encoder + ViT config + image processor (:mod:`models.vit_io`)."""

    unit = "images"

    def __init__(self, cfg: RunConfig, plan):
        from models.vit import ViTConfig, resolve_vit_config

        self.cfg = cfg
        self.image = plan.data  # image_size, channels, n_classes, class_names (from the manifest)
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
    def extra_eval(
        self, trainer, name: str, rows: dict[str, torch.Tensor], bank: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """k-NN and nearest-class-mean accuracy of the frozen encoder on validation set ``name`` (queries)
        against the probe bank (the first ``data.probe_rows`` training rows); CLIP adds zero-shot accuracy.

        Every rank embeds its slice; embeddings are all-gathered so every rank computes the same figures.
        """
        from trainers import probes

        if name != trainer.main_val or bank is None:
            return {}
        bank_emb, bank_labels = self._embed_all(trainer, bank, self.objective.embed)
        q_emb, q_labels = self._embed_all(trainer, rows, self.objective.embed)
        out = probes.probe_metrics(bank_emb, bank_labels, q_emb, q_labels, k=self.cfg.data.probe_k)
        text = self.objective.class_text_embeddings(trainer.engine.model, trainer.device)  # None: no text tower
        if text is not None:  # CLIP: captions of every class as prompts
            img, labels = self._embed_all(trainer, rows, self.objective.image_embeddings)
            out["probe/zero_shot_acc"] = probes.zero_shot_accuracy(img, text, labels)
        return out

    def _embed_all(self, trainer, rows: dict[str, torch.Tensor], embed) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        mb = self.cfg.trainer.micro_batch_size * 4
        chunks = []
        for i in range(0, len(rows["labels"]), mb):
            x = self.inputs([{k: v[i : i + mb] for k, v in rows.items()}], trainer.device)
            chunks.append(embed(trainer.engine.model, x["images"]))
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
