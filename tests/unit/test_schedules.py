"""Exact-value tests of the LR schedules (trainers/schedules.py).

The expected values in the tables are worked out by hand from the formulas in the schedule classes'
docstrings (and the papers they cite) at steps chosen so that cos / sqrt / powers come out round
(cos(pi/3) = 1/2, sqrt(0.25) = 1/2, 0.25^0.5 = 1/2, ...); they are not produced by calling the code
under test.
"""

import json
import math
import pickle

import pytest

from trainers import schedules

INF_BASE = dict(
    warmup_steps=100,
    cooldown_steps=500,
    constant_steps=2000,
    anneal_steps=300,
    const_ratio=0.5,
    min_ratio=0.125,
)
# W = 100, C = 500, K = C + 2000 = 2500, A = 300: cooldown [100, 600), constant up to t = W + K = 2600,
# anneal [2600, 2900), floor from 2900.


def check_table(f, table: dict[int, float]) -> None:
    got = {t: f(t) for t in table}
    assert got == pytest.approx(table, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------- registry / API


def test_available_lists_the_contract_names_in_order():
    assert schedules.available() == ["constant", "linear", "cosine", "cosine_rewarm", "wsd", "infinite"]


def test_params_model_is_the_pydantic_class():
    model = schedules.params_model("cosine")
    p = model(warmup_steps=10, total_steps=100)
    assert (p.warmup_steps, p.total_steps, p.min_ratio) == (10, 100, 0.0)
    assert "total_steps" in model.model_fields
    assert "total_steps" not in schedules.params_model("cosine_rewarm").model_fields


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'cosine' is already registered"):

        @schedules.register("cosine")
        class Again:  # pragma: no cover - never registered
            pass

    assert schedules.available().count("cosine") == 1


def test_capabilities_are_declared_by_the_schedule_classes():
    assert schedules.with_capability("task_boundaries") == ["cosine_rewarm", "infinite"]
    assert schedules.with_capability("anneal_branch") == ["infinite"]
    assert schedules.params_model("infinite").capabilities == {"task_boundaries", "anneal_branch"}
    with pytest.raises(ValueError, match="unknown schedule capability 'anneal'; known: task_boundaries"):
        schedules.with_capability("anneal")
    assert schedules.has_param("cosine", "total_steps")
    assert not schedules.has_param("cosine_rewarm", "total_steps")  # its budget is the tasks
    assert not schedules.has_param("nope", "total_steps")


def test_register_checks_declared_capabilities():
    with pytest.raises(ValueError, match="declares task_boundaries but has no task_steps field"):

        @schedules.register("no_tasks")
        class NoTasks(schedules.Schedule):  # pragma: no cover - never registered
            capabilities = frozenset({"task_boundaries"})

    with pytest.raises(ValueError, match="declares anneal_branch but does not define constant_phase"):

        @schedules.register("no_constant")
        class NoConstant(schedules.Schedule):  # pragma: no cover - never registered
            capabilities = frozenset({"anneal_branch"})

    with pytest.raises(ValueError, match="unknown capabilities"):

        @schedules.register("typo")
        class Typo(schedules.Schedule):  # pragma: no cover - never registered
            capabilities = frozenset({"anneal"})

    assert {"no_tasks", "no_constant", "typo"}.isdisjoint(schedules.available())


def test_schedule_is_its_params_model_and_immutable():
    f = schedules.get("cosine", warmup_frac=0.1, total_steps=100)
    assert isinstance(f, schedules.params_model("cosine")) and f.name == "cosine"
    assert (f.warmup_steps, f.warmup_frac) == (10, None)
    with pytest.raises(ValueError, match="frozen"):
        f.warmup_steps = 3


def test_describe_is_json_and_round_trips():
    d = schedules.describe("wsd", warmup_frac=0.1, total_steps=1000, decay_frac=0.2, decay_shape="cosine")
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "name": "wsd",
        "params": {
            "warmup_steps": 100,
            "total_steps": 1000,
            "decay_steps": 200,
            "decay_shape": "cosine",
            "min_ratio": 0.0,
        },
    }
    f = schedules.get(d["name"], **d["params"])
    g = schedules.get("wsd", warmup_steps=100, total_steps=1000, decay_steps=200, decay_shape="cosine")
    assert f == g


