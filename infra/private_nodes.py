"""Ray nodes that share no disk: ``ray start`` in private mount namespaces, on one machine.

A cluster from :func:`private_cluster` is a head (no CPUs) and ``workers`` worker nodes. Each
node is started by ``unshare -m --propagation private sh -c '<mounts>; exec ray start …'``, so
the raylet and every worker it forks live in the node's own mount namespace, where fresh
tmpfs mounts cover:

- the node's private area, holding its ``HOME`` and its ``LORAFLEET_HOME``;
- ``/tmp`` (``private_tmp``), except Ray's ``--temp-dir``, bound back in: a driver on this
  machine reaches a node through the unix sockets Ray keeps there, as every node does;
- ``/dev/shm`` (``private_shm``): what one node maps there (plasma's pages, lorafleet's
  shared frozen base) no other node sees. A driver outside still puts and gets large objects
  (``ray.put``/``ray.get``): plasma hands its clients file descriptors over a unix socket,
  never a path;
- every directory in ``hide`` (the client's working directory: files no node may read).

So nodes share what separate machines share — the catalog and object store servers on
loopback ports — plus Ray's temp dir (Ray's own business) and the read-only code and
virtualenv. A path one node (or the client) wrote is not there for another: code that passes
paths between nodes fails here as it would on a real cluster.

A node's processes are those in its mount namespace, recognised by the tmpfs it mounts
(source ``lorafleet:<cluster>:<name>``, in ``/proc/<pid>/mountinfo``); they also inherit the
environment markers ``LORAFLEET_CLUSTER=<cluster>`` and ``LORAFLEET_NODE=<cluster>-<name>``, but
those alone miss processes: Ray's agents and workers ``setproctitle``, which overwrites the
start of their ``/proc/<pid>/environ``. Teardown signals only this cluster's processes
(``ray stop`` would stop every Ray on the machine); :func:`kill_node` SIGKILLs one node's, as
when a machine dies. Needs root (or CAP_SYS_ADMIN) and util-linux ``unshare``/``mount``;
:func:`can_isolate` says whether this machine allows it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from infra.servers import free_port, free_ports, processes_with_env, wait_until

NODE_MARKER = "LORAFLEET_NODE"  # <cluster>-<name>, in the environment of one node's processes
CLUSTER_MARKER = "LORAFLEET_CLUSTER"  # <cluster>, in the environment of every node's processes
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 2.0  # after SIGTERM; gcs_server and raylets can take longer, rarely worth it
_CLUSTER_ID = re.compile(r"[0-9A-Za-z_]{1,64}")


@dataclass(frozen=True)
class PrivateNode:
    """One node of a private cluster.

    Attributes:
        name: ``head``, ``node-1``, ``node-2``, …
        home: its ``LORAFLEET_HOME``, on its private tmpfs (absent outside the node).
        marker: ``LORAFLEET_NODE=<cluster>-<name>``, in the environment its processes inherit.
        node_manager_port: its raylet's port, as ``ray.nodes()`` reports it
            (``NodeManagerPort``): how a driver finds the node's Ray node ID.
        cluster: the id of its cluster.
    """

    name: str
    home: Path
    marker: str
    node_manager_port: int
    cluster: str

    def processes(self) -> list[int]:
        """PIDs of the live processes of this node."""
        return cluster_processes(self.cluster, node=self.name)


@dataclass(frozen=True)
class PrivateCluster:
    """A running private cluster: connect with ``ray.init(address=cluster.address)``."""

    id: str
    address: str  # GCS address, host:port
    head: PrivateNode
    workers: list[PrivateNode]
    temp_dir: Path  # Ray's --temp-dir, shared by every node and the client

    @property
    def nodes(self) -> list[PrivateNode]:
        return [self.head, *self.workers]

    def processes(self) -> list[int]:
        """PIDs of the live processes of every node of this cluster."""
        return cluster_processes(self.id)


def can_isolate() -> bool:
    """Whether this machine lets us mount in a new mount namespace (root, util-linux)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "lf", "/tmp"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def cluster_processes(cluster_id: str, *, node: str | None = None) -> list[int]:
    """PIDs of live processes of the private cluster ``cluster_id`` (or of its ``node``).

    A process belongs to a node if it lives in the node's mount namespace (found by the tmpfs
    source ``lorafleet:<cluster>:<node>`` in its mountinfo) or carries the node's marker.
    """
    marker = f"{NODE_MARKER}={cluster_id}-{node}" if node else f"{CLUSTER_MARKER}={cluster_id}"
    found = set(processes_with_env(marker))
    by_ns: dict[str, list[str]] = defaultdict(list)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            ns = _mount_ns(proc.name)
            if ns is not None:
                by_ns[ns].append(proc.name)
    for members in by_ns.values():
        for source in _tmpfs_sources(members):
            parts = source.split(":")
            if (
                len(parts) == 3
                and parts[:2] == ["lorafleet", cluster_id]
                and node in (None, parts[2])
            ):
                found.update(int(pid) for pid in members)
                break
    return sorted(found)


