"""Driver of one training run: check the data -> start/join Ray -> TorchTrainer.fit -> register the model.

The data kind (tokens, images) is the workload spec's business (:mod:`trainers.workloads`), chosen by the
prepared data's manifest; this module only plans the fit: where it starts, which rows each stream reads,
which MLflow run it logs to, and what is registered at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import tracking
from cluster.config import ConfigError, dump_config
from cluster.data_check import check_data, fill_from_data
from cluster.storage import Storage, StorageError, resolve_storage
from data.mixture import Source
from trainers.checkpoint import CheckpointDir
from trainers.config import RunConfig
from trainers.workloads import DataFacts

log = logging.getLogger(__name__)
RUN_FILE = "rpt_run.json"  # in the Ray run folder: links it to its MLflow run

__all__ = ["RUN_FILE", "TrainOutcome", "TrainingError", "check_data", "data_sources", "fill_from_data", "run_train"]


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    checkpoint: str | None
    model_name: str | None
    model_version: int | None
    metrics: dict[str, Any]
    tracking_uri: str
    register_later: str | None = None  # the command that registers the checkpoint when MLflow answers again


class TrainingError(RuntimeError):
    """A fit failed inside the Ray workers: one paragraph (what, where, the fix), the full traceback in a file."""

    def __init__(self, message: str, log_path: Path):
        super().__init__(f"{message} Full traceback: {log_path}")
        self.log_path = log_path


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind Ray's wrappers (``RayTaskError.cause``, Ray Data's ``UserCodeException``
    raised ``from`` the user's error): the one whose message was written for the user."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def translate_worker_error(e: BaseException, run_name: str, log_dir: Path) -> TrainingError:
    """Ray Train's failure (per-rank tracebacks, 100+ lines) as one paragraph naming the run, the rank and the
    worker's own message (whose text names the fix); the whole text goes to ``log_dir/error.log``."""
    import traceback

    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = _root_cause(failures[rank])
        where = f"on rank {rank} ({type(cause).__name__})"
        # the first line: the worker's message (Ray may append hints of its own below it)
        what = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        what += _storage_hint(str(cause))
    else:
        where, what = f"({type(e).__name__})", str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        what += _storage_hint(str(e))
    text = "".join(traceback.format_exception(e)) + "\n" + str(e) + "\n"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "error.log"
        log_path.write_text(text)
    except OSError:  # the run folder cannot take it (a full or read-only store): this machine's temp folder
        import tempfile

        log_path = Path(tempfile.mkdtemp(prefix="rpt-error-")) / "error.log"
        log_path.write_text(text)
    return TrainingError(f"training run {run_name!r} failed {where}: {what}", log_path)


def _storage_hint(text: str) -> str:
    """The fix for a fit that could not write its storage (full, read-only or forbidden), found by the system's
    error message in ``text`` (libraries such as pyarrow wrap the OSError and drop its errno)."""
    import errno
    import os

    why = {errno.ENOSPC: "the storage is full", errno.EDQUOT: "the storage quota is used up",
           errno.EROFS: "the storage is read-only", errno.EACCES: "the storage refuses writes"}
    found = next((w for n, w in why.items() if os.strerror(n) in text), None)
    if found is None:
        return ""
    return (f" ({found}: free space or point storage_path at a writable folder, then `rpt train --resume` "
            "continues from the run's last complete checkpoint; incomplete ones are skipped)")


def check_writable(storage: Storage, run_name: str) -> None:
    """The run folder can be created and written (before the MLflow run or Ray start): a clear error naming
    ``storage_path`` otherwise."""
    probe = storage.path(run_name, ".rpt-write-check")
    try:
        storage.makedirs(storage.path(run_name))
        storage.write_text(probe, "ok")
        storage.filesystem.delete_file(probe)
    except OSError as e:
        raise ConfigError(
            f"storage_path={storage.uri!r} is not writable ({e.strerror or e}: {storage.uri_of(storage.path(run_name))}); "
            "point storage_path at a folder you can write, with room for the checkpoints"
        ) from None


