"""DeepSpeed ZeRO 1-3 state onto another number of ranks: DeepSpeed's universal checkpoint.

``deepspeed.checkpoint.ds_to_universal`` turns the per-rank optimizer shards of a checkpoint into one folder per
parameter (fp32 weight, Adam's ``exp_avg`` / ``exp_avg_sq``, whole), which any data-parallel world size loads with
``checkpoint.load_universal`` (Lian et al., "Universal Checkpointing", arXiv 2406.18820).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

DS_TAG = "ds"


def to_universal(checkpoint: Path, out: Path) -> Path:
    """Convert ``checkpoint/ds`` (written by any number of ranks) into ``out/ds``; returns ``out``. Runs in this
    process (one extract and one merge worker: the state of a run that fits one node's memory)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint / DS_TAG), output_folder=str(out / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        ds_to_universal.main(args)
    return out
