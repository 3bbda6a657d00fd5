"""Data and checkpoints on an S3-compatible object store (moto's S3 server on localhost): a corpus in a bucket is
prepared into a bucket, a run trains from there with its checkpoints in a bucket, resumes from them with a higher
max_steps and registers the model; image and continual runs keep their checkpoints there too.

Credentials reach the Ray workers only through their environment (the filesystem Ray pickles to them
carries none, by design). The workers are forked from the session's Ray instance, which inherits this
process's environment when it starts, so dummy credentials are set at import, before any fixture runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BUCKET = "rpt-checkpoints"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a subprocess), with one bucket; stopped by PID."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]', part of the dev extra)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_image_run_in_s3_registers_its_encoder(ray_session, tmp_path, tracking_uri, s3_endpoint):
    """An image run's checkpoints in the bucket; the registry downloads the workload's export files (the
    encoder's, not the decoder's) and the registered encoder loads back."""
    import torch

    from cluster.config import load_config
    from cluster.registry import load_model
    from cluster.train import run_train
    from data.image_prepare import ImagePrepareConfig, prepare_images

    data = tmp_path / "fractals"
    prepare_images(ImagePrepareConfig(source="fractals", n_classes=4, image_size=32, train_rows=256, val_rows=64,
                                      shard_rows=128, seed=0, out_dir=str(data)), progress=False)
    storage_path = f"s3://{BUCKET}/runs?endpoint_override={s3_endpoint}&region=us-east-1"
    cfg = load_config(REPO / "configs/tiny-mae.yaml", [
        f"data.path={data}", f"storage_path={storage_path}", f"tracking.artifact_root={tmp_path / 'art'}",
        "name=s3-mae", "tracking.registered_model=s3-mae", "vit.preset=debug", "data.eval_rows=32",
        "data.probe_rows=64", "trainer.max_steps=4", "trainer.micro_batch_size=16", "trainer.log_every=2",
        "trainer.eval_every=4", "trainer.checkpoint_every=4", "schedule.warmup_steps=1",
    ])
    out = run_train(cfg, tracking_uri=tracking_uri)
    assert out.checkpoint.startswith(f"s3://{BUCKET}/runs/s3-mae/checkpoint_"), out.checkpoint
    embedder, processor = load_model("s3-mae@current", tracking_uri=tracking_uri)
    assert processor.objective == "mae" and processor.image_size == 32 and len(processor.class_names) == 4
    emb = embedder(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert emb.shape[0] == 3 and torch.isfinite(emb).all()


def test_continual_with_anneal_branches_in_s3(ray_session, tmp_path, tracking_uri, s3_endpoint):
    """A continual task whose storage_path is the bucket: its anneal branch resumes the task's full state from the
    bucket (trainer.resume_from an s3:// URI: the path a next task takes too) and writes its checkpoints there."""
    import mlflow
    import numpy as np

    from cluster.continual import load_continual, run_continual
    from cluster.storage import resolve_storage

    storage_path = f"s3://{BUCKET}/cl?endpoint_override={s3_endpoint}&region=us-east-1"
    cfg = load_continual(REPO / "configs/continual-debug.yaml", [
        f"storage_path={storage_path}", f"tracking.artifact_root={tmp_path / 'art'}", "name=cl-s3",
        f"tasks.0.data.path={tmp_path / 'prose'}", "tasks.0.data.prepare.max_documents=40",
        "tasks.0.steps=6", "schedule.warmup_steps=1", "schedule.cooldown_steps=2", "anneal_steps=2",
        "trainer.eval_every=100",
    ])
    cfg.tasks = cfg.tasks[:1]
    res = run_continual(cfg, tracking_uri=tracking_uri)
    L, La = np.array(res["L"]), np.array(res["L_annealed"])
    assert L.shape == La.shape == (1, 1) and np.isfinite(L).all() and np.isfinite(La).all()
    (run,) = res["runs"]
    assert run["checkpoint"].startswith(f"s3://{BUCKET}/cl/") and run["step"] == 6
    storage = resolve_storage(storage_path)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    tags = client.get_run(run["annealed_run_id"]).data.tags
    assert tags["rpt.anneal_source"] == run["checkpoint"] and tags["rpt.resume_from"] == run["checkpoint"]
    ann = tags["rpt.checkpoint"]
    assert ann.startswith(f"s3://{BUCKET}/cl/") and storage.state_of(ann).step == 6 + 2
    assert client.get_model_version_by_alias("cl-debug", "task-0-annealed").run_id == run["annealed_run_id"]


# ---- data on the object store: prepare from and into the bucket, train and resume from there ----------------------

_WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "su", "ta", "ro", "vi", "pe", "do") for b in ("n", "r", "s", "la", "ti")]


