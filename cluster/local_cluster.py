"""A multi-process Ray cluster on this machine: one head and one worker node, each its own ``ray start``.

It exists so that the real cluster path (Ray Jobs API on the head's dashboard, a driver that joins
with ``--address``, workers on another raylet) runs on a laptop and in tests, next to any other Ray
instance on the machine:

- every node runs ``ray start --block`` in its own process session, so ``down`` can end exactly this
  cluster's processes (``ray stop`` would kill every Ray process of the machine, other users' too);
- each node gets its own short temp dir (Ray's unix sockets live there and their paths must stay
  under ~107 characters; two nodes sharing one would also share ``runtime_resources``, and the worker
  node's runtime-env agent would delete a job's working dir under the driver on the head) and its own
  free ports for everything Ray would otherwise bind at a fixed
  default (GCS 6379, dashboard 8265, client server 10001, dashboard agent 52365), and random worker
  ports, so it never collides with another instance;
- the dashboard (Jobs API) listens on 127.0.0.1 only; Ray's internal services bind the machine's
  address, as every Ray instance does (Ray resolves 127.0.0.1 to it);
- token authentication stays on (Ray's default for new clusters): the nodes and ``rpt`` read the
  token from ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``), created if missing;
  ``RAY_AUTH_MODE=disabled`` in the environment turns it off.

State (PIDs, addresses, temp dir, logs) is kept in ``STATE_DIR/cluster.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
NODE_IP = "127.0.0.1"
DEFAULT_STATE_DIR = Path(os.environ.get("RPT_CLUSTER_DIR", Path.home() / ".cache" / "ray-pretrain" / "cluster"))


class ClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped as asked."""


@dataclass
class NodeProcess:
    role: str  # "head" | "worker"
    pid: int  # the `ray start --block` process; leader of its own session
    log: str
    num_cpus: int


