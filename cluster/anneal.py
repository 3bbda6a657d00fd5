"""Anneal branches of the infinite schedule (Ibrahim et al. 2024, arXiv 2403.08763): any schedule with
the ``anneal_branch`` capability (``trainers.schedules.with_capability``).

The main line trains at the constant LR ``η_const`` for as long as data keeps coming. To release a
model, a *branch* continues from a constant-phase checkpoint with the exponential anneal to ``η_min``
for N steps, into a new run; the source checkpoint is only read, so the main line can go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, apply_overrides, validate_config
from cluster.train import TrainOutcome, run_train
from trainers import schedules
from trainers.checkpoint import TrainState
from trainers.config import TrainerSpec


def resolve_checkpoint(source: str, tracking_uri: str, storage_path: str | None = None) -> tuple[str, TrainState]:
    """A checkpoint (local folder, or a URI such as ``s3://...`` read through ``storage_path``'s store, default
    the URI's bucket with the environment's endpoint), or the checkpoint behind a registered model
    (``NAME@ALIAS``, ``models:/...``); with its train state."""
    from cluster.storage import StorageError, is_uri, resolve_storage

    if is_uri(source):
        try:
            storage = resolve_storage(storage_path or "/".join(source.split("/", 3)[:3]), create=False)
            return source, storage.state_of(source)
        except (StorageError, FileNotFoundError) as e:
            raise ConfigError(f"checkpoint {source!r}: {e}") from None
    path = Path(source)
    if path.is_dir():
        return str(path.resolve()), TrainState.load(path)  # fails clearly if it is not one of ours
    from cluster.registry import model_version

    try:
        mv = model_version(source, tracking_uri)
    except Exception as e:
        raise ConfigError(f"{source!r} is neither a checkpoint folder nor a registered model version ({e})") from None
    from mlflow import MlflowClient

    ckpt = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_run(mv.run_id).data.tags.get("rpt.checkpoint")
    if not ckpt or not (is_uri(ckpt) or Path(ckpt).is_dir()):
        raise ConfigError(
            f"registered model {source!r} (run {mv.run_id}) has no reachable training checkpoint "
            f"(tag rpt.checkpoint={ckpt!r}); pass the checkpoint folder instead"
        )
    return resolve_checkpoint(ckpt, tracking_uri, storage_path)


def anneal_config(checkpoint: str, st: TrainState, steps: int, overrides: list[str], alias: str):
    """The run config of an anneal branch from ``checkpoint`` (train state ``st``): its own config, its
    schedule annealing from the checkpoint's step for ``steps`` steps, full state resumed."""
    name = st.schedule.get("name")
    branching = schedules.with_capability("anneal_branch")
    if name not in branching:
        raise ConfigError(
            f"checkpoint {checkpoint} was trained with schedule {name!r}: anneal branches start "
            f"from the constant phase of the {' or '.join(map(repr, branching))} schedule"
        )
    try:
        params = schedules.anneal_branch(st.schedule["params"], start_step=st.step, anneal_steps=steps, name=name)
    except ValueError as e:
        raise ConfigError(f"checkpoint {checkpoint} at step {st.step}: {e}") from None
    raw = dict(st.config)
    raw["name"] = f"{raw['name']}-anneal-s{st.step}"
    raw["schedule"] = {"name": name, **params}
    # fields of the checkpoint's trainer config that this version still has (older ones may hold removed fields)
    trainer = {k: v for k, v in raw["trainer"].items() if k in TrainerSpec.model_fields}
    raw["trainer"] = {**trainer, "max_steps": st.step + steps, "resume_from": checkpoint, "init_from": None}
    raw["tracking"] = {**raw["tracking"], "alias": alias}
    return validate_config(apply_overrides(raw, overrides), source=f"anneal branch of {checkpoint}")


def run_anneal(
    source: str, *, steps: int, overrides: list[str] | None = None, alias: str = "annealed",
    tracking_uri: str, address: str | None = None, parent_run_id: str | None = None, callbacks: Sequence[Any] = (),
    storage_path: str | None = None,
) -> TrainOutcome:
    """An anneal branch of ``source`` into a new run (``storage_path``: the store of an ``s3://`` source, with its
    options; the branch's run goes to the source run's ``storage_path`` unless overridden)."""
    ckpt, state = resolve_checkpoint(source, tracking_uri, storage_path)
    cfg = anneal_config(ckpt, state, steps, list(overrides or []), alias)
    if storage_path and not any(o.startswith("storage_path=") for o in overrides or []):
        cfg = cfg.model_copy(update={"storage_path": storage_path})
    return run_train(cfg, address=address, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     tags={"rpt.anneal_source": ckpt}, callbacks=callbacks)
