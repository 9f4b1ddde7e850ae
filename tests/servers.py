"""Throwaway servers for tests, on 127.0.0.1 only: a PostgreSQL cluster in a temp dir, and ``mlflow server``.

The PostgreSQL binaries come from the system (Debian's ``postgresql`` package, ``/usr/lib/postgresql/<major>/bin``);
nothing is installed or started as a service. PostgreSQL refuses to run as root, so under root ``initdb`` and the
server run as the ``postgres`` system user (via ``runuser``) in a directory that user owns. The password is random
per cluster and appears only in :meth:`PostgresCluster.uri` and connections, never in a repr or a log.

:func:`start_mlflow_server` runs an MLflow tracking server as a subprocess (any backend store, artifacts proxied
into a directory or bucket) for the tests that stop and restart one or share one between processes.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from synth import storage

log = logging.getLogger(__name__)

REQUIRE_POSTGRES_ENV = "CLEARAIR_REQUIRE_POSTGRES"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "clearair"
RUN_AS = "postgres"
# A throwaway cluster: durability off (MLflow's schema migrations run several times faster), loopback only.
SETTINGS = {"listen_addresses": "'127.0.0.1'", "fsync": "off", "synchronous_commit": "off",
            "full_page_writes": "off", "max_connections": "50"}  # fmt: skip
HBA = """\
# throwaway test cluster: scram password logins over its private socket and from 127.0.0.1 only
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
"""


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a PostgreSQL cluster for tests (no binaries, no driver, no user to run it as)."""


