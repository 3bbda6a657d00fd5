"""Learning-rate schedules: pure multipliers of the peak LR, chosen by name from a small registry.

A schedule is a frozen pydantic model ``f`` with ``f(step) -> float``: the multiplier of the peak LR at
the 0-based global optimizer step. Its fields are its parameters, declared once: they validate the YAML
``schedule:`` block and are what the function reads. So it pickles (Ray ships it to the workers), it can
be wrapped in ``torch.optim.lr_scheduler.LambdaLR`` as is, and only the step has to be checkpointed. No
torch here: this module is pure Python + ``math`` + pydantic.

Schedules (formulas in each class's docstring and in the README, "Learning-rate schedules";
t = step, W = warmup, T = total_steps):

- ``constant``: linear warmup, then 1.
- ``linear``: linear warmup, then linear decay to ``min_ratio`` at T.
- ``cosine``: linear warmup, then cosine decay to ``min_ratio`` at T (Loshchilov & Hutter, SGDR,
  arXiv 1608.03983), flat at ``min_ratio`` after T.
- ``cosine_rewarm``: one warmup + cosine cycle per task (the re-warming baseline of continual
  pre-training; SGDR's warm restarts, arXiv 1608.03983).
- ``wsd``: warmup-stable-decay (MiniCPM, arXiv 2404.06395; Hägele et al. 2024, arXiv 2405.18392).
- ``infinite``: warmup, cooldown, constant, exponential anneal (Ibrahim et al. 2024, arXiv 2403.08763;
  compared with repeated cosine in "Beyond Cosine Decay", arXiv 2503.02844).

Usage::

    from trainers import schedules
    f = schedules.get("cosine", warmup_steps=100, total_steps=1000, min_ratio=0.1)
    LambdaLR(optimizer, f)

Capabilities: a schedule class declares what the continual and anneal code may ask of it in
``capabilities`` (see :data:`CAPABILITIES`); callers ask the registry (:func:`with_capability`) rather
than naming schedules.

Conventions shared by every schedule:

- Warmup: ``f(t) = t / W`` for ``t < W``, so ``f(0) = 0`` and ``f(W) = 1``; ``W = 0`` starts at 1.
- Phases are given in steps (``warmup_steps``) or as a fraction of a budget (``warmup_frac``), exactly
  one of the two. Fractions are *phase lengths* (not end points) and are resolved at validation time
  to ``round_half_up(frac * budget)`` steps, so the function only sees integers and ``describe()``
  records steps (its output can be fed back to ``get``). The one exception: ``infinite`` also takes
  its authors' *end points* ``cooldown_end_frac`` / ``constant_end_frac`` (fractions of the budget where
  a phase ends), resolved to phase lengths in steps the same way.
- Phases that overrun the budget (``total_steps``) are a ValueError naming the phase and the budget.
- Every phase is a half-open interval ``[start, end)`` of steps; by continuity the value at ``end`` is
  the next phase's starting value.
"""

import bisect
import logging
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

logger = logging.getLogger(__name__)

Phase = tuple[str, int, int]
PositiveInt = Annotated[int, Field(gt=0)]

CAPABILITIES = {
    "task_boundaries": "takes task_steps (one length per task) and reports where tasks begin",
    "anneal_branch": "has a constant phase that an anneal branch can start from (constant_phase, anneal_branch)",
}


