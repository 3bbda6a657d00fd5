"""MLflow Model Registry: register an exported checkpoint, set aliases, pull and load models back.

A registered version holds ``model.safetensors`` + ``model_config.json`` + ``tokenizer.json`` as pyfunc
artifacts, with the ``models`` package as code, so it loads with
``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` or with :func:`load_model` here.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import models

MODEL_FILES = ("model.safetensors", "model_config.json")


def register_checkpoint(
    checkpoint_dir: str | Path, *, run_id: str, name: str, aliases: list[str], tracking_uri: str
) -> int:
    """Log the checkpoint's export files into run ``run_id`` as a pyfunc model, register it, set aliases.

    Returns the new model version number.
    """
    import mlflow
    from mlflow import MlflowClient

    from models.pyfunc import DecoderLMPyfunc

    ckpt = Path(checkpoint_dir)
    missing = [f for f in (*MODEL_FILES, "tokenizer.json") if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt} lacks {missing}: it was not written by ray-pretrain")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        for f in MODEL_FILES:
            shutil.copy(ckpt / f, model_dir / f)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=DecoderLMPyfunc(),
                artifacts={"model_dir": str(model_dir), "tokenizer": str(ckpt / "tokenizer.json")},
                code_paths=[str(Path(models.__file__).parent)],
                pip_requirements=["torch", "safetensors", "tokenizers", "mlflow"],
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
    """Download a registered model's files (weights, config, tokenizer) into ``dest``."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_normalise_uri(uri), dst_path=tmp))
        for f in (*MODEL_FILES, "tokenizer.json"):
            found = sorted(local.rglob(f))
            if not found:
                raise FileNotFoundError(f"{uri} holds no {f}: it was not registered by ray-pretrain")
            shutil.copy(found[0], dest / f)
    return dest


def load_model(uri: str, *, tracking_uri: str | None = None):
    """``load_model("models:/NAME@ALIAS")`` -> (model, tokenizer); also accepts a local export folder."""
    from tokenizers import Tokenizer

    from models.io import load_pretrained

    path = Path(uri)
    if path.is_dir():
        model, _ = load_pretrained(path)
        return model.eval(), Tokenizer.from_file(str(path / "tokenizer.json"))
    with tempfile.TemporaryDirectory() as tmp:
        d = pull(uri, tmp, tracking_uri=tracking_uri)
        model, _ = load_pretrained(d)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return model.eval(), tok
