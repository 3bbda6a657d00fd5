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
