"""Driver of one training run: validate -> start/join Ray -> TorchTrainer.fit -> register the model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import tracking
from cluster.config import ConfigError, dump_config
from cluster.storage import Storage, StorageError, resolve_storage
from trainers.checkpoint import TrainState
from trainers.config import RunConfig

log = logging.getLogger(__name__)
RUN_FILE = "rpt_run.json"  # in the Ray run folder: links it to its MLflow run


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    checkpoint: str | None
    model_name: str | None
    model_version: int | None
    metrics: dict[str, Any]
    tracking_uri: str


@dataclass
class DataCheck:
    manifest: Any
    vocab_size: int
    seq_len: int
    tokenizer_path: str
    image: dict[str, Any] | None = None  # image data: image_size, channels, n_classes, class_names




def check_data(cfg: RunConfig) -> DataCheck:
    """Everything about the prepared data that can fail, checked on the driver before Ray starts."""
    from data.manifest import ImageManifest, Manifest, load_any_manifest
    from objectives.vision import VISION_OBJECTIVES
    from trainers.workload import is_image_objective

    root = Path(cfg.data.path)
    try:
        manifest = load_any_manifest(root)
        if cfg.data.verify_shards:
            manifest.verify(root)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
    image_objective = is_image_objective(cfg.objective.name, cfg.objective.params)
    if isinstance(manifest, ImageManifest):
        if not image_objective:
            raise ConfigError(
                f"data.path={cfg.data.path!r} holds images, but objective {cfg.objective.name!r} trains the decoder LM "
                f"on token shards: choose an image objective ({', '.join(VISION_OBJECTIVES)}) or point data.path at "
                "data prepared from a text corpus"
            )
        return _check_image_data(cfg, root, manifest)
    if image_objective:
        raise ConfigError(
            f"objective {cfg.objective.name!r} trains a ViT on images, but data.path={cfg.data.path!r} holds token "
            "shards: prepare image data (data.prepare.kind: images, e.g. source: fractals) into another folder"
        )
    vocab = manifest.tokenizer.vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer vocabulary of {vocab} "
            f"({root / manifest.tokenizer.path}); remove model.vocab_size (it defaults to the tokenizer's) "
            "or prepare the data with data.prepare.vocab_size matching the model"
        )
    if cfg.model.max_seq_len is not None and cfg.model.max_seq_len < manifest.seq_len:
        raise ConfigError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the data's seq_len={manifest.seq_len} "
            f"({root}/manifest.json); raise model.max_seq_len or prepare shorter rows"
        )
    others = {f"data.eval_sets.{k}": v for k, v in cfg.data.eval_sets.items()}
    if cfg.data.replay:
        others.update({f"data.replay.paths[{i}]": p for i, p in enumerate(cfg.data.replay.paths)})
    for field_name, path in others.items():
        try:
            other = Manifest.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{field_name}={path!r}: {e}") from None
        if other.tokenizer.sha256 != manifest.tokenizer.sha256 or other.seq_len != manifest.seq_len:
            raise ConfigError(
                f"{field_name}={path!r} was prepared with another tokenizer or seq_len than data.path: prepare it "
                f"with data.prepare.tokenizer={str(root / manifest.tokenizer.path)!r} and seq_len={manifest.seq_len}"
            )
    import objectives

    obj = objectives.get(cfg.objective.name, **cfg.objective.params)
    needed = list(obj.required_special_tokens()) if hasattr(obj, "required_special_tokens") else []
    missing = [tok for tok in needed if tok not in manifest.tokenizer.special_tokens]
    if missing:
        raise ConfigError(
            f"objective {cfg.objective.name!r} needs special tokens {missing} that the tokenizer of "
            f"data.path={cfg.data.path!r} lacks (it has {sorted(manifest.tokenizer.special_tokens)}); prepare "
            f"the data with data.prepare.special_tokens including them"
        )
    teacher = cfg.objective.params.get("teacher")
    if teacher:  # self-distillation: the frozen teacher must exist and share the tokenizer, checked before Ray
        tcfg = Path(teacher, "model_config.json")
        if not tcfg.is_file():
            raise ConfigError(f"objective.teacher={teacher!r} holds no model_config.json (an export or checkpoint folder)")
        if json.loads(tcfg.read_text()).get("vocab_size") != vocab:
            raise ConfigError(f"objective.teacher={teacher!r} has another vocab_size than the data's tokenizer ({vocab})")
    if cfg.trainer.init_from:
        init_cfg = Path(cfg.trainer.init_from, "model_config.json")
        if not init_cfg.is_file():
            raise ConfigError(f"trainer.init_from={cfg.trainer.init_from!r} holds no model_config.json")
        src_vocab = json.loads(init_cfg.read_text()).get("vocab_size")
        if src_vocab != vocab:
            raise ConfigError(
                f"trainer.init_from model has vocab_size {src_vocab}, the data's tokenizer has {vocab}: "
                "continue pre-training with data tokenised by the model's own tokenizer"
            )
    return DataCheck(manifest, vocab, manifest.seq_len, str((root / manifest.tokenizer.path).resolve()))


def _check_image_data(cfg: RunConfig, root: Path, manifest) -> DataCheck:
    """Image data: the other image folders must have the same image size and channels; ``init_from`` must be a
    vision export."""
    from data.manifest import ImageManifest, load_any_manifest

    others = {f"data.eval_sets.{k}": v for k, v in cfg.data.eval_sets.items()}
    if cfg.data.replay:
        others.update({f"data.replay.paths[{i}]": p for i, p in enumerate(cfg.data.replay.paths)})
    for field_name, path in others.items():
        try:
            other = load_any_manifest(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{field_name}={path!r}: {e}") from None
        if not isinstance(other, ImageManifest) or (other.image_size, other.channels) != (manifest.image_size, manifest.channels):
            raise ConfigError(
                f"{field_name}={path!r} is not image data of {manifest.channels}x{manifest.image_size}x{manifest.image_size} "
                f"like data.path: prepare it with data.prepare image_size={manifest.image_size}, channels={manifest.channels}"
            )
    if cfg.trainer.init_from and not Path(cfg.trainer.init_from, "vit_config.json").is_file():
        raise ConfigError(
            f"trainer.init_from={cfg.trainer.init_from!r} holds no vit_config.json: give a checkpoint or pulled model "
            "of an image run"
        )
    image = {"image_size": manifest.image_size, "channels": manifest.channels, "n_classes": manifest.n_classes,
             "class_names": list(manifest.class_names)}
    return DataCheck(manifest, 0, 0, "", image=image)


def fill_from_data(cfg: RunConfig, data: DataCheck) -> RunConfig:
    """Image runs: sizes the config leaves unset come from the data (as the LM's vocab_size comes from the
    tokenizer): ``vit.image_size`` and ``vit.in_channels``; CLIP's ``n_classes`` and ``class_names``.
    Explicit values that contradict the data are errors naming both."""
    if data.image is None:
        return cfg
    from models.vit import ViTConfig

    im = data.image
    vit = (cfg.vit or ViTConfig()).model_dump()
    for key, value in (("image_size", im["image_size"]), ("in_channels", im["channels"])):
        if vit[key] is not None and vit[key] != value:
            raise ConfigError(
                f"vit.{key}={vit[key]} but data.path={cfg.data.path!r} holds {im['channels']}x{im['image_size']}x"
                f"{im['image_size']} images: remove vit.{key} (it defaults to the data's) or prepare matching data"
            )
        vit[key] = value
    try:
        vit_cfg = ViTConfig.model_validate(vit)
    except ValueError as e:
        raise ConfigError(f"vit: {e}") from None
    params = dict(cfg.objective.params)
    if cfg.objective.name == "clip":
        if params.get("n_classes", im["n_classes"]) != im["n_classes"]:
            raise ConfigError(
                f"objective.n_classes={params['n_classes']} but data.path={cfg.data.path!r} has {im['n_classes']} "
                "classes: remove objective.n_classes (it defaults to the data's)"
            )
        params["n_classes"] = im["n_classes"]
        params.setdefault("class_names", im["class_names"])
    new = cfg.model_dump(mode="json")
    new["vit"] = vit_cfg.model_dump(mode="json")
    new["objective"] = {"name": cfg.objective.name, **params}
    return RunConfig.model_validate(new)


def replay_rows_per_micro(cfg: RunConfig) -> int:
    """Rows of each micro-batch drawn from replay: ``round(fraction * micro_batch_size)``."""
    rp, mb = cfg.data.replay, cfg.trainer.micro_batch_size
    if rp is None or rp.fraction == 0.0:
        return 0
    if not rp.paths:
        raise ConfigError("data.replay.fraction > 0 needs data.replay.paths (prepared folders of earlier tasks)")
    n = round(rp.fraction * mb)
    if n == 0 or n == mb:
        raise ConfigError(
            f"data.replay.fraction={rp.fraction} of trainer.micro_batch_size={mb} rounds to {n} rows: "
            "raise micro_batch_size or choose a fraction that leaves both parts non-empty"
        )
    if abs(n / mb - rp.fraction) > 1e-9:
        log.warning("data.replay.fraction=%s realised as %d/%d = %.4f of each micro-batch", rp.fraction, n, mb, n / mb)
    return n


def _unique_run_name(storage: Storage, name: str) -> str:
    new = storage.unique_run_name(name)
    if new != name:
        log.warning("run %r already exists in %s: starting %r (pass --resume to continue %r)", name, storage.uri, new, name)
    return new


def _marker_path(storage: Storage, name: str) -> str:
    """Fault-injection marker (trainer.fail_at_step): in the run folder when it is local, else in a local
    temp folder (the marker is a test device, read with plain file I/O by the workers)."""
    if not storage.remote:
        return storage.path(name, ".failure_injected")
    import tempfile

    return str(Path(tempfile.gettempdir(), "rpt-markers", storage.root.replace("/", "_"), name, ".failure_injected"))


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def _log_lr_plot(client, run_id: str, cfg: RunConfig) -> None:
    """The run's planned LR curve (phases and task boundaries marked) as an MLflow artifact."""
    import tempfile

    from cluster.plots import plot_lr

    curve = {"label": cfg.name, "name": cfg.schedule.name, "params": cfg.schedule_params(),
             "lr_peak": cfg.optimizer.lr_peak, "steps": cfg.trainer.max_steps}
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_lr([curve], Path(tmp, "lr_schedule.png"), title=f"{cfg.name}: {cfg.schedule.name}")
        client.log_artifact(run_id, str(path))