def test_describe_cosine_rewarm_and_infinite_round_trip():
    for name, params in [
        ("cosine_rewarm", dict(task_steps=[200, 400], warmup_frac=0.1, min_ratio=0.2)),
        ("infinite", dict(INF_BASE, task_steps=[1000, 2000])),
    ]:
        d = schedules.describe(name, **params)
        assert json.loads(json.dumps(d)) == d
        assert schedules.get(name, **d["params"]) == schedules.get(name, **params)


def test_evaluate_accepts_int_and_range():
    f = schedules.get("constant", warmup_steps=4)
    assert schedules.evaluate(f, 6) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedules.evaluate(f, range(2, 8, 2)) == [0.5, 1.0, 1.0]
    assert schedules.evaluate(f, 0) == []


# ------------------------------------------------------------------------------------------ tables


def test_constant_table():
    check_table(schedules.get("constant", warmup_steps=10), {0: 0.0, 3: 0.3, 9: 0.9, 10: 1.0, 10**6: 1.0})
    check_table(schedules.get("constant", warmup_steps=0), {0: 1.0, 1: 1.0, 500: 1.0})


def test_linear_table():
    f = schedules.get("linear", warmup_steps=10, total_steps=100, min_ratio=0.0)
    check_table(f, {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 99: 1 / 90, 100: 0.0, 150: 0.0})
    g = schedules.get("linear", warmup_steps=10, total_steps=100, min_ratio=0.2)
    check_table(g, {10: 1.0, 55: 0.6, 100: 0.2, 10**5: 0.2})


def test_cosine_table():
    f = schedules.get("cosine", warmup_steps=100, total_steps=1000, min_ratio=0.1)
    # decay over 900 steps: x = 1/3 at 400 (cos = 1/2), 1/2 at 550, 2/3 at 700 (cos = -1/2)
    check_table(
        f,
        {
            0: 0.0,
            50: 0.5,
            99: 0.99,
            100: 1.0,
            400: 0.775,
            550: 0.55,
            700: 0.325,
            1000: 0.1,
            1001: 0.1,
            5000: 0.1,
        },
    )


def test_cosine_without_warmup_starts_at_one():
    f = schedules.get("cosine", warmup_steps=0, total_steps=100, min_ratio=0.0)
    check_table(f, {0: 1.0, 50: 0.5, 100: 0.0})


@pytest.mark.parametrize(
    ("params", "table"),
    [
        # S = 800, D = 200: x = 0.25 at 850, 0.5 at 900
        (
            dict(decay_steps=200, decay_shape="linear", min_ratio=0.1),
            {
                0: 0.0,
                50: 0.5,
                100: 1.0,
                500: 1.0,
                799: 1.0,
                800: 1.0,
                850: 0.775,
                900: 0.55,
                1000: 0.1,
                2000: 0.1,
            },
        ),
        # x = 0.09 at 818 (sqrt 0.3), 0.25 at 850 (sqrt 0.5), 0.36 at 872 (sqrt 0.6)
        (
            dict(decay_steps=200, decay_shape="1-sqrt", min_ratio=0.1),
            {799: 1.0, 800: 1.0, 818: 0.73, 850: 0.55, 872: 0.46, 1000: 0.1},
        ),
        (dict(decay_steps=200, decay_shape="1-sqrt", min_ratio=0.0), {850: 0.5, 1000: 0.0}),
        # S = 700, D = 300: x = 1/3 at 800, 1/2 at 850, 2/3 at 900
        (
            dict(decay_steps=300, decay_shape="cosine", min_ratio=0.1),
            {699: 1.0, 700: 1.0, 800: 0.775, 850: 0.55, 900: 0.325, 1000: 0.1},
        ),
        # r^x with r = 0.01: 0.01^0.25 = sqrt(0.1), 0.01^0.5 = 0.1
        (
            dict(decay_steps=200, decay_shape="exponential", min_ratio=0.01),
            {800: 1.0, 850: 0.31622776601683794, 900: 0.1, 1000: 0.01, 3000: 0.01},
        ),
    ],
)
def test_wsd_table(params, table):
    check_table(schedules.get("wsd", warmup_steps=100, total_steps=1000, **params), table)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine", "exponential"])
