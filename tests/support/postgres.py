"""A real, throwaway PostgreSQL for tests: Debian's ``postgresql`` binaries, ``initdb`` in a temp dir,
``pg_ctl`` on a free port on 127.0.0.1 (as the ``postgres`` user when the tests run as root, since
PostgreSQL refuses to run as root). One server per test session (``postgres_server``); each test or
module asks it for a fresh database (``create_database``).

Registered as a pytest plugin in ``tests/conftest.py`` so every test directory shares the one server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import free_port

SETUP_HINT = "install Debian's postgresql (`./scripts/setup --tests` does)"
SUPERUSER = "postgres"
# pg_ctl daemonizes the server into its own session, so nothing stops it when a test run is killed
# (timeout, Ctrl-C twice) before its teardown: this watchdog, in a session of its own, stops it when
# the test process is gone. Arguments: test pid, data dir, temp root, then the pg_ctl command.
_REAPER = """
import os, shutil, subprocess, sys, time
owner, data_dir, root, command = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
while os.path.isdir(data_dir):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        subprocess.run([*command, "-D", data_dir, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(1)
"""


def find_bin_dir() -> Path:
    """Where initdb and pg_ctl live: the newest /usr/lib/postgresql/<version>/bin, else PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(re.sub(r"\D", "", path.parent.parent.name) or 0))
    if versions:
        return versions[-1].parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    raise RuntimeError(f"PostgreSQL's initdb/pg_ctl were not found: {SETUP_HINT}")


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` on 127.0.0.1:<free port>; ``stop`` removes everything."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        # Not under pytest's tmp dirs: those are private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="imagegate-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_file = self.root / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> None:
        self.socket_dir.mkdir()
        if self._as_root:
            shutil.chown(self.root, SUPERUSER)
            shutil.chown(self.socket_dir, SUPERUSER)
        initialized = self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                                "--no-sync", "--no-instructions")
        if initialized.returncode != 0:
            raise RuntimeError(f"initdb failed: {initialized.stderr[-2000:]}")
        # Durability off: a test database that dies with the test loses nothing worth an fsync.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.socket_dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        started = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                            "-w", "-t", "60", "start")
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr[-2000:]} {self.log_tail()}")
        self.started = True
        pg_ctl = [str(self.bin_dir / "pg_ctl")]
        if self._as_root:
            pg_ctl = ["runuser", "-u", SUPERUSER, "--", *pg_ctl]
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(self.data_dir), str(self.root), *pg_ctl],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "60", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return self.log_file.read_text()[-2000:]
        except OSError:
            return ""

    def url(self, database: str = SUPERUSER, driver: str = "asyncpg") -> str:
        return f"postgresql+{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = SUPERUSER) -> str:
        result = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database,
                           "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout.strip()

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy async URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