@dataclass
class FitStart:
    """Where this fit starts: the run's name, the global step, each stream's position, the MLflow run."""

    name: str
    step: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # per stream: rows per rank consumed (absent: 0)
    mixed: int = 0  # the mixture's position (data.mixture): rows per rank drawn
    run_id: str | None = None
    skipped: tuple[str, ...] = ()  # newer checkpoints of the run found incomplete or damaged (--resume)
    heads: dict[str, Any] = field(default_factory=dict)  # data.stream.Head per stream (an epoch resharded)
    grad_accum_steps: int | None = None  # set when the global batch is kept on another number of workers
    declared_grad_accum_steps: int | None = None  # the config's value, when the run trains with a rescaled one


def data_sources(cfg: RunConfig) -> list[Source]:
    """The run's planned streams: ``data.sources`` as given; else ``data.path`` as ``train``, mixed with the earlier
    tasks' folders as ``replay`` (weight ``data.replay.fraction``) in continual pre-training."""
    d = cfg.data
    if d.sources:
        return [Source(s.name, (s.path,), s.weight, cfg.seed if s.seed is None else s.seed) for s in d.sources]
    rp = d.replay
    if rp is None or rp.fraction == 0.0:
        return [Source("train", (d.path,), 1.0, cfg.seed)]
    if not rp.paths:
        raise ConfigError("data.replay.fraction > 0 needs data.replay.paths (prepared folders of earlier tasks)")
    return [Source("train", (d.path,), 1.0 - rp.fraction, cfg.seed),
            Source("replay", tuple(rp.paths), rp.fraction, rp.seed)]


def _unique_run_name(storage: Storage, name: str) -> str:
    new = storage.unique_run_name(name)
    if new != name:
        log.warning("run %r already exists in %s: starting %r (pass --resume to continue %r)", name, storage.uri, new, name)
    return new


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


def start_models_cache(storage: Storage) -> Path:
    """Where pulled and imported start models are kept: under a local ``storage_path`` (shared with the
    workers), else in this machine's temp folder."""
    import tempfile

    return Path(storage.root, ".start-models") if not storage.remote else Path(tempfile.gettempdir(), "rpt-start-models")


def resolve_prepare_models(cfg: RunConfig, pcfg, uri: str | None = None):
    """``data.prepare.select.embeddings`` (INGENIOUS's embedding model) as a local export folder: a registered
    model is pulled, a Hugging Face folder imported, like a run's start model."""
    from data.prepare import PrepareConfig

    sel = pcfg.select if isinstance(pcfg, PrepareConfig) else None
    if sel is None or sel.embeddings is None:
        return pcfg
    from cluster.model_io import resolve_start

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, uri)
    try:
        storage = resolve_storage(cfg.storage_path)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    local = resolve_start(sel.embeddings, start_models_cache(storage), tracking_uri=uri)
    return pcfg.model_copy(update={"select": sel.model_copy(update={"embeddings": local})})


def resolve_init(cfg: RunConfig, storage: Storage, uri: str) -> RunConfig:
    """``trainer.init_from`` as a local export folder: a registered model (``models:/NAME@ALIAS``) is pulled,
    a Hugging Face folder imported (:func:`cluster.model_io.resolve_start`)."""
    from cluster.model_io import resolve_start

    src = cfg.trainer.init_from
    if not src:
        return cfg
    local = resolve_start(src, start_models_cache(storage), tracking_uri=uri)
    if local == src:
        return cfg
    # a copy, not a dump + validate: which model fields the user set must survive (fill_config compares them)
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": local})})


