"""Metric sinks (rank 0 -> MLflow with explicit steps; a no-op elsewhere) and the MFU denominator."""

from __future__ import annotations

import time

import torch

# Dense bf16 peak per device in TFLOP/s (vendor datasheets).
GPU_PEAK_TFLOPS = {"H200": 790.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class MlflowSink:
    """Logs one metrics dict per step to an existing MLflow run (created by the driver)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


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
