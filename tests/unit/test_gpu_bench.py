"""benchmarks/gpu.py cannot rot while no GPU is at hand: its CPU check (the debug preset, a few steps) runs the
plain loop and both engines (with activation checkpointing, with compile) in their own processes and writes
measured figures for each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_on_cpu_with_the_debug_preset(tmp_path):
    out = tmp_path / "gpu.json"
    variants = "plain,deepspeed-zero2+ac,accelerate-fsdp2+compile"
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--presets", "debug", "--variants",
                        variants, "--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["presets"]["debug"]
    assert sorted(rows) == sorted(variants.split(",")) and res["skipped"] == []
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["mem_peak_gb"] > 0.05, (name, row)
        assert row["params"] == rows["plain"]["params"] > 100_000
    assert rows["plain"]["vs_plain"] == 1.0 and all(r["vs_plain"] > 0 for r in rows.values())
    assert "tokens/s" in r.stdout and "accelerate-fsdp2+compile" in r.stdout
