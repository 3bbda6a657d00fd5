"""The training loop without Ray: a debug decoder, DeepSpeed's engine in one process (gloo, world 1), an
in-memory planned stream and a local checkpoint folder behind a fake context.

Checks the loop's contract: the planned rows arrive in order and are checked, the LR is the schedule's at
every step, metrics reach the sink at their cadences, a fit resumed from its checkpoint reproduces the
uninterrupted fit's losses exactly, and a non-finite loss stops the run (``stop``) or skips its step
(``skip``: NaN losses injected at chosen micro-batches); gradient accumulation trains like one larger
micro-batch, ZeRO stages 1-3 train like stage 0, and building the engine compiles no DeepSpeed op.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import validate_config
from data.stream import Shard, StreamPlan, pieces_row_ids
from tests.unit.conftest import ROWS, SEQ, VOCAB
from trainers.callbacks import Callback, NonFiniteLoss
from trainers.loop import FitPlan, Trainer


class MemorySink:
    def __init__(self):
        self.logged: dict[str, dict[int, float]] = {}

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.logged.setdefault(k, {})[step] = float(v)

    def close(self, timeout_s=None):
        self.closed = True


class FakeContext:
    """Rank 0 of 1: the planned stream from memory, checkpoints copied into a local folder."""

    def __init__(self, tokens: np.ndarray, plan: StreamPlan, ckpt_root: Path, resume_from: Path | None = None):
        self.rank, self.world = 0, 1
        self.tokens, self.ids = tokens, pieces_row_ids(plan.pieces(1, 0))
        self.ckpt_root, self.latest = ckpt_root, resume_from
        self.reports: list[dict] = []

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.latest

    def batches(self, stream, batch_size, prefetch):
        for i in range(0, len(self.ids) - batch_size + 1, batch_size):
            ids = self.ids[i : i + batch_size]
            yield {"tokens": torch.from_numpy(self.tokens[ids]), "row_id": torch.from_numpy(ids)}

    def report(self, metrics, checkpoint_dir):
        dest = self.ckpt_root / f"step{metrics['step']:04d}"
        shutil.copytree(checkpoint_dir, dest)
        self.reports.append({**metrics, "path": dest})


class SeenRows(Callback):
    def __init__(self):
        self.rows: list[np.ndarray] = []

    def on_checkpoint(self, trainer, step, committed):
        self.rows.append(committed["train"])


def make(tokens, val_path, tmp: Path, *, max_steps: int, start_step: int = 0, start_rows: int = 0,
         resume_from: Path | None = None, callbacks=(), objective: str = "causal_lm", init_from: str | None = None,
         micro_batch_size: int = 4, grad_accum_steps: int = 1, zero_stage: int = 0, every: int = 4,
         eval_every: int | None = None, grad_clip: float = 1.0, trainer: dict | None = None):
    cfg = validate_config({
        "name": "loop-unit", "seed": 3, "data": {"path": str(tmp), "eval_rows": 32}, "objective": {"name": objective},
        "model": {"preset": "debug"}, "schedule": {"name": "cosine", "warmup_steps": 2, "min_ratio": 0.1},
        "optimizer": {"lr_peak": 3e-3},
        "trainer": {"num_workers": 1, "zero_stage": zero_stage, "max_steps": max_steps, "init_from": init_from,
                    "micro_batch_size": micro_batch_size, "grad_accum_steps": grad_accum_steps,
                    "grad_clip": grad_clip, "log_every": 1, "eval_every": eval_every or every, "checkpoint_every": every,
                    **(trainer or {})},
    })
    shards = (Shard(path="memory", rows=ROWS, row_id_start=0),)
    count = (max_steps - start_step) * cfg.trainer.rows_per_step
    stream = StreamPlan(shards, seed=7, start=start_rows, count=count)
    plan = FitPlan(kind="text", streams={"train": stream.to_dict()}, start_step=start_step, tracking_uri="",
                   mixed_start=start_rows,
                   mlflow_run_id=None, eval_shards={"val": [str(val_path)]},
                   data={"tokenizer_path": str(val_path), "vocab_size": VOCAB, "seq_len": SEQ,
                         "special_tokens": {"<e>": 0, "<p>": 1, "<|mask|>": VOCAB - 1},
                         "eos_id": 0, "pad_id": 1, "tokenizer_config": {"eos_token": "<e>"}})
    ctx = FakeContext(tokens, stream, tmp / "ckpts", resume_from)
    (tmp / "ckpts").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, plan, ctx, callbacks)
    trainer.sink = MemorySink()
    return trainer, ctx, stream


def test_loop_trains_planned_rows_with_the_schedule_and_resumes_exactly(process_group, rows, tmp_path):
    from trainers import schedules

    tokens, val = rows
    seen = SeenRows()
    full, ctx, stream = make(tokens, val, tmp_path / "full", max_steps=8, callbacks=[seen])
    full.fit()
    logged = full.sink.logged
    assert sorted(logged["train/loss"]) == list(range(1, 9))
    assert sorted(logged["val/loss"]) == [0, 4, 8]
    assert logged["train/loss"][8] < logged["train/loss"][1]
    f = schedules.get("cosine", warmup_steps=2, min_ratio=0.1, total_steps=8)
    for step, lr in logged["lr"].items():
        assert lr == pytest.approx(3e-3 * f(step), rel=1e-12)
    # the rows committed by the two checkpoints are the plan's first 8 x 4, in order
    np.testing.assert_array_equal(np.concatenate(seen.rows), pieces_row_ids(stream.pieces(1, 0))[:32])
    assert [r["step"] for r in ctx.reports] == [4, 8]
    state = json.loads(Path(ctx.reports[0]["path"], "train_state.json").read_text())
    assert state["step"] == 4 and state["data_position"]["rows_consumed"] == 16
    assert {"model.safetensors", "model_config.json", "tokenizer_config.json"} <= set(os.listdir(ctx.reports[0]["path"]))

    # a new fit continuing from the step-4 checkpoint: same losses and LRs at steps 5..8, bit for bit
    resumed, _, _ = make(tokens, val, tmp_path / "resumed", max_steps=8, resume_from=ctx.reports[0]["path"])
    resumed.fit()
    again = resumed.sink.logged
    for step in range(5, 9):
        assert again["train/loss"][step] == logged["train/loss"][step], step
        assert again["lr"][step] == logged["lr"][step], step
    assert again["val/loss"][8] == logged["val/loss"][8]


def test_loop_refuses_rows_that_are_not_the_plan(process_group, rows, tmp_path):
    tokens, val = rows
    trainer, ctx, _ = make(tokens, val, tmp_path, max_steps=4)
    ctx.ids = ctx.ids[::-1].copy()  # the stream delivers other rows than planned
    with pytest.raises(RuntimeError, match="diverged from the plan"):
        trainer.fit()


def test_resumed_fit_draws_the_same_masks(process_group, rows, tmp_path):
    """MLM draws its masks from the loop's generator: a fit resumed from its step-4 checkpoint (which holds
    every rank's random state) logs exactly the uninterrupted fit's losses at steps 5-8."""
    tokens, val = rows
    full, ctx, _ = make(tokens, val, tmp_path / "full", max_steps=8, objective="mlm")
    full.fit()
    assert (Path(ctx.reports[0]["path"]) / "rng-rank0.pt").is_file()
    resumed, _, _ = make(tokens, val, tmp_path / "resumed", max_steps=8, objective="mlm",
                         resume_from=ctx.reports[0]["path"])
    resumed.fit()
    for step in range(5, 9):
        assert resumed.sink.logged["train/loss"][step] == full.sink.logged["train/loss"][step], step


def test_nonfinite_loss_stops_the_run_before_a_checkpoint(process_group, rows, tmp_path):
    """A start model with NaN weights: the run stops at step 1 naming the step and the fix; nothing is
    checkpointed (so nothing can be registered)."""
    import models
    from models.io import save_pretrained

    cfg = models.resolve_config("debug", vocab_size=VOCAB, max_seq_len=SEQ)
    bad = models.build(cfg)
    with torch.no_grad():
        bad.norm.weight.fill_(float("nan"))  # every logit NaN from the first step
    save_pretrained(bad, cfg, tmp_path / "nan-model")
    tokens, val = rows
    trainer, ctx, _ = make(tokens, val, tmp_path / "run", max_steps=8, init_from=str(tmp_path / "nan-model"))
    with pytest.raises(NonFiniteLoss, match="not finite .* at step 1;.*trainer.init_from"):
        trainer.fit()
    assert ctx.reports == []


@pytest.mark.parametrize("zero_stage, every", [(2, 4), (0, 3)])
def test_nonfinite_gradient_norm_with_a_finite_loss_stops_the_run(process_group, rows, tmp_path, zero_stage, every):
    """The loss stays finite but its gradient is NaN (sqrt's slope at 0): the global gradient norm is checked
    too (every engine gives it at logging and checkpoint steps), so the run stops at that step and the step-3
    weights are never checkpointed."""
    tokens, val = rows
    trainer, ctx, _ = make(tokens, val, tmp_path / f"run{zero_stage}", max_steps=8, zero_stage=zero_stage, every=every)
    real = trainer.objective.loss

    def loss(engine, prepared):
        out, metrics = real(engine, prepared)
        if torch.is_grad_enabled() and trainer.state.step + 1 == 3:
            w = next(p for p in engine.module.parameters() if p.requires_grad)
            out = out + torch.sqrt(w.sum() * 0.0)  # + 0 to the loss, NaN to every gradient of w
        return out, metrics

    trainer.objective.loss = loss
    with pytest.raises(NonFiniteLoss, match="loss or gradient norm is not finite .* at step 3;"):
        trainer.fit()
    assert [r["step"] for r in ctx.reports] == []  # the step-3/4 checkpoint never happened
    assert all(np.isfinite(v) for v in trainer.sink.logged["train/loss"].values())


def nan_losses_at(trainer: Trainer, bad: set[tuple[int, int]]) -> None:
    """Patches the objective's training loss: micro-batch ``i`` of global step ``s`` returns its loss times NaN
    for every ``(s, i)`` in ``bad``, graph included (a backward through it makes every gradient NaN)."""
    real, calls = trainer.objective.loss, {}

    def loss(engine, prepared):
        out, metrics = real(engine, prepared)
        if not torch.is_grad_enabled():
            return out, metrics  # evaluation
        step = trainer.state.step + 1
        i = calls[step] = calls.get(step, -1) + 1
        return (out * float("nan") if (step, i) in bad else out), metrics

    trainer.objective.loss = loss


class Record(Callback):
    """The whole weights (gathered under ZeRO-3) before the first step and after every step, and every step's
    summed loss."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.loss: dict[int, float] = {}

    def _keep(self, trainer, step):
        whole = trainer.engine.full_state_dict()
        self.weights[step] = {k: v.detach().clone() for k, v in whole.items()}

    def on_fit_start(self, trainer):
        self._keep(trainer, trainer.state.step)

    def on_step_end(self, trainer, step, out):
        self._keep(trainer, step)
        self.loss[step] = out.loss_sum.item()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_injected_nan_loss_poisons_the_weights_when_ignored(process_group, rows, tmp_path):
    """The injection the skip tests use is real: trained through (on_nonfinite=ignore), it makes weights NaN."""
    class Enough(Exception):
        pass

    class StopAfterStep2(Callback):  # before the checkpoint (whose export refuses NaN weights)
        def on_step_end(self, trainer, step, out):
            if step == 2:
                raise Enough

    tokens, val = rows
    rec = Record()
    trainer, _, _ = make(tokens, val, tmp_path, max_steps=4, callbacks=[rec, StopAfterStep2()],
                         trainer={"on_nonfinite": "ignore"})
    nan_losses_at(trainer, {(2, 0)})
    with pytest.raises(Enough):
        trainer.fit()
    assert all(torch.isfinite(v).all() for v in rec.weights[1].values())
    assert any(torch.isnan(v).any() for v in rec.weights[2].values())


@pytest.mark.parametrize(("accum", "zero_stage", "engine"), [(1, 0, "deepspeed"), (2, 0, "deepspeed"),
                                                            (2, 2, "deepspeed"), (2, 3, "deepspeed"),
                                                            (2, 0, "accelerate"), (2, 3, "accelerate")])
def test_skip_leaves_the_weights_of_nonfinite_steps_and_trains_on(process_group, rows, tmp_path, monkeypatch,
                                                                  accum, zero_stage, engine):
    """on_nonfinite=skip with NaN losses at steps 3, 5 and 6 (in the step's last micro-batch, so with
    accumulation a finite one was backpropagated before): those steps change no weight, bit for bit, the
    others do; the logged loss leaves them out; the count is logged and checkpointed; no row is repeated.
    ZeRO-3 partitions every parameter here (the debug model's are all below DeepSpeed's default persistence
    threshold, which would keep them whole)."""
    from trainers.engines import deepspeed as ds_engine

    ds_config = ds_engine.deepspeed_config
    monkeypatch.setattr(ds_engine, "deepspeed_config", lambda t: {
        **ds_config(t), "zero_optimization": {"stage": t.zero_stage, "stage3_param_persistence_threshold": 0}})
    tokens, val = rows
    rec, seen = Record(), SeenRows()
    trainer, ctx, stream = make(tokens, val, tmp_path, max_steps=8, callbacks=[rec, seen], trainer={
        "on_nonfinite": "skip", "log_every": 2, "grad_accum_steps": accum, "zero_stage": zero_stage,
        "engine": engine})
    nan_losses_at(trainer, {(s, accum - 1) for s in (3, 5, 6)})
    trainer.fit()
    if zero_stage == 3 and engine == "deepspeed":  # every parameter is partitioned outside the forward pass
        assert all(p.numel() == 0 for p in trainer.engine.module.parameters())
    for step in range(2, 9):  # (step 1 trains at the warmup's LR 0)
        assert same_weights(rec.weights[step], rec.weights[step - 1]) == (step in (3, 5, 6)), step
    assert all(torch.isfinite(v).all() for v in rec.weights[8].values())
    assert trainer.skipped_steps == 3
    logged = trainer.sink.logged
    assert logged["train/skipped_steps"] == {2: 0, 4: 1, 6: 3, 8: 3}
    assert sorted(logged["train/loss"]) == [2, 4, 8]  # steps 5 and 6 (the whole window) skipped: no loss logged
    assert logged["train/loss"][2] == pytest.approx((rec.loss[1] + rec.loss[2]) / (2 * accum), rel=1e-6)
    assert logged["train/loss"][4] == pytest.approx(rec.loss[4] / accum, rel=1e-6)  # step 3 left out
    assert logged["train/loss"][8] == pytest.approx((rec.loss[7] + rec.loss[8]) / (2 * accum), rel=1e-6)
    assert np.isnan(rec.loss[3]) and all(np.isfinite(v) for v in logged["train/loss"].values())
    # the skipped steps' rows were consumed: the checkpoints committed the plan's rows in order, once each
    planned = pieces_row_ids(stream.pieces(1, 0))
    np.testing.assert_array_equal(np.concatenate(seen.rows), planned[: 8 * 4 * accum])
    states = [json.loads(Path(r["path"], "train_state.json").read_text()) for r in ctx.reports]
    assert [(st["step"], st["skipped_steps"]) for st in states] == [(4, 1), (8, 3)]


def test_skipped_steps_count_goes_on_after_a_resume(process_group, rows, tmp_path):
    """A fit resumed from the step-4 checkpoint of a run that skipped step 3 counts on from 1, and ends with
    the uninterrupted fit's weights, bit for bit."""
    tokens, val = rows
    runs = {}
    for name, resume in (("full", None), ("resumed", "full")):
        rec = Record()
        src = runs[resume][1].reports[0]["path"] if resume else None
        trainer, ctx, _ = make(tokens, val, tmp_path / name, max_steps=8, callbacks=[rec], resume_from=src,
                               trainer={"on_nonfinite": "skip"})
        nan_losses_at(trainer, {(3, 0), (6, 0)})
        trainer.fit()
        runs[name] = trainer, ctx, rec
    assert [runs[n][0].skipped_steps for n in runs] == [2, 2]
    assert runs["resumed"][0].sink.logged["train/skipped_steps"] == {5: 1, 6: 2, 7: 2, 8: 2}
    assert same_weights(runs["resumed"][2].weights[8], runs["full"][2].weights[8])


def test_skip_stops_the_run_past_max_skipped_steps(process_group, rows, tmp_path):
    """More skipped steps than trainer.max_skipped_steps: the run stops at the one too many, naming the
    count, the limit, the step and the fix; checkpoints before it were written as usual."""
    tokens, val = rows
    trainer, ctx, _ = make(tokens, val, tmp_path, max_steps=8,
                           trainer={"on_nonfinite": "skip", "max_skipped_steps": 1})
    nan_losses_at(trainer, {(2, 0), (6, 0)})
    with pytest.raises(NonFiniteLoss, match=r"2 training steps were skipped .*max_skipped_steps=1; the last at "
                       r"step 6\. .*optimizer.lr_peak .*trainer.grad_clip.*raise trainer.max_skipped_steps"):
        trainer.fit()
    assert trainer.skipped_steps == 2 and [r["step"] for r in ctx.reports] == [4]
    assert trainer.sink.logged["train/skipped_steps"] == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1}


