"""Metric sinks (rank 0 -> MLflow with explicit steps, off the training path; a no-op elsewhere) and the MFU
denominator."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Any

import torch

log = logging.getLogger(__name__)
UNSENT_PREFIX = "unsent-metrics-"  # + <mlflow run id>-<unix ms>.jsonl in the run folder: replayed by the driver
TRACKING_STATS = "tracking-stats.json"

# Dense bf16 peak per device in TFLOP/s (vendor datasheets: SXM parts; the sparse figures are twice these).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, timeout_s: float | None = None) -> None:
        pass


class AsyncMlflowSink:
    """Rank 0's metrics to an existing MLflow run (created by the driver), off the training path.

    ``log`` only appends to a queue (the record keeps the time it was logged); one thread sends the queue
    in order, in batches, and while the tracking server does not answer it retries with backoff (1 s
    doubling to 10 s) and the loop goes on: an outage neither stalls nor kills training. ``close`` (end of
    the fit) waits up to ``flush_timeout_s`` for the queue to drain; what is still unsent is written to
    ``unsent-metrics-<run id>-<ms>.jsonl`` in the run folder, which the driver replays when the server
    answers (cluster/train.py). What happened is counted in ``tracking-stats.json`` there: records logged,
    sent, sent late (after a failed attempt), the longest delay, the failed attempts, the records left unsent.
    """

    BATCH = 200  # MLflow's log_batch takes up to 1000 metrics

    def __init__(self, tracking_uri: str, run_id: str, *, spill=None, flush_timeout_s: float = 120.0):
        from mlflow import MlflowClient

        # one attempt per call, bounded: this thread retries itself, so a call never hangs for the client's minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id, self.spill, self.flush_timeout_s = MlflowClient(tracking_uri), run_id, spill, flush_timeout_s
        self.queue: collections.deque[tuple[int, int, dict[str, float]]] = collections.deque()
        self.cond = threading.Condition()
        self.closing = self.abandon = False
        self.stats: dict[str, Any] = {"logged": 0, "sent": 0, "sent_late": 0, "failed_attempts": 0,
                                      "max_delay_s": 0.0, "unsent": 0}
        self.thread = threading.Thread(target=self._run, name="rpt-mlflow-sink", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        rec = (int(time.time() * 1000), int(step), {k: float(v) for k, v in metrics.items()})
        with self.cond:
            self.queue.append(rec)
            self.stats["logged"] += 1
            self.cond.notify()

    def _next_batch(self) -> list[tuple[int, int, dict[str, float]]] | None:
        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if self.abandon or not self.queue:
                return None
            return list(self.queue)[: self.BATCH]

    def _run(self) -> None:
        from mlflow.entities import Metric

        backoff, late = 1.0, False
        while (batch := self._next_batch()) is not None:
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for ts, step, m in batch
                                                            for k, v in m.items()])
            except Exception as e:  # the server is away (or refuses): keep the records, retry later
                self.stats["failed_attempts"] += 1
                if self.stats["failed_attempts"] == 1:
                    log.warning("MLflow does not take metrics (%s); training goes on, they are kept and retried",
                                str(e).splitlines()[0][:200])
                late = True
                with self.cond:
                    self.cond.wait_for(lambda: self.abandon, timeout=backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            now = time.time() * 1000
            with self.cond:
                for _ in batch:
                    self.queue.popleft()
                self.stats["sent"] += len(batch)
                self.stats["sent_late"] += len(batch) if late else 0
                self.stats["max_delay_s"] = max(self.stats["max_delay_s"], (now - batch[0][0]) / 1000)
            backoff, late = 1.0, late and bool(self.queue)

    def close(self, timeout_s: float | None = None) -> None:
        """Drain the queue (up to ``timeout_s``, default ``flush_timeout_s``), then spill what is left."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(self.flush_timeout_s if timeout_s is None else timeout_s)
        with self.cond:
            self.abandon = True
            self.cond.notify_all()
        self.thread.join(15)  # at most one bounded call in flight
        with self.cond:
            left = list(self.queue)
            self.queue.clear()
        self.stats["unsent"] = len(left)
        if self.spill is not None:
            self._write(left)

    def _write(self, left: list[tuple[int, int, dict[str, float]]]) -> None:
        fs, run_dir = self.spill
        if left:
            name = f"{run_dir}/{UNSENT_PREFIX}{self.run_id}-{int(time.time() * 1000)}.jsonl"
            with fs.open_output_stream(name) as f:
                f.write("".join(json.dumps({"ts": ts, "step": st, "metrics": m}) + "\n" for ts, st, m in left).encode())
            log.warning("%d metric records could not reach MLflow; kept in %s (replayed by the driver)", len(left), name)
        with fs.open_output_stream(f"{run_dir}/{TRACKING_STATS}") as f:
            f.write(json.dumps({**self.stats, "run_id": self.run_id}).encode())


def system_monitor(tracking_uri: str, run_id: str, every_s: float):
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, GPU when present)
    of rank 0's node, sampled every ``every_s`` seconds in MLflow's own thread; None when off (``every_s`` 0)."""
    if every_s <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def measured_cpu_tflops(n: int = 512, repeats: int = 5) -> float:
    """Achieved fp32 matmul TFLOP/s of this process's CPU threads: the MFU denominator on CPU.

    A CPU has no single datasheet peak for PyTorch; a square matmul is the best case the model's
    own matmuls can reach, so MFU on CPU reads as "fraction of achievable matmul throughput".
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_tflops(configured: float | None, use_gpu: bool) -> float:
    if configured:
        return configured
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, val in GPU_PEAK_TFLOPS.items():
            if key in name:
                return val
        return 100.0
    return measured_cpu_tflops()
