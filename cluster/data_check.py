"""Everything about the prepared data that can fail, checked on the driver before Ray starts.

The manifest's format chooses the workload spec (:mod:`trainers.workloads`); the spec checks its own
data, the evaluation and replay folders and ``trainer.init_from``; the objective checks what it needs of
the data (:meth:`objectives.hooks.ObjectiveHooks.check_data`) and fills parameters from it.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import ConfigError
from trainers import workloads
from trainers.config import RunConfig
from trainers.workloads import DataError, DataFacts


def check_data(cfg: RunConfig) -> DataFacts:
    """Load and verify ``data.path``'s manifest (with ``data.sources``: every source's), match it with the
    objective, check the other folders against it."""
    import objectives

    d = cfg.data
    root, field = Path(d.root), d.root_field
    manifest = _load_verified(field, root, d.verify_shards)
    _check_val_rows(field, d.root)
    for i, src in enumerate(d.sources[1:], start=1):
        _load_verified(f"data.sources[{i}].path", Path(src.path), d.verify_shards)
        _check_val_rows(f"data.sources[{i}].path", src.path)
    for name, path in d.eval_sets.items():
        _check_val_rows(f"data.eval_sets.{name}", path)
    spec = workloads.for_manifest(manifest)
    obj = objectives.get(cfg.objective.name, **cfg.objective.params)
    wanted = workloads.for_objective(obj)
    if wanted is not spec:
        raise ConfigError(_mismatch(cfg, spec, wanted))
    try:
        facts = spec.check(cfg, root, manifest)
        others = {f"data.eval_sets.{k}": v for k, v in cfg.data.eval_sets.items()}
        others.update({f"data.sources[{i}].path": s.path for i, s in enumerate(cfg.data.sources[1:], start=1)})
        if cfg.data.replay:
            others.update({f"data.replay.paths[{i}]": p for i, p in enumerate(cfg.data.replay.paths)})
        for field_name, path in others.items():
            spec.check_other(field_name, path, facts)
        spec.check_init(cfg, facts)
    except DataError as e:
        raise ConfigError(str(e)) from None
    try:
        obj.check_data(facts.fields)
    except ValueError as e:
        raise ConfigError(f"{field}={d.root!r}: {e}") from None
    return facts


def _load_verified(field: str, root: Path, verify: bool | str):
    """A prepared folder's manifest, its shards checked as ``data.verify_shards`` says."""
    from data.manifest import load_any_manifest

    try:
        manifest = load_any_manifest(root)
        if verify:
            manifest.verify(root)
        if verify == "full":
            manifest.verify_rows(root)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{field}={str(root)!r}: {e}") from None
    return manifest


def _check_val_rows(field_name: str, path: str) -> None:
    """Every evaluation set needs rows: the run evaluates at step 0 and every ``trainer.eval_every`` steps."""
    from data.stream import load_shards

    try:
        rows = sum(s.rows for s in load_shards(path, "val"))
    except (FileNotFoundError, KeyError):
        return  # a missing folder or split is reported by the manifest checks
    if rows == 0:
        raise ConfigError(
            f"{field_name}={path!r} has no validation rows (prepared with data.prepare.val_fraction=0): prepare it "
            "again with data.prepare.val_fraction > 0 (e.g. 0.05) and --overwrite"
        )


def _mismatch(cfg: RunConfig, spec, wanted) -> str:
    """The objective trains on another data kind than ``data.path`` holds."""
    if spec.kind == "images":
        return (f"{cfg.data.root_field}={cfg.data.root!r} holds images, but objective {cfg.objective.name!r} trains the decoder LM "
                f"on token shards: choose {spec.objective_hint} ({', '.join(_objectives_of(spec))}) or point "
                "data.path at data prepared from a text corpus")
    return (f"objective {cfg.objective.name!r} trains a ViT on images, but {cfg.data.root_field}={cfg.data.root!r} holds token "
            f"shards: prepare image data (data.prepare.kind: images, e.g. source: fractals) into another folder")


def _objectives_of(spec) -> list[str]:
    from objectives import registry

    return [n for n in registry.available() if spec.owns(registry.objective_class(n))]


def fill_from_data(cfg: RunConfig, facts: DataFacts) -> RunConfig:
    """Sizes and objective parameters the config leaves unset, from the data (the workload spec's
    ``fill_config``, the objective's ``fill_params``); contradictions are errors naming both."""
    import objectives

    try:
        cfg = workloads.get(facts.kind).fill_config(cfg, facts)
    except DataError as e:
        raise ConfigError(str(e)) from None
    obj = objectives.get(cfg.objective.name, **cfg.objective.params)
    try:
        params = obj.fill_params(dict(cfg.objective.params), facts.fields)
    except ValueError as e:
        raise ConfigError(f"{cfg.data.root_field}={cfg.data.root!r}: {e}") from None
    if params == cfg.objective.params:
        return cfg
    new = cfg.model_dump(mode="json")
    new["objective"] = {"name": cfg.objective.name, **params}
    return RunConfig.model_validate(new)
