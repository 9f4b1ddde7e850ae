"""Throwaway servers for tests: a PostgreSQL cluster in a temp dir, on 127.0.0.1 only, behind a scram password.

The binaries come from the system (Debian's ``postgresql`` package, ``/usr/lib/postgresql/<major>/bin``); nothing is
installed or started as a service. PostgreSQL refuses to run as root, so under root ``initdb`` and the server run as
the ``postgres`` system user (via ``runuser``) in a directory that user owns. The password is random per cluster and
appears only in :meth:`PostgresCluster.uri` and connections, never in a repr or a log.
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
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


def _free_port() -> int:
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
        port = _free_port()
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
