"""Ray Jobs: submit an ``rpt`` command to a running Ray cluster, follow it, list, read logs, stop.

A submission ships the repository as the job's ``working_dir`` (code and configs, not venvs, prepared
data or results), so ``python -m cluster.cli`` runs the same code on the head as here. Settings the
job needs from this machine (MLflow tracking URI, object-store credentials) travel as environment
variables of the job's ``runtime_env``: their values are read from the submitter's environment at
submission time and never written into a file. Ray keeps a job's runtime_env in the cluster's job
table, visible to whoever can read the dashboard/Jobs API of that cluster: on shared clusters give
secrets to the pods instead (Kubernetes Secrets, see docs/kubernetes.md) and pass only their names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "tune", "continual")
# gitignore-style patterns, relative to the working dir. Ray also honours .gitignore/.rayignore;
# these hold even in a checkout without them.
EXCLUDES = [
    ".venv/", "venv/", ".git/", "**/__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", "*.egg-info/",
    "data/prepared/", "results/", "mlartifacts/", "mlruns/", "*.db", "benchmarks/results/", "artifacts/", "k8s/schemas/",
]
# Passed through when set in the submitter's environment.
PASSTHROUGH_NAMES = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_INSECURE_TLS",
)
PASSTHROUGH_PREFIXES = ("AWS_",)
# A job's exit code: 0 only for SUCCEEDED.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
EXIT_OTHER = 4


class JobError(RuntimeError):
    """A submission that cannot be made as asked (names the setting and the fix)."""


# --- authentication ---------------------------------------------------------------------------
def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(address: str) -> dict[str, str]:
    """The bearer-token header for a Ray cluster with token authentication (Ray >= 2.5x default).

    The token (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) is sent when
    ``RAY_AUTH_MODE=token`` or a token variable is set, and to a head on this machine (loopback: the
    local cluster of ``rpt cluster up`` shares the token file). It is never sent elsewhere unasked.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    token = _token()
    if not token:
        return {}
    explicit = mode == "token" or "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
    if explicit or _is_loopback(address):
        return {"Authorization": f"Bearer {token}"}
    return {}


def client(address: str):
    """A ``JobSubmissionClient`` for the head's dashboard address (``http://HEAD:8265``)."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address!r}: expected the dashboard URL of the head, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address, headers=auth_headers(address))
    except (ConnectionError, RuntimeError) as e:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


# --- submission -------------------------------------------------------------------------------
@dataclass
class Submission:
    """What ``submit`` sends (without the values of the environment variables in ``repr``)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    env_names: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        env = {k: "<from environment>" for k in self.runtime_env.get("env_vars", {})}
        shown = {**self.runtime_env, "env_vars": env}
        return f"Submission(id={self.submission_id!r}, entrypoint={self.entrypoint!r}, runtime_env={shown!r})"


def _reserved_env() -> set[str]:
    """Variables the driver itself puts into its ``ray.init`` runtime_env (cluster/ray_env.py): Ray
    refuses a job whose runtime_env sets the same keys, so they may not be passed through."""
    from cluster.ray_env import WORKER_ENV

    return {*WORKER_ENV, "DS_ACCELERATOR"}