class Schedule(BaseModel):
    """Base of every schedule: the fields are the parameters, ``__call__`` the multiplier of the peak LR.

    Unknown fields are an error, not silently ignored. Subclasses resolve fractions and check
    cross-field constraints in :meth:`_check` (raising ValueError), which runs after field validation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""  # the registry name, set by @register
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _validate(self):
        self._check()
        return self

    def _check(self) -> None:
        pass

    def _fill(self, **values: Any) -> None:
        """Set resolved fields during validation (the model is frozen; pydantic keeps fields in __dict__)."""
        self.__dict__.update(values)

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        """Named phases ``(phase, start, end)``: half-open step ranges, empty ones left out."""
        raise NotImplementedError

    def task_boundaries(self) -> list[int]:
        """Steps where tasks begin (cumulative sums of ``task_steps``, from 0); [] without tasks."""
        task_steps = getattr(self, "task_steps", None)
        return _cumulative_starts(task_steps) if task_steps is not None else []

    def constant_phase(self) -> tuple[int, int | None]:
        """First and last step of the constant phase (last None: open-ended); ``anneal_branch`` schedules."""
        raise NotImplementedError(f"schedule {self.name!r} has no constant phase")


# --------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, type[Schedule]] = {}
_S = TypeVar("_S", bound=type[Schedule])


def register(name: str) -> Callable[[_S], _S]:
    """Class decorator: register a :class:`Schedule` subclass under ``name``.

    A duplicate name raises ValueError; so does a capability the class does not back (``task_boundaries``
    needs a ``task_steps`` field, ``anneal_branch`` a ``constant_phase`` method).
    """

    def wrap(cls: _S) -> _S:
        if name in _REGISTRY:
            raise ValueError(
                f"schedule {name!r} is already registered (by {_REGISTRY[name].__qualname__}); "
                f"cannot register {cls.__qualname__} under the same name"
            )
        unknown = cls.capabilities - CAPABILITIES.keys()
        if unknown:
            raise ValueError(
                f"schedule {name!r}: unknown capabilities {sorted(unknown)}; known: {list(CAPABILITIES)}"
            )
        if "task_boundaries" in cls.capabilities and "task_steps" not in cls.model_fields:
            raise ValueError(f"schedule {name!r} declares task_boundaries but has no task_steps field")
        if "anneal_branch" in cls.capabilities and cls.constant_phase is Schedule.constant_phase:
            raise ValueError(f"schedule {name!r} declares anneal_branch but does not define constant_phase()")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of the registered schedules, in registration order."""
    return list(_REGISTRY)


