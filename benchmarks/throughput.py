"""Throughput of the Ray Train loop on both engines against a plain PyTorch loop, same model, same batches.

    python benchmarks/throughput.py [--config configs/tiny-lm.yaml] [--steps 60] [--out benchmarks/results/throughput.json]

Both loops train the config's model on the same prepared shards with the same micro-batch size and
AdamW settings. The plain loop runs in this process (one rank, no Ray, no DeepSpeed) and reads the
rows with pyarrow; the Ray loops are the real `rpt train` path (Ray Data stream, the engine, MLflow
logging, checkpoints at the end only), for each engine (DeepSpeed; accelerate) with 1 worker holding every
CPU (ZeRO-0 / DDP, the like-for-like comparison: same thread count as the plain loop) and with the config's
worker count and ZeRO stage (accelerate: FSDP2 for stages 2 and 3). Tokens/s of the Ray runs is the median
of the logged `perf/tokens_per_s` windows after the first (warm-up) window. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_common import write_json  # noqa: E402


def plain_loop(cfg, steps: int, warmup: int) -> dict:
    """Single-process PyTorch: the same model, objective, optimizer and batches, no Ray/DeepSpeed."""
    import numpy as np
    import torch

    import models
    import objectives
    from data.location import read_parquet
    from data.manifest import Manifest
    from data.stream import load_shards
    from trainers.engines.base import param_groups

    man = Manifest.load(cfg.data.root)
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model.resolve(vocab_size=man.tokenizer.vocab_size, max_seq_len=man.seq_len)
    model = models.build(mcfg)
    obj = objectives.get(cfg.objective.name, **cfg.objective.params)
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr_peak, betas=o.betas, eps=o.eps)
    mb = cfg.trainer.micro_batch_size
    rows = np.concatenate([
        np.stack(read_parquet(s.path, columns=["tokens"]).column("tokens").to_numpy(zero_copy_only=False))
        for s in load_shards(cfg.data.root, "train")[:4]
    ])
    need = (steps + warmup) * mb
    rows = np.resize(rows, (need, rows.shape[1]))
    batches = torch.from_numpy(rows.astype(np.int64)).split(mb)
    times = []
    for i, tokens in enumerate(batches):
        t0 = time.perf_counter()
        loss, _ = obj.loss(model, obj.prepare({"tokens": tokens}))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    float(loss)
    tok = mb * man.seq_len
    return {"tokens_per_s": tok * len(times) / sum(times), "steps": len(times), "threads": torch.get_num_threads()}


def ray_loop(cfg, overrides: list[str], steps: int, tmp: Path) -> dict:
    import mlflow

    from cluster.config import load_config
    from cluster.train import run_train

    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    c = load_config(
        cfg["path"],
        [*cfg["overrides"], *overrides, f"trainer.max_steps={steps}", "trainer.log_every=10",
         f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}", f"storage_path={tmp / 'results'}",
         f"tracking.artifact_root={tmp / 'artifacts'}", "trainer.max_failures=0"],
    )
    t0 = time.perf_counter()
    out = run_train(c, tracking_uri=uri, register=False)
    wall = time.perf_counter() - t0
    hist = mlflow.MlflowClient(uri).get_metric_history(out.mlflow_run_id, "perf/tokens_per_s")
    windows = [m.value for m in sorted(hist, key=lambda m: m.step)][1:]
    wait = [m.value for m in mlflow.MlflowClient(uri).get_metric_history(out.mlflow_run_id, "data/wait_frac")][1:]
    mfu = [m.value for m in mlflow.MlflowClient(uri).get_metric_history(out.mlflow_run_id, "perf/mfu")][1:]
    return {
        "tokens_per_s": statistics.median(windows),
        "windows": windows,
        "data_wait_frac": statistics.median(wait),
        "mfu": statistics.median(mfu),
        "fit_wall_s": wall,
        "workers": c.trainer.num_workers,
        "zero_stage": c.trainer.zero_stage,
        "engine": c.trainer.engine,
        "mem_peak_gb": max(m.value for m in mlflow.MlflowClient(uri).get_metric_history(out.mlflow_run_id,
                                                                                         "perf/mem_peak_gb")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/tiny-lm.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/throughput.json"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import ray

    from cluster.config import load_config
    from cluster.ray_env import init_ray

    cfg = load_config(a.config, a.overrides)
    from cluster.train import check_data

    check_data(cfg)  # the data must be prepared: `rpt data prepare CONFIG`
    res: dict = {"config": a.config, "overrides": a.overrides, "steps": a.steps, "model": cfg.model.preset,
                 "micro_batch_size": cfg.trainer.micro_batch_size, "host": platform.node(),
                 "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    res["plain_pytorch"] = plain_loop(cfg, a.steps, a.warmup)
    init_ray(None, cpus_needed=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker, dashboard=False)
    spec = {"path": a.config, "overrides": a.overrides}
    stage = cfg.trainer.zero_stage if cfg.trainer.zero_stage != 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        # Ray gives a worker as many intra-op threads as CPUs it reserves: reserve all of them so the
        # 1-worker runs and the plain loop use the same number of threads.
        threads = ["trainer.num_workers=1", "trainer.zero_stage=0", f"trainer.cpus_per_worker={os.cpu_count()}"]
        for engine in ("deepspeed", "accelerate"):
            res[f"ray_{engine}_1worker_zero0"] = ray_loop(spec, [*threads, f"trainer.engine={engine}"], a.steps, Path(tmp))
            own = [f"trainer.engine={engine}"] + ([f"trainer.zero_stage={stage}"] if engine == "accelerate" else [])
            res[f"ray_{engine}_config"] = ray_loop(spec, own, a.steps, Path(tmp))
    ray.shutdown()
    plain = res["plain_pytorch"]["tokens_per_s"]
    for engine in ("deepspeed", "accelerate"):
        res[f"ratio_{engine}_1worker_vs_plain"] = res[f"ray_{engine}_1worker_zero0"]["tokens_per_s"] / plain
        res[f"ratio_{engine}_config_vs_plain"] = res[f"ray_{engine}_config"]["tokens_per_s"] / plain

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"throughput: {cfg.model.preset}, micro-batch {cfg.trainer.micro_batch_size}, {a.steps} steps")
    for col in ("loop", "tokens/s", "vs plain", "data wait", "MFU", "peak GiB"):
        t.add_column(col)
    t.add_row("plain PyTorch (1 process)", f"{plain:,.0f}", "1.00", "-", "-", "-")
    names = {"deepspeed": ("DeepSpeed", "ZeRO-0", "ZeRO-"), "accelerate": ("accelerate", "DDP", "FSDP2 stage ")}
    for engine, (label, one, many) in names.items():
        for key in (f"ray_{engine}_1worker_zero0", f"ray_{engine}_config"):
            r = res[key]
            shape = one if r["zero_stage"] == 0 else f"{many}{r['zero_stage']}"
            t.add_row(f"Ray Train + {label}, {r['workers']} worker(s), {shape}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / plain:.2f}", f"{r['data_wait_frac']:.1%}", f"{r['mfu']:.1%}",
                      f"{r['mem_peak_gb']:.2f}")
    Console().print(t)
    write_json(res, a.out)


if __name__ == "__main__":
    main()