def test_wsd_every_shape_hits_min_ratio_at_total_steps(shape):
    r = 0.05
    f = schedules.get(
        "wsd", warmup_steps=100, total_steps=1000, decay_steps=200, decay_shape=shape, min_ratio=r
    )
    assert f(1000) == r
    assert f(1001) == r
    assert f(800) == pytest.approx(1.0)  # decay starts at the peak
    assert abs(f(999) - r) < 0.05  # and arrives continuously
    values = schedules.evaluate(f, range(100, 1001))
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:], strict=False))


def test_wsd_phases():
    assert schedules.phases("wsd", warmup_steps=100, total_steps=1000, decay_steps=200) == [
        ("warmup", 0, 100),
        ("stable", 100, 800),
        ("decay", 800, 1000),
    ]
    assert schedules.phases("wsd", warmup_steps=0, total_steps=1000, decay_steps=1000) == [("decay", 0, 1000)]


def test_cosine_rewarm_table():
    f = schedules.get("cosine_rewarm", warmup_steps=100, task_steps=[1000, 1000, 1000], min_ratio=0.1)
    check_table(
        f,
        {
            0: 0.0, 50: 0.5, 100: 1.0, 400: 0.775, 550: 0.55, 700: 0.325,
            1000: 0.1, 1050: 0.55, 1100: 1.0, 1550: 0.55,
            2000: 0.1, 2100: 1.0, 3000: 0.1, 10**5: 0.1,
        },
    )  # fmt: skip


def test_cosine_rewarm_uneven_tasks_and_per_task_warmup():
    f = schedules.get("cosine_rewarm", task_steps=[200, 400], warmup_steps=[0, 40], min_ratio=0.2)
    # task 0: no warmup, cosine over 200; task 1: re-warm 0.2 -> 1 over 40, cosine over 360 (x = 1/3 at 360)
    check_table(f, {0: 1.0, 100: 0.6, 200: 0.2, 220: 0.6, 240: 1.0, 360: 0.8, 600: 0.2, 601: 0.2})
    assert schedules.task_boundaries("cosine_rewarm", task_steps=[200, 400], warmup_steps=[0, 40]) == [0, 200]
    assert schedules.phases("cosine_rewarm", task_steps=[200, 400], warmup_steps=[0, 40]) == [
        ("task0:decay", 0, 200),
        ("task1:warmup", 200, 240),
        ("task1:decay", 240, 600),
    ]