@dataclass
class LocalCluster:
    state_dir: str
    temp_dir: str  # the head's; the worker node's is worker_temp_dir
    gcs_address: str  # what `ray start --address` / `ray.init(address=...)` take
    dashboard_url: str  # what `rpt submit --address` / JobSubmissionClient take
    nodes: list[NodeProcess] = field(default_factory=list)
    started_at: float = 0.0
    worker_temp_dir: str = ""

    def save(self) -> None:
        path = Path(self.state_dir, STATE_FILE)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: str | Path) -> LocalCluster | None:
        path = Path(state_dir, STATE_FILE)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["nodes"] = [NodeProcess(**n) for n in raw["nodes"]]
        return cls(**raw)

    def processes(self) -> list[int]:
        """PIDs of every live process of this cluster: each node's session and its descendants.

        Ray's job supervisor starts entrypoints in sessions of their own, so the sessions alone
        would miss the drivers of running jobs: the process tree below each node finds them.
        """
        import psutil

        roots = [n.pid for n in self.nodes]
        found: set[int] = set()
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) in roots:
                    found.add(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        for pid in list(found) + roots:
            try:
                found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
                found.add(pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(p for p in found if _alive(p))


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


def _ray_executable() -> list[str]:
    """The `ray` CLI of this interpreter's environment (not whichever `ray` is first on PATH)."""
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def _node_env() -> dict[str, str]:
    """Environment of the node processes, inherited by job entrypoints and workers.

    The venv's bin goes first on PATH: a job's entrypoint says ``python`` and must get this
    interpreter, with the project's dependencies.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_AUTH_MODE", "token")
    # A driver of this process (pytest's session Ray) must not leak its address into the nodes.
    for k in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        env.pop(k, None)
    return env


def _ensure_token() -> None:
    """Create Ray's auth token (``~/.ray/auth_token``) if token auth is on and none exists yet."""
    from cluster.jobs import _token

    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not _token():
        subprocess.run([*_ray_executable(), "get-auth-token", "--generate"], check=True, capture_output=True,
                       env=_node_env())


def _get_json(url: str, timeout_s: float = 2.0):
    from cluster.jobs import auth_headers

    req = urllib.request.Request(url, headers=auth_headers(url))
    with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 (loopback URL we built)
        return json.loads(r.read())


def _alive_nodes(dashboard_url: str) -> int:
    """Nodes the head reports ALIVE (through the state API on the dashboard)."""
    data = _get_json(f"{dashboard_url}/api/v0/nodes?limit=100")
    rows = data.get("data", {}).get("result", {}).get("result", [])
    return sum(1 for r in rows if r.get("state") == "ALIVE")


def up(
    *,
    num_cpus_head: int = 1,
    num_cpus_worker: int = 4,
    dashboard_port: int | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    object_store_mb: int = 256,
    timeout_s: float = 120.0,
) -> LocalCluster:
    """Start a head (with dashboard and Jobs API) and one worker node; wait until both are ALIVE.

    ``num_cpus_*`` are logical CPUs: above the physical count is fine and, on 2 cores, needed (train
    workers plus Ray Data's readers). Raises :class:`ClusterError` if a cluster of this state dir is
    already running or the nodes do not come up within ``timeout_s`` (then everything started is
    stopped again).
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _refuse_if_running(state_dir)
    # Short on purpose: the session folder + socket names must fit in a unix socket path.
    temp_dir = tempfile.mkdtemp(prefix="rpt-ray-", dir="/tmp")
    worker_temp_dir = tempfile.mkdtemp(prefix="rpt-ray-w-", dir="/tmp")
    gcs_port = _free_port()
    dash_port = dashboard_port or _free_port()
    cluster = LocalCluster(
        state_dir=str(state_dir),
        temp_dir=temp_dir,
        worker_temp_dir=worker_temp_dir,
        gcs_address=f"{NODE_IP}:{gcs_port}",
        dashboard_url=f"http://{NODE_IP}:{dash_port}",
        started_at=time.time(),
    )
    common = _common_node_args(object_store_mb)
    head = _head_node_args(gcs_port, dash_port, num_cpus_head, temp_dir)
    _ensure_token()
    try:
        _start_nodes(cluster, head, common, num_cpus_head, num_cpus_worker, timeout_s)
    except BaseException:
        _stop(cluster, timeout_s=30)
        _forget(cluster)
        raise
    log.info("local cluster up: dashboard %s, GCS %s, temp dir %s",
             cluster.dashboard_url, cluster.gcs_address, temp_dir)
    return cluster


def _refuse_if_running(state_dir: Path) -> None:
    """Raise :class:`ClusterError` if the cluster recorded in ``state_dir`` still has live processes."""
    existing = LocalCluster.load(state_dir)
    if existing is not None and existing.processes():
        raise ClusterError(
            f"a local cluster is already running from {state_dir} (dashboard {existing.dashboard_url}); "
            "run `rpt cluster down` first or pass another --state-dir"
        )


def _common_node_args(object_store_mb: int) -> list[str]:
    """`ray start` flags of both nodes: blocking, no usage stats, random worker ports, object store size."""
    return [
        "--block",
        "--disable-usage-stats",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
    ]


def _head_node_args(gcs_port: int, dash_port: int, num_cpus: int, temp_dir: str) -> list[str]:
    """`ray start` flags of the head: GCS and dashboard ports, free ports for everything else Ray binds."""
    return [
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        f"--dashboard-host={NODE_IP}",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
    ]


def _worker_node_args(cluster: LocalCluster, num_cpus: int) -> list[str]:
    """`ray start` flags of the worker node: join the head's GCS, with its own agent port and temp dir."""
    return [
        f"--address={cluster.gcs_address}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={cluster.worker_temp_dir}",
    ]


def _start_nodes(
    cluster: LocalCluster,
    head: list[str],
    common: list[str],
    num_cpus_head: int,
    num_cpus_worker: int,
    timeout_s: float,
) -> None:
    """Start the head, wait for its dashboard, then the worker node; return once both are ALIVE and the
    Jobs API answers. Each node is recorded in the state file as soon as it is started."""
    url = cluster.dashboard_url
    cluster.nodes.append(_start_node(cluster, "head", head + common, num_cpus_head))
    cluster.save()
    _wait(lambda: _get_json(f"{url}/api/version") is not None, cluster, "the head's dashboard", timeout_s)
    worker = _worker_node_args(cluster, num_cpus_worker)
    cluster.nodes.append(_start_node(cluster, "worker", worker + common, num_cpus_worker))
    cluster.save()
    _wait(lambda: _alive_nodes(url) >= 2 or None, cluster, "the worker node", timeout_s)
    # The Jobs API answers once the job module is loaded (it can lag the version endpoint).
    _wait(lambda: _get_json(f"{url}/api/jobs/") is not None, cluster, "the Jobs API", timeout_s)


def _start_node(cluster: LocalCluster, role: str, args: list[str], num_cpus: int) -> NodeProcess:
    log_path = Path(cluster.state_dir, f"{role}.log")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [*_ray_executable(), "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_node_env(),
            cwd=cluster.state_dir,
            start_new_session=True,  # its own session: `down` ends exactly this node's processes
        )
    return NodeProcess(role=role, pid=proc.pid, log=str(log_path), num_cpus=num_cpus)


def _wait(probe, cluster: LocalCluster, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if not _alive(node.pid):
                raise ClusterError(f"the {node.role} node exited while waiting for {what}; see {node.log}:\n"
                                   + _tail(node.log))
        try:
            if probe():
                return
        except Exception as e:  # connection refused / 404 until the server is up
            last = e
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout_s:.0f} s (last error: {last}); logs in {cluster.state_dir}")


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def status(state_dir: str | Path = DEFAULT_STATE_DIR) -> dict:
    """What is recorded in ``state_dir`` and what of it is alive (nodes, Jobs API, process count)."""
    cluster = LocalCluster.load(Path(state_dir).resolve())
    if cluster is None:
        return {"running": False, "state_dir": str(Path(state_dir).resolve())}
    nodes = [{**asdict(n), "alive": _alive(n.pid)} for n in cluster.nodes]
    try:
        alive_nodes = _alive_nodes(cluster.dashboard_url)
        jobs_api = True
    except Exception:
        alive_nodes, jobs_api = None, False
    procs = cluster.processes()
    return {
        "running": bool(procs),
        "state_dir": cluster.state_dir,
        "dashboard_url": cluster.dashboard_url,
        "gcs_address": cluster.gcs_address,
        "temp_dir": cluster.temp_dir,
        "worker_temp_dir": cluster.worker_temp_dir,
        "nodes": nodes,
        "ray_nodes_alive": alive_nodes,
        "jobs_api": jobs_api,
        "processes": len(procs),
    }


def down(state_dir: str | Path = DEFAULT_STATE_DIR, *, timeout_s: float = 30.0) -> list[int]:
    """Stop the cluster recorded in ``state_dir`` and only it; returns the PIDs that were ended.

    Each ``ray start --block`` is asked to stop first (SIGTERM: it shuts its node down, as ``ray
    stop`` would, but for that node only); whatever of the cluster's process tree is left after
    ``timeout_s`` is killed. Raises :class:`ClusterError` if a process survives even SIGKILL.
    """
    cluster = LocalCluster.load(Path(state_dir).resolve())
    if cluster is None:
        return []
    ended = _stop(cluster, timeout_s=timeout_s)
    _forget(cluster)
    return ended


def _forget(cluster: LocalCluster) -> None:
    """Remove the state file and the nodes' temp dirs (sessions, logs, sockets): nothing runs there now."""
    Path(cluster.state_dir, STATE_FILE).unlink(missing_ok=True)
    for d in (cluster.temp_dir, cluster.worker_temp_dir):
        if d:
            shutil.rmtree(d, ignore_errors=True)


def _stop(cluster: LocalCluster, *, timeout_s: float) -> list[int]:
    targets = cluster.processes()  # collected before anything dies: orphans leave the tree
    if not targets:
        return []
    # Worker node first: its raylet would otherwise spin reconnecting to a vanished GCS.
    for node in sorted(cluster.nodes, key=lambda n: n.role != "worker"):
        _signal(node.pid, signal.SIGTERM)
        _wait_gone([node.pid], timeout_s / 2)
    left = [p for p in targets if _alive(p)]
    for pid in left:
        _signal(pid, signal.SIGTERM)
    left = _wait_gone(left, 5.0)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    left = _wait_gone(left, 5.0)
    # Anything that a dying node started after the first snapshot.
    late = [p for p in cluster.processes() if p not in targets]
    for pid in late:
        _signal(pid, signal.SIGKILL)
    left += _wait_gone(late, 5.0)
    if left:
        raise ClusterError(f"processes of the local cluster survived SIGKILL: {left}")
    with_children = set(targets) | set(late)
    for pid in with_children:  # reap our own direct children (the `ray start` processes)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return sorted(with_children)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        for pid in left:  # our own children turn into zombies until reaped
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    return left
