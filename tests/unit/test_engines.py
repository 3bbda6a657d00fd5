"""The two engines behind one interface (trainers/engines), in one process (gloo, world 1): DeepSpeed ZeRO-0 and
accelerate (DDP; FSDP2 for zero_stage 2 / 3) train the debug decoder to the same losses and gradient norms,
activation checkpointing changes nothing, compile next to nothing, and an accelerate (DCP) checkpoint resumes
exactly. Two-rank runs, resharding and the image workload: tests/integration/test_engines.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import validate_config
from tests.unit.test_loop import make

STEPS = 20


def fit(data, tmp: Path, max_steps: int = STEPS, every: int = 10, **trainer) -> tuple[dict, object, object]:
    tokens, val = data
    t, ctx, _ = make(tokens, val, tmp, max_steps=max_steps, every=every, zero_stage=trainer.pop("zero_stage", 0),
                     trainer=trainer)
    t.fit()
    return t.sink.logged, t, ctx


def assert_close(a: dict[int, float], b: dict[int, float], rtol: float, what: str) -> None:
    assert sorted(a) == sorted(b) and len(a) >= 6, what
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in a)
    assert worst <= rtol, f"{what}: worst relative difference {worst:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def runs(process_group, rows, tmp_path_factory):
    """Every variant's logged metrics, trained once for the module."""
    out = {}
    for name, trainer in {
        "ds0": {"engine": "deepspeed"},
        "ddp": {"engine": "accelerate"},
        "fsdp2": {"engine": "accelerate", "zero_stage": 2},
        "fsdp3": {"engine": "accelerate", "zero_stage": 3},
        "fsdp3_ac": {"engine": "accelerate", "zero_stage": 3, "activation_checkpointing": True},
        "ds0_ac": {"engine": "deepspeed", "activation_checkpointing": True},
        "ds3_ac": {"engine": "deepspeed", "zero_stage": 3, "activation_checkpointing": True},
    }.items():
        out[name], _, _ = fit(rows, tmp_path_factory.mktemp(name), **trainer)
    return out


def test_accelerate_ddp_trains_like_deepspeed_zero0(runs):
    assert_close(runs["ddp"]["train/loss"], runs["ds0"]["train/loss"], 1e-3, "accelerate DDP vs DeepSpeed ZeRO-0")
    # the gradient norm before clipping, logged at every logging step by both engines
    assert_close(runs["ddp"]["train/grad_norm"], runs["ds0"]["train/grad_norm"], 1e-3, "gradient norms")
    assert all(v > 0 for v in runs["ds0"]["train/grad_norm"].values())
    assert all(v > 0.05 for v in runs["ddp"]["perf/mem_peak_gb"].values())  # a process's peak RSS, in GiB


@pytest.mark.parametrize("variant", ["fsdp2", "fsdp3"])
def test_fsdp2_trains_like_ddp(runs, variant):
    assert_close(runs[variant]["train/loss"], runs["ddp"]["train/loss"], 1e-3, f"{variant} vs DDP")


@pytest.mark.parametrize(("on", "off", "rtol"), [("fsdp3_ac", "fsdp3", 1e-5), ("ds0_ac", "ds0", 1e-5),
                                                ("ds3_ac", "ds0", 1e-5)])
def test_activation_checkpointing_changes_no_loss(runs, on, off, rtol):
    """Recomputed activations give the same losses (ZeRO-3 with checkpointing against ZeRO-0 without: ZeRO-3 trains
    like ZeRO-0 to float tolerance, tests/unit/test_loop.py)."""
    assert_close(runs[on]["train/loss"], runs[off]["train/loss"], rtol, f"{on} vs {off}")


