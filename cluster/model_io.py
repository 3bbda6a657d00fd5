"""Models in and out of the system: import a Hugging Face folder into the registry, export a checkpoint or
pull a registered model in the Hugging Face format, and resolve where a run starts from.

Formats (:mod:`models.hf_io`): *native* is the export folder every checkpoint holds (``model.safetensors`` +
``model_config.json`` + tokenizer files); *hf* is a ``LlamaForCausalLM`` folder that ``transformers``
(``AutoModelForCausalLM`` / ``AutoTokenizer``), vLLM or lm-eval-harness open. Nothing here downloads: a
source is a local folder or a model in the configured MLflow registry.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from cluster.config import ConfigError
from models.files import LM_CONFIG, TOKENIZER

FORMATS = ("hf", "native")
HF_CONFIG = "config.json"


def is_registry_uri(source: str) -> bool:
    """``models:/NAME@ALIAS``, ``models:/NAME/3``, or the short ``NAME@ALIAS`` when no such folder exists."""
    return source.startswith("models:/") or ("@" in source and not Path(source).exists())


def is_hf_folder(path: Path) -> bool:
    return (path / HF_CONFIG).is_file() and not (path / LM_CONFIG).is_file()


def native_folder(source: str | Path) -> Path:
    """The native export folder behind a checkpoint folder, an export folder or a Ray run folder (its latest
    checkpoint); a clear error otherwise."""
    from cluster.storage import resolve_storage

    path = Path(source)
    if (path / LM_CONFIG).is_file():
        return path
    found = resolve_storage(str(path.resolve().parent), create=False).latest_checkpoint(path.name)
    if found is not None and Path(found[1], LM_CONFIG).is_file():
        return Path(found[1])
    raise ConfigError(
        f"{str(path)!r} holds no {LM_CONFIG}: give a checkpoint folder, a run folder with checkpoints, or a "
        "folder written by `rpt models pull --format native`"
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; allowed: {', '.join(FORMATS)}")


def _check_dest(dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{str(dest)!r} exists and is not empty: choose a new folder (nothing was written)")


def export_model(source: str | Path, dest: str | Path, *, fmt: str = "hf", dtype: str = "float32",
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the decoder of ``source`` (checkpoint, run or export folder) into ``dest`` in format ``fmt``."""
    from models.hf import HFFormatError
    from models.hf_io import export_hf_folder
    from trainers import workloads

    _check_format(fmt)
    src, dest = native_folder(source), Path(dest)
    _check_dest(dest)
    if fmt == "native":
        dest.mkdir(parents=True, exist_ok=True)
        for f in workloads.for_export(src).registry_files(src):
            shutil.copy(src / f, dest / f)
        return dest
    try:
        return export_hf_folder(src, dest, max_shard_bytes=max_shard_bytes, dtype=dtype)
    except HFFormatError as e:
        raise ConfigError(str(e)) from None


def pull_model(uri: str, dest: str | Path, *, fmt: str = "native", tracking_uri: str | None = None,
               dtype: str = "float32") -> Path:
    """A registered model into ``dest``: its export files (``native``) or a Hugging Face folder (``hf``)."""
    from cluster.registry import pull

    _check_format(fmt)
    dest = Path(dest)
    _check_dest(dest)
    if fmt == "native":
        return pull(uri, dest, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="rpt-pull-") as tmp:
        native = pull(uri, Path(tmp, "native"), tracking_uri=tracking_uri)
        return export_model(native, dest, fmt="hf", dtype=dtype)


def import_model(src: str | Path, *, name: str, alias: str, tracking_uri: str, experiment: str = "ray-pretrain",
                 artifact_root: str = "mlartifacts") -> int:
    """Register a local Hugging Face Llama-architecture folder as ``models:/NAME@ALIAS``; returns the version.

    Everything (config, weights, tokenizer and its roles) is checked before anything is registered; the
    MLflow run that holds the version is tagged with the source folder.
    """
    from mlflow import MlflowClient

    from cluster import tracking
    from cluster.registry import register_checkpoint
    from models.hf import HFFormatError
    from models.hf_io import import_hf_folder

    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{str(src)!r} is not a folder: give a local Hugging Face model folder (config.json, "
                          "safetensors weights, tokenizer.json); nothing is downloaded")
    with tempfile.TemporaryDirectory(prefix="rpt-import-") as tmp:
        try:
            cfg = import_hf_folder(src, Path(tmp, "native"))
        except (HFFormatError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        client = MlflowClient(tracking_uri)
        exp = tracking.ensure_experiment(tracking_uri, experiment, artifact_root)
        run = client.create_run(exp, run_name=f"import-{name}",
                                tags={"rpt.imported_from": str(src.resolve()), "rpt.format": "hf"})
        client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "model_config.json")
        version = register_checkpoint(Path(tmp, "native"), run_id=run.info.run_id, name=name, aliases=[alias],
                                      tracking_uri=tracking_uri)
        client.set_terminated(run.info.run_id, status="FINISHED")
    return version