def fit_start(cfg: RunConfig, storage: Storage, resume: bool) -> FitStart:
    """``--resume``: the run's latest checkpoint; ``trainer.resume_from``: another run's state in a new run
    (its data position only with ``resume_data_position``); else a new run from step 0."""
    t = cfg.trainer
    if resume:
        if not storage.is_dir(storage.path(cfg.name)):
            raise ConfigError(f"--resume: no run {cfg.name!r} in storage_path={storage.uri!r}")
        start = FitStart(cfg.name)
        found, skipped = storage.newest_checkpoint(cfg.name)
        if found is None and skipped:
            raise ConfigError(f"--resume: no checkpoint of run {cfg.name!r} is complete ("
                              + "; ".join(f"{storage.uri_of(p)}: {why}" for p, why in skipped)
                              + "); resuming would start over: run without --resume under another name")
        if found is not None:
            st = found[0]
            start = FitStart(cfg.name, st.step, run_id=st.mlflow_run_id)
            _continue_data(cfg, st, start, f"--resume (run {cfg.name!r} at step {st.step})")
        start.skipped = tuple(p for p, _ in skipped)
        if storage.exists(storage.path(cfg.name, RUN_FILE)):
            start.run_id = json.loads(storage.read_text(storage.path(cfg.name, RUN_FILE)))["mlflow_run_id"]
        return start
    start = FitStart(_unique_run_name(storage, cfg.name))
    if t.resume_from:
        try:
            st = storage.state_of(t.resume_from)
        except (StorageError, FileNotFoundError) as e:
            raise ConfigError(f"trainer.resume_from: {e}") from None
        start.step = st.step
        if t.resume_data_position:
            _continue_data(cfg, st, start, f"trainer.resume_from={t.resume_from!r}")
        else:
            _keep_global_batch(cfg, st, start, f"trainer.resume_from={t.resume_from!r}")
        if start.step >= t.max_steps:
            raise ConfigError(f"trainer.max_steps={t.max_steps} but trainer.resume_from is already at step {start.step}")
    return start


def _stream_totals(cfg: RunConfig) -> dict[str, int]:
    """Rows per epoch of each planned stream (:func:`data_sources`)."""
    from data.stream import load_shards

    return {src.name: sum(s.rows for p in src.paths for s in load_shards(p, "train")) for src in data_sources(cfg)}


def _continue_data(cfg: RunConfig, st, start: FitStart, what: str) -> None:
    """The checkpoint's data position for this fit, resharded when it was written by another number of workers
    (the rest of the epoch split over the new ones: :meth:`data.stream.DataPosition.resharded`). A stream the
    checkpoint does not know (a source added to the mixture) starts at its beginning; the mixture goes on from its
    position with the configured weights."""
    pos = st.data_position
    totals = _stream_totals(cfg)
    gone = sorted(set(pos.streams) - set(totals))
    if gone:
        log.warning("%s: the checkpoint's data position has streams %s that this config does not train on; "
                    "their positions are dropped", what, gone)
    moved = pos.resharded(totals, cfg.trainer.num_workers)
    start.rows, start.mixed, start.heads = {n: moved.rows(n) for n in totals}, moved.mixed, moved.heads
    _keep_global_batch(cfg, st, start, what)
    if pos.world_size != cfg.trainer.num_workers:
        log.warning("%s was written by %d workers; continuing on %d: the rest of data epoch %d is split over them "
                    "and the optimizer state is resharded", what, pos.world_size, cfg.trainer.num_workers, pos.epoch)


def _keep_global_batch(cfg: RunConfig, st, start: FitStart, what: str) -> None:
    """On another number of workers with the micro_batch_size and grad_accum_steps the run was configured with,
    the rows per optimizer step (the global batch, which the LR schedule was tuned for) stay the same:
    grad_accum_steps is rescaled, or the change is refused when it cannot be. The configured value is kept in the
    checkpoints (``declared_grad_accum_steps``), so a later resume with the same config keeps the rescaled one."""
    t = cfg.trainer
    old_world = st.data_position.world_size if st.data_position else t.num_workers
    old = st.config.get("trainer", {})
    mb, accum = old.get("micro_batch_size", t.micro_batch_size), old.get("grad_accum_steps", t.grad_accum_steps)
    declared = st.declared_grad_accum_steps or accum
    start.declared_grad_accum_steps = st.declared_grad_accum_steps
    if (t.micro_batch_size, t.grad_accum_steps) != (mb, declared):
        return  # a batch the config chose explicitly
    rows = old_world * mb * accum
    if rows == t.num_workers * mb * t.grad_accum_steps:
        return
    if rows % (t.num_workers * mb):
        raise ConfigError(
            f"{what}: the checkpoint's global batch is {rows} rows per step ({old_world} workers x micro_batch_size "
            f"{mb} x grad_accum_steps {accum}), which {t.num_workers} workers x micro_batch_size {mb} cannot divide; "
            f"choose trainer.num_workers (or trainer.micro_batch_size) so that num_workers x micro_batch_size divides "
            f"{rows}, or set trainer.grad_accum_steps for another global batch explicitly"
        )
    start.grad_accum_steps = rows // (t.num_workers * mb)
    start.declared_grad_accum_steps = declared
    log.warning("%s: %d workers (checkpoint: %d); trainer.grad_accum_steps %d -> %d keeps the global batch of %d "
                "rows per step", what, t.num_workers, old_world, t.grad_accum_steps, start.grad_accum_steps, rows)