def test_the_losses_are_not_all_alike(runs):
    """The tolerances above can fail: from step to step the loss moves by far more than them."""
    losses = runs["ds0"]["train/loss"]
    moves = [abs(losses[s + 1] - losses[s]) / losses[s] for s in range(1, STEPS)]
    assert max(moves) > 1e-2 and sorted(moves)[len(moves) // 2] > 1e-3, moves


@pytest.mark.parametrize(("engine", "stage"), [("accelerate", 3), ("deepspeed", 2)])
def test_compile_trains_like_eager(process_group, rows, tmp_path, engine, stage):
    eager, _, _ = fit(rows, tmp_path / "eager", max_steps=6, every=6, engine=engine, zero_stage=stage)
    compiled, t, _ = fit(rows, tmp_path / "compiled", max_steps=6, every=6, engine=engine, zero_stage=stage,
                         compile=True)
    block = t.engine.module.blocks[0]
    assert block._compiled_call_impl is not None  # nn.Module.compile in place: names (and checkpoints) unchanged
    assert_close(compiled["train/loss"], eager["train/loss"], 1e-3, "compile")


@pytest.mark.parametrize("stage", [0, 3])
def test_accelerate_bf16_trains_near_fp32(runs, process_group, rows, tmp_path, stage):
    """bf16 through accelerate (autocast under DDP, FSDP2's MixedPrecisionPolicy): the losses follow fp32's to
    bf16's precision, and are not fp32's (the precision is really applied)."""
    bf16, _, _ = fit(rows, tmp_path, engine="accelerate", zero_stage=stage, precision="bf16")
    fp32 = runs["ddp"]["train/loss"]
    assert_close(bf16["train/loss"], fp32, 2e-2, "bf16 vs fp32")
    assert max(abs(bf16["train/loss"][s] - fp32[s]) for s in fp32) > 1e-5


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_accelerate_checkpoint_resumes_exactly(process_group, rows, tmp_path, zero_stage):
    """A fit resumed from its step-4 DCP checkpoint logs the uninterrupted fit's losses at steps 5-8 exactly."""
    tokens, val = rows
    full, t, ctx = fit(rows, tmp_path / "full", max_steps=8, every=4, engine="accelerate", zero_stage=zero_stage)
    ckpt = ctx.reports[0]["path"]
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    again, _, _ = make(tokens, val, tmp_path / "again", max_steps=8, every=4, zero_stage=zero_stage,
                       start_step=4, start_rows=16, resume_from=ckpt, trainer={"engine": "accelerate"})
    again.fit()
    for step in range(5, 9):
        assert again.sink.logged["train/loss"][step] == full["train/loss"][step], step
    final = t.engine.full_state_dict()
    assert all(torch.equal(final[k], v) for k, v in again.engine.full_state_dict().items())


def test_a_checkpoint_of_the_other_engine_is_a_clear_error(process_group, rows, tmp_path):
    tokens, val = rows
    _, _, ctx = fit(rows, tmp_path / "ds", max_steps=4, every=4, engine="deepspeed")
    other, _, _ = make(tokens, val, tmp_path / "acc", max_steps=8, every=4, start_step=4, start_rows=16,
                       resume_from=ctx.reports[0]["path"], trainer={"engine": "accelerate"})
    with pytest.raises(ValueError, match=r"holds no dcp/ .* trainer.engine=accelerate.*written by the other engine"):
        other.fit()


@pytest.mark.parametrize(("trainer", "needle"), [
    ({"engine": "accelerate", "zero_stage": 1}, "zero_stage=1 has no counterpart with trainer.engine=accelerate"),
    ({"engine": "accelerate", "zero_stage": 3, "precision": "fp16"}, "precision=fp16 with trainer.engine=accelerate"),
    ({"engine": "accelerate", "zero_stage": 0, "precision": "fp16"}, "allowed: precision bf16 or fp32"),
    ({"engine": "megatron"}, "deepspeed"),
    ({"engine": "accelerate", "zero_stage": 2, "objective": "hpm"}, "hpm with trainer.engine=accelerate and "
     r"trainer.zero_stage=2: .* allowed: engine deepspeed with zero_stage 0-2, or engine accelerate with zero_stage 0"),
    ({"engine": "deepspeed", "zero_stage": 3, "objective": "hpm"}, "hpm with trainer.engine=deepspeed"),
])
def test_engine_settings_are_checked(trainer, needle):
    objective = trainer.pop("objective", "causal_lm")
    with pytest.raises(ValueError, match=needle):
        validate_config({"name": "x", "data": {"path": "d"}, "trainer": trainer, "objective": {"name": objective}})


@pytest.mark.parametrize("objective", ["mlm"])
def test_every_token_objective_trains_alike_on_both_engines(process_group, rows, tmp_path, objective):
    """A masked objective (its masks drawn from the loop's seeded generator): accelerate FSDP2 logs DeepSpeed
    ZeRO-0's losses. The denoisers, which need sentinel tokens: tests/integration/test_objectives.py."""
    tokens, val = rows
    logged = {}
    for engine, stage in (("deepspeed", 0), ("accelerate", 3)):
        t, _, _ = make(tokens, val, tmp_path / engine, max_steps=6, every=6, objective=objective, zero_stage=stage,
                       trainer={"engine": engine})
        t.fit()
        logged[engine] = t.sink.logged["train/loss"]
    assert_close(logged["accelerate"], logged["deepspeed"], 1e-3, objective)
