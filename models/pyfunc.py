"""MLflow ``pyfunc`` wrappers: an exported decoder LM (weights + config + tokenizer) and a ViT image encoder.

Kept free of Ray/DeepSpeed imports so ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` works in any
environment with torch, safetensors, tokenizers and mlflow: the registry ships this package as code.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

DECODER_PARAMS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "seed": 0}
"""Sampling parameters of :class:`DecoderLMPyfunc` and their defaults (``top_k`` 0: no top-k filtering)."""


def decoder_signature():
    """The decoder pyfunc's ``mlflow.models.ModelSignature``: prompts (strings) in, their continuations
    (strings) out, and the sampling parameters ``max_new_tokens`` (int), ``temperature`` (float), ``top_k``
    (int) and ``seed`` (int) with the defaults of :data:`DECODER_PARAMS`, so that
    ``mlflow.pyfunc.load_model(uri).predict(["text", ...], params={...})`` accepts and applies them.

    The input is one string column without a name: MLflow matches a plain list of strings only against an
    unnamed column (a named ``prompt`` column makes it refuse lists); a DataFrame with a ``prompt`` column
    is accepted as well and :class:`DecoderLMPyfunc` reads that column.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(name, kinds[name], DECODER_PARAMS[name]) for name in kinds]),
    )


class DecoderLMPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes prompts (a list of str or a DataFrame with a ``prompt`` column) and returns
    their sampled continuations; ``params`` may set ``max_new_tokens``, ``temperature`` (0 = greedy),
    ``top_k`` (0 or None = all tokens) and ``seed`` (see :data:`DECODER_PARAMS` for the defaults).

    Artifacts: ``model_dir`` (``model.safetensors`` + ``model_config.json`` + ``tokenizer.json``; versions
    registered before the tokenizer moved into it have a separate ``tokenizer`` artifact) and the token roles (``tokenizer_config.json``) taken from the artifact
    ``tokenizer_config`` if given, else from ``model_dir``, else from beside ``tokenizer``; without one the
    defaults of older exports apply (eos ``<|eos|>``, no bos). Prompts are encoded without the tokenizer's
    own special tokens; BOS is prepended when ``add_bos_token``. Generation stops at EOS and uses the KV
    cache.
    """

    def load_context(self, context) -> None:
        from pathlib import Path

        from tokenizers import Tokenizer

        from models.hf_io import TOKENIZER_CONFIG_NAME, read_token_roles
        from models.io import load_pretrained

        artifacts = context.artifacts
        self.model, self.cfg = load_pretrained(artifacts["model_dir"])
        self.model.eval()
        tokenizer = artifacts.get("tokenizer") or str(Path(artifacts["model_dir"], "tokenizer.json"))
        self.tokenizer = Tokenizer.from_file(tokenizer)
        folders = [Path(artifacts["model_dir"]), Path(tokenizer).parent]
        if artifacts.get("tokenizer_config"):
            folders.insert(0, Path(artifacts["tokenizer_config"]).parent)
        folder = next((f for f in folders if (f / TOKENIZER_CONFIG_NAME).is_file()), folders[0])
        self.roles = read_token_roles(folder)
        eos, bos = self.roles.eos_token, self.roles.bos_token
        self.eos_id = None if eos is None else self.tokenizer.token_to_id(eos)
        add_bos = bos is not None and self.roles.add_bos_token
        self.bos_id = self.tokenizer.token_to_id(bos) if add_bos else None
        if self.roles.add_bos_token and self.bos_id is None:
            raise ValueError(
                f"{folder / TOKENIZER_CONFIG_NAME}: bos_token={bos!r} is not in the tokenizer's vocabulary; "
                f"allowed: one of its tokens, or add_bos_token false"
            )

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``: BOS (when ``add_bos_token``) + the text without added special tokens;
        an empty prompt without BOS becomes ``[eos]``."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if not ids and self.eos_id is not None:
            ids = [self.eos_id]
        if not ids:
            raise ValueError("an empty prompt needs a bos_token or an eos_token in tokenizer_config.json")
        return ids

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from models import generate

        p = {**DECODER_PARAMS, **(params or {})}
        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            model_input = model_input[column]
        elif isinstance(model_input, str):
            model_input = [model_input]
        prompts = []
        for item in model_input:  # a cell may hold a list of prompts ({"prompt": [...]} through the schema)
            prompts.extend([item] if isinstance(item, str) else list(item))
        top_k = None if p["top_k"] is None or int(p["top_k"]) <= 0 else int(p["top_k"])
        out = []
        g = torch.Generator().manual_seed(int(p["seed"]))
        for prompt in prompts:
            ids = torch.tensor([self.encode(str(prompt))])
            gen = generate(self.model, ids, max_new_tokens=int(p["max_new_tokens"]),
                           temperature=float(p["temperature"]), top_k=top_k, generator=g, eos_id=self.eos_id)
            new = gen[0, ids.shape[1]:].tolist()
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id)]
            out.append(self.tokenizer.decode(new))
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
