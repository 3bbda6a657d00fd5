"""Faults done for real on a local Ray (2 workers, ZeRO-2, CPU): a worker process killed with SIGKILL, an
exception in a worker, checkpoints cut off mid-write or damaged afterwards. The oracle is an uninterrupted
run of the same config: on CPU a run is deterministic, so the disturbed run must log the same loss at every
step (the steps redone after a restart included) and end with the same weights."""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.config import ConfigError, load_config
from cluster.train import run_train
from data.stream import load_shards, pieces_row_ids, rank_pieces
from tests.support.callbacks import AuditRows, FailOnce, KillOnce

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# the cosine spans 24 steps whatever max_steps a part of a run stops at, so parts add up to the whole run
BASE = ("trainer.max_steps=24", "schedule.total_steps=24", "trainer.checkpoint_every=8", "trainer.eval_every=100",
        "trainer.log_every=1", "trainer.keep_checkpoints=3", "trainer.max_failures=1")


def cfg(data: Path, tmp: Path, name: str, *extra: str):
    return load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={data}", f"storage_path={tmp / 'results'}", f"tracking.artifact_root={tmp / 'artifacts'}",
        f"name={name}", *BASE, *extra])


def losses(uri: str, run_id: str) -> dict[int, list[float]]:
    """Every logged train/loss by step (a step logged twice, before a failure and after the restart, has two)."""
    import mlflow

    out: dict[int, list[float]] = defaultdict(list)
    for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss"):
        out[m.step].append(m.value)
    return dict(out)


