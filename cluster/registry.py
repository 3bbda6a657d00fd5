"""MLflow Model Registry: register an exported checkpoint, set aliases, pull and load models back.

A registered version holds the workload's export files (:mod:`trainers.workloads`: the decoder LM's
weights, config and tokenizer; an image encoder's weights, ViT config and image processor) as pyfunc
artifacts, with the ``models`` package as code, so it loads with ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")``
or with :func:`load_model` here. Which kind a folder holds is the spec's answer (its marker file).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import models
from trainers import workloads


def _spec_of(directory: Path, what: str):
    spec = workloads.for_export(directory)
    if spec is None:
        markers = ", ".join(workloads.get(k).export_marker for k in workloads.available())
        raise FileNotFoundError(f"{what} holds none of {markers}: it was not written by ray-pretrain")
    return spec


def register_checkpoint(
    checkpoint_dir: str | Path, *, run_id: str, name: str, aliases: list[str], tracking_uri: str
) -> int:
    """Log the checkpoint's export files into run ``run_id`` as a pyfunc model, register it, set aliases.

    Returns the new model version number.
    """
    import mlflow
    from mlflow import MlflowClient

    ckpt = Path(checkpoint_dir)
    spec = _spec_of(ckpt, f"checkpoint {ckpt}")
    files = spec.registry_files(ckpt)
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt} lacks {missing}: it was not written by ray-pretrain")
    python_model, requirements = spec.pyfunc()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        for f in files:
            shutil.copy(ckpt / f, model_dir / f)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
                artifacts={"model_dir": str(model_dir)},
                code_paths=[str(Path(models.__file__).parent)],
                pip_requirements=requirements,
                signature=spec.signature(),
                registered_model_name=name,
            )
    version = int(info.registered_model_version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def model_version(source: str, tracking_uri: str):
    """The registered version behind ``models:/NAME@ALIAS``, ``models:/NAME/3``, ``NAME@ALIAS`` or ``NAME/3``
    (an ``mlflow.entities.model_registry.ModelVersion``); MLflow's own error for an unknown name or alias."""
    from mlflow import MlflowClient

    uri = source.removeprefix("models:/")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "@" in uri:
        name, alias = uri.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = uri.split("/", 1)  # a ValueError for anything else
    return client.get_model_version(name, version)


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
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_normalise_uri(uri), dst_path=tmp))
        folders = [p.parent for k in workloads.available() for p in local.rglob(workloads.get(k).export_marker)]
        if not folders:
            raise FileNotFoundError(f"{uri} holds no model export: it was not registered by ray-pretrain")
        src = folders[0]
        files = _spec_of(src, uri).registry_files(src)
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{uri} holds no {missing}: it was not registered by ray-pretrain")
        dest.mkdir(parents=True, exist_ok=True)  # only once everything is here: a failed pull leaves no folder
        for f in files:
            shutil.copy(src / f, dest / f)
    return dest


def load_model(uri: str, *, tracking_uri: str | None = None):
    """``load_model("models:/NAME@ALIAS")`` -> (model, processor); also accepts a local export folder.

    Decoder LM: ``(DecoderLM, tokenizers.Tokenizer)``. Image encoder: ``(ImageEmbedder, ImageProcessor)``,
    where ``embedder(uint8 images (B, C, H, W))`` returns the pooled embeddings (B, D) and the processor
    holds the input size, normalisation and the training data's class names.
    """
    path = Path(uri)
    if path.is_dir():
        return _spec_of(path, str(path)).load_export(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = pull(uri, tmp, tracking_uri=tracking_uri)
        return _spec_of(local, uri).load_export(local)
