"""``rpt submit``, ``rpt jobs ...`` and ``rpt cluster ...``: running on a Ray cluster instead of in-process.

cluster/cli.py adds them to the ``rpt`` app with :func:`register`; this module does not import it.
Thin, like cluster/cli.py: parse, call one function of cluster/jobs.py or cluster/local_cluster.py, print.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer
from rich.console import Console

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (Ray Jobs API).")
cluster_app = typer.Typer(no_args_is_help=True, help="A local multi-process Ray cluster on this machine.")
console = Console()
err = Console(stderr=True)

ADDRESS_HELP = ("dashboard URL of the head, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                "else the cluster of `rpt cluster up`)")
ADDRESS = typer.Option(None, "--address", help=ADDRESS_HELP)
STATE_DIR = typer.Option(None, "--state-dir", help="where `rpt cluster` keeps its state (default ~/.cache/ray-pretrain/cluster)")


def _fail(e: BaseException | str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _state_dir(state_dir: str | None) -> Path:
    from cluster.local_cluster import DEFAULT_STATE_DIR

    return Path(state_dir) if state_dir else DEFAULT_STATE_DIR


def _address(address: str | None, state_dir: str | None = None) -> str:
    if address:
        return address
    env = os.environ.get("RAY_API_SERVER_ADDRESS")
    if env:
        return env
    from cluster.local_cluster import LocalCluster

    local = LocalCluster.load(_state_dir(state_dir).resolve())
    if local is not None and local.processes():
        return local.dashboard_url
    _fail("no --address given, RAY_API_SERVER_ADDRESS is unset and no `rpt cluster up` cluster is running")
    return ""  # unreachable


def check_train_config(config: str, overrides: list[str]) -> list[str]:
    """Load the train config here (a bad config fails before anything is shipped) and list what cannot
    work in a job: paths relative to the job's working dir, which is a fresh copy of the repository on
    the head without prepared data or results."""
    from cluster.config import load_config
    from data.location import is_uri

    cfg = load_config(config, overrides)
    problems = []
    folders = {"data.path": cfg.data.path} if cfg.data.path else {
        f"data.sources[{i}].path": s.path for i, s in enumerate(cfg.data.sources)}
    for field, path in folders.items():
        if not is_uri(path) and not Path(path).is_absolute():
            problems.append(f"{field}={path!r} is relative: prepared data is not shipped with the job; "
                            "use a path every node sees (shared volume) or an object store, e.g. "
                            "data.path=/mnt/shared/data/... or s3://BUCKET/data/...")
    if "://" not in cfg.storage_path and not Path(cfg.storage_path).is_absolute():
        problems.append(f"storage_path={cfg.storage_path!r} is relative: checkpoints would stay in the job's "
                        "temporary working dir; use a shared path or s3://BUCKET/PREFIX")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(f"tracking URI {uri!r} is a relative SQLite file: export MLFLOW_TRACKING_URI=http://MLFLOW:5000 "
                        "(or an absolute sqlite:////path on shared storage) before submitting")
    root = cfg.tracking.artifact_root
    if "://" not in root and not Path(root).is_absolute():
        problems.append(f"tracking.artifact_root={root!r} is relative: set it to a shared path, s3://... or "
                        "mlflow-artifacts://MLFLOW:5000/experiments")
    return problems


def submit(
    config: str = typer.Argument(..., help="run config, inside the repository (it is shipped as the working dir)"),
    overrides: list[str] | None = typer.Argument(None, help="dotted overrides, e.g. trainer.max_steps=50"),
    address: str | None = ADDRESS,
    command: str = typer.Option("train", help="rpt command the job runs: train | tune | continual"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream the logs; the exit code is the job's (0: SUCCEEDED)"),
    env: list[str] | None = typer.Option(None, "--env", help="NAME of an extra environment variable to pass (value read from here)"),
    image: str | None = typer.Option(None, help="container image for the job (runtime_env image_uri)"),
    pip: list[str] | None = typer.Option(None, "--pip", help="pip requirement, or one requirements file, installed for the job"),
    entrypoint_num_cpus: float | None = typer.Option(None, help="CPUs reserved for the driver process"),
    entrypoint_num_gpus: float | None = typer.Option(None, help="GPUs reserved for the driver process"),
    working_dir: str | None = typer.Option(None, help="folder shipped as the job's working dir (default: the repository)"),
    submission_id: str | None = typer.Option(None, help="job id to use (default: rpt-COMMAND-CONFIG-TIME-RANDOM)"),
    dry_run: bool = typer.Option(False, help="print what would be submitted and stop"),
) -> None:
    """Submit CONFIG as a Ray job: `python -m cluster.cli COMMAND CONFIG OVERRIDES --address auto` on the head."""
    from cluster import jobs
    from cluster.config import ConfigError

    overrides = overrides or []
    if command == "train":
        try:
            problems = check_train_config(config, overrides)
        except ConfigError as e:
            _fail(e)
        if problems:
            _fail("the config cannot run as a cluster job:\n  - " + "\n  - ".join(problems))
    try:
        sub = jobs.build_submission(
            config, overrides, command=command, env=env or [], image=image, pip=pip or [], working_dir=working_dir,
            entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
            submission_id=submission_id,
        )
    except jobs.JobError as e:
        _fail(e)
    if dry_run:
        typer.echo(repr(sub))
        return
    addr = _address(address)
    try:
        job_id = jobs.submit(addr, sub)
    except jobs.JobError as e:
        _fail(e)
    console.print(f"submitted [bold]{job_id}[/] to {addr}  (env passed: {', '.join(sub.env_names) or 'none'})")
    if not follow:
        console.print(f"follow: rpt jobs logs {job_id} --follow --address {addr}")
        return
    try:
        status = jobs.follow(addr, job_id)
    except KeyboardInterrupt:
        err.print(f"stopped following; the job goes on (rpt jobs stop {job_id} --address {addr})", highlight=False)
        raise typer.Exit(130) from None
    code = jobs.exit_code(status)
    (console if code == 0 else err).print(f"job {job_id}: [bold]{status}[/]")
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: str | None = ADDRESS, as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs of the cluster, newest first."""
    from cluster import jobs

    try:
        rows = jobs.list_jobs(_address(address))
    except jobs.JobError as e:
        _fail(e)
    if as_json:  # plain: rich would wrap long strings at the console width
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['submission_id'] or r['job_id']:<48} {r['status']:<10} {r['entrypoint'] or ''}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: str | None = ADDRESS,
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit code is the job's"),
) -> None:
    """Print a job's logs (driver stdout/stderr)."""
    from cluster import jobs

    addr = _address(address)
    try:
        if follow:
            raise typer.Exit(jobs.exit_code(jobs.follow(addr, job_id)))
        typer.echo(jobs.job_logs(addr, job_id), nl=False)
    except jobs.JobError as e:
        _fail(e)


