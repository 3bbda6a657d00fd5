"""A live progress line per logging step on the driver's console (and live metrics for Ray Tune), read
from the run's MLflow metrics.

Rank 0 logs ``train/loss``, throughput, MFU and data wait to MLflow at every logging step; a thread on the
driver polls them and prints ``step 40/300  loss 6.12  4,590 tokens/s  MFU 0.54  data wait 0.2%  ETA 4m10s``
(and the validation metrics at evaluation steps). Polling keeps the training path untouched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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


TRAIN_KEYS = ("train/loss", "perf/", "data/")
EVAL_KEYS = ("val/", "probe/")


class RunWatcher:
    """Polls run ``run_id`` every ``every_s`` seconds (a daemon thread) and hands each logging step's newly
    arrived metrics to ``on_step(step, metrics)``: the training metrics of a step once its ``train/loss`` is
    in, its evaluation metrics (``val/``, ``probe/``) once they are in (one ``log_batch``), each once. With
    a ``rich`` ``console`` it also prints a progress line per delivery; ``on_step`` is how ``rpt tune``
    reports every evaluation to Tune while the fit runs."""

    def __init__(self, tracking_uri: str, run_id: str, *, start_step: int, max_steps: int, console: Any = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None, every_s: float = 2.0):
        self.uri, self.run_id, self.start, self.max_steps = tracking_uri, run_id, start_step, max_steps
        self.console, self.on_step, self.every_s = console, on_step, every_s
        self.delivered: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpt-progress", daemon=True)

    def __enter__(self) -> RunWatcher:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        from cluster.tracking import wait_reachable

        self._stop.set()
        self._thread.join(timeout=10)
        if exc[0] is None and wait_reachable(self.uri, 0):
            try:
                self.poll()  # the last steps
            except Exception:  # the console line is a convenience; never fail a finished fit over it
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception:  # a tracking hiccup must never disturb the run; the next poll retries
                continue

    def _fetch(self) -> dict[int, dict[str, float]]:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        keys = [k for k in client.get_run(self.run_id).data.metrics if k.startswith(TRAIN_KEYS + EVAL_KEYS)]
        by_step: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in client.get_metric_history(self.run_id, key):
                if m.step > self.start and key not in self.delivered.get(m.step, ()):
                    by_step.setdefault(m.step, {})[key] = m.value
        return by_step

    def poll(self) -> None:
        with self._lock:  # the thread's poll and the final one never interleave
            by_step = self._fetch()
            for step in sorted(by_step):
                new = by_step[step]
                train = {k: v for k, v in new.items() if k.startswith(TRAIN_KEYS)}
                if "train/loss" not in train:
                    train = {}  # wait until the step's training metrics are in
                evals = {k: v for k, v in new.items() if k.startswith(EVAL_KEYS)}
                ready = {**train, **evals}
                if ready:
                    self.delivered.setdefault(step, set()).update(ready)
                    self._deliver(step, ready)

    def _deliver(self, step: int, metrics: dict[str, float]) -> None:
        if self.console is not None:
            done = step - self.start
            elapsed = time.monotonic() - self.t0
            eta = elapsed / done * (self.max_steps - step) if done > 0 else None
            line = progress_line(step, self.max_steps, metrics, eta)
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        if self.on_step is not None:
            self.on_step(step, metrics)
