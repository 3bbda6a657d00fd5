"""A weighted mixture of two prepared folders under Ray Train: the rows each rank draws from each source are the
plan's (0.75 / 0.25 of every micro-batch), a --resume continues both sources exactly once, and the run logs
each source's rows seen and validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from cluster.train import run_train
from data.stream import load_shards, pieces_row_ids, rank_pieces
from tests.support.callbacks import AuditRows

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MB, WORLD = 8, 2  # micro-batch 8 rows: 6 from web, 2 from code


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory) -> Path:
    """A small generated corpus of Python functions."""
    corpus = tmp_path_factory.mktemp("code-corpus")
    for i in range(18):
        body = "\n".join(f"    y{j} = x * {i + j} + len(str(y{j - 1 if j else 0}))" for j in range(8))
        (corpus / f"f{i:02d}.py").write_text(f"def f{i}(x):\n    y0 = x\n{body}\n    return y7\n")
    return corpus


def prepare_code(corpus: Path, out: Path, tokenizer: Path, seq_len: int = 64) -> Path:
    from data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(corpus=str(corpus), out_dir=out, seq_len=seq_len, tokenizer=str(tokenizer), shard_rows=16,
                          val_fraction=0.1, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def code_data(ray_session, debug_data, code_corpus, tmp_path_factory) -> Path:
    """The code corpus tokenised with the debug corpus's tokenizer and seq_len (about 40 training rows: the run
    wraps into its next epoch)."""
    return prepare_code(code_corpus, tmp_path_factory.mktemp("prepared") / "code-64", debug_data / "tokenizer.json")


def mix_cfg(web: Path, code: Path, tmp_path: Path, *overrides: str):
    sources = f"[{{name: web, path: {web}, weight: 0.75}}, {{name: code, path: {code}, weight: 0.25}}]"
    return load_config(REPO / "configs/debug-lm.yaml", [
        "data.path=null", "data.prepare=null", f"data.sources={sources}", f"storage_path={tmp_path / 'results'}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}", "trainer.log_every=2", "trainer.eval_every=4",
        "trainer.checkpoint_every=4", f"trainer.micro_batch_size={MB}", *overrides,
    ])


def audited(audit: Path, stream: str, rank: int) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted(audit.glob(f"{stream}-rank{rank}-step*.npy"))])


def test_two_sources_draw_the_planned_rows_resume_once_and_log_per_source(
        ray_session, debug_data, code_data, tmp_path, tracking_uri):
    import mlflow

    audit = tmp_path / "audit"
    cfg = mix_cfg(debug_data, code_data, tmp_path, "trainer.max_steps=8")
    first = run_train(cfg, tracking_uri=tracking_uri, register=False, callbacks=[AuditRows(audit)])
    cfg = mix_cfg(debug_data, code_data, tmp_path, "trainer.max_steps=12")
    out = run_train(cfg, resume=True, tracking_uri=tracking_uri, callbacks=[AuditRows(audit)])
    assert out.mlflow_run_id == first.mlflow_run_id and out.model_version == 1

    # every rank drew 6 web and 2 code rows per micro-batch, exactly the plan's over both fits (none twice)
    steps = 12
    for name, path, per_micro in (("web", debug_data, 6), ("code", code_data, 2)):
        shards = load_shards(path, "train")
        for rank in range(WORLD):
            want = pieces_row_ids(rank_pieces(shards, world_size=WORLD, rank=rank, seed=cfg.seed, start=0,
                                              count=steps * per_micro))
            np.testing.assert_array_equal(audited(audit, name, rank), want)
    code_rows = sum(s.rows for s in load_shards(code_data, "train"))
    assert steps * 2 * WORLD > code_rows // WORLD * WORLD, "the small source wraps into its next epoch"

    state = json.loads(Path(out.checkpoint, "train_state.json").read_text())["data_position"]
    assert state["streams"] == {"web": steps * 6, "code": steps * 2} and state["mixed"] == steps * MB
    assert state["seen"] == {"web": steps * 6 * WORLD, "code": steps * 2 * WORLD}

    client = mlflow.MlflowClient(tracking_uri)
    hist = {k: {m.step: m.value for m in client.get_metric_history(out.mlflow_run_id, k)}
            for k in ("data/web/rows_seen", "data/code/rows_seen", "val/web/loss", "val/code/loss", "val/loss")}
    assert hist["data/web/rows_seen"] == {s: s * 6 * WORLD for s in range(2, 13, 2)}
    assert hist["data/code/rows_seen"] == {s: s * 2 * WORLD for s in range(2, 13, 2)}
    assert sorted(hist["val/web/loss"]) == sorted(hist["val/code/loss"]) == [0, 4, 8, 12]
    for s in (0, 4, 8, 12):
        assert hist["val/loss"][s] == pytest.approx(0.75 * hist["val/web/loss"][s] + 0.25 * hist["val/code/loss"][s])
    for name in ("web", "code"):  # both sources were learnt from
        assert hist[f"val/{name}/loss"][12] < hist[f"val/{name}/loss"][0] - 0.2


def test_a_source_with_another_seq_len_or_tokenizer_is_refused_naming_it(debug_data, code_data, code_corpus, tmp_path):
    """Every source must be tokenised like the first: another seq_len or tokenizer fails on the driver, naming
    the source's field and the fix."""
    import shutil

    from cluster.config import ConfigError
    from cluster.data_check import check_data
    from data.tokenizer import tokenizer_sha256

    short = prepare_code(code_corpus, tmp_path / "code-32", debug_data / "tokenizer.json", seq_len=32)
    retrained = tmp_path / "code-other-tokenizer"
    shutil.copytree(code_data, retrained)
    tok = retrained / "tokenizer.json"  # another tokenizer file (its manifest consistent with it)
    tok.write_text(tok.read_text() + "\n")
    manifest = json.loads((retrained / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = tokenizer_sha256(tok)
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    for other in (short, retrained):
        with pytest.raises(ConfigError) as e:
            check_data(mix_cfg(debug_data, other, tmp_path))
        assert f"data.sources[1].path={str(other)!r}" in str(e.value), str(e.value)
        assert "another tokenizer or seq_len" in str(e.value) and "prepare it with" in str(e.value), str(e.value)