def with_capability(capability: str) -> list[str]:
    """Names of the registered schedules declaring ``capability`` (one of :data:`CAPABILITIES`)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown schedule capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    return [name for name, cls in _REGISTRY.items() if capability in cls.capabilities]


def has_param(name: str, param: str) -> bool:
    """Whether schedule ``name`` takes parameter ``param``; False for an unregistered name (``get`` says why)."""
    return name in _REGISTRY and param in _REGISTRY[name].model_fields


def params_model(name: str) -> type[Schedule]:
    """The pydantic model of schedule ``name``: its class (the config layer validates YAML with it)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def _format_error(name: str, model: type[BaseModel], exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(
                f"unknown field {loc!r} (= {err['input']!r}); allowed fields: {', '.join(model.model_fields)}"
            )
        elif err["type"] == "missing":
            parts.append(f"missing required field {loc!r}")
        elif loc:
            parts.append(f"field {loc!r} = {err['input']!r}: {msg}")
        else:  # cross-field check from _check: its message names the fields
            parts.append(msg)
    return f"schedule {name!r}: " + "; ".join(parts)


def validate(name: str, **params: Any) -> Schedule:
    """Schedule ``name`` built from validated ``params``; fractions come back resolved to steps.

    Raises ValueError naming the schedule, the field, the value and what is allowed.
    """
    model = params_model(name)
    try:
        return model(**params)
    except ValidationError as exc:
        raise ValueError(_format_error(name, model, exc)) from None


def get(name: str, **params: Any) -> Schedule:
    """Build schedule ``name`` with validated parameters: a picklable ``f(step) -> float``."""
    return validate(name, **params)


def describe(name: str, **params: Any) -> dict[str, Any]:
    """``{"name": ..., "params": {...}}`` with validated, step-resolved params (JSON-serialisable).

    ``get(d["name"], **d["params"])`` rebuilds the same schedule.
    """
    return {"name": name, "params": validate(name, **params).model_dump(mode="json", exclude_none=True)}


def phases(name: str, **params: Any) -> list[Phase]:
    """Named phases ``(phase, start, end)`` (half-open step ranges, empty ones left out), for plotting."""
    return get(name, **params).phases()


def task_boundaries(name: str, **params: Any) -> list[int]:
    """Steps where tasks begin (cumulative sums of ``task_steps``, starting at 0); [] without tasks."""
    return get(name, **params).task_boundaries()


def anneal_branch(
    params: dict[str, Any], start_step: int, anneal_steps: int, *, name: str = "infinite"
) -> dict[str, Any]:
    """Params of schedule ``name`` (an ``anneal_branch`` one) whose anneal begins exactly at ``start_step``.

    See :meth:`InfiniteSchedule.anneal_branch`.
    """
    if name not in with_capability("anneal_branch"):
        raise ValueError(
            f"anneal_branch: schedule {name!r} has no constant phase to branch from; "
            f"schedules with one: {', '.join(with_capability('anneal_branch'))}"
        )
    return get(name, **params).anneal_branch(start_step, anneal_steps)


def evaluate(f: Callable[[int], float], steps: range | int) -> list[float]:
    """``[f(t) for t in steps]``; an int ``n`` means ``range(n)``."""
    if isinstance(steps, int):
        if steps < 0:
            raise ValueError(f"evaluate: steps={steps} must be >= 0 (or a range)")
        steps = range(steps)
    return [f(t) for t in steps]


# --------------------------------------------------------------------------------------------------
# Helpers shared by the schedules


def _round_steps(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which surprises in a config)."""
    return int(math.floor(x + 0.5))


def _resolve_phase(s: Schedule, phase: str, budget: int | None, budget_name: str) -> None:
    """Set ``<phase>_steps`` from exactly one of ``<phase>_steps`` / ``<phase>_frac`` (then frac = None)."""
    steps_f, frac_f = f"{phase}_steps", f"{phase}_frac"
    steps, frac = getattr(s, steps_f), getattr(s, frac_f)
    if steps is not None and frac is not None:
        raise ValueError(f"{steps_f}={steps} and {frac_f}={frac} are both set; give exactly one of them")
    if steps is None and frac is None:
        raise ValueError(f"missing {steps_f}: give {steps_f} (steps) or {frac_f} (fraction of {budget_name})")
    if frac is not None:
        if budget is None:
            raise ValueError(
                f"{frac_f}={frac} needs {budget_name} to resolve into steps; set it or give {steps_f}"
            )
        s._fill(**{steps_f: _round_steps(frac * budget), frac_f: None})


def _check_warmup(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be < total_steps={total_steps} (the schedule needs steps after warmup)"
        )


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step={step} must be >= 0 (0-based global optimizer step)")


def _nonempty(*ps: Phase) -> list[Phase]:
    return [p for p in ps if p[2] > p[1]]


def _cumulative_starts(task_steps: Iterable[int]) -> list[int]:
    starts, s = [], 0
    for n in task_steps:
        starts.append(s)
        s += n
    return starts


def _cosine(x: float, r: float) -> float:
    """Half-cosine from 1 (x=0) to r (x=1)."""
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * x))


_STEPS_DOC = "steps (give this or the matching *_frac)"
_FRAC_DOC = "fraction of the budget (give this or the matching *_steps)"


# --------------------------------------------------------------------------------------------------
# constant, linear, cosine: one warmup of total_steps, then a single shape (wsd further down)


class _WarmupSchedule(Schedule):
    """Linear warmup of W steps (``warmup_steps`` or ``warmup_frac`` of ``total_steps``), then
    :meth:`_after_warmup`."""

    warmup_steps: int | None = Field(None, ge=0, description=f"warmup length in {_STEPS_DOC}")
    warmup_frac: float | None = Field(
        None, ge=0.0, le=1.0, description=f"warmup length as {_FRAC_DOC} total_steps"
    )
    total_steps: int = Field(gt=0, description="T: planned optimizer steps; f = min_ratio from T on")

    def _check(self) -> None:
        _resolve_phase(self, "warmup", self.total_steps, "total_steps")
        if self.total_steps is not None:
            _check_warmup(self.warmup_steps, self.total_steps)

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return self._after_warmup(step)

    def _after_warmup(self, step: int) -> float:
        raise NotImplementedError


@register("constant")
class ConstantSchedule(_WarmupSchedule):
    """Linear warmup, then the peak LR forever: f(t) = t/W for t < W, else 1."""

    total_steps: int | None = Field(
        None, gt=0, description="optional: the budget warmup_frac refers to, and the end of phases()"
    )

    def _after_warmup(self, step: int) -> float:
        return 1.0

    def phases(self) -> list[Phase]:
        """Warmup, then constant up to total_steps (an open-ended constant phase is left out)."""
        w = self.warmup_steps
        end = self.total_steps if self.total_steps is not None else w
        return _nonempty(("warmup", 0, w), ("constant", w, end))


class _DecaySchedule(_WarmupSchedule):
    """After warmup: 1 up to the decay start S (W unless overridden), :meth:`_decay` on [S, T), then
    ``min_ratio``. Subclasses declare the ``min_ratio`` field (after their own fields: describe() order)."""

    def _decay_start(self) -> int:
        return self.warmup_steps

    def _decay(self, step: int) -> float:
        raise NotImplementedError

    def _after_warmup(self, step: int) -> float:
        if step >= self.total_steps:
            return self.min_ratio
        if step < self._decay_start():
            return 1.0
        return self._decay(step)

    def phases(self) -> list[Phase]:
        w, s, t_end = self.warmup_steps, self._decay_start(), self.total_steps
        return _nonempty(("warmup", 0, w), ("stable", w, s), ("decay", s, t_end))


@register("linear")
class LinearSchedule(_DecaySchedule):
    """Linear warmup, then linear decay from 1 to min_ratio at total_steps.

    t < W: t/W; W <= t < T: 1 - (1-r)(t-W)/(T-W); t >= T: r.
    """

    min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="floor as a fraction of the peak LR")

    def _decay(self, step: int) -> float:
        w, t_end = self.warmup_steps, self.total_steps
        return 1.0 - (1.0 - self.min_ratio) * (step - w) / (t_end - w)


@register("cosine")
class CosineSchedule(_DecaySchedule):
    """Cosine with warmup (Loshchilov & Hutter, SGDR, arXiv 1608.03983, without restarts).

    t < W: t/W; W <= t < T: r + (1-r)/2 (1 + cos(pi (t-W)/(T-W))); t >= T: r.
    """

    min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="eta_min / eta_max, the floor of the cosine")

    def _decay(self, step: int) -> float:
        w, t_end = self.warmup_steps, self.total_steps
        return _cosine((step - w) / (t_end - w), self.min_ratio)


# --------------------------------------------------------------------------------------------------
# cosine_rewarm


@register("cosine_rewarm")
class CosineRewarmSchedule(Schedule):
    """One warmup + cosine cycle per task: the re-warming baseline (SGDR warm restarts, arXiv 1608.03983;
    the baseline that the infinite schedule improves on, arXiv 2403.08763 / 2503.02844).

    In task k (starts at B_k, length I_k, re-warm W_k), tau = t - B_k, s = 0 for the first task and
    min_ratio r for later ones: tau < W_k: s + (1-s) tau/W_k; else r + (1-r)/2 (1 + cos(pi (tau-W_k)/(I_k-W_k))).
    After the last task: r. Re-warming is what causes forgetting.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"task_boundaries"})

    task_steps: list[PositiveInt] = Field(min_length=1, description="optimizer steps of each task, in order")
    warmup_steps: int | list[int] | None = Field(
        None,
        description="re-warm length: one value for every task, or one per task (give this or warmup_frac)",
    )
    warmup_frac: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="re-warm length as a fraction of each task's own length (per-task steps)",
    )
    min_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="floor of each cosine and start of each re-warm"
    )

    _starts: tuple[int, ...] = PrivateAttr()
    _warmups: tuple[int, ...] = PrivateAttr()  # per task

    def _check(self) -> None:
        n = len(self.task_steps)
        if self.warmup_steps is not None and self.warmup_frac is not None:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} and warmup_frac={self.warmup_frac} are both set; "
                "give exactly one of them"
            )
        if self.warmup_steps is None and self.warmup_frac is None:
            raise ValueError(
                "missing warmup_steps: give warmup_steps (steps, one or one per task) "
                "or warmup_frac (fraction of each task's length)"
            )
        if self.warmup_frac is not None:
            self._fill(
                warmup_steps=[_round_steps(self.warmup_frac * i) for i in self.task_steps], warmup_frac=None
            )
        if isinstance(self.warmup_steps, list) and len(self.warmup_steps) != n:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} has {len(self.warmup_steps)} entries but task_steps has {n}; "
                "give one value per task or a single int"
            )
        per_task = self.warmup_steps if isinstance(self.warmup_steps, list) else [self.warmup_steps] * n
        for k, (w, i) in enumerate(zip(per_task, self.task_steps, strict=True)):
            if w < 0:
                raise ValueError(f"warmup_steps={w} (task {k}) must be >= 0")
            if w >= i:
                raise ValueError(
                    f"warmup_steps={w} must be < task_steps[{k}]={i} (each task needs steps after its re-warm)"
                )
        self._warmups = tuple(per_task)
        self._starts = tuple(_cumulative_starts(self.task_steps))

    def __call__(self, step: int) -> float:
        _check_step(step)
        r = self.min_ratio
        if step >= self._starts[-1] + self.task_steps[-1]:
            return r
        k = bisect.bisect_right(self._starts, step) - 1
        tau, length, w = step - self._starts[k], self.task_steps[k], self._warmups[k]
        if tau < w:
            s = 0.0 if k == 0 else r
            return s + (1.0 - s) * tau / w
        return _cosine((tau - w) / (length - w), r)

    def phases(self) -> list[Phase]:
        out: list[Phase] = []
        for k, (b, i, w) in enumerate(zip(self._starts, self.task_steps, self._warmups, strict=True)):
            out += _nonempty((f"task{k}:warmup", b, b + w), (f"task{k}:decay", b + w, b + i))
        return out