def test_cosine_rewarm_rewarms_at_every_boundary():
    w, r = 50, 0.1
    f = schedules.get("cosine_rewarm", warmup_steps=w, task_steps=[300, 500, 400], min_ratio=r)
    bounds = schedules.task_boundaries("cosine_rewarm", warmup_steps=w, task_steps=[300, 500, 400])
    assert bounds == [0, 300, 800]
    assert f(0) == 0.0  # the first task warms up from 0
    for b in bounds[1:]:
        assert f(b) == r  # later tasks re-warm from min_ratio ...
        assert abs(f(b - 1) - r) < 1e-3  # ... where the previous cosine ended
        assert f(b + w // 2) == pytest.approx(r + (1 - r) / 2)
        assert f(b + w) == pytest.approx(1.0)  # ... and reach the peak W steps later
        assert f(b + 1) > f(b)
    assert f(1200) == r


# ---------------------------------------------------------------------------------------- infinite


@pytest.mark.parametrize(
    ("shape", "cooldown_table"),
    [
        ("cosine", {100: 1.0, 350: 0.75, 600: 0.5}),  # u = 250: x = 1/2, (1 + cos)/2 = 1/2
        ("linear", {100: 1.0, 200: 0.9, 350: 0.75, 600: 0.5}),
        # alpha = 10, u = 150: x = 0.3, h(0.3) = 1/2 - 1, h(1) = 1/sqrt(11) - 1
        ("inv_sqrt", {100: 1.0, 250: 1 - 0.5 * 0.5 / (1 - 1 / math.sqrt(11)), 600: 0.5}),
    ],
)
def test_infinite_table(shape, cooldown_table):
    f = schedules.get("infinite", **INF_BASE, cooldown_shape=shape)
    check_table(f, {0: 0.0, 50: 0.5, 99: 0.99, **cooldown_table})
    # constant at c, then c (r/c)^x with r/c = 1/4: x = 1/4 -> 0.5 * 0.25^0.25, x = 1/2 -> 0.25
    check_table(
        f,
        {
            601: 0.5,
            1500: 0.5,
            2600: 0.5,
            2675: 0.5 * 0.5**0.5,
            2750: 0.25,
            2900: 0.125,
            2901: 0.125,
            10**6: 0.125,
        },
    )


def test_infinite_inv_sqrt_alpha():
    # alpha = 8, C = 800, u = 300: x = 3/8, h = 1/sqrt(4) - 1 = -1/2, h(1) = 1/3 - 1 = -2/3, ratio 3/4
    f = schedules.get(
        "infinite", **{**INF_BASE, "cooldown_steps": 800}, cooldown_shape="inv_sqrt", inv_sqrt_alpha=8.0
    )
    check_table(f, {100: 1.0, 400: 0.625, 900: 0.5})


@pytest.mark.parametrize("shape", ["cosine", "inv_sqrt", "linear"])
def test_infinite_invariants(shape):
    w, c, k, a = 100, 500, 2500, 300
    const, r = INF_BASE["const_ratio"], INF_BASE["min_ratio"]
    f = schedules.get("infinite", **INF_BASE, cooldown_shape=shape)
    assert f(w) == 1.0
    assert f(w + c) == const
    assert all(f(t) == const for t in range(w + c + 1, w + k + 1))  # constant on (W+C, W+K]
    assert f(w + k + a) == r
    values = schedules.evaluate(f, range(w, w + k + a + 50))
    assert all(nxt <= cur for cur, nxt in zip(values, values[1:], strict=False))  # non-increasing after W
    for b in (w, w + c, w + k, w + k + a):  # continuous at every phase boundary
        assert abs(f(b) - f(b - 1)) < 0.011, (shape, b)
    assert schedules.phases("infinite", **INF_BASE) == [
        ("warmup", 0, 100),
        ("cooldown", 100, 600),
        ("constant", 600, 2600),
        ("anneal", 2600, 2900),
    ]


def test_infinite_without_anneal_stays_constant_and_tasks_only_mark_boundaries():
    p = dict(INF_BASE, anneal_steps=0, task_steps=[1000, 1000, 1000])
    p.pop("constant_steps")  # derived: sum(task_steps) - W - C = 3000 - 600
    assert schedules.describe("infinite", **p)["params"]["constant_steps"] == 2400
    f = schedules.get("infinite", **p)
    g = schedules.get("infinite", **{**p, "task_steps": [3000]})
    assert schedules.evaluate(f, 3500) == schedules.evaluate(g, 3500)  # tasks do not change the function
    check_table(f, {1000: 0.5, 1001: 0.5, 2000: 0.5, 3000: 0.5, 10**7: 0.5})  # no re-warm at boundaries
    assert schedules.task_boundaries("infinite", **p) == [0, 1000, 2000]
    assert schedules.phases("infinite", **p) == [
        ("warmup", 0, 100),
        ("cooldown", 100, 600),
        ("constant", 600, 3000),
    ]
    assert schedules.task_boundaries("infinite", **INF_BASE) == []


def test_infinite_constant_derived_from_total_steps_and_floor_phase():
    p = dict(INF_BASE, total_steps=3000)
    p.pop("constant_steps")  # total - W - C - A = 3000 - 100 - 500 - 300
    assert schedules.describe("infinite", **p)["params"]["constant_steps"] == 2100
    assert schedules.get("infinite", **p)(3000) == 0.125
    assert schedules.phases("infinite", **INF_BASE, total_steps=3000)[-1] == ("floor", 2900, 3000)


# The authors' end points (Ibrahim et al., arXiv 2403.08763): warmup 1%, cooldown to 60%, constant to 85% of
# the budget, anneal to the end; their LM learning rates eta_max = 3e-4, eta_const = 1.65e-4, eta_min = 3e-5.
PAPER_ENDS = dict(
    warmup_frac=0.01, cooldown_end_frac=0.6, constant_end_frac=0.85, const_ratio=0.55, min_ratio=0.1
)


def paper_lr(t: int) -> float:
    """The paper's infinite schedule with a cosine cooldown, written out on its closed intervals."""
    t_warm, t_cd, t_ann, t_end = 10, 600, 850, 1000
    eta_max, eta_const, eta_min = 3e-4, 1.65e-4, 3e-5
    if t <= t_warm:
        return eta_max * t / t_warm
    if t <= t_cd:
        x = (t - t_warm) / (t_cd - t_warm)
        return eta_const + (eta_max - eta_const) / 2 * (1 + math.cos(math.pi * x))
    if t <= t_ann:
        return eta_const
    if t <= t_end:
        return eta_const * (eta_min / eta_const) ** ((t - t_ann) / (t_end - t_ann))
    return eta_min


def test_infinite_end_points_give_the_papers_lr_at_the_phase_boundaries():
    f = schedules.get("infinite", **PAPER_ENDS, total_steps=1000)
    steps = [0, 5, 10, 11, 305, 599, 600, 601, 700, 849, 850, 851, 925, 999, 1000, 1200]
    expected = {t: paper_lr(t) for t in steps}
    assert {t: 3e-4 * f(t) for t in steps} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # by hand: peak at T_warm, eta_const at T_cd and T_ann, cosine midpoint (1 + c)/2, geometric midpoint
    # sqrt(c r) of the anneal, eta_min at T_end
    check_table(f, {10: 1.0, 305: 0.775, 600: 0.55, 850: 0.55, 925: math.sqrt(0.055), 1000: 0.1})
    d = schedules.describe("infinite", **PAPER_ENDS, total_steps=1000)["params"]
    lengths = (d["warmup_steps"], d["cooldown_steps"], d["constant_steps"], d["anneal_steps"])
    assert lengths == (10, 590, 250, 150)
    assert not any(key.endswith("_frac") for key in d)  # stored as steps, like every other fraction
    same = dict(warmup_steps=10, cooldown_steps=590, constant_steps=250, anneal_steps=150, total_steps=1000)
    assert f == schedules.get("infinite", **same, const_ratio=0.55, min_ratio=0.1)
    assert schedules.phases("infinite", **PAPER_ENDS, total_steps=1000) == [
        ("warmup", 0, 10),
        ("cooldown", 10, 600),
        ("constant", 600, 850),
        ("anneal", 850, 1000),
    ]


def test_infinite_end_points_mix_with_lengths_and_use_task_steps_as_budget():
    # cooldown given as a length, the constant phase by its end; an explicit anneal leaves a floor phase
    d = schedules.describe(
        "infinite",
        warmup_steps=10,
        cooldown_steps=90,
        constant_end_frac=0.5,
        anneal_steps=100,
        total_steps=1000,
    )["params"]
    assert (d["constant_steps"], d["anneal_steps"]) == (400, 100)
    d = schedules.describe(
        "infinite", warmup_frac=0.01, cooldown_end_frac=0.6, anneal_steps=0, task_steps=[500, 500]
    )["params"]
    # the constant phase runs to the tasks' end
    assert (d["warmup_steps"], d["cooldown_steps"], d["constant_steps"]) == (10, 590, 400)


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        (dict(PAPER_ENDS, cooldown_steps=500), ["cooldown_end_frac=0.6", "cooldown_steps=500", "both set"]),
        (dict(PAPER_ENDS, cooldown_frac=0.5), ["cooldown_end_frac=0.6", "cooldown_frac=0.5", "both set"]),
        (dict(PAPER_ENDS, constant_steps=200), ["constant_end_frac=0.85", "constant_steps=200", "both set"]),
        (dict(PAPER_ENDS, constant_frac=0.2), ["constant_end_frac=0.85", "constant_frac=0.2", "both set"]),
        (
            dict(PAPER_ENDS, warmup_frac=None, warmup_steps=700),
            ["cooldown_end_frac=0.6", "step 600", "step 700"],
        ),
        (dict(PAPER_ENDS, constant_end_frac=0.5), ["constant_end_frac=0.5", "step 500", "step 600"]),
    ],
)
def test_infinite_end_point_errors_name_both_fields(params, needles):
    with pytest.raises(ValueError) as info:
        schedules.get("infinite", **params, total_steps=1000)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_infinite_end_points_need_a_budget():
    with pytest.raises(ValueError, match=r"cooldown_end_frac=0.6 needs total_steps \(or task_steps\)"):
        schedules.get("infinite", warmup_steps=10, cooldown_end_frac=0.6, constant_steps=10, anneal_steps=0)


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        (dict(INF_BASE, total_steps=2000), ["constant phase ends at step 2600", "total_steps=2000"]),
        (dict(INF_BASE, total_steps=2700), ["anneal phase ends at step 2900", "total_steps=2700"]),
        (dict(INF_BASE, task_steps=[300]), ["cooldown phase ends at step 600", "sum(task_steps)=300"]),
        (
            dict(PAPER_ENDS, anneal_steps=200, total_steps=1000),
            ["anneal phase ends at step 1050", "total_steps=1000"],
        ),
    ],
)
def test_infinite_phases_overrunning_the_budget_are_an_error(params, needles):
    with pytest.raises(ValueError) as info:
        schedules.get("infinite", **params)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    # phases that end exactly at the budget are fine; with task_steps alone the constant phase may run on
    schedules.get("infinite", **INF_BASE, total_steps=2900)
    schedules.get("infinite", **INF_BASE, task_steps=[600])


