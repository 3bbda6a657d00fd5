"""Worker side of the text workload: the decoder LM on packed token rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.files import TOKENIZER, TOKENIZER_CONFIG
from trainers.config import RunConfig


class TextWorkload:
    """:class:`models.decoder.DecoderLM` trained by a token objective; throughput in tokens, MFU from the
    model's FLOPs per token; export ``model.safetensors`` + ``model_config.json`` + tokenizer files."""

    unit = "tokens"

    def __init__(self, cfg: RunConfig, plan):
        import models

        self.cfg, self.data = cfg, plan.data
        seq_len = self.data["seq_len"]
        self.model_cfg = cfg.model.resolve(vocab_size=self.data["vocab_size"], max_seq_len=seq_len)
        self.units_per_row = seq_len
        self.flops_per_unit = models.flops_per_token(self.model_cfg, seq_len)

    def build_model(self) -> nn.Module:
        import models

        return models.build(self.model_cfg)

    def build_objective(self):
        import objectives

        obj = objectives.get(self.cfg.objective.name, **self.cfg.objective.params)
        d = self.data
        obj.setup(special_tokens=d["special_tokens"], vocab_size=d["vocab_size"], eos_id=d["eos_id"], pad_id=d["pad_id"])
        return obj

    def init_weights(self, model: nn.Module, path: str) -> None:
        """Weights only (continual pre-training start): an export or checkpoint folder's consolidated weights."""
        from models.io import load_pretrained

        src, _ = load_pretrained(path)
        model.load_state_dict(src.state_dict())

    def inputs(self, parts: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = parts[0]["tokens"] if len(parts) == 1 else torch.cat([p["tokens"] for p in parts])
        return {"tokens": tokens.to(device, dtype=torch.long, non_blocking=True)}

    def extra_eval(self, trainer, name: str, rows: dict[str, torch.Tensor], bank) -> dict[str, float]:
        return {}

    def export(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        from data.location import copy_to_local
        from models.io import save_pretrained

        save_pretrained(state, self.model_cfg, directory)
        copy_to_local(self.data["tokenizer_path"], directory / TOKENIZER)  # a path, or a URI read from the store
        roles = {**self.data["tokenizer_config"], "model_max_length": self.model_cfg.max_seq_len}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(roles, indent=2) + "\n")