# --------------------------------------------------------------------------------------------------
# wsd (its decay starts at T - D instead of W)

DecayShape = Literal["linear", "1-sqrt", "cosine", "exponential"]


def _wsd_decay(shape: str, x: float, r: float) -> float:
    if shape == "linear":
        return 1.0 - (1.0 - r) * x
    if shape == "1-sqrt":
        return r + (1.0 - r) * (1.0 - math.sqrt(x))
    if shape == "cosine":
        return _cosine(x, r)
    if shape == "exponential":
        return r**x
    raise AssertionError(f"unvalidated decay_shape {shape!r}")


@register("wsd")
class WSDSchedule(_DecaySchedule):
    """Warmup-stable-decay (MiniCPM, arXiv 2404.06395; Hägele et al. 2024, arXiv 2405.18392).

    S = T - D, x = (t - S)/D: t < W: t/W; W <= t < S: 1; S <= t < T: decay(x) with
    linear 1-(1-r)x, 1-sqrt r+(1-r)(1-sqrt x), cosine r+(1-r)/2 (1+cos pi x), exponential r^x; t >= T: r.
    """

    total_steps: int = Field(gt=0, description="T: the decay ends here; f = min_ratio from T on")
    decay_steps: int | None = Field(
        None, gt=0, description=f"D, decay length in {_STEPS_DOC}; 10-20% of T is usual"
    )
    decay_frac: float | None = Field(None, gt=0.0, le=1.0, description=f"D as {_FRAC_DOC} total_steps")
    decay_shape: DecayShape = Field(
        "1-sqrt", description="linear | 1-sqrt (best in Hägele et al.) | cosine | exponential (MiniCPM)"
    )
    min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="r = eta_min / eta_max reached at total_steps")

    def _check(self) -> None:
        _resolve_phase(self, "warmup", self.total_steps, "total_steps")
        _resolve_phase(self, "decay", self.total_steps, "total_steps")
        _check_warmup(self.warmup_steps, self.total_steps)
        if self.decay_steps < 1:
            raise ValueError(
                f"decay_steps={self.decay_steps} must be >= 1 (decay_frac too small for total_steps?)"
            )
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} + decay_steps={self.decay_steps} must be <= "
                f"total_steps={self.total_steps} (the decay starts after warmup)"
            )
        if self.decay_shape == "exponential" and self.min_ratio <= 0.0:
            raise ValueError(
                f"min_ratio={self.min_ratio} must be > 0 with decay_shape='exponential' (r^x needs r > 0)"
            )

    def _decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    def _decay(self, step: int) -> float:
        x = (step - self._decay_start()) / self.decay_steps
        return _wsd_decay(self.decay_shape, x, self.min_ratio)