@jobs_app.command("status")
def jobs_status(job_id: str, address: str | None = ADDRESS) -> None:
    """A job's status; exit code 1 FAILED, 3 STOPPED, else 0 (SUCCEEDED, or not finished yet)."""
    from cluster import jobs

    try:
        status = jobs.job_status(_address(address), job_id)
    except jobs.JobError as e:
        _fail(e)
    console.print(status)
    raise typer.Exit(jobs.exit_code(status) if status in jobs.EXIT_CODES else 0)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str | None = ADDRESS) -> None:
    """Stop a job (its driver gets SIGTERM, then SIGKILL) and print its final status."""
    from cluster import jobs

    try:
        console.print(jobs.stop_job(_address(address), job_id))
    except jobs.JobError as e:
        _fail(e)


@cluster_app.command("up")
def cluster_up(
    num_cpus_head: int = typer.Option(1, help="logical CPUs of the head (job drivers run there)"),
    num_cpus_worker: int = typer.Option(4, help="logical CPUs of the worker node (train workers, Ray Data)"),
    dashboard_port: int | None = typer.Option(None, help="default: a free port"),
    object_store_mb: int = typer.Option(256, help="object store per node"),
    state_dir: str | None = STATE_DIR,
) -> None:
    """Start a head (dashboard + Jobs API) and a worker node as separate `ray start` processes."""
    from cluster import local_cluster

    try:
        c = local_cluster.up(num_cpus_head=num_cpus_head, num_cpus_worker=num_cpus_worker,
                             dashboard_port=dashboard_port, state_dir=_state_dir(state_dir),
                             object_store_mb=object_store_mb)
    except local_cluster.ClusterError as e:
        _fail(e, 1)
    console.print(f"[bold green]up[/]  dashboard / Jobs API: {c.dashboard_url}   GCS: {c.gcs_address}")
    console.print(f"submit: rpt submit configs/debug-lm.yaml data.path=$PWD/data/prepared/pydoc-64 "
                  f"storage_path=$PWD/results --address {c.dashboard_url}", highlight=False, markup=False)
    console.print(f"stop:   rpt cluster down{' --state-dir ' + state_dir if state_dir else ''}", highlight=False)


@cluster_app.command("status")
def cluster_status(state_dir: str | None = STATE_DIR) -> None:
    """What runs of the local cluster (JSON); exit code 1 when it is not running."""
    from cluster import local_cluster

    st = local_cluster.status(_state_dir(state_dir))
    typer.echo(json.dumps(st, indent=2))
    raise typer.Exit(0 if st["running"] else 1)


@cluster_app.command("down")
def cluster_down(state_dir: str | None = STATE_DIR) -> None:
    """Stop the local cluster's processes (only those: other Ray instances on this machine stay)."""
    from cluster import local_cluster

    try:
        ended = local_cluster.down(_state_dir(state_dir))
    except local_cluster.ClusterError as e:
        _fail(e, 1)
    console.print(f"down: {len(ended)} processes ended" if ended else "no local cluster was running")


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``jobs`` and ``cluster`` to the main ``rpt`` app (once; calling it again is a no-op)."""
    if any(c.name == "submit" for c in app.registered_commands):
        return
    app.command("submit")(submit)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(cluster_app, name="cluster")


def main() -> None:
    """``python -m cluster.cli_ops submit|jobs|cluster ...``: these commands alone, as ``rpt`` runs them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="ray-pretrain on a Ray cluster: submit, jobs, cluster (`rpt` has every command).")
    register(app)
    app()


if __name__ == "__main__":
    main()
