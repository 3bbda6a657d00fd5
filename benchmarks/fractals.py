"""Fractal image throughput: one process, and the Ray Data prepare path end to end.

    python benchmarks/fractals.py [--rows 4096] [--seconds 3] [--out benchmarks/results/fractals.json]

1. `data.fractals.measure_throughput`: `render_batch` on this process (one core), 32 and 64 px, coloured,
   single instance, the default points (2 per pixel), batches of 256 from one generator; images/s over
   `--seconds`. Then `FractalRows` at 32 px on this process: the same renderer with one seeded generator
   per row (what makes prepared rows independent of batching), i.e. the per-task work of step 2.
2. `rpt data prepare` for fractals (`data.image_prepare.prepare_images`): `--rows` training images at
   32 px in shards of `--shard-rows`, rendered by Ray Data tasks (one shard each) and written to
   Parquet, on a local Ray started here with every core; images/s end to end (out-dir checks, render,
   Parquet writes, manifest, verify), excluding Ray's start. The first run also starts Ray's worker
   processes; the second (same size) and a third (4x the rows, showing the fixed cost) find them warm.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def single_process(sizes: list[int], seconds: float) -> list[dict]:
    from data.fractals import default_points, measure_throughput

    return [
        {"path": "render_batch, 1 process", "image_size": s, "points": default_points(s),
         "images_per_s": measure_throughput(size=s, seconds=seconds)}
        for s in sizes
    ]  # fmt: skip


def fractal_rows(size: int, seconds: float, batch: int = 256) -> dict:
    """`FractalRows` on this process: what each prepare task runs (one seeded generator per row)."""
    import numpy as np

    from data.fractals import FractalRows, default_points

    render = FractalRows(n_classes=100, seed=0, size=size)
    render({"id": np.arange(batch)})  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        render({"id": np.arange(done, done + batch)})
        done += batch
    return {"path": "FractalRows (per-row generators), 1 process", "image_size": size, "points": default_points(size),
            "images_per_s": done / (time.perf_counter() - start)}


def ray_prepare(rows: int, shard_rows: int, size: int) -> list[dict]:
    import ray

    from data.image_prepare import ImagePrepareConfig, prepare_images

    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for run, n in (("cold", rows), ("warm", rows), ("warm", 4 * rows)):
                cfg = ImagePrepareConfig(source="fractals", n_classes=100, train_rows=n, val_rows=0,
                                         shard_rows=shard_rows, image_size=size, out_dir=Path(tmp) / f"{run}-{n}")
                s = prepare_images(cfg, progress=False)
                out.append({"path": f"rpt data prepare, {n:,} rows (Ray Data, {cpus} CPUs, {run})",
                            "image_size": size, "points": cfg.resolved_points(), "rows": n, "shards": s["shards"],
                            "seconds": s["seconds"], "images_per_s": s["images_per_s"]})
    finally:
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--seconds", type=float, default=3.0, help="per single-process measurement")
    p.add_argument("--rows", type=int, default=4096, help="training images of the Ray Data prepare run")
    p.add_argument("--shard-rows", type=int, default=512)
    p.add_argument("--prepare-size", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/fractals.json"))
    a = p.parse_args()

    t0 = time.perf_counter()
    results = [*single_process(a.sizes, a.seconds), fractal_rows(a.prepare_size, a.seconds),
               *ray_prepare(a.rows, a.shard_rows, a.prepare_size)]

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Fractal rendering throughput")
    for col in ("path", "image px", "points", "images/s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in results:
        table.add_row(r["path"], str(r["image_size"]), f"{r['points']:,}", f"{r['images_per_s']:,.0f}")
    Console(width=120).print(table)

    report = {
        "benchmark": "fractals",
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "settings": {"sizes": a.sizes, "seconds": a.seconds, "rows": a.rows, "shard_rows": a.shard_rows,
                     "prepare_size": a.prepare_size, "n_classes": 100, "batch": 256, "colored": True},
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