def ray_node_id(node: PrivateNode) -> str:
    """The Ray node ID of ``node``, from a driver connected to its cluster (``ray.init``).

    Raises:
        LookupError: Ray knows no live node with ``node``'s raylet port.
    """
    import ray

    for info in ray.nodes():
        if info["Alive"] and info["NodeManagerPort"] == node.node_manager_port:
            return str(info["NodeID"])
    raise LookupError(f"no live Ray node for {node.name} (port {node.node_manager_port})")


def node_running(cluster: PrivateCluster, cmdline_part: bytes) -> PrivateNode | None:
    """The first worker node with a live process whose command line contains
    ``cmdline_part`` (e.g. ``b"RayTrainWorker"``: a node that runs a training worker)."""
    for node in cluster.workers:
        for pid in node.processes():
            try:
                if cmdline_part in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return node
            except OSError:  # it exited meanwhile
                continue
    return None


def kill_node(node: PrivateNode, *, timeout_s: float = 30.0) -> None:
    """SIGKILL every process of ``node`` (as when its machine dies); return once none is left.

    Raises:
        TimeoutError: some process of the node is still alive after ``timeout_s``.
    """
    _kill(node.processes, timeout_s=timeout_s, what=node.name)


@contextmanager
def private_cluster(
    env: dict[str, str],
    *,
    workers: int = 2,
    cpus: int = 2,
    hide: Sequence[Path] = (),
    private_tmp: bool = True,
    private_shm: bool = True,
    cluster_id: str | None = None,
) -> Iterator[PrivateCluster]:
    """A head (0 CPUs) and ``workers`` nodes of ``cpus`` CPUs, each in its own mount namespace.

    Args:
        env: environment of every node (``LORAFLEET_*`` settings, ``RAY_*`` config); each node
            gets its own ``HOME``, ``LORAFLEET_HOME`` and markers on top. ``RAY_AUTH_MODE``
            defaults to ``disabled``.
        workers: worker nodes, named ``node-1`` … ``node-<workers>``.
        cpus: CPUs each worker node advertises.
        hide: existing directories that no node may read (each covered by an empty tmpfs).
        private_tmp: give each node its own ``/tmp`` (Ray's temp dir stays shared).
        private_shm: give each node its own ``/dev/shm``.
        cluster_id: letters, digits and ``_``; random by default.

    Yields:
        The running cluster. On exit every process of it is stopped (SIGTERM, then SIGKILL
        after ``STOP_GRACE_S``) and its temp dirs removed.

    Raises:
        ValueError: a ``hide`` entry is not an existing directory or holds Ray's temp dir, or a
            bad ``cluster_id``.
        RuntimeError: a ``ray start`` failed (its output is in the message).
    """
    cluster_id = cluster_id or uuid.uuid4().hex[:12]
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise ValueError(f"cluster_id: {cluster_id!r} is not 1-64 letters, digits or _")
    for path in hide:
        if not Path(path).is_dir():
            raise ValueError(f"hide: {path} is not an existing directory")
    root = Path(tempfile.mkdtemp(prefix="lfnodes-"))  # short: Ray's socket paths live under it
    if any(root.is_relative_to(Path(p).resolve()) for p in hide):
        shutil.rmtree(root)
        raise ValueError(f"hide: would cover Ray's temp dir {root} (under {tempfile.gettempdir()})")
    mounts = _Mounts(root / "ray", [Path(p).resolve() for p in hide], private_tmp, private_shm)
    mounts.ray_temp.mkdir()
    port = free_port()
    try:
        start = _Starter(env, root, cluster_id, mounts, port)
        head = start.nodes([("head", 0)])[0]
        yield PrivateCluster(
            id=cluster_id,
            address=f"127.0.0.1:{port}",
            head=head,
            workers=start.nodes([(f"node-{i}", cpus) for i in range(1, workers + 1)]),
            temp_dir=mounts.ray_temp,
        )
    finally:
        _stop(cluster_id)
        shutil.rmtree(root, ignore_errors=True)


def _code_dirs() -> list[Path]:
    """The project's code and the Python environment: what every node runs, as every machine
    of a real cluster has it in its image."""
    project = Path(__file__).resolve().parent.parent
    env = Path(sys.prefix).resolve()
    return [project] if env.is_relative_to(project) else [project, env]


def _under_tmp(path: Path) -> bool:
    return path.is_relative_to(Path("/tmp").resolve())


