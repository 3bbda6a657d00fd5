"""Curation inside `rpt data prepare` on real Ray Data: exact and near dedup, Gopher filters and INGENIOUS
selection on a JSONL corpus with planted copies, near copies and junk; the manifest's stage table, the removed
ids, and the same shards whatever the number of actors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.curation.pipeline import REMOVED_FILE
from data.manifest import Manifest
from data.prepare import PrepareConfig, prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    docs = [" ".join(rng.choice(vocab, size=int(rng.integers(80, 160)))) for _ in range(120)]
    kinds = ["base"] * 120
    for src in rng.choice(120, size=10, replace=False):  # exact copies, up to case and whitespace
        docs.append("  " + docs[src].upper().replace(" ", "\n ") + " ")
        kinds.append("copy")
    for src in rng.choice(120, size=10, replace=False):  # near copies: one word changed (5-gram Jaccard > 0.9)
        words = docs[src].split()
        words[len(words) // 2] = "changed"
        docs.append(" ".join(words))
        kinds.append("near")
    for i in range(5):  # junk the Gopher rules remove: too few words
        docs.append(f"short junk {i}")
        kinds.append("junk")
    order = rng.permutation(len(docs))
    docs, kinds = [docs[i] for i in order], [kinds[i] for i in order]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, kinds


def run(corpus, out, actors: int):
    cfg = PrepareConfig(corpus=str(corpus), out_dir=out, seq_len=32, vocab_size=600, num_actors=actors, seed=3,
                        dedup={"exact": True, "near": {"threshold": 0.8, "ngram": 5, "num_perm": 128}},
                        filters={"min_words": 20}, select={"fraction": 0.5, "partitions": 2})
    return prepare(cfg, progress=False)


@pytest.fixture(scope="module")
def curated(ray_session, planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "a"
    return out, run(planted[0], out, actors=2)


def test_curation_stages_remove_what_was_planted_and_are_deterministic(curated, planted, tmp_path):
    corpus, kinds = planted
    a, summary = curated
    man = Manifest.load(a)
    stages = [(s.stage, s.documents_in, s.documents_out) for s in man.curation]
    assert stages == [("dedup.exact", 145, 135), ("dedup.near", 135, 125), ("filters", 125, 120),
                      ("select.ingenious", 120, 60)]
    assert summary["curation"][0]["stage"] == "dedup.exact" and summary["documents"] == 60
    assert man.documents.train + man.documents.val == 60
    removed = pq.read_table(a / REMOVED_FILE).to_pydict()
    by_stage = {}
    for doc_id, stage, reason in zip(removed["doc_id"], removed["stage"], removed["reason"], strict=True):
        by_stage.setdefault(stage, []).append(doc_id)
        assert reason, (doc_id, stage)
    assert {kinds[i] for i in by_stage["dedup.exact"]} <= {"copy", "base"} and len(by_stage["dedup.exact"]) == 10
    assert len(by_stage["dedup.near"]) == 10 and {kinds[i] for i in by_stage["dedup.near"]} <= {"near", "base"}
    assert sorted(kinds[i] for i in by_stage["filters"]) == ["junk"] * 5
    assert len(by_stage["select.ingenious"]) == 60
    # the same shards, tokenizer and removed ids with one actor
    run(corpus, tmp_path / "b", actors=1)
    for rel in ["tokenizer.json", REMOVED_FILE, *(s.path for s in man.splits["train"].shards)]:
        assert (a / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_ingenious_with_a_model_s_embeddings(curated, planted, tmp_path):
    """select.embeddings: a decoder export's mean-pooled hidden states (the model loaded once per actor) as the
    facility-location features: the configured share is kept, and another one than with hashed n-grams."""
    import shutil

    import torch

    import models
    from models.io import save_pretrained

    corpus, _ = planted
    a, _ = curated
    vocab = Manifest.load(a).tokenizer.vocab_size
    torch.manual_seed(0)
    cfg = models.ModelConfig(preset="debug").resolve(vocab_size=vocab, max_seq_len=128)
    folder = tmp_path / "embedder"
    save_pretrained(models.build(cfg), cfg, folder)
    shutil.copy(a / "tokenizer.json", folder / "tokenizer.json")
    picks = {}
    for name, sel in (("model", {"embeddings": str(folder), "max_tokens": 64}), ("hashed", {})):
        out = tmp_path / name
        prepare(PrepareConfig(corpus=str(corpus), out_dir=out, seq_len=32, vocab_size=600, seed=3,
                              select={"fraction": 0.4, **sel}), progress=False)
        man = Manifest.load(out)
        assert [(s.stage, s.documents_in, s.documents_out) for s in man.curation] == [("select.ingenious", 145, 58)]
        picks[name] = sorted(pq.read_table(out / REMOVED_FILE).column("doc_id").to_pylist())
        assert len(picks[name]) == 145 - 58
    assert picks["model"] != picks["hashed"]  # the features matter


def test_a_run_logs_the_curation_table(curated, tmp_path):
    """What a training run on curated data logs to MLflow: the stage table as data/curation.json and one
    data.curation.<stage> param per stage (cluster.train._log_curation, called when the run is opened)."""
    from mlflow import MlflowClient

    from cluster.train import _log_curation

    a, _ = curated
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.create_experiment("curation", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    _log_curation(client, run_id, Manifest.load(a))
    params = client.get_run(run_id).data.params
    assert params["data.curation.dedup.exact"] == "145 -> 135" and params["data.curation.select.ingenious"] == "120 -> 60"
    table = json.loads(open(client.download_artifacts(run_id, "data/curation.json", str(tmp_path))).read())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["stage"] for r in rows] == ["dedup.exact", "dedup.near", "filters", "select.ingenious"]
    assert rows[1]["documents_out"] == 125
