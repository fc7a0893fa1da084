"""Ray processes of one node of a SLURM job, started and stopped by that node's task.

``launcher.slurm.jobs.RaySweepJob`` runs a task per node: the first starts the head, the
others start workers that join it (``ray_node``), and each stops only what it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RayNode:
    """This task's ``ray start --block``: the Ray processes of one node, and only those.

    ``ray stop`` would stop every Ray instance of the machine, other users' and, on a test cluster
    whose nodes share a machine, the other nodes'. A blocking ``ray start`` instead owns its
    processes: SIGTERM makes it stop them all, and they die with it if it is killed.
    """

    def __init__(self, process: subprocess.Popen, address: str, temp_dir: Path) -> None:
        self.process, self.address, self.temp_dir = process, address, temp_dir

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("ray start did not stop its node in %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def use_cluster_token(token: str) -> None:
    """Token authentication with the job's own token, for this process and the Ray processes it starts.

    Ray turns token authentication on for a head whenever ``~/.ray/auth_token`` exists, while
    nodes that join read the mode from the environment only: without this, they would be refused.
    """
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)


def ray_temp_dir(name: str) -> Path:
    """A node-local Ray temp dir of its own (short: Ray's socket paths are length-limited)."""
    return Path(os.environ.get("RAY_TMPDIR") or "/tmp") / f"ray-{name}"


def _free_ports(host: str, count: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # all bound at once, so they differ
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def start_ray_node(
    temp_dir: Path,
    head_address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    timeout_s: float = 300.0,
) -> RayNode:
    """Start the head (``head_address`` None) or a worker joining it; return once it runs.

    Several nodes may share one machine and network stack (the local test cluster): each has
    its own temp dir, and every port but the head's is picked free by the OS.
    """
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--block",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--node-manager-port",
        "0",
        "--object-manager-port",
        "0",
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--dashboard-agent-listen-port",
        "0",
    ]
    if head_address is None:
        # The address the other nodes reach this one at: its hostname resolved, as in Ray's
        # SLURM recipe. Ray's CLI replaces a loopback address (the local test cluster's) by the
        # machine's own; GCS and raylet listen on every interface anyway, hence the token.
        # Workers find their address by the route to the head.
        ip = socket.gethostbyname(socket.gethostname())
        port, dashboard_port, client_port = _free_ports(ip, 3)
        command += [
            "--head",
            "--node-ip-address",
            ip,
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(client_port),
        ]
        address = f"{ip}:{port}"
    else:
        command += ["--address", head_address]
        address = head_address
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    # Trials keep the job's working directory, on every node: relative data paths resolve alike.
    # A node is stopped only once the sweep is over: nothing to drain (Ray waits up to 30 s).
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    log.info("starting a Ray %s node: %s", "head" if head_address is None else "worker", " ".join(command))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    node = RayNode(process, address, temp_dir)
    ready = temp_dir / "ray_current_cluster"  # ray start writes it once its node runs
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if not node.alive():
            node.stop()
            raise RuntimeError(
                f"`ray start` exited with code {process.returncode} before its node ran; "
                f"its output is in this task's log"
            )
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"the Ray node did not start in {timeout_s:.0f} s; see this task's log")
        time.sleep(0.5)
    log.info("Ray %s node running (cluster %s)", "head" if head_address is None else "worker", address)
    return node


@contextlib.contextmanager
def ray_node(
    temp_dir: Path, head_address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None
) -> Iterator[RayNode]:
    """A Ray node of this task (see ``start_ray_node``), stopped on leaving, however we leave."""
    node = start_ray_node(temp_dir, head_address, num_cpus, num_gpus)
    try:
        yield node
    finally:
        node.stop()
        log.info("stopped the Ray node of this task")


def wait_for_nodes(num_nodes: int, timeout_s: float) -> list[dict[str, Any]]:
    """Wait until the connected Ray cluster has ``num_nodes`` live nodes; describe them."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= num_nodes:
            return [
                {
                    "hostname": n["NodeManagerHostname"],
                    "address": n["NodeManagerAddress"],
                    "cpus": n["Resources"].get("CPU", 0.0),
                    "gpus": n["Resources"].get("GPU", 0.0),
                }
                for n in alive
            ]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(alive)} of {num_nodes} Ray nodes joined the cluster in "
                f"{timeout_s:.0f} s; the logs of the job's other tasks say why"
            )
        time.sleep(1.0)