@dataclass(frozen=True)
class PostgresTools:
    """Where the binaries are and the command prefix that runs them as a non-root user (empty when not root)."""

    bindir: Path
    run_as: tuple[str, ...]

    def run(self, tool: str, *args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [*self.run_as, str(self.bindir / tool), *args]
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _major(bindir: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", Path(bindir).parent.name))


def find_postgres() -> PostgresTools:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb and pg_ctl, and how to run it; raises if unusable."""
    found = [d for d in glob.glob(BIN_GLOB) if all(os.access(Path(d, t), os.X_OK) for t in ("initdb", "pg_ctl"))]
    if not found:
        raise PostgresUnavailable(f"no initdb/pg_ctl under {BIN_GLOB}: install Debian's `postgresql` package")
    try:
        import psycopg2  # noqa: F401  (MLflow's PostgreSQL driver; the fixture uses it too)
    except ImportError as err:
        raise PostgresUnavailable("psycopg2 is not installed: pip install -e '.[dev]'") from err
    return PostgresTools(Path(max(found, key=_major)), _run_as_prefix())


def _run_as_prefix() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        runuser = None
    if runuser is None:
        raise PostgresUnavailable(f"running as root, and PostgreSQL refuses root: need `runuser` and a {RUN_AS} user")
    return (runuser, "-u", RUN_AS, "--")


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster on ``127.0.0.1:port``; ``repr`` leaves the password out, :meth:`uri` carries it."""

    port: int
    root: Path
    password: str = field(repr=False)
    host: str = "127.0.0.1"
    user: str = SUPERUSER

    def uri(self, dbname: str = "postgres", driver: str | None = "psycopg2") -> str:
        """``postgresql+psycopg2://user:password@127.0.0.1:port/dbname``; ``driver=None`` gives libpq's form.

        The driver is explicit because SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, not psycopg2.
        """
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        """A psycopg2 connection (the caller closes it)."""
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=5)  # fmt: skip

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URI."""
        from psycopg2 import sql

        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.uri(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a race may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_owned(path: Path, text: str, tools: PostgresTools, mode: int = 0o600) -> None:
    """Write a file the server user can read (root writes it, then hands it over)."""
    path.write_text(text)
    path.chmod(mode)
    if tools.run_as:
        shutil.chown(path, RUN_AS, RUN_AS)


def _initdb(tools: PostgresTools, root: Path, password: str) -> Path:
    data, pwfile = root / "data", root / "pwfile"
    _write_owned(pwfile, password + "\n", tools)
    try:
        res = tools.run("initdb", "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                        "--encoding=UTF8", "--locale=C", "--no-sync", cwd=root)  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise RuntimeError(f"initdb failed ({res.returncode}):\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
    socket_dir = root / "socket"
    socket_dir.mkdir(mode=0o700)
    if tools.run_as:
        shutil.chown(socket_dir, RUN_AS, RUN_AS)
    settings = {**SETTINGS, "unix_socket_directories": f"'{socket_dir}'"}
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n# clearair tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    _write_owned(data / "pg_hba.conf", HBA, tools)
    return data


def _start(tools: PostgresTools, root: Path, data: Path, timeout: float, attempts: int = 3) -> int:
    """Start the server on a free port (another free one if a race took it); returns the port."""
    logfile = root / "postgres.log"
    for _ in range(attempts):
        port = free_port()
        res = tools.run("pg_ctl", "start", "-D", str(data), "-l", str(logfile), "-w", "-t", str(int(timeout)),
                        "-o", f"-p {port}", cwd=root, timeout=timeout + 30)  # fmt: skip
        if res.returncode == 0:
            return port
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else res.stderr[-2000:]
        if "could not bind" not in tail and "in use" not in tail:
            raise RuntimeError(f"pg_ctl start failed ({res.returncode}); {logfile}:\n{tail}")
        log.info("port %d was taken before PostgreSQL bound it; trying another", port)
    raise RuntimeError(f"PostgreSQL found no free port on 127.0.0.1 in {attempts} attempts:\n{tail}")


def _stop(tools: PostgresTools, root: Path, data: Path) -> None:
    res = tools.run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30", cwd=root, timeout=60)
    if res.returncode != 0:
        log.warning("pg_ctl stop -m fast failed (%s); stopping immediately", res.stderr.strip()[-500:])
        tools.run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", cwd=root, timeout=60)


@contextlib.contextmanager
def running_postgres(tools: PostgresTools, timeout: float = 60.0) -> Iterator[PostgresCluster]:
    """A fresh cluster in a new temp dir for the ``with`` block; stopped (``pg_ctl stop -m fast``) and removed after.

    The temp dir is made with :func:`tempfile.mkdtemp` (not under pytest's root-only tmp tree) so that the
    ``postgres`` user can own it when the tests run as root.
    """
    root = Path(tempfile.mkdtemp(prefix="clearair-pg-"))
    try:
        if tools.run_as:
            shutil.chown(root, RUN_AS, RUN_AS)
        password = secrets.token_hex(16)
        data = _initdb(tools, root, password)
        port = _start(tools, root, data, timeout)
        try:
            yield PostgresCluster(port=port, root=root, password=password)
        finally:
            _stop(tools, root, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- mlflow server


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServerHandle:
    """A running ``mlflow server`` subprocess on 127.0.0.1; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, owns_log: bool = False) -> None:
        self.process, self.port, self.log_path = process, port, log_path
        self._owns_log = owns_log  # a temp log we created is removed after a clean stop

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's combined stdout/stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group (it started its own session), SIGKILL if it outlives ``timeout``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mlflow server on port %d ignored SIGTERM for %.0f s; killing it", self.port, timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                return
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"mlflow server on port {handle.port} exited with code {handle.process.returncode}; "
                f"log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            if requests.get(handle.uri + "/health", timeout=1.0).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    handle.stop()
    raise RuntimeError(f"mlflow server on port {handle.port} not ready after {timeout:.0f} s:\n{handle.log_tail()}")


def start_mlflow_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    port: int | None = None,
    *,
    workers: int = 1,
    timeout: float = 120.0,
    log_path: Path | None = None,
) -> ServerHandle:
    """Start ``mlflow server`` on 127.0.0.1 (never another interface) and return once ``/health`` answers.

    Artifacts are proxied by the server into ``artifacts_dir``. Job execution is switched off
    (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``), which keeps the server to a few processes. No authentication
    is configured: keep it on loopback. Output goes to ``log_path`` (a new temp file by default).
    """
    port = port or free_port()
    if not _port_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; pick another port for the mlflow server")
    artifacts_dir = storage.resolve(artifacts_dir)  # a directory, or an s3:// prefix the server writes with boto3
    storage.makedirs(artifacts_dir)
    owns_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"mlflow-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_dir, "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = ServerHandle(process, port, Path(log_path), owns_log)
    _wait_ready(handle, timeout)
    log.info("mlflow server ready at %s (pid %d, log %s)", handle.uri, process.pid, log_path)
    return handle