def run_train(
    cfg: RunConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    register: bool = True,
    dashboard: bool | None = False,
    extra_aliases: tuple[str, ...] = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> TrainOutcome:
    import mlflow
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    from cluster.ray_env import init_ray
    from cluster.registry import register_checkpoint
    from data.stream import PlannedDataConfig, StreamPlan, load_shards
    from trainers.loop import train_loop_per_worker

    data = check_data(cfg)
    cfg = fill_from_data(cfg, data)
    t = cfg.trainer
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, tracking_uri)
    try:
        storage = resolve_storage(cfg.storage_path)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    name = cfg.name if resume else _unique_run_name(storage, cfg.name)
    run_dir = storage.path(name)

    # --- where this fit starts --------------------------------------------------------------
    start_rows, start_step, run_id, start_replay = 0, 0, None, 0
    if resume:
        if not storage.is_dir(run_dir):
            raise ConfigError(f"--resume: no run {name!r} in storage_path={storage.uri!r}")
        found = storage.latest_checkpoint(name)
        if found is not None:
            st, _ = found
            start_rows, start_step, run_id = st.data_position["rows_consumed"], st.step, st.mlflow_run_id
            start_replay = st.data_position.get("replay_rows_consumed", 0)
        if storage.exists(storage.path(name, RUN_FILE)):
            run_id = json.loads(storage.read_text(storage.path(name, RUN_FILE)))["mlflow_run_id"]
    elif t.resume_from:
        st = TrainState.load(t.resume_from)
        start_step = st.step
        if t.resume_data_position:
            start_rows = st.data_position["rows_consumed"]
            start_replay = st.data_position.get("replay_rows_consumed", 0)
        if st.data_position["world_size"] != t.num_workers:
            raise ConfigError(
                f"trainer.resume_from={t.resume_from!r} was written by {st.data_position['world_size']} workers; "
                f"set trainer.num_workers={st.data_position['world_size']} (the data position is per rank)"
            )
        if start_step >= t.max_steps:
            raise ConfigError(f"trainer.max_steps={t.max_steps} but trainer.resume_from is already at step {start_step}")

    # --- tracking ---------------------------------------------------------------------------
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    client = MlflowClient(uri)
    if run_id is None:
        run_tags = {"rpt.config_name": cfg.name, "rpt.objective": cfg.objective.name, **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in _flat_params(cfg.model_dump(mode="json")).items()])
        client.log_text(run_id, dump_config(cfg), "config.yaml")
        client.log_text(run_id, data.manifest.model_dump_json(indent=2), "data/manifest.json")
        if t.resume_from:
            client.set_tag(run_id, "rpt.resume_from", str(Path(t.resume_from).resolve()))
        _log_lr_plot(client, run_id, cfg)
    storage.write_text(storage.path(name, RUN_FILE), json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))

    # --- Ray ----------------------------------------------------------------------------------
    init_ray(address, cpus_needed=t.num_workers * t.cpus_per_worker, dashboard=dashboard)
    # One progress bar per rank stream and per epoch is noise in a training log; Ray Data's own
    # progress stays on the dashboard.
    ray.data.DataContext.get_current().enable_progress_bars = False
    steps = t.max_steps - start_step
    replay_micro = replay_rows_per_micro(cfg)
    cols = ("images", "labels", "row_id") if data.image else ("tokens", "row_id")
    shards = load_shards(cfg.data.path, "train")
    streams = {"train": StreamPlan(tuple(shards), cfg.seed, start_rows, steps * t.grad_accum_steps * (t.micro_batch_size - replay_micro), cols)}
    datasets = {"train": ray.data.read_parquet([s.path for s in shards], columns=list(cols))}
    if replay_micro:
        rshards = [sh for p in cfg.data.replay.paths for sh in load_shards(p, "train")]
        streams["replay"] = StreamPlan(tuple(rshards), cfg.data.replay.seed, start_replay, steps * t.grad_accum_steps * replay_micro, cols)
        datasets["replay"] = ray.data.read_parquet([s.path for s in rshards], columns=list(cols))
    # Evaluation sets are small and fixed: each worker reads them directly (data.stream.read_rows).
    val_sets = {"val": cfg.data.path, **{f"val:{k}": v for k, v in cfg.data.eval_sets.items()}}
    eval_shards = {key: [s.path for s in load_shards(path, "val")] for key, path in val_sets.items()}
    if data.image:  # the labelled bank of the k-NN / nearest-class-mean probes: the first training rows
        eval_shards["probe"] = [s.path for s in shards]
    fit = {
        "streams": {k: v.to_dict() for k, v in streams.items()},
        "start_step": start_step,
        "replay_per_micro": replay_micro,
        "tokenizer_path": data.tokenizer_path,
        "vocab_size": data.vocab_size,
        "seq_len": data.seq_len,
        "tracking_uri": uri,
        "mlflow_run_id": run_id,
        "marker_path": _marker_path(storage, name) if t.fail_at_step else None,
        "special_tokens": {} if data.image else dict(data.manifest.tokenizer.special_tokens),
        "eval_shards": eval_shards,
        "image": data.image,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "fit": fit},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **storage.ray_run_config_kwargs(),  # storage_path (+ storage_filesystem for s3://)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        dataset_config=PlannedDataConfig(streams, world_size=t.num_workers),
    )
    result = trainer.fit()
    if result.error:
        client.set_terminated(run_id, status="FAILED")
        raise result.error

    # --- registry -------------------------------------------------------------------------------
    ckpt_path = storage.uri_of(result.checkpoint.path) if result.checkpoint else None  # s3://... when remote
    model_name = version = None
    if register and ckpt_path:
        model_name = cfg.tracking.registered_model or cfg.name
        # Remote storage: only the export files are downloaded (not the optimizer state).
        with storage.local_checkpoint(result.checkpoint.path) as local_ckpt:
            version = register_checkpoint(
                local_ckpt, run_id=run_id, name=model_name, aliases=[cfg.tracking.alias, *extra_aliases], tracking_uri=uri
            )
        client.set_tag(run_id, "rpt.checkpoint", ckpt_path)
    client.set_terminated(run_id, status="FINISHED")
    return TrainOutcome(name, run_id, ckpt_path, model_name, version, dict(result.metrics or {}), uri)