@pytest.fixture(scope="module")
def baseline(ray_session, debug_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    t0 = time.monotonic()
    out = run_train(cfg(debug_data, tmp, "baseline"), tracking_uri=uri, register=False)
    TIMES["undisturbed"] = time.monotonic() - t0
    got = losses(uri, out.mlflow_run_id)
    assert sorted(got) == list(range(1, 25)) and all(len(v) == 1 for v in got.values())
    return {s: v[0] for s, v in got.items()}, load_file(str(Path(out.checkpoint, "model.safetensors")))


TIMES: dict[str, float] = {}  # fit wall times, printed for the README's reliability table (pytest -s)


def report(name: str, seconds: float, redone: int) -> None:
    base = TIMES.get("undisturbed", float("nan"))
    print(f"\nRELIABILITY {name}: fit {seconds:.1f} s (undisturbed {base:.1f} s, +{seconds - base:.1f} s), "
          f"{redone} steps redone, losses and final weights identical")


def assert_same_as_baseline(baseline, got: dict[int, list[float]], checkpoint: str) -> None:
    want, weights = baseline
    assert sorted(got) == list(range(1, 25))
    for step, values in got.items():  # every logging of a step, the redone ones too, equals the undisturbed run
        assert values == [want[step]] * len(values), (step, values, want[step])
    final = load_file(str(Path(checkpoint, "model.safetensors")))
    assert final.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(final[k], weights[k], rtol=0, atol=0)


@pytest.mark.parametrize("fault", ["exception", "sigkill"])
def test_worker_fault_restarts_from_the_checkpoint_and_matches_the_undisturbed_run(
        baseline, debug_data, tmp_path, tracking_uri, fault):
    marker, audit = tmp_path / "fault", tmp_path / "audit"
    inject = FailOnce(step=13, marker=marker) if fault == "exception" else KillOnce(step=13, marker=marker)
    t0 = time.monotonic()
    out = run_train(cfg(debug_data, tmp_path, f"fault-{fault}"), tracking_uri=tracking_uri, register=False,
                    callbacks=[inject, AuditRows(audit)])
    seconds = time.monotonic() - t0
    assert marker.is_file() and out.metrics["step"] == 24
    got = losses(tracking_uri, out.mlflow_run_id)
    # restarted from the step-8 checkpoint, not from zero: steps 9..12 were logged twice (the fault hits step 13
    # before its logging), the others once
    assert {s for s, v in got.items() if len(v) == 2} == set(range(9, 13))
    assert all(len(v) == 1 for s, v in got.items() if s not in range(9, 13))
    assert_same_as_baseline(baseline, got, out.checkpoint)
    # exactly once: every planned row of each rank committed once, in plan order (the restart re-read none)
    shards = load_shards(debug_data, "train")
    for rank in range(2):
        rows = np.concatenate([np.load(f) for f in sorted(audit.glob(f"rank{rank}-step*.npy"))])
        want = pieces_row_ids(rank_pieces(shards, world_size=2, rank=rank, seed=0, start=0, count=24 * 8))
        np.testing.assert_array_equal(rows, want)
    report(f"worker {fault}", seconds, 4)


def test_resume_skips_cut_off_and_damaged_checkpoints_and_matches_the_undisturbed_run(
        baseline, debug_data, tmp_path, tracking_uri, caplog):
    first = run_train(cfg(debug_data, tmp_path, "resume-damage", "trainer.max_steps=16"), tracking_uri=tracking_uri,
                      register=False)
    with pytest.raises(ConfigError, match=r"global batch is 16 rows per step \(2 workers x micro_batch_size 8 x "
                                          r"grad_accum_steps 1\), which 3 workers x micro_batch_size 8 cannot divide"):
        run_train(cfg(debug_data, tmp_path, "resume-damage", "trainer.num_workers=3"), resume=True,
                  tracking_uri=tracking_uri, register=False)
    run = tmp_path / "results" / "resume-damage"
    ckpt16 = Path(first.checkpoint)
    # damaged afterwards: rank 1's optimizer shard of the newest checkpoint loses its second half
    shard = next(ckpt16.rglob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # cut off mid-write: a later folder with every file but the ranks' completion markers
    cut = run / "checkpoint_9999-12-31_23-59-59.999999"
    shutil.copytree(ckpt16, cut, ignore=shutil.ignore_patterns("complete-rank*.json"))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cluster.storage"):
        second = run_train(cfg(debug_data, tmp_path, "resume-damage"), resume=True, tracking_uri=tracking_uri,
                           register=False)
    report("resume past a cut-off and a damaged checkpoint (second part only)", time.monotonic() - t0, 8)
    warned = caplog.text
    assert f"{cut} skipped: no completion marker" in warned
    assert f"{ckpt16} skipped: ds/" in warned and "truncated or damaged" in warned
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["step"] == 24
    got = losses(tracking_uri, second.mlflow_run_id)
    # resumed from step 8 (the newest complete checkpoint): steps 9..16 logged by both parts, equal
    assert {s for s, v in got.items() if len(v) == 2} == set(range(9, 17))
    assert_same_as_baseline(baseline, got, second.checkpoint)
    # the skipped folders are kept (never deleted) and listed on the run
    import mlflow

    assert cut.is_dir() and shard.is_file()
    tag = mlflow.MlflowClient(tracking_uri).get_run(second.mlflow_run_id).data.tags["rpt.incomplete_checkpoints"]
    assert str(cut) in tag and str(ckpt16) in tag


@pytest.fixture
def tiny_storage(tmp_path):
    """A 6 MiB tmpfs: room for one checkpoint of the debug run (~4 MiB), not two."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_storage_fails_in_one_paragraph_and_keeps_the_last_complete_checkpoint(
        ray_session, debug_data, tmp_path, tracking_uri, tiny_storage):
    import mlflow

    from cluster.storage import resolve_storage
    from cluster.train import TrainingError

    c = cfg(debug_data, tmp_path, "full", "trainer.max_failures=0").model_copy(update={"storage_path": str(tiny_storage)})
    with pytest.raises(TrainingError) as e:
        run_train(c, tracking_uri=tracking_uri, register=False)
    msg = str(e.value)
    assert "No space left on device" in msg and "the storage is full" in msg, msg
    assert "--resume" in msg and "\n" not in msg
    storage = resolve_storage(str(tiny_storage), create=False)
    found, skipped = storage.newest_checkpoint("full")
    assert found is not None and found[0].step == 8  # the first checkpoint is whole; the cut-off one is skipped
    assert all(why for _, why in skipped)
    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri).get_experiment_by_name("ray-pretrain-debug").experiment_id])
    assert [r.info.status for r in runs if r.info.run_name == "full"] == ["FAILED"]


def test_unwritable_storage_path_is_refused_before_anything_starts(debug_data, tmp_path, tracking_uri):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    c = cfg(debug_data, tmp_path, "nowrite").model_copy(update={"storage_path": str(blocker / "results")})
    with pytest.raises(ConfigError, match=r"storage_path=.*a-file/results.* cannot be created .*point storage_path at a "
                                          r"folder you can write"):
        run_train(c, tracking_uri=tracking_uri, register=False)
    assert blocker.read_text() == "not a folder"


class ExtraNode:
    """A second Ray node joined to the session's instance (`ray start --address ... --block`, its own process
    group) offering the custom resource the training workers need, so they run on it; removed with SIGKILL."""

    def __init__(self, gcs: str, log: Path):
        self.gcs, self.log, self.proc = gcs, log, None

    def start(self, timeout_s: float = 120.0) -> ExtraNode:
        import subprocess
        import sys
        import time

        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ray_cli = str(Path(sys.executable).parent / "ray")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([ray_cli, "start", "--address", self.gcs, "--num-cpus", "2", "--resources",
                                          '{"rpt_trainer": 2}', "--block", "--disable-usage-stats"],
                                         stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before
                   and n["Resources"].get("rpt_trainer")]
            if new:
                self.node_id = new[0]["NodeID"]
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the extra node did not join: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def keep_ray_address_file():
    """`ray start --address` records the cluster in Ray's temp folder (ray_current_cluster); put back what was
    there, so no later `ray.init()` on this machine joins a test's cluster."""
    import tempfile

    path = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    before = path.read_bytes() if path.exists() else None
    yield
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


def test_node_removal_restarts_on_a_fresh_node_and_matches_the_undisturbed_run(
        ray_session, baseline, debug_data, tmp_path, tracking_uri, keep_ray_address_file):
    """The node the workers run on is killed at step 13 (its raylet and workers, SIGKILL) and a fresh node
    joins: the run restarts there from the step-8 checkpoint and ends as the undisturbed run."""
    import threading
    import time

    import ray

    from tests.support.callbacks import PauseAt

    gcs = ray.get_runtime_context().gcs_address
    nodes = [ExtraNode(gcs, tmp_path / "node-a.log").start()]
    marker = tmp_path / "paused"
    removed: dict[str, float] = {}

    def remove_and_replace():
        while not marker.exists():
            time.sleep(0.2)
        nodes[0].kill()
        removed["at"] = time.monotonic()
        nodes.append(ExtraNode(gcs, tmp_path / "node-b.log").start())

    th = threading.Thread(target=remove_and_replace, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        out = run_train(cfg(debug_data, tmp_path, "node-loss", 'trainer.worker_resources={"rpt_trainer": 1}'),
                        tracking_uri=tracking_uri, register=False, callbacks=[PauseAt(step=13, marker=marker)])
        th.join(60)
        assert removed and out.metrics["step"] == 24
        got = losses(tracking_uri, out.mlflow_run_id)
        assert {s for s, v in got.items() if len(v) == 2} == set(range(9, 13))
        assert_same_as_baseline(baseline, got, out.checkpoint)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert nodes[0].node_id not in alive and nodes[1].node_id in alive
        report("node removal + fresh node (incl. a 120 s pause cut short)", time.monotonic() - t0, 4)
        print(f"node removal: run finished {time.monotonic() - removed['at']:.1f} s after the node was killed")
    finally:
        for n in nodes:
            n.kill()
