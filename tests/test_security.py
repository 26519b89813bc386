"""Security defaults: Ray's token authentication stays on, MLflow is not exposed by default,
``cluster.yaml`` opens nothing but SSH, and no credentials live in the repository.

The Ray tests start real single-node clusters with ``ray start --head`` (in a scratch HOME
and temp dir, killed by process group afterwards) and run the real sweep command against
them. The MLflow binding itself is checked on a real server in ``tests/test_tracking.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import free_port, lr_sweep_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


class RayHead:
    """``ray start --head --block`` in its own process group, with its own ports and dirs."""

    def __init__(self, root: Path, auth_mode: str) -> None:
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.temp = Path(f"/tmp/rs{os.getpid()}{auth_mode[:1]}")  # unix socket paths are short
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))
        }
        self.env.update(HOME=str(self.home), RAY_AUTH_MODE=auth_mode, PYTHONUNBUFFERED="1")
        if auth_mode == "token":
            subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                env=self.env,
                check=True,
                capture_output=True,
            )
        self.log = (root / "ray.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                "--num-cpus=1",
                "--include-dashboard=true",
                f"--temp-dir={self.temp}",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (root / "ray.log").read_text()
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # 401: up, and enforcing the token
            except OSError:
                time.sleep(1)
        else:
            self.stop()
            pytest.fail("ray start --head did not come up: " + (root / "ray.log").read_text())

    def stop(self) -> None:
        # SIGTERM to `ray start` alone: it drains the node through the GCS, then stops its
        # processes (~2 s). Sent to the whole group, the GCS dies first and the drain waits 30 s
        # for it. Whatever is left of the group is killed afterwards.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()
        subprocess.run(["rm", "-rf", str(self.temp)], check=False)


@pytest.fixture
def ray_head(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RayHead]:
    head = RayHead(tmp_path, request.param)
    yield head
    head.stop()


def _sweep(head: RayHead, tmp_path: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = lr_sweep_command(tmp_path, data, "--table-only", "--address", head.address)
    return subprocess.run(
        cmd, cwd=tmp_path, env=head.env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("ray_head", ["disabled"], indirect=True)
def test_sweep_refuses_a_ray_cluster_without_token_auth(
    ray_head: RayHead, tmp_path: Path, small_dataset: Path
) -> None:
    # The cluster really serves anyone: its dashboard answers without a token.
    with urllib.request.urlopen(f"{ray_head.dashboard}/api/version", timeout=10) as r:
        assert r.status == 200
    out = _sweep(ray_head, tmp_path, small_dataset)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "token authentication is off" in out.stderr
    assert "RAY_AUTH_MODE=token" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() or "table_" not in out.stdout


@pytest.mark.parametrize("ray_head", ["token"], indirect=True)
def test_a_token_cluster_rejects_anonymous_requests_and_passes_the_check(
    ray_head: RayHead, tmp_path: Path
) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/version", timeout=10)
    assert info.value.code == 401
    # A driver that holds the token joins, and the sweep's check finds auth enforced.
    code = (
        "import ray; from iceaggr_tune.cluster import check_ray_auth; "
        f"ray.init(address='{ray_head.address}'); print('auth', check_ray_auth())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ray_head.env, capture_output=True, text=True, timeout=120
    )
    assert "auth True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


# ---------------------------------------------------------------- cluster.yaml


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_starts_every_ray_node_with_token_auth() -> None:
    cfg = _cluster()
    starts = [
        c
        for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        before_start = command.split("ray start")[0]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before_start), command
    # The token comes from the user's machine, never from the checkout.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    readme = (REPO / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme


def test_cluster_yaml_mlflow_server_is_bound_to_the_private_address() -> None:
    cfg = _cluster()
    (command,) = [c for c in cfg["head_start_ray_commands"] if "mlflow-server" in c]
    assert "0.0.0.0" not in command
    assert re.search(r"--host \$\(hostname -I \| awk '\{print \$1\}'\)", command), command
    # The dashboard stays on the head's loopback too.
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_files_run_mlflow_on_the_heads_own_postgres(name: str) -> None:
    """The head installs and starts PostgreSQL in one folder (Unix socket only, no password
    anywhere) and the MLflow server uses that store, one worker per core."""
    cfg = yaml.safe_load((REPO / name).read_text())
    setup = cfg["head_setup_commands"]
    (install,) = [c for c in setup if "apt-get install" in c]
    assert "postgresql" in install and install.startswith("ls /usr/lib/postgresql/")
    (start,) = [c for c in setup if "iceaggr postgres start" in c]
    folder = re.search(r"--dir (\S+)", start).group(1)
    (command,) = [c for c in cfg["head_start_ray_commands"] if "mlflow-server" in c]
    assert f'--backend-store-uri "$(iceaggr postgres start --dir {folder})"' in command
    assert f"host={folder}/" in command  # the pattern that stops an earlier server
    assert "sqlite" not in command and "--workers auto" in command
    for text in [*setup, command]:
        assert not re.search(r"(?i)passw|PGPASS|://[^@\s]*:[^@\s]*@", text), text


def test_mlflow_server_reads_a_bare_postgresql_uri_with_psycopg2() -> None:
    from iceaggr.cli import build_parser, mlflow_server_command

    uri = "postgresql://ray@/mlflow?host=/home/ray/mlflow/postgres/socket&port=5432"
    args = build_parser().parse_args(["mlflow-server", "--backend-store-uri", uri])
    cmd = mlflow_server_command(args)
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri.replace(
        "postgresql://", "postgresql+psycopg2://"
    )
    args = build_parser().parse_args(["mlflow-server", "--workers", "auto"])
    cmd = mlflow_server_command(args)
    assert cmd[cmd.index("--workers") + 1] == str(os.cpu_count())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mlflow-server", "--workers", "0"])


def test_mlflow_server_command_defaults_to_loopback() -> None:
    from iceaggr.cli import build_parser, mlflow_server_command

    args = build_parser().parse_args(["mlflow-server"])
    cmd = mlflow_server_command(args)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


# ---------------------------------------------------------------- no credentials in the repo

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "credentials in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"*]+@"),
    "assigned secret": re.compile(
        r"(?i)\b(aws_secret_access_key|password|passwd|api_key|auth_token)\s*[=:]\s*['\"][^'\"\s]{8,}"
    ),
}


def test_no_credentials_in_tracked_files() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert files, "not a git checkout"
    assert not [f for f in files if Path(f).name in ("auth_token", ".env", "credentials")]
    found = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in (".parquet", ".png", ".db"):
            continue
        text = path.read_text(errors="ignore")
        for what, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(text):
                line = text[: m.start()].count("\n") + 1
                found.append(f"{name}:{line}: {what}: {m.group(0)[:40]}")
    assert not found, "\n".join(found)


def test_no_sweep_option_takes_storage_credentials() -> None:
    """Object-storage credentials come from the AWS standard chain (environment, ~/.aws, the
    instance profile), never from a flag that would land in sweep.json and MLflow params."""
    import dataclasses

    from iceaggr_tune.options import SweepOptions

    def names(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if inner is not None and dataclasses.is_dataclass(inner):
                out += names(inner, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            else:
                out.append(prefix + f.name)
        return out

    fields = names(SweepOptions)
    assert "data.path" in fields and "data.cache_dir" in fields
    assert not [n for n in fields if re.search(r"(?i)secret|access_key|credential|password", n)]