# --------------------------------------------------------------------------------------------------
# infinite

CooldownShape = Literal["cosine", "inv_sqrt", "linear"]


@register("infinite")
class InfiniteSchedule(Schedule):
    """Infinite schedule (Ibrahim et al. 2024, arXiv 2403.08763; "Beyond Cosine Decay", arXiv 2503.02844).

    u = t - W, K = C + constant_steps, c = const_ratio, r = min_ratio:
    t < W: t/W (once for the whole task sequence); 0 <= u < C: cooldown 1 - (1-c) g(u/C) with
    g = (1 - cos pi x)/2 (cosine), h(x)/h(1), h(x) = 1/sqrt(1+alpha x) - 1 (inv_sqrt), or x (linear);
    C <= u <= K: c; K < u < K+A: c (r/c)^((u-K)/A); u >= K+A: r. With A = 0 it stays at c forever.

    In the paper's notation (T_warm, T_cd, T_ann, T_end: the steps where warmup, cooldown, constant
    phase and anneal end): W = T_warm, C = T_cd - T_warm, constant_steps =
    T_ann - T_cd, A = T_end - T_ann, and the cosine cooldown is eta_const + (eta_max - eta_const)/2
    (1 + cos(pi (t - T_warm)/(T_cd - T_warm))), the anneal eta_const (eta_min/eta_const)^((t - T_ann)/A).

    Phases are given as lengths (``*_steps``, or ``*_frac`` of the budget), or, as in the authors'
    configs, by end points as fractions of the budget: ``cooldown_end_frac`` = T_cd / budget (instead of
    ``cooldown_steps`` / ``cooldown_frac``) and ``constant_end_frac`` = T_ann / budget (instead of
    ``constant_steps`` / ``constant_frac``); with ``constant_end_frac`` and no anneal length given the
    anneal runs to the budget (A = budget - T_ann). E.g. ``warmup_frac: 0.01, cooldown_end_frac: 0.6,
    constant_end_frac: 0.85`` (warmup 1%, cooldown to 60%, constant to 85%, anneal to the end). End
    points resolve to lengths in steps, ``round_half_up(frac * budget) - (end of the previous phase)``.

    Budget for the ``*_frac`` fields: ``total_steps``, else ``sum(task_steps)``. If no constant length
    or end is given, the constant phase is derived: with ``task_steps``,
    ``constant_steps = sum(task_steps) - W - C`` (the tasks end with the constant phase; the anneal is a
    branch after them); otherwise with ``total_steps``, ``constant_steps = total_steps - W - C - A`` (the
    anneal ends at the budget). With ``total_steps``, every phase must end by it (a phase that ends later
    is a ValueError naming it and the budget); with ``task_steps`` alone, warmup and cooldown must end by
    ``sum(task_steps)``. Defaults of the ratios are the authors' LM values
    (eta_const = 1.65e-4, eta_min = 3e-5 for eta_max = 3e-4).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"task_boundaries", "anneal_branch"})

    warmup_steps: int | None = Field(
        None, ge=0, description=f"W, warmup length in {_STEPS_DOC}; once for all tasks"
    )
    warmup_frac: float | None = Field(None, ge=0.0, le=1.0, description=f"W as {_FRAC_DOC}")
    cooldown_steps: int | None = Field(
        None, ge=0, description=f"C, cooldown length 1 -> const_ratio, {_STEPS_DOC}"
    )
    cooldown_frac: float | None = Field(None, ge=0.0, le=1.0, description=f"C as {_FRAC_DOC}")
    constant_steps: int | None = Field(
        None, ge=0, description="length of the constant phase (K = C + constant_steps); derived if omitted"
    )
    constant_frac: float | None = Field(None, ge=0.0, le=1.0, description=f"constant_steps as {_FRAC_DOC}")
    anneal_steps: int | None = Field(
        None,
        ge=0,
        description="A, exponential anneal length; 0 = constant forever (anneal later, as a branch)",
    )
    anneal_frac: float | None = Field(None, ge=0.0, le=1.0, description=f"A as {_FRAC_DOC}")
    const_ratio: float = Field(0.55, gt=0.0, le=1.0, description="eta_const / eta_max of the constant phase")
    min_ratio: float = Field(0.1, ge=0.0, le=1.0, description="eta_min / eta_max at the end of the anneal")
    cooldown_shape: CooldownShape = Field("cosine", description="cosine | inv_sqrt | linear")
    inv_sqrt_alpha: float = Field(
        10.0, gt=0.0, description="alpha of h(x) = 1/sqrt(1 + alpha x) - 1 (inv_sqrt)"
    )
    total_steps: int | None = Field(None, gt=0, description="optional budget for the *_frac fields")
    task_steps: list[PositiveInt] | None = Field(
        None,
        min_length=1,
        description="optional steps per task: boundaries/plots only, the function ignores them",
    )
    cooldown_end_frac: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="T_cd / budget: where the cooldown ends (instead of cooldown_steps/frac)",
    )
    constant_end_frac: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="T_ann / budget: where the constant phase ends (instead of constant_steps/frac)",
    )

    def _end_step(self, phase: str, budget: int | None, budget_name: str) -> int | None:
        """The step where ``phase`` ends from ``<phase>_end_frac`` (None when not given); clears the field."""
        end_f = f"{phase}_end_frac"
        frac = getattr(self, end_f)
        if frac is None:
            return None
        for other in (f"{phase}_steps", f"{phase}_frac"):
            if getattr(self, other) is not None:
                raise ValueError(
                    f"{end_f}={frac} and {other}={getattr(self, other)} are both set; give one of them "
                    f"(where the {phase} phase ends, or its length)"
                )
        if budget is None:
            raise ValueError(f"{end_f}={frac} needs {budget_name} to resolve into a step; set it")
        self._fill(**{end_f: None})
        return _round_steps(frac * budget)

    def _length_to(self, phase: str, end: int, start: int, end_frac: float, start_name: str) -> int:
        if end < start:
            raise ValueError(
                f"{phase}_end_frac={end_frac} puts the end of the {phase} phase at step {end}, before "
                f"{start_name} at step {start}"
            )
        return end - start

    def _check(self) -> None:
        if self.total_steps is not None:
            budget, budget_name = self.total_steps, "total_steps"
        elif self.task_steps is not None:
            budget, budget_name = sum(self.task_steps), "total_steps (or task_steps)"
        else:
            budget, budget_name = None, "total_steps (or task_steps)"
        cd_frac, k_frac = self.cooldown_end_frac, self.constant_end_frac
        cd_end = self._end_step("cooldown", budget, budget_name)
        k_end = self._end_step("constant", budget, budget_name)
        _resolve_phase(self, "warmup", budget, budget_name)
        if cd_end is None:
            _resolve_phase(self, "cooldown", budget, budget_name)
        else:
            w_end = self.warmup_steps
            self._fill(cooldown_steps=self._length_to("cooldown", cd_end, w_end, cd_frac, "the warmup's end"))
        if k_end is not None:
            self._fill(
                constant_steps=self._length_to(
                    "constant", k_end, self.warmup_steps + self.cooldown_steps, k_frac, "the cooldown's end"
                )
            )
            if self.anneal_steps is None and self.anneal_frac is None:
                self._fill(anneal_steps=budget - k_end)  # T_end = the budget
        _resolve_phase(self, "anneal", budget, budget_name)
        w, c, a = self.warmup_steps, self.cooldown_steps, self.anneal_steps
        if self.constant_steps is None and self.constant_frac is None:
            if self.task_steps is not None:
                derived, how = sum(self.task_steps) - w - c, f"sum(task_steps)={sum(self.task_steps)} - W - C"
            elif self.total_steps is not None:
                derived, how = self.total_steps - w - c - a, f"total_steps={self.total_steps} - W - C - A"
            else:
                raise ValueError(
                    "missing constant_steps: give constant_steps or constant_frac, "
                    "or task_steps / total_steps to derive it from"
                )
            if derived < 0:
                raise ValueError(
                    f"constant_steps derived as {how} = {derived} < 0 (warmup_steps={w}, cooldown_steps={c}, "
                    f"anneal_steps={a}); shorten the phases or give constant_steps"
                )
            logger.debug("infinite schedule: constant_steps derived as %s = %d", how, derived)
            self._fill(constant_steps=derived)
        else:
            _resolve_phase(self, "constant", budget, budget_name)
        if self.min_ratio > self.const_ratio:
            raise ValueError(
                f"min_ratio={self.min_ratio} must be <= const_ratio={self.const_ratio} (the anneal goes down)"
            )
        if a > 0 and self.min_ratio <= 0.0:
            raise ValueError(
                f"min_ratio={self.min_ratio} must be > 0 when anneal_steps={a} > 0 "
                "(the anneal is exponential, const_ratio * (min_ratio/const_ratio)^x)"
            )
        if self.total_steps is not None:
            _check_warmup(w, self.total_steps)
            self._check_fits(self.total_steps, "total_steps", ("warmup", "cooldown", "constant", "anneal"))
        elif self.task_steps is not None:  # the constant phase may go on past the tasks (anneal branches)
            self._check_fits(sum(self.task_steps), "sum(task_steps)", ("warmup", "cooldown"))

    def _check_fits(self, budget: int, budget_name: str, names: tuple[str, ...]) -> None:
        """ValueError naming the first of ``names`` whose phase ends after ``budget``."""
        lengths = {
            "warmup": self.warmup_steps,
            "cooldown": self.cooldown_steps,
            "constant": self.constant_steps,
            "anneal": self.anneal_steps,
        }
        end = 0
        for phase in names:
            end += lengths[phase]
            if end > budget:
                plan = ", ".join(f"{p}_steps={n}" for p, n in lengths.items())
                raise ValueError(
                    f"the {phase} phase ends at step {end}, after the budget {budget_name}={budget} "
                    f"({plan}); shorten the phases or raise {budget_name}"
                )

    def _cooldown(self, x: float) -> float:
        c = self.const_ratio
        if self.cooldown_shape == "cosine":
            g = 0.5 * (1.0 - math.cos(math.pi * x))
        elif self.cooldown_shape == "linear":
            g = x
        elif self.cooldown_shape == "inv_sqrt":
            alpha = self.inv_sqrt_alpha

            def h(v: float) -> float:
                return 1.0 / math.sqrt(1.0 + alpha * v) - 1.0

            g = h(x) / h(1.0)
        else:
            raise AssertionError(f"unvalidated cooldown_shape {self.cooldown_shape!r}")
        return 1.0 - (1.0 - c) * g

    def __call__(self, step: int) -> float:
        _check_step(step)
        w, cd, a = self.warmup_steps, self.cooldown_steps, self.anneal_steps
        c, r = self.const_ratio, self.min_ratio
        if step < w:
            return step / w
        u = step - w
        if u < cd:
            return self._cooldown(u / cd)
        k = cd + self.constant_steps
        if a == 0 or u <= k:
            return c
        if u >= k + a:
            return r
        return max(r, c * (r / c) ** ((u - k) / a))

    def phases(self) -> list[Phase]:
        """warmup, cooldown, constant, anneal, then 'floor' up to total_steps if it lies beyond.

        With anneal_steps = 0 the constant phase is open-ended; it is reported up to the later of
        W + K and the horizon (total_steps, else the end of the tasks).
        """
        w, cd, a = self.warmup_steps, self.cooldown_steps, self.anneal_steps
        k_end = w + cd + self.constant_steps
        horizon = self.total_steps
        if horizon is None and self.task_steps is not None:
            horizon = sum(self.task_steps)
        if a == 0:
            return _nonempty(
                ("warmup", 0, w), ("cooldown", w, w + cd), ("constant", w + cd, max(k_end, horizon or 0))
            )
        out = _nonempty(
            ("warmup", 0, w),
            ("cooldown", w, w + cd),
            ("constant", w + cd, k_end),
            ("anneal", k_end, k_end + a),
        )
        if horizon is not None:
            out += _nonempty(("floor", k_end + a, horizon))
        return out

    def constant_phase(self) -> tuple[int, int | None]:
        """Steps [W + C, W + K] at const_ratio; open-ended (None) when anneal_steps is 0."""
        lo = self.warmup_steps + self.cooldown_steps
        return lo, (lo + self.constant_steps if self.anneal_steps > 0 else None)

    def anneal_branch(self, start_step: int, anneal_steps: int) -> dict[str, Any]:
        """Params of this schedule with its anneal beginning exactly at ``start_step``.

        Ibrahim et al. (arXiv 2403.08763): the main line trains on at const_ratio; to release a model, a
        branch resumed from a constant-phase checkpoint anneals for ``anneal_steps``. The returned schedule
        equals this one for every t <= start_step (so the branch resumes seamlessly), and
        f(start_step) = const_ratio, f(start_step + anneal_steps) = min_ratio. Fractions come back resolved
        to steps and ``total_steps`` is set to ``start_step + anneal_steps``.

        ``start_step`` must lie in the constant phase (:meth:`constant_phase`); otherwise ValueError
        saying where the constant phase is.
        """
        if anneal_steps < 1:
            raise ValueError(f"anneal_branch: anneal_steps={anneal_steps} must be >= 1")
        lo, hi = self.constant_phase()
        if start_step < lo or (hi is not None and start_step > hi):
            where = f"[{lo}, {hi}]" if hi is not None else f"[{lo}, inf)"
            raise ValueError(
                f"anneal_branch: start_step={start_step} is outside the constant phase, steps {where} "
                f"(warmup_steps={self.warmup_steps}, cooldown_steps={self.cooldown_steps}, "
                f"constant_steps={self.constant_steps}, anneal_steps={self.anneal_steps}); "
                "branch from a checkpoint taken in the constant phase"
            )
        out = self.model_dump(mode="json", exclude_none=True)
        out.update(
            constant_steps=start_step - lo, anneal_steps=anneal_steps, total_steps=start_step + anneal_steps
        )
        validate(self.name, **out)  # e.g. min_ratio must be > 0 now that there is an anneal
        return out