# ------------------------------------------------------------------------------------- anneal branch


def test_anneal_branch_from_constant_phase():
    base = dict(INF_BASE, anneal_steps=0)
    branch = schedules.anneal_branch(base, start_step=1500, anneal_steps=300)
    assert branch["constant_steps"] == 900 and branch["anneal_steps"] == 300 and branch["total_steps"] == 1800
    f, g = schedules.get("infinite", **base), schedules.get("infinite", **branch)
    assert schedules.evaluate(g, 1501) == schedules.evaluate(f, 1501)  # identical up to the branch point
    check_table(g, {1500: 0.5, 1650: 0.25, 1800: 0.125, 5000: 0.125})
    assert f(1800) == 0.5  # the main line goes on at const_ratio


def test_anneal_branch_at_phase_edges():
    at_start = schedules.anneal_branch(dict(INF_BASE, anneal_steps=0), start_step=600, anneal_steps=100)
    assert at_start["constant_steps"] == 0
    at_end = schedules.anneal_branch(INF_BASE, start_step=2600, anneal_steps=300)  # same as the plan
    assert schedules.get("infinite", **at_end) == schedules.get("infinite", **INF_BASE, total_steps=2900)


@pytest.mark.parametrize(
    ("params", "start", "where"),
    [
        (dict(INF_BASE, anneal_steps=0), 599, r"\[600, inf\)"),  # still cooling down
        (INF_BASE, 50, r"\[600, 2600\]"),  # warmup
        (INF_BASE, 2601, r"\[600, 2600\]"),  # already annealing in the original plan
    ],
)
def test_anneal_branch_outside_constant_phase_raises(params, start, where):
    with pytest.raises(ValueError, match=rf"start_step={start} is outside the constant phase, steps {where}"):
        schedules.anneal_branch(params, start_step=start, anneal_steps=100)


