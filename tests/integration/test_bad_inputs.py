"""Bad inputs fail on the driver, before Ray training starts, with a message naming the cause."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.train import check_data

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def data_copy(debug_data, tmp_path) -> Path:
    dst = tmp_path / "prepared"
    shutil.copytree(debug_data, dst)
    return dst


def cfg_for(path: Path, *overrides: str):
    return load_config(REPO / "configs/debug-lm.yaml", [f"data.path={path}", *overrides])


def test_good_data_passes(data_copy):
    chk = check_data(cfg_for(data_copy))
    assert chk.fields["vocab_size"] == 1024 and chk.fields["seq_len"] == 64


def test_missing_shard_folder(data_copy):
    shutil.rmtree(data_copy / "train")
    with pytest.raises(ConfigError, match=r"train shard .*part-00000.parquet.* is missing.*rpt data prepare"):
        check_data(cfg_for(data_copy))


def test_missing_prepared_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist.*rpt data prepare"):
        check_data(cfg_for(tmp_path / "nowhere"))


def test_corrupt_parquet_shard(data_copy):
    shard = sorted((data_copy / "train").glob("*.parquet"))[1]
    shard.write_bytes(b"PAR1 this is not parquet" * 10)
    with pytest.raises(ConfigError, match=rf"{shard.name}.*not a readable Parquet file"):
        check_data(cfg_for(data_copy))


def test_tokenizer_vocab_does_not_match_model(data_copy):
    with pytest.raises(ConfigError, match=r"model.vocab_size=2048 does not match the tokenizer vocabulary of 1024"):
        check_data(cfg_for(data_copy, "model.vocab_size=2048"))


def test_replaced_tokenizer_file(data_copy):
    tok = data_copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    with pytest.raises(ConfigError, match=r"tokenizer.*does not match the manifest's sha256"):
        check_data(cfg_for(data_copy))


def test_init_from_model_with_other_vocab(data_copy, tmp_path):
    import models
    from models.io import save_pretrained

    cfg = models.resolve_config("debug", vocab_size=2048, max_seq_len=64)
    save_pretrained(models.build(cfg), cfg, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"vocab_size 2048.*tokenizer has 1024"):
        check_data(cfg_for(data_copy, f"trainer.init_from={tmp_path / 'other'}"))


def test_rpt_train_exits_nonzero_before_ray(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(REPO / "configs/debug-lm.yaml"), f"data.path={tmp_path / 'x'}",
         f"storage_path={tmp_path / 'res'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.path=" in r.stderr and "rpt data prepare" in r.stderr
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())  # nothing half-written


def test_image_objective_on_token_shards_is_refused(data_copy):
    with pytest.raises(ConfigError, match="trains a ViT on images, but data.path=.* holds token shards"):
        check_data(cfg_for(data_copy, "objective={name: mae}"))


def test_models_pull_never_overwrites_and_leaves_nothing_on_failure(tmp_path, tracking_uri):
    def pull(dest: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", "models", "pull", "nope@current", str(dest),
                               "--tracking-uri", tracking_uri, *extra], capture_output=True, text=True, timeout=120)

    r = pull(tmp_path / "new")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()  # a failed pull leaves no folder behind
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = pull(mine, "--format", "hf")
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


def test_a_stale_ray_address_file_does_not_stop_a_local_run(tmp_path):
    """A leftover ``ray_current_cluster`` (a cluster that is gone) once made every command fail with Ray's
    "num_cpus and num_gpus must not be provided"; a local command now starts its own instance."""
    import tempfile

    stale = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    saved = stale.read_text() if stale.is_file() else None
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("127.0.0.1:9")  # nothing listens there
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "data", "prepare", str(REPO / "configs/debug-lm.yaml"),
             f"data.path={tmp_path / 'prepared'}", "data.prepare.max_documents=12"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
        )
    finally:
        if saved is None:
            stale.unlink(missing_ok=True)
        else:
            stale.write_text(saved)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "prepared" / "manifest.json").is_file()


def test_a_damaged_shard_is_named_on_the_driver_and_by_the_workers(data_copy, tmp_path, tracking_uri):
    """Bytes overwritten inside a shard (its footer intact): the default footer check passes; the run fails
    with one paragraph naming the file and its rows; ``data.verify_shards: full`` finds it before Ray starts."""
    import json

    from cluster.train import TrainingError, run_train

    manifest = json.loads((data_copy / "manifest.json").read_text())
    shards = [data_copy / s["path"] for s in manifest["splits"]["train"]["shards"]]
    for path in shards:  # every one: whichever the plan reads first is damaged
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 3)
            f.write(bytes(range(256)) * 8)
    shard = shards[0]
    cfg = load_config(REPO / "configs/debug-lm.yaml", [
        f"data.path={data_copy}", f"storage_path={tmp_path / 'results'}", f"tracking.artifact_root={tmp_path / 'a'}",
        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4", "name=damaged",
    ])
    check_data(cfg)  # footers only: the damage is inside
    with pytest.raises(ConfigError, match=rf"{shard.name}.* is damaged in row group 0 \(row ids 0\.\.\d+\)"):
        check_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"verify_shards": "full"})}))
    with pytest.raises(TrainingError, match=r"failed on rank \d \(ValueError\): training shard .*part-\d+\.parquet.* cannot be read"):
        run_train(cfg, tracking_uri=tracking_uri, register=False)
