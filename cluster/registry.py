"""MLflow Model Registry: register an exported checkpoint, set aliases, pull and load models back.

A registered version holds the export files as pyfunc artifacts, with the ``models`` package as code, so it
loads with ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` or with :func:`load_model` here:

- decoder LM: ``model.safetensors`` + ``model_config.json`` + ``tokenizer.json``; pyfunc predict: text;
- image encoder: ``encoder.safetensors`` + ``vit_config.json`` + ``image_processor.json``; pyfunc predict:
  embeddings of images.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import models

MODEL_FILES = ("model.safetensors", "model_config.json")
LM_FILES = (*MODEL_FILES, "tokenizer.json")
VISION_FILES = ("encoder.safetensors", "vit_config.json", "image_processor.json")


def _export_files(directory: Path) -> tuple[str, ...]:
    """The export files of a checkpoint or pulled folder: the image encoder's when it has a ViT config."""
    return VISION_FILES if (directory / "vit_config.json").is_file() else LM_FILES


def register_checkpoint(
    checkpoint_dir: str | Path, *, run_id: str, name: str, aliases: list[str], tracking_uri: str
) -> int:
    """Log the checkpoint's export files into run ``run_id`` as a pyfunc model, register it, set aliases.

    Returns the new model version number.
    """
    import mlflow
    from mlflow import MlflowClient

    from models.pyfunc import DecoderLMPyfunc, ImageEncoderPyfunc

    ckpt = Path(checkpoint_dir)
    files = _export_files(ckpt)
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt} lacks {missing}: it was not written by ray-pretrain")
    vision = files == VISION_FILES
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        for f in VISION_FILES if vision else MODEL_FILES:
            shutil.copy(ckpt / f, model_dir / f)
        artifacts = {"model_dir": str(model_dir)}
        if not vision:
            artifacts["tokenizer"] = str(ckpt / "tokenizer.json")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=ImageEncoderPyfunc() if vision else DecoderLMPyfunc(),
                artifacts=artifacts,
                code_paths=[str(Path(models.__file__).parent)],
                pip_requirements=["torch", "safetensors", "mlflow", "pydantic"] if vision
                else ["torch", "safetensors", "tokenizers", "mlflow"],
                registered_model_name=name,
            )
    version = int(info.registered_model_version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def _normalise_uri(uri: str) -> str:
    """``NAME@ALIAS`` / ``NAME/3`` -> ``models:/NAME@ALIAS`` / ``models:/NAME/3``; other URIs unchanged."""
    return uri if ":/" in uri else f"models:/{uri}"


def pull(uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered model's export files (LM: weights, config, tokenizer; image encoder: weights,
    ViT config, image processor) into ``dest``."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_normalise_uri(uri), dst_path=tmp))
        files = VISION_FILES if any(local.rglob("vit_config.json")) else LM_FILES
        for f in files:
            found = sorted(local.rglob(f))
            if not found:
                raise FileNotFoundError(f"{uri} holds no {f}: it was not registered by ray-pretrain")
            shutil.copy(found[0], dest / f)
    return dest


def load_model(uri: str, *, tracking_uri: str | None = None):
    """``load_model("models:/NAME@ALIAS")`` -> (model, processor); also accepts a local export folder.

    Decoder LM: ``(DecoderLM, tokenizers.Tokenizer)``. Image encoder: ``(ImageEmbedder, ImageProcessor)``,
    where ``embedder(uint8 images (B, C, H, W))`` returns the pooled embeddings (B, D) and the processor
    holds the input size, normalisation and the training data's class names.
    """
    path = Path(uri)
    if path.is_dir():
        return _load_local(path)
    with tempfile.TemporaryDirectory() as tmp:
        return _load_local(pull(uri, tmp, tracking_uri=tracking_uri))


def _load_local(path: Path):
    if _export_files(path) == VISION_FILES:
        from models.vit_io import load_embedder

        embedder = load_embedder(path)
        return embedder, embedder.processor
    from tokenizers import Tokenizer

    from models.io import load_pretrained

    model, _ = load_pretrained(path)
    return model.eval(), Tokenizer.from_file(str(path / "tokenizer.json"))