def test_anneal_branch_bad_inputs():
    with pytest.raises(ValueError, match="anneal_steps=0"):
        schedules.anneal_branch(INF_BASE, start_step=1000, anneal_steps=0)
    no_floor = dict(INF_BASE, anneal_steps=0, min_ratio=0.0)
    with pytest.raises(ValueError, match="min_ratio"):
        schedules.anneal_branch(no_floor, start_step=1000, anneal_steps=100)


def test_constant_phase_and_anneal_branch_need_the_capability():
    assert schedules.get("infinite", **INF_BASE).constant_phase() == (600, 2600)
    assert schedules.get("infinite", **dict(INF_BASE, anneal_steps=0)).constant_phase() == (600, None)
    with pytest.raises(
        ValueError, match="'cosine' has no constant phase to branch from; schedules with one: infinite"
    ):
        schedules.anneal_branch(
            dict(warmup_steps=1, total_steps=10), start_step=5, anneal_steps=2, name="cosine"
        )
    with pytest.raises(NotImplementedError, match="no constant phase"):
        schedules.get("cosine", warmup_steps=1, total_steps=10).constant_phase()


# ---------------------------------------------------------------------------------------- fractions


def test_fractions_resolve_to_steps():
    d = schedules.describe("cosine", warmup_frac=0.05, total_steps=1000, min_ratio=0.1)["params"]
    assert d == {"warmup_steps": 50, "total_steps": 1000, "min_ratio": 0.1}
    assert schedules.get("cosine", warmup_frac=0.05, total_steps=1000, min_ratio=0.1) == schedules.get(
        "cosine", warmup_steps=50, total_steps=1000, min_ratio=0.1
    )
    d = schedules.describe("wsd", warmup_steps=10, total_steps=1000, decay_frac=0.2)["params"]
    assert d["decay_steps"] == 200
    d = schedules.describe(
        "infinite",
        warmup_frac=0.01,
        cooldown_frac=0.59,
        constant_frac=0.25,
        anneal_frac=0.15,
        total_steps=10000,
    )["params"]
    assert (d["warmup_steps"], d["cooldown_steps"], d["constant_steps"], d["anneal_steps"]) == (
        100,
        5900,
        2500,
        1500,
    )
    assert not any(key.endswith("_frac") for key in d)


