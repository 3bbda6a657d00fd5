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


def resolve_checkpoint(source: str, tracking_uri: str) -> Path:
    """A checkpoint folder, or the checkpoint behind a registered model (``NAME@ALIAS``, ``models:/...``)."""
    path = Path(source)
    if path.is_dir():
        TrainState.load(path)  # fails clearly if it is not one of ours
        return path
    from mlflow import MlflowClient

    from cluster.registry import model_version

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        mv = model_version(source, tracking_uri)
    except Exception as e:
        raise ConfigError(f"{source!r} is neither a checkpoint folder nor a registered model version ({e})") from None
    ckpt = client.get_run(mv.run_id).data.tags.get("rpt.checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        raise ConfigError(
            f"registered model {source!r} (run {mv.run_id}) has no reachable training checkpoint "
            f"(tag rpt.checkpoint={ckpt!r}); pass the checkpoint folder instead"
        )
    return Path(ckpt)


def anneal_config(checkpoint: Path, steps: int, overrides: list[str], alias: str):
    """The run config of an anneal branch from ``checkpoint``: its own config, its schedule annealing
    from the checkpoint's step for ``steps`` steps, full state resumed."""
    st = TrainState.load(checkpoint)
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
    raw["trainer"] = {**trainer, "max_steps": st.step + steps, "resume_from": str(checkpoint.resolve()),
                      "init_from": None}
    raw["tracking"] = {**raw["tracking"], "alias": alias}
    return validate_config(apply_overrides(raw, overrides), source=f"anneal branch of {checkpoint}")


def run_anneal(
    source: str, *, steps: int, overrides: list[str] | None = None, alias: str = "annealed",
    tracking_uri: str, address: str | None = None, parent_run_id: str | None = None, callbacks: Sequence[Any] = (),
) -> TrainOutcome:
    ckpt = resolve_checkpoint(source, tracking_uri)
    cfg = anneal_config(ckpt, steps, list(overrides or []), alias)
    return run_train(cfg, address=address, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     tags={"rpt.anneal_source": str(ckpt.resolve())}, callbacks=callbacks)