def resolve_start(source: str, cache_root: Path, *, tracking_uri: str) -> str:
    """A local native export folder for a run's start model (``trainer.init_from``, continual ``start``):
    a registered model (pulled), a Hugging Face folder (imported) or a native/checkpoint folder (as is).

    Pulled and imported models land in ``cache_root/<key>`` and are reused when the same source comes again
    (a registered version, or an HF folder with the same config and weights index)."""
    if is_registry_uri(source):
        name, version = _registry_version(source, tracking_uri)
        dest = cache_root / f"{name}-v{version}"
        if not (dest / LM_CONFIG).is_file() and not (dest / "vit_config.json").is_file():
            from cluster.registry import pull

            pull(f"models:/{name}/{version}", dest, tracking_uri=tracking_uri)
        return str(dest.resolve())
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"start model {source!r} is neither a folder nor a registered model (models:/NAME@ALIAS)")
    if not is_hf_folder(path):
        return str(path.resolve())
    from models.hf import HFFormatError
    from models.hf_io import import_hf_folder

    dest = cache_root / f"hf-{_folder_key(path)}"
    if not (dest / LM_CONFIG).is_file():
        try:
            import_hf_folder(path, dest)
        except (HFFormatError, FileNotFoundError) as e:
            raise ConfigError(f"start model {source!r}: {e}") from None
    return str(dest.resolve())


def _registry_version(source: str, tracking_uri: str) -> tuple[str, str]:
    from cluster.registry import model_version

    try:
        mv = model_version(source, tracking_uri)
        return mv.name, mv.version
    except Exception as e:  # MlflowException for unknown names/aliases; ValueError for a malformed URI
        raise ConfigError(f"start model {source!r} is not a registered model version ({e})") from None


def _folder_key(path: Path) -> str:
    """Identifies an HF folder's content cheaply: its config, weights index or weights size, tokenizer."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in (HF_CONFIG, "model.safetensors.index.json", TOKENIZER):
        if (path / f).is_file():
            h.update((path / f).read_bytes())
    for w in sorted(path.glob("*.safetensors")):
        h.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def register_later(checkpoint: str, *, name: str, aliases: list[str], tracking_uri: str) -> tuple[int, int]:
    """``rpt models register``: register a run's checkpoint that could not be registered at the end of its run
    (the tracking server was away). The checkpoint must be complete; the run's metrics that rank 0 could not
    send are replayed into its MLflow run first, and a run still RUNNING ends FINISHED. Returns the new version
    and the number of metric records replayed."""
    import json
    import posixpath

    from mlflow import MlflowClient

    from cluster import tracking
    from cluster.registry import register_checkpoint
    from cluster.storage import resolve_storage
    from cluster.train import RUN_FILE
    from trainers.checkpoint import checkpoint_problem

    tracking.check_reachable(tracking_uri)
    run_dir, ckpt_name = posixpath.split(checkpoint.rstrip("/"))
    storage = resolve_storage(run_dir, create=False)
    path = storage.path(ckpt_name)
    if not storage.is_dir(path):
        raise ConfigError(f"{checkpoint!r} is not a folder: give a checkpoint folder of a run (results/RUN/checkpoint_*)")
    problem = checkpoint_problem(storage.filesystem, path, deep=not storage.remote)
    if problem:
        raise ConfigError(f"{checkpoint!r} is not a complete checkpoint ({problem}); register another checkpoint "
                          "of the run")
    run_file = storage.path(RUN_FILE)
    if not storage.exists(run_file):
        raise ConfigError(f"{run_dir!r} holds no {RUN_FILE}: {checkpoint!r} is not a checkpoint of a ray-pretrain run")
    run_id = json.loads(storage.read_text(run_file))["mlflow_run_id"]
    client = MlflowClient(tracking_uri)
    replayed = tracking.replay_unsent(storage.filesystem, storage.root, client, run_id)
    tracking.record_metric_stats(storage.filesystem, storage.root, client, run_id, replayed)
    with storage.local_checkpoint(path, files=None) as local:
        version = register_checkpoint(local, run_id=run_id, name=name, aliases=aliases, tracking_uri=tracking_uri)
    client.set_tag(run_id, "rpt.checkpoint", checkpoint)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="FINISHED")
    return version, replayed
