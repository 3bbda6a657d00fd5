"""MLflow ``pyfunc`` wrappers: an exported decoder LM (weights + config + tokenizer) and a ViT image encoder.

Kept free of Ray/DeepSpeed imports so ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` works in any
environment with torch, safetensors, tokenizers and mlflow: the registry ships this package as code.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class DecoderLMPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes prompts (a list of str or a DataFrame with a ``prompt`` column) and returns
    their sampled continuations; ``params`` may set ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``."""

    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        from models.io import load_pretrained

        self.model, self.cfg = load_pretrained(context.artifacts["model_dir"])
        self.model.eval()
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])

    def predict(self, context, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from models import generate

        p = {"max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "seed": 0, **(params or {})}
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        out = []
        g = torch.Generator().manual_seed(int(p["seed"]))
        eos = self.tokenizer.token_to_id("<|eos|>")
        for prompt in prompts:
            ids = torch.tensor([self.tokenizer.encode(prompt).ids or [eos]])
            gen = generate(self.model, ids, max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                           top_k=p["top_k"], generator=g, eos_id=eos)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:].tolist()))
        return out


class ImageEncoderPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes uint8 images (a numpy array (N, C, H, W), or a DataFrame whose ``image`` column holds
    one flattened (C·H·W) array per row) and returns their pooled encoder embeddings (N, D) as numpy."""

    def load_context(self, context) -> None:
        from models.vit_io import load_embedder

        self.embedder = load_embedder(context.artifacts["model_dir"])

    def predict(self, context, model_input: Any, params: dict[str, Any] | None = None):
        import numpy as np
        import torch

        p = self.embedder.processor
        if hasattr(model_input, "columns"):
            model_input = np.stack([np.asarray(x, dtype=np.uint8) for x in model_input["image"]])
        arr = np.ascontiguousarray(model_input, dtype=np.uint8)
        if arr.ndim != 4:  # flattened rows
            arr = arr.reshape(-1, p.channels, p.image_size, p.image_size)
        return self.embedder(torch.from_numpy(arr)).numpy()
