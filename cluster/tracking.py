"""MLflow on the driver: resolve the tracking URI, create experiments with an explicit artifact location."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def resolve_tracking_uri(configured: str, override: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the config; relative SQLite paths become absolute
    (Ray workers run in other working directories)."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """An ``http(s)://`` tracking server must answer before anything starts: an unreachable one fails in
    seconds with one line (the MLflow client would retry for minutes); a ``sqlite:///`` store's folder must
    exist (a mistyped path would silently become a new, empty store)."""
    import urllib.error
    import urllib.request

    from trainers.config import ConfigError

    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(
                f"tracking URI {tracking_uri!r}: folder {str(folder)!r} does not exist; fix the path "
                "(tracking.tracking_uri, MLFLOW_TRACKING_URI or --tracking-uri) or create the folder"
            )
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(
            f"MLflow tracking server {tracking_uri!r} does not answer ({getattr(e, 'reason', e)}): start it or fix "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI / --tracking-uri"
        ) from None


def run_tags() -> dict[str, str]:
    """Provenance tags of a new run: the command line and, inside a git checkout, the commit."""
    import subprocess
    import sys

    tags = {"rpt.command": " ".join(sys.argv)[:5000]}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            tags["mlflow.source.git.commit"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def resolve_artifact_root(root: str) -> str:
    if "://" in root:
        return root
    return Path(root).resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str) -> str:
    """The experiment id, creating the experiment with ``artifact_root/name`` as its artifact location."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=f"{resolve_artifact_root(artifact_root)}/{name}")


def ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri}"


@contextlib.contextmanager
def run_status(client, run_id: str) -> Iterator[None]:
    """End MLflow run ``run_id`` honestly: FINISHED, FAILED (the error as the tag ``rpt.error``) or KILLED
    (Ctrl-C, or a stop such as a Tune scheduler's, which raises SystemExit) — never left RUNNING by an exception."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException as e:
        client.set_tag(run_id, "rpt.error", str(e)[:5000] or type(e).__name__)
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def wait_reachable(tracking_uri: str, wait_s: float, every_s: float = 2.0) -> bool:
    """Whether the tracking server answers within ``wait_s`` (polled every ``every_s``); a local store always does."""
    import time

    from trainers.config import ConfigError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_reachable(tracking_uri, timeout_s=min(5.0, max(wait_s, 0.5)))
            return True
        except ConfigError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(every_s)


def replay_unsent(fs, run_dir: str, client, run_id: str) -> int:
    """Log the metric records rank 0 could not send (``unsent-metrics-<run id>-*.jsonl`` in the run folder,
    written by :class:`trainers.metrics.AsyncMlflowSink`) to run ``run_id``, with their original steps and
    times; each file replayed is renamed ``*.replayed``. Returns the number of records replayed."""
    import json

    import pyarrow.fs as pafs
    from mlflow.entities import Metric

    from trainers.metrics import UNSENT_PREFIX

    n = 0
    for info in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        if not (info.base_name.startswith(f"{UNSENT_PREFIX}{run_id}-") and info.base_name.endswith(".jsonl")):
            continue
        with fs.open_input_stream(info.path) as f:
            records = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        metrics = [Metric(k, float(v), r["ts"], r["step"]) for r in records for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i: i + 1000])
        fs.move(info.path, info.path + ".replayed")
        n += len(records)
    return n


def record_metric_stats(fs, run_dir: str, client, run_id: str, replayed: int) -> dict[str, float]:
    """What the fit's metric delivery went through, as run tags ``rpt.metrics.*`` (logged, sent late, longest
    delay, failed attempts, left unsent and replayed): the figures an outage left."""
    import json

    from trainers.metrics import TRACKING_STATS

    path = f"{run_dir}/{TRACKING_STATS}"
    try:
        with fs.open_input_stream(path) as f:
            stats = json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        stats = {}
    stats = {k: v for k, v in stats.items() if k != "run_id"} | {"replayed": replayed}
    for k, v in stats.items():
        client.set_tag(run_id, f"rpt.metrics.{k}", str(round(v, 3) if isinstance(v, float) else v))
    return stats
