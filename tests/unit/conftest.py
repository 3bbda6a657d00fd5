"""Fixtures of the unit tests that run the training loop in this process (tests/unit/test_loop.py,
tests/unit/test_engines.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VOCAB, SEQ, ROWS = 96, 16, 256


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group and the launcher variables DeepSpeed reads (what Ray Train sets up for
    each worker); all undone after the module, DeepSpeed's communication backend included (it keeps the group it
    first saw), so the next module's group is a fresh one and tests that fork ranks inherit none."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    import sys

    ds_comm, ds_groups = sys.modules.get("deepspeed.comm.comm"), sys.modules.get("deepspeed.utils.groups")
    if ds_comm is not None:
        ds_comm.cdb = None
    if ds_groups is not None:  # process groups DeepSpeed cached from this group
        for name, value in vars(ds_groups).items():
            if name.startswith("_") and name.endswith("_GROUP"):
                setattr(ds_groups, name, {} if isinstance(value, dict) else None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> tuple[np.ndarray, Path]:
    """Random token rows: all of them as the training stream, the first 32 written as a Parquet val split."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(ROWS, SEQ), dtype=np.int32)
    path = tmp_path_factory.mktemp("val") / "val.parquet"
    flat = pa.array(tokens[:32].reshape(-1))
    pq.write_table(pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, SEQ),
                             "row_id": pa.array(np.arange(32, dtype=np.int64))}), path)
    return tokens, path