def _corpus_documents(n: int = 40) -> dict[str, str]:
    """``n`` short generated documents (seeded), ``doc-NNN.txt`` -> text."""
    import numpy as np

    rng = np.random.default_rng(7)
    return {f"doc-{i:03d}.txt": " ".join(rng.choice(_WORDS, size=int(rng.integers(60, 140)))) + ".\n" for i in range(n)}


def _prepare_config(corpus: str, out_dir: str):
    from data.prepare import PrepareConfig

    return PrepareConfig(corpus=corpus, out_dir=out_dir, seq_len=64, vocab_size=300, val_fraction=0.1, shard_rows=32,
                         seed=0)


def test_data_prepared_from_and_into_s3_trains_and_resumes(ray_session, tmp_path, tracking_uri, s3_endpoint):
    """Acceptance: prepare from an s3:// corpus into s3:// shards (byte-identical to a local preparation of the same
    corpus), train 10 steps from the bucket with the checkpoints in a bucket, resume to 15 there and register the
    model from the bucket; every rank reads exactly its planned rows."""
    import mlflow
    import numpy as np
    import pyarrow.fs as pafs

    from cluster.config import load_config
    from cluster.storage import resolve_storage
    from cluster.train import run_train
    from data.location import resolve
    from data.manifest import Manifest, is_prepared
    from data.prepare import prepare
    from data.stream import load_shards, pieces_row_ids, rank_pieces
    from tests.support.callbacks import AuditRows

    query = f"endpoint_override={s3_endpoint}&region=us-east-1"  # the Ray workers' environment has no endpoint
    docs = _corpus_documents()
    local_corpus, bucket = tmp_path / "corpus", resolve(f"s3://{BUCKET}/data?{query}")
    local_corpus.mkdir()
    for name, text in docs.items():
        (local_corpus / name).write_text(text)
        bucket.join("corpus", name).write_bytes(text.encode())
    prepared = f"s3://{BUCKET}/data/prepared?{query}"
    assert not is_prepared(prepared)

    summary = prepare(_prepare_config(f"s3://{BUCKET}/data/corpus?{query}", prepared), progress=False)
    assert summary["documents"] == 40 and summary["out_dir"] == f"s3://{BUCKET}/data/prepared"
    prepare(_prepare_config(str(local_corpus), str(tmp_path / "local")), progress=False)
    remote, local = resolve(prepared), Manifest.load(tmp_path / "local")
    manifest = Manifest.load(prepared)
    manifest.verify(prepared)
    assert is_prepared(prepared) and manifest.splits == local.splits and manifest.tokenizer == local.tokenizer
    assert manifest.source.documents == 40 and manifest.source.corpus.startswith(f"s3://{BUCKET}/data/corpus")
    files = {remote.relative(i) for i in remote.files()}
    assert files == {p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file()}
    for name in files - {"manifest.json"}:  # determinism: the same shards and tokenizer, byte for byte
        assert remote.join(name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    from typer.testing import CliRunner

    from cluster.cli import app

    again = CliRunner().invoke(app, ["data", "prepare", str(REPO / "configs/debug-lm.yaml"), f"data.path={prepared}",
                                     "--if-missing"])
    assert again.exit_code == 0 and "is already prepared" in again.output, again.output
    shards = load_shards(prepared, "train")
    assert len(shards) >= 3 and all(s.path.startswith(f"s3://{BUCKET}/data/prepared/train/part-") for s in shards)
    assert all(s.path.endswith(f"?{query}") for s in shards)  # the endpoint travels with every shard to the workers

    # Checkpoints in the bucket too; the endpoint travels in the URI (pyarrow's option names), credentials only in
    # the environment.
    storage_path = f"s3://{BUCKET}/runs?{query}"

    def cfg(max_steps: int):
        return load_config(REPO / "configs/debug-lm.yaml", [
            f"data.path={prepared}", f"storage_path={storage_path}", f"tracking.artifact_root={tmp_path / 'art'}",
            "name=s3-data", f"trainer.max_steps={max_steps}", "schedule.total_steps=15", "trainer.checkpoint_every=5",
            "trainer.eval_every=100", "trainer.log_every=5", "data.eval_rows=8", "trainer.keep_checkpoints=2",
        ])

    audit = tmp_path / "audit"
    first = run_train(cfg(10), tracking_uri=tracking_uri, register=False, callbacks=[AuditRows(audit)])
    assert first.metrics["step"] == 10
    assert first.checkpoint.startswith(f"s3://{BUCKET}/runs/s3-data/checkpoint_"), first.checkpoint
    assert not (Path.cwd() / "s3:").exists(), "the URI was taken for a local path"

    # the bucket holds the run: every rank's DeepSpeed shard, the train state, the export files; the workers copied
    # the tokenizer from the data bucket into the export
    storage = resolve_storage(storage_path)
    state, ckpt = storage.latest_checkpoint("s3-data")
    assert state.step == 10 and state.data_position.rows_consumed == 10 * 8
    names = {i.base_name for i in storage.filesystem.get_file_info(pafs.FileSelector(ckpt, recursive=True))}
    assert {"train_state.json", "model.safetensors", "model_config.json", "tokenizer.json",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert storage.read_text(f"{ckpt}/tokenizer.json").encode() == remote.join("tokenizer.json").read_bytes()
    assert json.loads(storage.read_text(storage.path("s3-data", "rpt_run.json")))["mlflow_run_id"] == first.mlflow_run_id

    # resume the same run from the bucket, further, and register the final model from there
    second = run_train(cfg(15), resume=True, tracking_uri=tracking_uri, callbacks=[AuditRows(audit)])
    assert second.run_name == "s3-data" and second.mlflow_run_id == first.mlflow_run_id
    assert second.metrics["step"] == 15
    state2, _ = storage.latest_checkpoint("s3-data")
    assert state2.step == 15 and state2.data_position.rows_consumed == 15 * 8, "resumed, not restarted"
    steps = [s.step for s, _ in storage.checkpoints("s3-data")]
    assert steps == [10, 15], f"keep_checkpoints=2 applies in the bucket too: {steps}"
    for rank in range(2):  # the first fit's rows, then the resumed fit's, as planned: none twice, none skipped
        got = np.concatenate([np.load(f) for f in sorted(audit.glob(f"rank{rank}-step*.npy"))])
        want = pieces_row_ids(rank_pieces(shards, world_size=2, rank=rank, seed=0, start=0, count=15 * 8))
        np.testing.assert_array_equal(got, want)

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "train/loss")] == [5, 10, 15]
    mv = client.get_model_version_by_alias("debug-lm", "current")
    assert int(mv.version) == second.model_version and mv.run_id == first.mlflow_run_id
    assert client.get_run(first.mlflow_run_id).data.tags["rpt.checkpoint"].startswith(f"s3://{BUCKET}/runs/s3-data/")
    from cluster.registry import load_model

    model, tok = load_model("debug-lm@current", tracking_uri=tracking_uri)
    assert sum(p.numel() for p in model.parameters()) > 0 and tok.get_vocab_size() == manifest.tokenizer.vocab_size


def test_data_on_a_missing_bucket_or_endpoint_is_one_clear_error(s3_endpoint, tmp_path):
    """A wrong bucket or endpoint in data.path fails on the driver with the field, the cause and the fix."""
    from cluster.config import ConfigError, load_config
    from cluster.data_check import check_data

    def fails(path: str, match: str) -> None:
        cfg = load_config(REPO / "configs/debug-lm.yaml", [f"data.path={path}", f"storage_path={tmp_path}"])
        with pytest.raises(ConfigError, match=match):
            check_data(cfg)

    fails(f"s3://no-such-bucket/data?endpoint_override={s3_endpoint}",
          r"data\.path='s3://no-such-bucket/data': bucket 'no-such-bucket' does not exist at this endpoint; create it")
    fails(f"s3://{BUCKET}/nothing-here?endpoint_override={s3_endpoint}",
          rf"data\.path=.*s3://{BUCKET}/nothing-here.* does not exist.*create it with `rpt data prepare`")
    dead = f"http://127.0.0.1:{_free_port()}"
    fails(f"s3://{BUCKET}/data?endpoint_override={dead}",
          r"data\.path='s3://rpt-checkpoints/data': cannot reach the store .*Check the endpoint")
