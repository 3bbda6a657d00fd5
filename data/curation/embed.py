"""INGENIOUS features from a pre-trained decoder: the mean of its final hidden states over a document's first
``max_tokens`` tokens, L2-normalised (Ray Data callable class: the model is loaded once per actor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


class ModelEmbedder:
    def __init__(self, folder: str, max_tokens: int, batch: int = 16):
        from tokenizers import Tokenizer

        from models.io import load_pretrained

        self.model, self.cfg = load_pretrained(folder)
        self.model.eval()
        self.tok = Tokenizer.from_file(str(Path(folder, "tokenizer.json")))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.max_tokens, self.batch = min(max_tokens, self.cfg.max_seq_len), batch

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        import torch

        texts = table.column("text").to_pylist()
        ids = [e.ids[: self.max_tokens] or [0] for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        out = []
        for i in range(0, len(ids), self.batch):
            chunk = ids[i : i + self.batch]
            width = max(len(c) for c in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width)
            for r, c in enumerate(chunk):
                x[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1.0
            with torch.no_grad():  # causal: a row's padding comes after its tokens and changes none of them
                _, hidden = self.model(x, return_hidden=True)
            pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return {"doc_id": table.column("doc_id").to_numpy(), "x": np.concatenate(out).astype(np.float32)}