def collect_env(names: Sequence[str] = (), *, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The job's env_vars: the pass-through set present in ``environ`` plus ``names`` (which must be set)."""
    environ = dict(os.environ if environ is None else environ)
    reserved = _reserved_env()
    out = {k: v for k, v in environ.items()
           if (k in PASSTHROUGH_NAMES or k.startswith(PASSTHROUGH_PREFIXES)) and k not in reserved}
    for name in names:
        if "=" in name:
            raise JobError(
                f"--env {name.split('=', 1)[0]}=...: pass the variable's name only; its value is read from your "
                "environment (values on the command line end up in shell history)"
            )
        if name in reserved:
            raise JobError(f"--env {name}: set by the job's driver itself (cluster/ray_env.py), not passed through")
        if name not in environ:
            raise JobError(f"--env {name}: not set in this environment; export it first")
        out[name] = environ[name]
    return out


def _config_arg(config: str, working_dir: Path) -> str:
    """The config path as the job sees it: relative to the working dir (the job runs inside it)."""
    path = Path(config).resolve()
    try:
        return path.relative_to(working_dir).as_posix()
    except ValueError:
        raise JobError(
            f"config {config!r} is outside the shipped working dir {working_dir}: the job cannot read it. "
            "Put it under configs/ (or pass --working-dir)"
        ) from None


def build_submission(
    config: str,
    overrides: Sequence[str] = (),
    *,
    command: str = "train",
    env: Sequence[str] = (),
    image: str | None = None,
    pip: Sequence[str] = (),
    working_dir: str | Path | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    submission_id: str | None = None,
    extra_args: Sequence[str] = (),
) -> Submission:
    """Everything ``submit`` sends, built and checked locally (nothing is contacted)."""
    if command not in COMMANDS:
        raise JobError(f"--command {command!r}: allowed {list(COMMANDS)}")
    if image and pip:
        raise JobError("--image and --pip exclude each other: a container image brings its own packages")
    wd = Path(working_dir).resolve() if working_dir else REPO_ROOT
    if not (wd / "cluster" / "cli.py").is_file():
        raise JobError(f"working dir {wd} holds no cluster/cli.py: pass the repository root as --working-dir")
    cfg_arg = _config_arg(config, wd)
    # --address auto: inside a job RAY_ADDRESS points at the cluster; the driver joins it instead of
    # starting a local instance.
    argv = ["python", "-m", "cluster.cli", command, cfg_arg, *overrides, "--address", "auto", *extra_args]
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    env_vars = collect_env(env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if image:
        runtime_env["image_uri"] = image
    if pip:
        one_file = len(pip) == 1 and Path(pip[0]).is_file()
        runtime_env["pip"] = str(Path(pip[0]).resolve()) if one_file else list(pip)
    run = Path(config).stem
    sid = submission_id or f"rpt-{command}-{run}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return Submission(
        entrypoint=shlex.join(argv),
        runtime_env=runtime_env,
        metadata={"rpt.command": command, "rpt.config": cfg_arg, "rpt.overrides": " ".join(overrides)[:500]},
        submission_id=sid,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        env_names=sorted(env_vars),
    )


def submit(address: str, submission: Submission) -> str:
    """Submit; returns the submission id."""
    c = client(address)
    return c.submit_job(
        entrypoint=submission.entrypoint,
        runtime_env=submission.runtime_env,
        metadata=submission.metadata,
        submission_id=submission.submission_id,
        entrypoint_num_cpus=submission.entrypoint_num_cpus,
        entrypoint_num_gpus=submission.entrypoint_num_gpus,
    )


# --- following and the rest -------------------------------------------------------------------
def exit_code(status: str) -> int:
    return EXIT_CODES.get(str(status), EXIT_OTHER)


def wait(address: str, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Block until the job is in a terminal state; returns the status name."""
    from ray.job_submission import JobStatus

    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = c.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            return str(status.value)
        time.sleep(poll_s)


def follow(address: str, job_id: str, *, out: TextIO = sys.stdout, timeout_s: float | None = None) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its final status name.

    The log stream is a websocket on the head; if it drops (head restart, proxy timeout), the rest of
    the log is fetched once the job has ended, so nothing is lost from ``out``.
    """
    c = client(address)
    written = 0

    async def _tail() -> None:
        nonlocal written
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout=timeout_s))
    except (RuntimeError, OSError, asyncio.TimeoutError) as e:
        log.warning("log stream of %s ended early (%s); waiting for the job to finish", job_id, e)
    status = wait(address, job_id, timeout_s=timeout_s)
    if written == 0 or status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        return status
    rest = c.get_job_logs(job_id)
    if len(rest) > written:  # the stream ended before the last lines
        out.write(rest[written:])
        out.flush()
    return status


def list_jobs(address: str) -> list[dict[str, Any]]:
    """Every job the cluster knows (newest first), as plain dicts."""
    rows = []
    for j in client(address).list_jobs():
        rows.append({
            "submission_id": j.submission_id,
            "job_id": j.job_id,
            "status": str(j.status.value if hasattr(j.status, "value") else j.status),
            "entrypoint": j.entrypoint,
            "start_time": j.start_time,
            "end_time": j.end_time,
            "message": j.message,
            "metadata": dict(j.metadata or {}),
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def job_logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def job_status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def stop_job(address: str, job_id: str, *, wait_s: float = 30.0) -> str:
    """Ask the job to stop (SIGTERM to its driver, then SIGKILL); returns the status after ``wait_s``."""
    client(address).stop_job(job_id)
    return wait(address, job_id, timeout_s=wait_s)
