"""Checkpoints are complete or invisible: completion markers, the checks, and the newest complete one."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

from trainers.checkpoint import TrainState, checkpoint_problem, marker_file, newest_complete, write_marker

FS = pafs.LocalFileSystem()


def _rank_dir(tmp: Path, rank: int, step: int, payload: bytes) -> Path:
    d = tmp / f"rank{rank}-{step}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(payload)
    if rank == 0:
        TrainState(step=step).save(d)
        (d / "model.safetensors").write_bytes(payload * 2)
    write_marker(d, rank=rank, world_size=2, step=step)
    return d


def _checkpoint(run: Path, tmp: Path, step: int, name: str | None = None) -> Path:
    """What Ray makes of two ranks' folders: one checkpoint folder with both merged."""
    ckpt = run / (name or f"checkpoint_{step:04d}")
    for rank in (0, 1):
        src = _rank_dir(tmp, rank, step, bytes([rank + 1]) * (1000 + step))
        pafs.copy_files(str(src), str(ckpt), source_filesystem=FS, destination_filesystem=FS)
    return ckpt


def test_marker_lists_this_ranks_files_with_sizes_and_hashes(tmp_path):
    d = _rank_dir(tmp_path, 0, 7, b"x" * 10)
    m = json.loads((d / marker_file(0)).read_text())
    assert (m["rank"], m["world_size"], m["step"]) == (0, 2, 7)
    assert set(m["files"]) == {"ds/zero_pp_rank_0_optim_states.pt", "train_state.json", "model.safetensors"}
    assert m["files"]["model.safetensors"]["size"] == 20 and len(m["files"]["model.safetensors"]["blake2b"]) == 32
    assert not list(d.glob(".*.tmp"))  # written by a rename


def test_complete_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path):
    run = tmp_path / "run"
    ckpt = _checkpoint(run, tmp_path, 10)
    assert checkpoint_problem(FS, str(ckpt), deep=True) is None

    (ckpt / marker_file(1)).unlink()  # rank 1 never finished
    assert "rank(s) [1] of 2 did not finish" in checkpoint_problem(FS, str(ckpt), deep=True)

    ckpt = _checkpoint(run, tmp_path, 20)
    f = ckpt / "ds" / "zero_pp_rank_1_optim_states.pt"
    f.write_bytes(f.read_bytes()[:100])  # cut off
    assert "ds/zero_pp_rank_1_optim_states.pt has 100 bytes but rank 1 wrote 1,020" in checkpoint_problem(
        FS, str(ckpt), deep=False)

    ckpt = _checkpoint(run, tmp_path, 30)
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\0" * f.stat().st_size)  # same size, other bytes
    assert checkpoint_problem(FS, str(ckpt), deep=False) is None  # sizes only: not seen
    assert "model.safetensors differs from what rank 0 wrote" in checkpoint_problem(FS, str(ckpt), deep=True)

    ckpt = _checkpoint(run, tmp_path, 40)
    (ckpt / "train_state.json").unlink()
    assert "train_state.json (written by rank 0) is missing" in checkpoint_problem(FS, str(ckpt), deep=True)

    bare = run / "checkpoint_0050"
    bare.mkdir()
    (bare / "train_state.json").write_text("{}")
    assert "no completion marker" in checkpoint_problem(FS, str(bare), deep=True)


def test_newest_complete_falls_back_past_damaged_ones_and_says_why(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        _checkpoint(run, tmp_path, step)
    (run / "checkpoint_0030" / marker_file(0)).unlink()
    f = run / "checkpoint_0020" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    found, skipped = newest_complete(FS, str(run), deep=True)
    assert found[0].step == 10 and found[1].endswith("checkpoint_0010")
    assert [Path(p).name for p, _ in skipped] == ["checkpoint_0030", "checkpoint_0020"]
    assert "rank(s) [0]" in skipped[0][1] and "truncated or damaged" in skipped[1][1]
    # what the driver found damaged, the workers skip without re-reading it
    found, skipped = newest_complete(FS, str(run), deep=False, exclude=(str(run / "checkpoint_0010"),))
    assert found is None and skipped[-1] == (str(run / "checkpoint_0010"), "found damaged by the driver")
    assert newest_complete(FS, str(tmp_path / "none"), deep=True) == (None, [])


def test_a_cut_off_marker_is_named_not_a_crash(tmp_path):
    ckpt = _checkpoint(tmp_path / "run", tmp_path, 10)
    (ckpt / marker_file(1)).write_bytes(b"")  # the disk filled while the marker was uploaded
    assert checkpoint_problem(FS, str(ckpt), deep=False) == (
        "complete-rank1.json cut off or damaged (a completion marker must be whole)")
    (ckpt / marker_file(0)).write_text('{"rank": 0, "world_')
    assert "complete-rank0.json, complete-rank1.json cut off" in checkpoint_problem(FS, str(ckpt), deep=True)
