"""A live progress line per logging step on the driver's console, read from the run's MLflow metrics.

Rank 0 logs ``train/loss``, throughput, MFU and data wait to MLflow at every logging step; a thread on the
driver polls them and prints ``step 40/300  loss 6.12  4,590 tokens/s  MFU 0.54  data wait 0.2%  ETA 4m10s``
(and the validation metrics at evaluation steps). Polling keeps the training path untouched.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(step: int, max_steps: int, m: dict[str, float], eta_s: float | None) -> str:
    """One console line for logging step ``step`` from its metrics ``m`` (MLflow keys)."""
    parts = [f"step {step}/{max_steps}"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    for key, unit in (("perf/tokens_per_s", "tokens/s"), ("perf/images_per_s", "images/s")):
        if key in m:
            parts.append(f"{m[key]:,.0f} {unit}")
    if "perf/mfu" in m:
        parts.append(f"MFU {m['perf/mfu']:.2f}")
    if "data/wait_frac" in m:
        parts.append(f"data wait {m['data/wait_frac']:.1%}")
    parts += [f"{k} {v:.4f}" for k, v in sorted(m.items()) if k.startswith(("val/", "probe/"))]
    if eta_s is not None:
        parts.append(f"ETA {_fmt_eta(eta_s)}")
    return "  ".join(parts)


class ProgressPrinter:
    """Polls run ``run_id`` every ``every_s`` seconds and prints a line per new logged step (a daemon thread)."""

    def __init__(self, tracking_uri: str, run_id: str, *, start_step: int, max_steps: int, console: Any,
                 every_s: float = 2.0):
        self.uri, self.run_id, self.start, self.max_steps = tracking_uri, run_id, start_step, max_steps
        self.console, self.every_s = console, every_s
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpt-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last steps

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception:  # a tracking hiccup must never disturb the run; the next poll retries
                continue

    def poll(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        run = client.get_run(self.run_id)
        keys = [k for k in run.data.metrics if k.startswith(("train/loss", "perf/", "data/", "val/", "probe/"))]
        by_step: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in client.get_metric_history(self.run_id, key):
                if m.step > self.start and m.step not in self.seen:
                    by_step.setdefault(m.step, {})[key] = m.value
        for step in sorted(by_step):
            if "train/loss" not in by_step[step] and step != self.max_steps:
                continue  # wait until the step's training metrics are in
            self.seen.add(step)
            done = step - self.start
            elapsed = time.monotonic() - self.t0
            eta = elapsed / done * (self.max_steps - step) if done > 0 else None
            line = progress_line(step, self.max_steps, by_step[step], eta)
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