def test_on_nonfinite_policies_in_the_config(tmp_path):
    from cluster.config import ConfigError

    def trainer(**t):
        raw = {"name": "x", "data": {"path": str(tmp_path)}, "schedule": {"name": "constant", "warmup_steps": 0},
               "trainer": t}
        return validate_config(raw).trainer

    assert trainer().on_nonfinite == "stop" and trainer().max_skipped_steps == 10
    t = trainer(on_nonfinite="skip", max_skipped_steps=0)
    assert (t.on_nonfinite, t.max_skipped_steps) == ("skip", 0)
    with pytest.raises(ConfigError) as e:
        trainer(on_nonfinite="skipp")
    msg = str(e.value)
    assert "trainer.on_nonfinite" in msg and "'skipp'" in msg and all(p in msg for p in ("'stop'", "'skip'", "'ignore'"))
    with pytest.raises(ConfigError, match=r"trainer.max_skipped_steps.*greater than or equal to 0"):
        trainer(on_nonfinite="skip", max_skipped_steps=-1)
def final_weights(ctx: FakeContext) -> dict[str, torch.Tensor]:
    """The consolidated export of a fit's last checkpoint (the weights a user registers or loads)."""
    from safetensors.torch import load_file

    return load_file(Path(ctx.reports[-1]["path"]) / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest elementwise difference of two state dicts, and the tensor it is in."""
    assert a.keys() == b.keys()
    return max((float((a[k] - b[k]).abs().max()), k) for k in a)


class GradNorms(Callback):
    """The global gradient norm of every optimizer step (before clipping: the accumulated gradient), as the engine
    reports it (:meth:`trainers.engines.base.Engine.backward`; every step is a logging step in these fits)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_step_end(self, trainer, step, out):
        self.norms.append(float(out.grad_norm))


# Float tolerances of the equivalence tests below (fp32 on CPU). A loss of ~4.6 is 4.8e-7 per ulp; the weights
# are O(1) (norm gains of 1.0: 1.2e-7 per ulp) and one AdamW step moves a weight by up to ~lr = 3e-3, so a
# wrong gradient, LR or step shows as differences of ~1e-4..1e-3, far above these.
LOSS_RTOL = 1e-6  # ~10 ulps of the loss
WEIGHT_ATOL = 1e-6  # ~8 ulps of an O(1) weight


@pytest.mark.parametrize(("engine", "stage"), [("deepspeed", 0), ("accelerate", 0), ("accelerate", 3)])
def test_grad_accumulation_trains_like_one_larger_micro_batch(process_group, rows, tmp_path, engine, stage):
    """grad_accum_steps=2 x micro_batch_size=4 against 1 x 8: both plans size rows_per_step = 8, so every
    optimizer step takes the same 8 planned rows in the same order. Same rows, LRs, per-step train/loss,
    gradient norm, val/loss and final weights, to float tolerance: the accumulated gradient is the mean of two
    4-row means instead of one 8-row mean (another summation order, and matmuls over 4 rows instead of 8).

    grad_clip=5 does not bind here (norms ~1.25): with a binding clip, AdamW would not see a constant gradient
    scale (clip + Adam normalise it away), so a wrong 1/grad_accum_steps loss scale would pass unseen; the
    unclipped gradient norm shows it (a factor 2)."""
    tokens, val = rows
    fits = {}
    for gas, mb in ((2, 4), (1, 8)):
        seen, norms = SeenRows(), GradNorms()
        trainer, ctx, stream = make(tokens, val, tmp_path / f"gas{gas}", max_steps=6, micro_batch_size=mb,
                                    grad_accum_steps=gas, callbacks=[seen, norms], every=6, grad_clip=5.0,
                                    zero_stage=stage, trainer={"engine": engine})
        assert trainer.cfg.trainer.rows_per_step == 8
        trainer.fit()
        fits[gas] = trainer.sink.logged, final_weights(ctx), np.concatenate(seen.rows), norms.norms, stream
    (acc, w_acc, rows_acc, n_acc, stream), (one, w_one, rows_one, n_one, _) = fits[2], fits[1]
    np.testing.assert_array_equal(rows_acc, rows_one)
    np.testing.assert_array_equal(rows_acc, pieces_row_ids(stream.pieces(1, 0))[:48])
    assert sorted(acc["train/loss"]) == sorted(one["train/loss"]) == list(range(1, 7))
    assert acc["lr"] == one["lr"]  # the schedule's, set once per optimizer step
    for step in range(1, 7):
        assert acc["train/loss"][step] == pytest.approx(one["train/loss"][step], rel=LOSS_RTOL, abs=0), step
    assert len(n_acc) == len(n_one) == 6  # one optimizer step per global step, not one per micro-batch
    assert max(n_one) < 5.0  # the clip does not bind
    assert n_acc == pytest.approx(n_one, rel=1e-5, abs=0)  # seen: ~1e-7
    assert acc["val/loss"][6] == pytest.approx(one["val/loss"][6], rel=LOSS_RTOL, abs=0)
    assert max_abs_diff(w_acc, w_one)[0] <= WEIGHT_ATOL  # seen: 1.5e-7


@pytest.fixture(scope="module")
def zero_fits(process_group, rows, tmp_path_factory):
    """The same 4-step fit under ZeRO stages 0-3 (checkpoints at steps 2 and 4; evaluation at 0 and 4)."""
    tokens, val = rows
    fits = {}
    for stage in (0, 1, 2, 3):
        trainer, ctx, _ = make(tokens, val, tmp_path_factory.mktemp(f"zero{stage}"), max_steps=4, zero_stage=stage,
                               every=2, eval_every=4)
        trainer.fit()
        fits[stage] = trainer.sink.logged, final_weights(ctx), ctx
    return fits


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_stage_0(zero_fits, stage):
    """Stage 1, 2 (the config default) and 3 log stage 0's per-step losses, LRs and val/loss and export its final
    weights, to float tolerance (seen: equal but for 1 ulp of the step-3 loss and of a norm weight under
    stage 3): the ZeRO optimizers clip with the norm of flat fp32 partitions, stage 0 with per-tensor norms,
    another summation order of the clip coefficient."""
    base, base_w, _ = zero_fits[0]
    logged, weights, ctx = zero_fits[stage]
    assert [r["step"] for r in ctx.reports] == [2, 4]
    assert sorted(logged["train/loss"]) == list(range(1, 5))
    assert logged["lr"] == base["lr"]
    for step in range(1, 5):
        assert logged["train/loss"][step] == pytest.approx(base["train/loss"][step], rel=LOSS_RTOL, abs=0), step
    for step in (0, 4):
        assert logged["val/loss"][step] == pytest.approx(base["val/loss"][step], rel=LOSS_RTOL, abs=0), step
    assert max_abs_diff(weights, base_w)[0] <= WEIGHT_ATOL


def test_zero3_resume_reproduces_the_uninterrupted_fit_exactly(zero_fits, rows, tmp_path):
    """A stage-3 fit resumed from the uninterrupted stage-3 fit's step-2 checkpoint (partitioned parameters
    and optimizer state) logs its losses at steps 3-4 and val/loss at 4 and exports its final weights, bit for bit."""
    tokens, val = rows
    logged, weights, ctx = zero_fits[3]
    resumed, again_ctx, _ = make(tokens, val, tmp_path, max_steps=4, zero_stage=3, every=2, eval_every=4,
                                 resume_from=ctx.reports[0]["path"])
    resumed.fit()
    again = resumed.sink.logged
    assert sorted(again["train/loss"]) == [3, 4]
    for step in (3, 4):
        assert again["train/loss"][step] == logged["train/loss"][step], step
        assert again["lr"][step] == logged["lr"][step], step
    assert again["val/loss"][4] == logged["val/loss"][4]
    final = final_weights(again_ctx)
    assert all(torch.equal(final[k], weights[k]) for k in weights)


def test_engine_build_does_not_compile_the_cpu_shm_op(process_group, rows, tmp_path, monkeypatch):
    """trainers/engines/deepspeed.py turns DeepSpeed's CPU shared-memory all-reduce op off: on the first
    ``deepspeed.initialize`` of a process, DeepSpeed's comm backend JIT-compiles it when
    ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` is true (30-40 s; training does not use it).

    The key must still exist under that name (else the switch writes a key nobody reads). The build is
    replayed as a worker's first one: DeepSpeed's comm backend reset (it asks for the op when it is created)
    and the key set true as DeepSpeed's probe finds it on a Linux machine with a compiler. Building the engine
    turns it false, loads no shm op and takes well under the compile's 30 s."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    assert os.environ["DS_ACCELERATOR"] == "cpu" and get_accelerator().device_name() == "cpu"
    builder = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
    assert builder.NAME == "deepspeed_shm_comm"
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    loads = []
    real_load = builder.load
    monkeypatch.setattr(builder, "load", lambda self, *a, **k: loads.append(self.NAME) or real_load(self, *a, **k))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    monkeypatch.setattr(ds_comm, "cdb", None)
    t0 = time.perf_counter()
    make(rows[0], rows[1], tmp_path, max_steps=4)
    build_s = time.perf_counter() - t0
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False, "trainers/engines/deepspeed.py's switch is gone"
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None  # a new comm backend, without the op
    assert loads == [], f"the engine build loaded (JIT-compiled) {loads} in {build_s:.0f} s"
    assert build_s < 15.0, f"building the engine took {build_s:.1f} s (seen: 0.1-2 s): is an op JIT-compiled?"
