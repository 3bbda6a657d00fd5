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
    _check_locations(cfg)
    field = d.root_field
    root, manifest = _load_verified(field, d.root, d.verify_shards)
    _check_val_rows(field, d.root)
    for i, src in enumerate(d.sources[1:], start=1):
        _load_verified(f"data.sources[{i}].path", src.path, d.verify_shards)
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
        for field_name, path in _other_folders(cfg).items():
            spec.check_other(field_name, path, facts)
        spec.check_init(cfg, facts)
    except DataError as e:
        raise ConfigError(str(e)) from None
    try:
        obj.check_data(facts.fields)
    except ValueError as e:
        raise ConfigError(f"{field}={d.root!r}: {e}") from None
    return facts


def _other_folders(cfg: RunConfig) -> dict[str, str]:
    """The folders that must match the run's data (tokenizer, seq_len, image size): eval sets, the other sources,
    the replayed tasks."""
    d = cfg.data
    others = {f"data.eval_sets.{k}": v for k, v in d.eval_sets.items()}
    others.update({f"data.sources[{i}].path": s.path for i, s in enumerate(d.sources[1:], start=1)})
    if d.replay:
        others.update({f"data.replay.paths[{i}]": p for i, p in enumerate(d.replay.paths)})
    return others


def _load_verified(field: str, path: str, verify: bool | str):
    """``(root, manifest)`` of a prepared folder (a local path or a URI), its shards checked as
    ``data.verify_shards`` says."""
    from data.location import is_uri, resolve
    from data.manifest import load_any_manifest

    root = path if is_uri(path) else Path(resolve(path).path)  # file:// URIs are local paths
    try:
        manifest = load_any_manifest(root)
        if verify:
            manifest.verify(root)
        if verify == "full":
            manifest.verify_rows(root)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{field}={path!r}: {e}") from None
    except OSError as e:  # a store that fails mid-way (permissions, network)
        raise ConfigError(_io_error(field, path, e)) from None
    return root, manifest


def _check_locations(cfg: RunConfig) -> None:
    """Every data folder on an object store: its store reachable and its bucket there (one paragraph naming the
    field, the cause and the fix, instead of a traceback from the first read)."""
    from data.location import LocationError, check_reachable, resolve

    fields = {cfg.data.root_field: cfg.data.root, **_other_folders(cfg)}
    for field_name, path in fields.items():
        try:
            check_reachable(resolve(path, what=field_name), field_name)
        except LocationError as e:
            raise ConfigError(str(e)) from None


def _io_error(field_name: str, path: str, exc: OSError) -> str:
    from data.location import io_error

    return str(io_error(field_name, path, exc))


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