def test_fraction_rounds_half_up():
    # 0.25 * 10 = 2.5 -> 3 (Python's round would give 2)
    assert schedules.describe("constant", warmup_frac=0.25, total_steps=10)["params"]["warmup_steps"] == 3


def test_infinite_fractions_use_task_steps_without_total_steps():
    d = schedules.describe(
        "infinite", warmup_frac=0.05, cooldown_frac=0.25, anneal_steps=0, task_steps=[1000, 1000]
    )["params"]
    assert (d["warmup_steps"], d["cooldown_steps"], d["constant_steps"]) == (100, 500, 1400)


def test_cosine_rewarm_warmup_frac_is_per_task():
    d = schedules.describe("cosine_rewarm", task_steps=[200, 400], warmup_frac=0.1)["params"]
    assert d["warmup_steps"] == [20, 40]


# ---------------------------------------------------------------------------------------- pickling


ALL = [
    ("constant", dict(warmup_steps=10)),
    ("linear", dict(warmup_steps=10, total_steps=100, min_ratio=0.0)),
    ("cosine", dict(warmup_steps=100, total_steps=1000, min_ratio=0.1)),
    ("cosine_rewarm", dict(warmup_steps=100, task_steps=[1000, 1000, 1000], min_ratio=0.1)),
    ("wsd", dict(warmup_steps=100, total_steps=1000, decay_steps=200, decay_shape="1-sqrt", min_ratio=0.0)),
    (
        "infinite",
        dict(
            warmup_steps=100,
            cooldown_steps=500,
            constant_steps=2000,
            anneal_steps=300,
            const_ratio=0.5,
            min_ratio=0.1,
            cooldown_shape="cosine",
        ),
    ),  # fmt: skip
]


@pytest.mark.parametrize(("name", "params"), ALL, ids=[n for n, _ in ALL])
def test_pickle_round_trip(name, params):
    f = schedules.get(name, **params)
    g = pickle.loads(pickle.dumps(f))
    assert g == f
    steps = range(0, 3500, 7)
    assert schedules.evaluate(g, steps) == schedules.evaluate(f, steps)


@pytest.mark.parametrize(("name", "params"), ALL, ids=[n for n, _ in ALL])
def test_values_stay_in_unit_interval(name, params):
    assert all(0.0 <= v <= 1.0 for v in schedules.evaluate(schedules.get(name, **params), 4000))