def open_tracking(cfg: RunConfig, uri: str, start: FitStart, facts: DataFacts, *, parent_run_id: str | None,
                  tags: dict[str, str] | None) -> str:
    """The MLflow run of this fit: the resumed run's, or a new one with params, config, manifest, LR plot."""
    import mlflow
    from mlflow import MlflowClient

    if start.run_id is not None:
        return start.run_id
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    client = MlflowClient(uri)
    run_tags = {"rpt.config_name": cfg.name, "rpt.objective": cfg.objective.name, **tracking.run_tags(), **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, run_name=start.name, tags=run_tags).info.run_id
    params = _flat_params(cfg.model_dump(mode="json"))
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    client.log_text(run_id, dump_config(cfg), "config.yaml")
    client.log_text(run_id, facts.manifest.model_dump_json(indent=2), "data/manifest.json")
    _log_curation(client, run_id, facts.manifest)
    if cfg.trainer.resume_from:
        src = cfg.trainer.resume_from
        client.set_tag(run_id, "rpt.resume_from", src if "://" in src else str(Path(src).resolve()))
    _log_lr_plot(client, run_id, cfg)
    return run_id


def _log_curation(client, run_id: str, manifest) -> None:
    """The data's curation stages (``rpt data prepare``: dedup, filters, INGENIOUS selection) as an MLflow table
    (``data/curation.json``: stage, documents_in, documents_out) and ``data.curation.<stage>`` params."""
    import mlflow

    from data.manifest import Manifest

    stages = manifest.curation if isinstance(manifest, Manifest) else None
    if not stages:
        return
    client.log_table(run_id, data={"stage": [s.stage for s in stages],
                                   "documents_in": [s.documents_in for s in stages],
                                   "documents_out": [s.documents_out for s in stages]},
                     artifact_file="data/curation.json")
    client.log_batch(run_id, params=[mlflow.entities.Param(f"data.curation.{s.stage}",
                                                           f"{s.documents_in} -> {s.documents_out}")
                                     for s in stages])


