"""A PostgreSQL server in one folder, as the MLflow tracking store of a cluster's head.

``LocalPostgres(folder).start()`` makes a database cluster there on first use (``initdb``),
starts it (``pg_ctl``) unless it already runs, creates the ``mlflow`` database and returns
the store's URI for ``mlflow server --backend-store-uri``. It uses the binaries of Debian's
``postgresql`` package (``/usr/lib/postgresql/<version>/bin``) or ``pg_ctl`` on PATH.

Who may connect: nobody over the network. The server listens on no TCP address at all
(``listen_addresses = ''``), only on a Unix socket in the folder, with permissions 0700: only
the account that owns the folder (and root) can open it. That account connects without a
password (``trust`` over the socket), so no password exists to be generated, stored or leaked.

PostgreSQL refuses to run as root; started by root, the server runs as the ``postgres``
account (Debian's package makes it) through ``runuser``, and the folder is given to it.
``iceaggr postgres start|stop --dir FOLDER`` is the command-line face of this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "mlflow"
DEFAULT_PORT = 5432
MAX_CONNECTIONS = 400
"""Room for many MLflow server workers: each holds a pool of up to 15 connections
(SQLAlchemy's default pool of 5 plus 10 overflow), and PostgreSQL's own default is 100."""
SOCKET_PATH_MAX = 107  # bytes in a Unix socket path (sun_path)
PG_SEARCH = "/usr/lib/postgresql"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, set up or started."""


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: Debian's newest version, else PATH."""
    versions = sorted(
        (p for p in Path(PG_SEARCH).glob("*/bin") if (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise PostgresError(
        f"PostgreSQL is not installed: no pg_ctl under {PG_SEARCH}/<version>/bin or on PATH. "
        "Install it, e.g. `sudo apt-get install postgresql` on Debian/Ubuntu."
    )


class LocalPostgres:
    """A PostgreSQL server whose data, socket and log live in ``folder``."""

    def __init__(self, folder: str | Path, port: int = DEFAULT_PORT) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.port = int(port)
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "socket"
        self.logfile = self.folder / "postgres.log"
        self.bin = find_bin_dir()
        self.as_root = os.geteuid() == 0
        # The account the server runs as (and the database user every client names).
        self.owner = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        socket_file = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_file).encode()) > SOCKET_PATH_MAX:
            raise PostgresError(
                f"the socket path {socket_file} is longer than {SOCKET_PATH_MAX} bytes "
                "(a Unix socket limit): choose a shorter --dir"
            )

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the ``mlflow`` database, over the Unix socket (psycopg2)."""
        return (
            f"postgresql+psycopg2://{self.owner}@/{DATABASE}"
            f"?host={self.socket_dir}&port={self.port}"
        )

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if check and proc.returncode != 0:
            said = (proc.stdout + proc.stderr)[-2000:]
            if args[0] == "pg_ctl":
                said += f"\nserver log {self.logfile}:\n{self._log_tail()}"
            raise PostgresError(f"{' '.join(cmd)} exited {proc.returncode}: {said}")
        return proc

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text()[-2000:]
        return "(none)"

    def _prepare_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.folder, 0o700)
        os.chmod(self.socket_dir, 0o700)
        if self.as_root:
            owner = pwd.getpwnam(self.owner)
            for path in (self.folder, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            if self.logfile.exists():
                os.chown(self.logfile, owner.pw_uid, owner.pw_gid)
            probe = subprocess.run(
                ["runuser", "-u", self.owner, "--", "test", "-w", str(self.folder)],
                capture_output=True,
            )
            if probe.returncode != 0:
                raise PostgresError(
                    f"run as root, PostgreSQL runs as the {self.owner!r} account, which cannot "
                    f"reach {self.folder} (a parent folder is closed to it): choose a --dir "
                    "under a folder every account can enter, such as /var/lib or /tmp"
                )

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def running(self) -> bool:
        return (
            self.initialized()
            and self._run(["pg_ctl", "status", "-D", str(self.data)], check=False).returncode == 0
        )

    def init(self) -> None:
        """``initdb`` into ``folder/data`` with socket-only, owner-only access."""
        self._prepare_folder()
        if self.initialized():
            return
        self._run(
            ["initdb", "-D", str(self.data), "-U", self.owner, "--auth-local=trust",
             "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8"]
        )  # fmt: skip
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# iceaggr: Unix socket only, owner only (iceaggr/tracking/pgstore.py)\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "unix_socket_permissions = 0700\n"
                f"port = {self.port}\n"
                f"max_connections = {MAX_CONNECTIONS}\n"
            )
        log.info("PostgreSQL database cluster made in %s", self.data)

    def start(self, timeout: float = 60.0) -> str:
        """Init if needed, start unless running, create the database; returns :attr:`uri`."""
        self.init()
        if not self.running():
            self._run(
                ["pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w",
                 "-t", str(int(timeout))]
            )  # fmt: skip
            log.info("PostgreSQL started in %s (socket %s)", self.data, self.socket_dir)
        self._create_database()
        return self.uri

    def _psql(self, sql: str, check: bool = True) -> str:
        out = self._run(
            ["psql", "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.owner,
             "-d", "postgres", "-tAc", sql],
            check=check,
        )  # fmt: skip
        return out.stdout.strip()

    def _create_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w returned; the socket may take a moment on a loaded machine
            exists = self._run(
                ["psql", "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.owner,
                 "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
                check=False,
            )  # fmt: skip
            if exists.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if exists.returncode != 0:
            raise PostgresError(f"cannot query PostgreSQL in {self.data}: {exists.stderr[-1000:]}")
        if exists.stdout.strip() != "1":
            self._psql(f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        """Stop the server (fast shutdown) if it runs."""
        if self.running():
            self._run(["pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w"])
            log.info("PostgreSQL in %s stopped", self.data)
