"""Shared fixtures: one local Ray instance per test session (ray.init costs seconds), a prepared debug
corpus, and a throwaway MLflow tracking store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with logical CPUs above the 2 physical ones, so Ray Data is never starved."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even if a stale ray_current_cluster file is left in Ray's temp folder
        # the dashboard serves the State API, which Ray Train's placement-group cleaner needs (a Tune trial that a
        # scheduler stops takes its fit's controller with it; the cleaner frees that fit's CPUs)
        ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def debug_data(ray_session, tmp_path_factory) -> Path:
    """The debug corpus (60 pydoc topics, seq_len 64, vocab 1024), prepared once per session."""
    from data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "pydoc-64"
    prepare(
        PrepareConfig(corpus="builtin:pydoc", out_dir=out, seq_len=64, vocab_size=1024, max_documents=60,
                      shard_rows=256, val_fraction=0.05, seed=0),
        progress=False,
    )
    return out


@pytest.fixture()
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns.db'}"