def plan_fit(cfg: RunConfig, facts: DataFacts, start: FitStart, uri: str, run_id: str):
    """The planned streams (:func:`data_sources`: each source's rows for this fit, split over the micro-batches by
    :class:`data.mixture.Mixture`), the datasets Ray Train hands the workers, and the
    :class:`trainers.loop.FitPlan` as a dict."""
    import ray.data

    from data.mixture import Mixture
    from data.stream import StreamPlan, load_shards
    from trainers import workloads

    t, spec = cfg.trainer, workloads.get(facts.kind)
    sources, cols = data_sources(cfg), spec.columns
    mixture = Mixture(tuple(s.name for s in sources), tuple(s.weight for s in sources))
    drawn = mixture.micro_counts(start.mixed, (t.max_steps - start.step) * t.grad_accum_steps, t.micro_batch_size)
    streams, datasets = {}, {}
    for src, count in zip(sources, drawn.sum(axis=0), strict=True):
        shards = [sh for p in src.paths for sh in load_shards(p, "train")]
        streams[src.name] = StreamPlan(tuple(shards), src.seed, start.rows.get(src.name, 0), int(count), cols,
                                       start.heads.get(src.name))
        datasets[src.name] = ray.data.range(1)  # a placeholder: PlannedDataConfig builds each rank's stream
    # Evaluation sets are small and fixed: each worker reads them directly (data.stream.read_rows).
    val_sets = {f"val:{k}": v for k, v in cfg.data.eval_sets.items()}
    if cfg.data.sources:
        val_sets.update({f"val:{s.name}": s.path for s in cfg.data.sources})
    else:
        val_sets["val"] = cfg.data.path
    eval_shards = {key: [s.path for s in load_shards(path, "val")] for key, path in val_sets.items()}
    eval_shards.update(spec.eval_shards(cfg, [s.path for s in streams[sources[0].name].shards]))
    fit = {"kind": facts.kind, "streams": {k: v.to_dict() for k, v in streams.items()}, "start_step": start.step,
           "declared_grad_accum_steps": start.declared_grad_accum_steps,
           "mixture": mixture.to_dict(), "mixed_start": start.mixed,
           "tracking_uri": uri, "mlflow_run_id": run_id, "eval_shards": eval_shards, "data": facts.fields}
    return fit, datasets, streams


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
    callbacks: Sequence[Any] = (),
    console: Any = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train ``cfg`` on Ray; ``callbacks`` (:class:`trainers.callbacks.Callback`, picklable) join the
    workers' loop (tests: fault injection, row audits); a ``rich`` ``console`` gets a progress line per
    logging step, ``on_step(step, metrics)`` its metrics as they arrive (:class:`cluster.progress.RunWatcher`)."""
    from mlflow import MlflowClient

    from cluster.ray_env import init_ray

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, tracking_uri)
    tracking.check_reachable(uri)
    try:
        storage = resolve_storage(cfg.storage_path)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    cfg = resolve_init(cfg, storage, uri)
    facts = check_data(cfg)
    cfg = fill_from_data(cfg, facts)
    start = fit_start(cfg, storage, resume)
    if start.grad_accum_steps is not None:
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"grad_accum_steps": start.grad_accum_steps})})
    check_writable(storage, start.name)
    run_id = open_tracking(cfg, uri, start, facts, parent_run_id=parent_run_id, tags=tags)
    storage.write_text(storage.path(start.name, RUN_FILE), json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    t = cfg.trainer
    init_ray(address, cpus_needed=t.num_workers * t.cpus_per_worker, dashboard=dashboard)
    client = MlflowClient(uri)
    with _failure_status(client, run_id), _watch(console, on_step, uri, run_id, start.step, t.max_steps):
        result = _fit(cfg, facts, start, storage, uri, run_id, callbacks)
    return _finish(cfg, storage, start.name, facts, result, client, run_id, uri,
                   aliases=[cfg.tracking.alias, *extra_aliases] if register else None)


def _finish(cfg: RunConfig, storage: Storage, name: str, facts: DataFacts, result, client, run_id: str, uri: str, *,
            aliases: list[str] | None) -> TrainOutcome:
    """After a fit that finished: incomplete checkpoints listed, the metrics rank 0 could not send replayed
    and accounted for, the final checkpoint registered (``aliases``; None: not registered), the run FINISHED.
    A tracking server still away after ``tracking.end_wait_s`` leaves the run to ``rpt models register``."""
    ckpt_path = storage.uri_of(result.checkpoint.path) if result.checkpoint else None  # s3://... when remote
    metrics, model_name = dict(result.metrics or {}), cfg.tracking.registered_model or cfg.name
    later = f"rpt models register {ckpt_path} --name {model_name} --tracking-uri {uri}"
    later += "".join(f" --alias {a}" for a in aliases or [])
    if not tracking.wait_reachable(uri, cfg.tracking.end_wait_s):
        log.warning("MLflow (%s) has not answered for %.0f s after training: the checkpoint is kept, nothing is "
                    "registered; when it answers again, run: %s", uri, cfg.tracking.end_wait_s, later)
        return TrainOutcome(name, run_id, ckpt_path, None, None, metrics, uri, register_later=later)
    _note_incomplete(storage, name, client, run_id)
    replayed = tracking.replay_unsent(storage.filesystem, storage.path(name), client, run_id)
    tracking.record_metric_stats(storage.filesystem, storage.path(name), client, run_id, replayed)
    version = None
    if aliases is not None and ckpt_path:
        client.set_tag(run_id, "rpt.checkpoint", ckpt_path)
        version = _register_with_retry(storage, result.checkpoint.path, facts, run_id, model_name, aliases, uri, later)
    client.set_terminated(run_id, status="FINISHED")
    return TrainOutcome(name, run_id, ckpt_path, model_name if version else None, version, metrics, uri,
                        register_later=later if aliases is not None and ckpt_path and not version else None)


def _register_with_retry(storage: Storage, path: str, facts: DataFacts, run_id: str, name: str, aliases: list[str],
                         uri: str, later: str, attempts: int = 3, wait_s: float = 5.0) -> int | None:
    """Registration retried (``attempts``, ``wait_s`` apart) when the tracking server fails; then the command
    that registers the checkpoint later is logged and None returned (the training result stands)."""
    import time

    for i in range(attempts):
        try:
            return _register(storage, path, facts, run_id, name, aliases, uri)
        except (ConfigError, FileNotFoundError):
            raise
        except Exception as e:  # a tracking server error: retry, then leave it to `rpt models register`
            err = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if i + 1 < attempts:
                time.sleep(wait_s)
    log.warning("registering %s failed %d times (%s); the checkpoint is kept: run %s", name, attempts, err, later)
    return None


@contextlib.contextmanager
def _failure_status(client, run_id: str) -> Iterator[None]:
    """A fit that does not finish ends its MLflow run FAILED (the error as ``rpt.error`` and the error log as an
    artifact) or KILLED (Ctrl-C, a stop)."""
    try:
        yield
    except TrainingError as e:
        client.set_tag(run_id, "rpt.error", str(e)[:5000])
        client.log_artifact(run_id, str(e.log_path))
        client.set_terminated(run_id, status="FAILED")
        raise
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise


def _note_incomplete(storage: Storage, run_name: str, client, run_id: str) -> None:
    """Incomplete checkpoint folders left in the run (cut off, or orphaned by workers that lost their run after
    a node loss) are listed in the log and as the tag ``rpt.incomplete_checkpoints``; never deleted."""
    found = storage.incomplete_checkpoints(run_name)
    for path, why in found:
        log.warning("incomplete checkpoint left in the run (not used, not deleted): %s: %s", storage.uri_of(path), why)
    if found:
        client.set_tag(run_id, "rpt.incomplete_checkpoints", "; ".join(storage.uri_of(p) for p, _ in found)[:5000])


def _watch(console: Any, on_step: Callable[[int, dict[str, float]], None] | None, uri: str, run_id: str,
           start_step: int, max_steps: int):
    import contextlib

    from cluster.progress import RunWatcher

    if console is None and on_step is None:
        return contextlib.nullcontext()
    return RunWatcher(uri, run_id, start_step=start_step, max_steps=max_steps, console=console, on_step=on_step)


def _fit(cfg: RunConfig, facts: DataFacts, start: FitStart, storage: Storage, uri: str, run_id: str,
         callbacks: Sequence[Any]):
    """One ``TorchTrainer.fit`` over the planned streams; raises the run's error."""
    import tempfile

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from data.stream import PlannedDataConfig
    from trainers.loop import train_loop_per_worker

    t = cfg.trainer
    # One progress bar per rank stream and per epoch is noise in a training log; Ray Data's own
    # progress stays on the dashboard.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # a damaged shard's error (naming the file) reaches the worker as is
    fit, datasets, streams = plan_fit(cfg, facts, start, uri, run_id)
    fit["checkpoints"] = CheckpointDir(storage.filesystem, storage.path(start.name), start.skipped)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "fit": fit, "callbacks": list(callbacks)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources}),
        run_config=ray.train.RunConfig(
            name=start.name,
            **storage.ray_run_config_kwargs(),  # storage_path (+ storage_filesystem for s3://)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        dataset_config=PlannedDataConfig(streams, world_size=t.num_workers),
    )
    log_dir = Path(storage.path(start.name)) if not storage.remote else Path(tempfile.mkdtemp(prefix="rpt-error-"))
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except ray.train.TrainingFailedError as e:
        raise translate_worker_error(e, start.name, log_dir) from None
    return result


def _register(storage: Storage, path: str, facts: DataFacts, run_id: str, name: str, aliases: list[str],
              uri: str) -> int:
    """Register the checkpoint's export; from remote storage only the workload's export files are
    downloaded (not the optimizer state)."""
    from cluster.registry import register_checkpoint
    from trainers import workloads

    spec = workloads.get(facts.kind)
    with storage.local_checkpoint(path, files=spec.export_files, optional=spec.optional_files) as local:
        return register_checkpoint(local, run_id=run_id, name=name, aliases=aliases, tracking_uri=uri)
