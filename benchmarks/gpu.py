"""One prepared benchmark for a machine with one GPU: both engines against plain PyTorch on the same model.

    python benchmarks/gpu.py [--presets 1b,small] [--steps 10] [--out benchmarks/results/gpu.json]
    python benchmarks/gpu.py --device cpu --presets debug --seq-len 32 --micro-batch 2 --steps 2   # the CPU check

For each model preset, on random token rows (nothing to download or prepare) with bf16 on a GPU (fp32 on CPU):

- plain PyTorch: the model, AdamW, autocast, clipping, in one process: the reference;
- DeepSpeed ZeRO-2 and accelerate FSDP2 (``zero_stage`` 2), each plain, with activation checkpointing
  (``+ac``) and with ``torch.compile`` of the blocks (``+compile``), built by ``trainers.engines.build`` as the
  training loop builds them and stepped through the same :class:`trainers.engines.base.Engine` calls.

Every variant runs in its own process (a one-rank process group; a fresh CUDA allocator, so peak memory is its
own) for ``--warmup`` untimed and ``--steps`` timed optimizer steps, with one device synchronisation at each end of
the timed span. Reported per variant: tokens/s, MFU against the GPU's dense bf16 peak
(``trainers.metrics.GPU_PEAK_TFLOPS``; on CPU the measured fp32 matmul rate) with the PaLM FLOPs per token
(``models.flops.flops_per_token``), peak memory (CUDA max allocated; peak RSS on CPU) and the ratio to plain
PyTorch. Variants still queued when ``--budget-s`` is spent are skipped and listed (the whole run is sized to
stay under 8 minutes on one H100/H200). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_common import print_result, run_child, write_json  # noqa: E402

VARIANTS = {  # name: trainer settings (None: the plain PyTorch loop)
    "plain": None,
    "deepspeed-zero2": {"engine": "deepspeed", "zero_stage": 2},
    "deepspeed-zero2+ac": {"engine": "deepspeed", "zero_stage": 2, "activation_checkpointing": True},
    "deepspeed-zero2+compile": {"engine": "deepspeed", "zero_stage": 2, "compile": True},
    "accelerate-fsdp2": {"engine": "accelerate", "zero_stage": 2},
    "accelerate-fsdp2+ac": {"engine": "accelerate", "zero_stage": 2, "activation_checkpointing": True},
    "accelerate-fsdp2+compile": {"engine": "accelerate", "zero_stage": 2, "compile": True},
}


def one(spec: dict) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch
    import torch.distributed as dist

    import models
    from models.flops import flops_per_token, num_params
    from trainers.config import OptimizerSpec, TrainerSpec
    from trainers.engines.base import adamw, peak_memory_gb
    from trainers.metrics import peak_tflops

    gpu = spec["device"] == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    cfg = models.presets.get(spec["preset"])
    mcfg = models.ModelConfig(preset=spec["preset"]).resolve(vocab_size=cfg["vocab_size"],
                                                            max_seq_len=max(spec["seq_len"], cfg["max_seq_len"]))
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    model = models.build(mcfg)
    precision = "bf16" if gpu else "fp32"
    o = OptimizerSpec(lr_peak=1e-4)
    mb, T = spec["micro_batch"], spec["seq_len"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, mcfg.vocab_size, (mb, T + 1), generator=gen) for _ in range(4)]
    settings = spec["trainer"]

    def loss_of(m, tokens):
        tokens = tokens.to(device, non_blocking=True)
        logits = m(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    if settings is None:
        model = model.to(device)
        opt = adamw(model, o)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

        def step(i):
            with autocast:
                loss = loss_of(model, batches[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from trainers import engines

        t = TrainerSpec(num_workers=1, use_gpu=gpu, precision=precision, micro_batch_size=mb, **settings)
        engine = engines.build(model, t, o)

        def step(i):
            with engine.micro_batch(True):
                loss = loss_of(engine.model, batches[i % len(batches)])
                engine.backward(loss, boundary=True, want_norm=False)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for i in range(spec["warmup"]):
        step(i)
    sync()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(spec["steps"]):
        step(i)
    sync()
    dt = time.perf_counter() - t0
    tokens_per_s = spec["steps"] * mb * T / dt
    peak = peak_tflops(None, gpu) * 1e12
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token(mcfg, T) / peak,
            "mem_peak_gb": peak_memory_gb(device), "params": num_params(model), "warmup_s": setup_s,
            "peak_tflops": peak / 1e12, "device_name": torch.cuda.get_device_name() if gpu else platform.processor()}


def run_variant(spec: dict, timeout_s: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1"}
    return run_child(__file__, spec, timeout_s=timeout_s, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--presets", default="1b,small")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the variants still queued after this")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/gpu.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print_result(one(json.loads(a.one)))
        return
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py: no CUDA GPU here; run it on a GPU machine, or check it with --device cpu")
    start = time.monotonic()
    res: dict = {"device": a.device, "seq_len": a.seq_len, "micro_batch": a.micro_batch, "steps": a.steps,
                 "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "presets": {}, "skipped": []}
    for preset in a.presets.split(","):
        rows = res["presets"][preset] = {}
        for name in a.variants.split(","):
            left = a.budget_s - (time.monotonic() - start)
            if left <= 0:
                res["skipped"].append(f"{preset}/{name}")
                continue
            spec = {"preset": preset, "device": a.device, "seq_len": a.seq_len, "micro_batch": a.micro_batch,
                    "steps": a.steps, "warmup": a.warmup, "trainer": VARIANTS[name]}
            rows[name] = run_variant(spec, timeout_s=max(left, 60.0))
            print(f"{preset:>6} {name:<26} {json.dumps(rows[name])[:160]}", flush=True)
        plain = rows.get("plain", {}).get("tokens_per_s")
        for r in rows.values():
            if plain and "tokens_per_s" in r:
                r["vs_plain"] = r["tokens_per_s"] / plain
    res["wall_s"] = time.monotonic() - start
    print_table(res)
    write_json(res, a.out)


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res['device']}: seq {res['seq_len']}, micro-batch {res['micro_batch']}, {res['steps']} steps")
    for col in ("preset", "loop", "tokens/s", "vs plain", "MFU", "peak GiB"):
        t.add_column(col)
    for preset, rows in res["presets"].items():
        for name, r in rows.items():
            if "error" in r:
                t.add_row(preset, name, "error", str(r["error"])[:60], "", "")
                continue
            t.add_row(preset, name, f"{r['tokens_per_s']:,.0f}", f"{r.get('vs_plain', float('nan')):.2f}",
                      f"{r['mfu']:.1%}", f"{r['mem_peak_gb']:.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