@dataclass(frozen=True)
class _Mounts:
    ray_temp: Path
    hide: list[Path]
    private_tmp: bool
    private_shm: bool

    def script(self, area: Path, source: str) -> str:
        """Shell lines, run in the node's new namespace, that make ``area`` and the rest private."""
        q = shlex.quote
        lines = ["set -e"]
        if self.private_tmp:
            # Keep a handle on what must stay shared under /tmp — Ray's temp dir, and the code
            # and virtualenv when they live there (a fresh clone in a temp folder, as CI
            # makes) — cover /tmp, bind each handle back at the same path. --no-canonicalize:
            # else mount resolves the fd link to a path, which by then names the new, empty
            # directory.
            keep = [self.ray_temp, *(p for p in _code_dirs() if _under_tmp(p))]
            for fd, path in enumerate(keep, start=3):
                lines.append(f"exec {fd}<{q(str(path))}")
            lines.append("mount -t tmpfs -o mode=1777 lorafleet-tmp /tmp")
            for fd, path in enumerate(keep, start=3):
                lines += [f"mkdir -p {q(str(path))}",
                          f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(str(path))}",
                          f"exec {fd}<&-"]  # fmt: skip
        if self.private_shm:
            lines.append("mount -t tmpfs -o mode=1777,nosuid,nodev lorafleet-shm /dev/shm")
        # Under a private /tmp a path may be gone already: recreate it, then cover it.
        for path, name in [(area, source), *((p, "lorafleet-hidden") for p in self.hide)]:
            lines += [f"mkdir -p {q(str(path))}",
                      f"mount -t tmpfs -o mode=0755 {q(name)} {q(str(path))}"]  # fmt: skip
        return "\n".join(lines)


@dataclass(frozen=True)
class _Starter:
    env: dict[str, str]
    root: Path
    cluster_id: str
    mounts: _Mounts
    gcs_port: int

    def nodes(self, nodes: Sequence[tuple[str, int]]) -> list[PrivateNode]:
        """``ray start`` each (name, cpus) node in its own namespace, in turn."""
        return [self._node(name, cpus) for name, cpus in nodes]

    def _node(self, name: str, cpus: int) -> PrivateNode:
        area = self.root / name  # an empty directory outside; the node's tmpfs inside
        area.mkdir()
        home, lorafleet_home = area / "home", area / "lorafleet"
        ports = free_ports(7)  # distinct: one Ray component each, none the GCS's
        while self.gcs_port in ports:
            ports = free_ports(7)
        node = PrivateNode(name, lorafleet_home, f"{NODE_MARKER}={self.cluster_id}-{name}",
                           ports[0], self.cluster_id)  # fmt: skip
        ray = str(Path(sys.executable).parent / "ray")
        args = [ray, "start", f"--num-cpus={cpus}", *_ports(ports[:6]),
                "--disable-usage-stats", f"--temp-dir={self.mounts.ray_temp}"]  # fmt: skip
        if name == "head":
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                     f"--ray-client-server-port={ports[6]}"]  # fmt: skip
        else:
            args.append(f"--address=127.0.0.1:{self.gcs_port}")
        script = "\n".join([
            self.mounts.script(area, f"lorafleet:{self.cluster_id}:{name}"),
            f"mkdir -p {shlex.quote(str(home))} {shlex.quote(str(lorafleet_home))}",
            f"cd {shlex.quote(str(home))}",  # not the caller's directory, which may be hidden
            f"exec {shlex.join(args)}",
        ])  # fmt: skip
        env = {
            **{k: v for k, v in self.env.items() if k != "RAY_ADDRESS"},  # we say which
            "RAY_AUTH_MODE": self.env.get("RAY_AUTH_MODE", "disabled"),
            "HOME": str(home),
            "LORAFLEET_HOME": str(lorafleet_home),
            CLUSTER_MARKER: self.cluster_id,
            NODE_MARKER: f"{self.cluster_id}-{name}",
        }
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        try:
            subprocess.run(
                cmd, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                check=True, timeout=START_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            output = exc.output.decode(errors="replace")[-3000:]
            raise RuntimeError(f"ray start failed on {name}:\n{output}") from None
        return node


def _ports(ports: list[int]) -> list[str]:
    """Every port of a node explicit (six distinct ones, the node manager's first), so nothing
    collides with another Ray on the machine or another component of this node."""
    node_manager, objects, agent_http, agent_grpc, metrics, runtime_env = ports
    return [
        f"--node-manager-port={node_manager}", f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]  # fmt: skip


def _mount_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a zombie
        return None


def _tmpfs_sources(pids: list[str]) -> list[str]:
    """Sources of the tmpfs mounts seen by the first of ``pids`` (one mount namespace)."""
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        # "<id> <parent> <dev> <root> <point> <opts> [<tags>] - <fstype> <source> <superopts>"
        fields = [line.split(" - ", 1)[1].split() for line in lines if " - " in line]
        return [f[1] for f in fields if len(f) > 1 and f[0] == "tmpfs"]
    return []


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill(find: Callable[[], list[int]], *, timeout_s: float, what: str) -> None:
    """SIGKILL what ``find`` finds, again as long as it finds any (a parent may still fork)."""

    def all_dead() -> bool:
        pids = find()
        _signal(pids, signal.SIGKILL)
        return not pids

    wait_until(all_dead, timeout_s=timeout_s, what=f"every process of {what} to die")


def _stop(cluster_id: str) -> None:
    """SIGTERM every process of the cluster; SIGKILL what is left after ``STOP_GRACE_S``."""
    _signal(cluster_processes(cluster_id), signal.SIGTERM)
    with suppress(TimeoutError):
        wait_until(lambda: not cluster_processes(cluster_id), timeout_s=STOP_GRACE_S)
    _kill(lambda: cluster_processes(cluster_id), timeout_s=30.0, what=f"cluster {cluster_id}")