def test_lambdalr_wrap_and_state_dict():
    torch = pytest.importorskip("torch")
    f = schedules.get("cosine", warmup_steps=2, total_steps=10, min_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(schedules.evaluate(f, 12))
    state = sched.state_dict()
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt, schedules.get("cosine", warmup_steps=2, total_steps=10))
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 12


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "params", "needles"),
    [
        ("nope", {}, ["'nope'", "available", "cosine_rewarm", "infinite"]),
        (
            "cosine",
            dict(warmup_steps=10, total_steps=100, warmup=3),
            ["'cosine'", "unknown field", "'warmup'"],
        ),
        (
            "cosine",
            dict(warmup_steps=-1, total_steps=100),
            ["'cosine'", "warmup_steps", "-1", "greater than or equal"],
        ),
        ("cosine", dict(warmup_steps=10), ["total_steps", "missing"]),
        ("cosine", dict(warmup_steps=10, total_steps=100, min_ratio=1.5), ["min_ratio", "1.5"]),
        (
            "cosine",
            dict(warmup_steps=5, warmup_frac=0.1, total_steps=100),
            ["warmup_steps=5", "warmup_frac=0.1"],
        ),
        ("cosine", dict(total_steps=100), ["missing warmup_steps", "warmup_frac"]),
        ("cosine", dict(warmup_steps=100, total_steps=100), ["warmup_steps=100", "total_steps=100"]),
        ("linear", dict(warmup_steps=200, total_steps=100), ["warmup_steps=200", "total_steps=100"]),
        ("constant", dict(warmup_steps=10, total_steps=10), ["warmup_steps=10", "total_steps=10"]),
        ("constant", dict(warmup_frac=0.1), ["warmup_frac=0.1", "total_steps"]),
        ("constant", dict(warmup_steps=2.5), ["warmup_steps", "2.5", "integer"]),
        ("wsd", dict(warmup_steps=100, total_steps=100, decay_steps=10), ["warmup_steps=100", "total_steps"]),
        (
            "wsd",
            dict(warmup_steps=900, total_steps=1000, decay_steps=200),
            ["decay_steps=200", "warmup_steps=900"],
        ),
        ("wsd", dict(warmup_steps=0, total_steps=1000, decay_steps=-5), ["decay_steps", "-5"]),
        (
            "wsd",
            dict(warmup_steps=0, total_steps=1000, decay_frac=0.2, decay_steps=200),
            ["decay_steps", "decay_frac"],
        ),
        (
            "wsd",
            dict(warmup_steps=0, total_steps=1000, decay_steps=1, decay_shape="exp"),
            ["decay_shape", "1-sqrt"],
        ),
        (
            "wsd",
            dict(warmup_steps=0, total_steps=1000, decay_steps=100, decay_shape="exponential", min_ratio=0.0),
            ["min_ratio=0.0", "exponential"],
        ),
        ("cosine_rewarm", dict(task_steps=[100, -1], warmup_steps=10), ["task_steps.1", "-1"]),
        ("cosine_rewarm", dict(task_steps=[], warmup_steps=10), ["task_steps"]),
        ("cosine_rewarm", dict(task_steps=[100, 100], warmup_steps=[1]), ["warmup_steps=[1]", "task_steps"]),
        (
            "cosine_rewarm",
            dict(task_steps=[100, 50], warmup_steps=50),
            ["warmup_steps=50", "task_steps[1]=50"],
        ),
        ("cosine_rewarm", dict(task_steps=[100], warmup_steps=-3), ["warmup_steps=-3"]),
        ("infinite", dict(INF_BASE, min_ratio=0.6), ["min_ratio=0.6", "const_ratio=0.5"]),
        ("infinite", dict(INF_BASE, cooldown_steps=-1), ["cooldown_steps", "-1"]),
        ("infinite", dict(INF_BASE, cooldown_shape="exp"), ["cooldown_shape", "inv_sqrt"]),
        ("infinite", dict(INF_BASE, anneal_frac=0.1), ["anneal_steps=300", "anneal_frac=0.1"]),
        ("infinite", dict(INF_BASE, min_ratio=0.0), ["min_ratio=0.0", "anneal_steps=300"]),
        ("infinite", dict(INF_BASE, inv_sqrt_alpha=0.0), ["inv_sqrt_alpha"]),
        ("infinite", dict(INF_BASE, const_ratio=0.0), ["const_ratio"]),
        (
            "infinite",
            dict(INF_BASE, warmup_steps=4000, total_steps=3000),
            ["warmup_steps=4000", "total_steps=3000"],
        ),
        (
            "infinite",
            {k: v for k, v in INF_BASE.items() if k != "constant_steps"},
            ["missing constant_steps", "constant_frac"],
        ),
        (
            "infinite",
            {**{k: v for k, v in INF_BASE.items() if k != "constant_steps"}, "task_steps": [300]},
            ["constant_steps", "-300"],
        ),
        (
            "infinite",
            {**INF_BASE, "warmup_steps": None, "warmup_frac": 0.1},
            ["warmup_frac=0.1", "total_steps"],
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(name, params, needles):
    with pytest.raises(ValueError) as info:
        schedules.get(name, **params)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_params_model_unknown_name():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'; available: constant"):
        schedules.params_model("cosin")


def test_negative_step_and_evaluate_raise():
    f = schedules.get("constant", warmup_steps=1)
    with pytest.raises(ValueError, match="step=-1"):
        f(-1)
    with pytest.raises(ValueError, match="steps=-2"):
        schedules.evaluate(f, -2)
