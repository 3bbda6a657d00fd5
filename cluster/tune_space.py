"""Search spaces, trial schedulers and search algorithms of ``rpt tune``, written in YAML.

A swept key is ``schedule`` (a label of the study's ``schedules``), ``seed`` or any dotted key of the
continual config (``optimizer.lr_peak``, ``tasks.1.replay_fraction``); its value is one of Ray Tune's
search spaces (https://docs.ray.io/en/latest/tune/api/search_space.html)::

    search:
      schedule: {grid: [cosine_rewarm, infinite]}   # every value, in every sample (a plain list means grid)
      seed: [0, 1, 2]
      optimizer.lr_peak: {loguniform: [1.0e-4, 1.0e-2]}
      trainer.micro_batch_size: {choice: [4, 8]}
      tasks.1.replay_fraction: {uniform: [0.0, 0.5]}
      trainer.log_every: {randint: [1, 10]}          # low inclusive, high exclusive

``num_samples`` repeats the grid that many times, drawing the other keys anew each time. A scheduler stops
poor trials early (``asha``: Li et al., "A System for Massively Parallel Hyperparameter Tuning",
arXiv 1810.05934) and a search algorithm proposes the samples (``optuna``: TPE, Akiba et al., arXiv
1907.10902; needs ``pip install optuna``). Everything here is pure: Ray Tune objects are built only in
:func:`tune_domains`, :func:`build_scheduler` and :func:`build_search_alg`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SAMPLED = ("choice", "uniform", "loguniform", "randint")


class SpaceError(ValueError):
    """A search space written wrong: the message names the key, the value and the allowed forms."""


class Dimension(BaseModel):
    """One swept key: its kind (one of :data:`KINDS`) and values (grid/choice) or bounds (the others)."""

    model_config = ConfigDict(frozen=True)
    key: str
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """Values a trial can take that validate the config on the driver: every listed value, or both
        bounds of a range (``randint``'s high bound is exclusive)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


def _forms() -> str:
    return ("a list (grid), {grid: [...]}, {choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]} "
            "(0 < low) or {randint: [low, high]} (integers, high exclusive)")


def parse_dimension(key: str, spec: Any, *, where: str = "search") -> Dimension:
    """``spec`` as written in YAML -> a :class:`Dimension`; a :class:`SpaceError` naming ``where.key`` otherwise."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{where}.{key}: {spec!r} is not a search space; write {_forms()}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}.{key}.{kind}: needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Dimension(key=key, kind=kind, values=tuple(values))
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise SpaceError(f"{where}.{key}.{kind}: needs [low, high] numbers, got {values!r}")
    lo, hi = values
    if not lo < hi:
        raise SpaceError(f"{where}.{key}.{kind}: low={lo} must be < high={hi}")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}.{key}.loguniform: low={lo} must be > 0 (log scale); use uniform for ranges with 0")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise SpaceError(f"{where}.{key}.randint: bounds must be integers, got {values!r}")
    return Dimension(key=key, kind=kind, values=(lo, hi))


def parse_space(grid: dict[str, list[Any]], search: dict[str, Any]) -> list[Dimension]:
    """The study's dimensions: ``grid`` (the short form: lists) then ``search`` (any form); a key in both is
    an error."""
    both = sorted(set(grid) & set(search))
    if both:
        raise SpaceError(f"{both} appear under both grid and search: keep each key in one of them")
    dims = [parse_dimension(k, v, where="grid") for k, v in grid.items()]
    return dims + [parse_dimension(k, v) for k, v in search.items()]


def probe_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Points that together take every candidate of every dimension once (the others at their first
    candidate): validating these on the driver checks every value a trial can be given, without the
    cartesian product."""
    base = {d.key: d.candidates()[0] for d in dims}
    points = [base]
    for d in dims:
        points += [{**base, d.key: v} for v in d.candidates()[1:]]
    return points


def grid_points(dims: list[Dimension]) -> int:
    """How many trials one sample of the grid makes (the product of the grid dimensions' sizes)."""
    return math.prod(len(d.values) for d in dims if d.kind == "grid")


def tune_domains(dims: list[Dimension], seed: int | None = None) -> dict[str, Any]:
    """``{key: Ray Tune domain}`` for ``Tuner(param_space=...)``."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {d.key: make[d.kind](list(d.values)) for d in dims}


class SchedulerSpec(BaseModel):
    """A trial scheduler. ``asha``: asynchronous successive halving on ``metric`` over ``time_attr`` (the
    global optimizer step, reported at every evaluation), rungs at grace_period * reduction_factor^k."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["asha"] = "asha"
    metric: str = Field("val/avg_loss", description="a metric every report carries: val/avg_loss or val/<task>/loss")
    mode: Literal["min", "max"] = "min"
    time_attr: Literal["step"] = "step"
    grace_period: int = Field(1, ge=1, description="steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="default: the sequence's total steps")


class SearchAlgSpec(BaseModel):
    """A search algorithm proposing the sampled keys (``optuna``: TPE; every key must be a sampled space)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["optuna"] = "optuna"
    metric: str = Field("val/avg_loss", description="what the search minimises/maximises, read from each trial's "
                        "last report: val/avg_loss (at the end: the final average loss) or val/<task>/loss")
    mode: Literal["min", "max"] = "min"
    seed: int | None = None


def check_search_alg(spec: SearchAlgSpec | None, dims: list[Dimension]) -> None:
    """Optuna samples every key itself: grid dimensions cannot be combined with it."""
    if spec is None:
        return
    grids = [d.key for d in dims if d.kind == "grid"]
    if grids:
        raise SpaceError(
            f"search_alg {spec.name} proposes every swept key itself and cannot take grid dimensions ({grids}): "
            "write them as {choice: [...]} under search, or drop search_alg"
        )
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SpaceError(f"search_alg {spec.name} needs Optuna: pip install 'ray-pretrain[tune]' "
                         "(or pip install optuna), or drop search_alg") from None


def build_scheduler(spec: SchedulerSpec | None, max_t: int):
    if spec is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=spec.time_attr, metric=spec.metric, mode=spec.mode, max_t=spec.max_t or max_t,
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor,
                         stop_last_trials=False)  # a trial reaching max_t still finishes its sequence


def build_search_alg(spec: SearchAlgSpec | None, seed: int, max_concurrent: int):
    """The search algorithm: Optuna's TPE, or Tune's random/grid generator seeded with ``seed`` (the
    samples of a study are reproducible). Either runs at most ``max_concurrent`` trials at a time."""
    if spec is None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.seed if spec.seed is not None else seed)
