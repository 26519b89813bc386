"""``ray up cluster-onprem.yaml`` for real, against an SSH server on this machine.

The slow test starts its own ``sshd`` on a free port of 127.0.0.1 with a throwaway host key and
client key (it needs root, as CI has), whose logins get a scratch ``HOME``; it then runs the
user's commands: ``ray up -y``, ``ray job submit`` of a smoke sweep, reads the sweep's runs
back from the MLflow server that the head started, and ``ray down -y``.

The sweep's dataset is in an S3-compatible server, as cluster-onprem.yaml describes for one:
the test starts moto's server on 127.0.0.1 (its ``s3_dataset`` fixture, which stops it at the
end) and uploads the smoke sweep's synthetic dataset (1,500 events) into a bucket; the job
reads ``--data s3://<bucket>/smoke``. The server's key pair reaches Ray the documented way, in
the head's ``~/.aws/credentials`` (written into the logins' scratch ``HOME`` before ``ray up``,
so the Ray that ``ray up`` starts has it), and the endpoint per job with ``ray job submit
--runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": ...}}'``; neither is in a file of the
checkout, and the test's own ``ray`` commands run with no ``AWS_*`` variable.

What the test changes in a copy of ``cluster-onprem.yaml``, and only that: the head is
127.0.0.1 with no workers, reached as root through ``nc`` to the test's sshd port; Ray's ports,
the dashboard's and MLflow's are free ports, Ray is started with --node-ip-address=127.0.0.1
and MLflow on 127.0.0.1, and Ray's temp dir
is a scratch folder (so nothing collides with another Ray on this machine); the head's
PostgreSQL folder is a scratch folder directly under /tmp (run as root, PostgreSQL runs as the
``postgres`` account, which cannot enter pytest's folders), stopped and removed at the end; the
checkout's virtual environment is linked into the copy (``make venv`` there is then a no-op
instead of a second install). Everything else (rsync of the checkout and the token, setup
commands, token authentication, PostgreSQL and MLflow server start, the job API) runs as
written.

Without sshd, rsync, nc or root the test is skipped with the reason; under ``CI=true`` that is
a failure (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
ONPREM_YAML = REPO / "cluster-onprem.yaml"
SSHD = Path("/usr/sbin/sshd")
HEAD_ADDRESS = "$(hostname -I | awk '{print $1}')"
"""How cluster-onprem.yaml names the head's address in its commands."""


def _cluster_config() -> dict:
    return yaml.safe_load(ONPREM_YAML.read_text())


def test_onprem_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster_config()
    prepared = prepare_config(cfg)  # what `ray up` does: fill Ray's defaults, then validate
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert prepared["max_workers"] == len(cfg["provider"]["worker_ips"])
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("make -C ~/iceaggr-tune venv" in c for c in cfg["setup_commands"])


def _missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "the test's sshd logs in as root and must run as root"
    for tool in ("ssh", "ssh-keygen", "rsync", "nc", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: apt-get install openssh-client rsync netcat-openbsd"
    if not SSHD.exists():
        return f"no {SSHD}: apt-get install openssh-server"
    return None


@pytest.fixture(scope="module")
def tools() -> None:
    missing = _missing_tools()
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the ray up test cannot run: {missing}")
        pytest.skip(f"ray up test: {missing}")


@pytest.fixture
def s3_dataset(small_dataset: Path) -> Iterator[tuple[S3Server, str]]:
    """The smoke sweep's dataset (the 1,500 events of ``small_dataset``, three files of 500, as
    ``--smoke-test`` would make them) in a moto S3 server on 127.0.0.1, and its URI. The
    server is not put in this process's environment: the job gets it only as the test hands it
    on. Stopped at the end, and checked to be gone."""
    server = S3Server()
    server.start()
    try:
        yield server, server.upload(small_dataset, "smoke")
    finally:
        server.stop()
        with socket.socket() as s:
            s.settimeout(5)
            refused = s.connect_ex(("127.0.0.1", server.port)) != 0
        assert refused, f"the test's S3 server still listens on {server.url}"


class Sshd:
    """An sshd on 127.0.0.1:``port`` that takes one throwaway key and gives logins ``home``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "remote-home"
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.key = root / "client_key"
        for key in (root / "host_key", self.key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        shutil.copy(f"{self.key}.pub", root / "authorized_keys")
        config = root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
            f"PidFile {root / 'sshd.pid'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            f"SetEnv HOME={self.home}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-f", str(config), "-E", str(root / "sshd.log")],
            start_new_session=True,
        )
        self._wait()

    def _wait(self) -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            probe = subprocess.run(
                ["ssh", *self.options(), "root@127.0.0.1", "true"], capture_output=True
            )
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError("test sshd did not accept the key: " + self.log())

    def options(self) -> list[str]:
        return [
            "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", f"ProxyCommand=nc 127.0.0.1 {self.port}",
        ]  # fmt: skip

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def loopback_config(sshd: Sshd, ports: dict[str, int], ray_tmp: Path, pg_dir: Path) -> str:
    """cluster-onprem.yaml with the substitutions listed in the module docstring."""
    text = ONPREM_YAML.read_text()
    replace = {
        "--port=6379": f"--port={ports['gcs']} --node-ip-address=127.0.0.1 "
        f"--object-manager-port={ports['object_manager']} --temp-dir={ray_tmp}",
        "--dashboard-port=8265": f"--dashboard-port={ports['dashboard']}",
        HEAD_ADDRESS: "127.0.0.1",
        "--port 5000": f"--port {ports['mlflow']}",
        ":5000;": f":{ports['mlflow']};",
        "$HOME/mlflow/postgres": str(pg_dir),
    }
    for old, new in replace.items():
        assert old in text, f"cluster-onprem.yaml no longer contains {old!r}"
        text = text.replace(old, new)
    cfg = yaml.safe_load(text)
    cfg["cluster_name"] = f"iceaggr-test-{secrets.token_hex(4)}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["max_workers"] = 0
    cfg["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": str(sshd.key),
        "ssh_proxy_command": f"nc 127.0.0.1 {sshd.port}",
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def _run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def write_aws_profile(home: Path, server: S3Server) -> None:
    """The S3 server's key pair (and a region) in ``home/.aws``, where the AWS SDK's standard
    chain looks for them; readable by the owner only, as ``aws configure`` leaves them."""
    aws = home / ".aws"
    aws.mkdir(mode=0o700)
    creds = aws / "credentials"
    creds.touch(mode=0o600)
    creds.write_text(
        "[default]\n"
        f"aws_access_key_id = {server.ENV['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {server.ENV['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (aws / "config").write_text(f"[default]\nregion = {server.ENV['AWS_DEFAULT_REGION']}\n")


@pytest.mark.slow
def test_ray_up_runs_a_sweep_on_the_onprem_cluster(tools, s3_dataset, small_dataset, tmp_path):
    from mlflow import MlflowClient

    from iceaggr.data.cache import DEFAULT_CACHE_DIR, FileCache
    from iceaggr.data.dataset import META_FILE
    from iceaggr.data.linefit import line_fit_dataset
    from iceaggr_tune.options import SweepOptions

    s3, data_uri = s3_dataset
    ray = str(Path(sys.executable).with_name("ray"))
    sshd = Sshd(tmp_path / "sshd")
    # The head's credentials for the S3 server, in the home its logins (and so Ray) get.
    write_aws_profile(sshd.home, s3)
    # The checkout's environment, linked where the setup commands expect it.
    (sshd.home / "iceaggr-tune").mkdir()
    (sshd.home / "iceaggr-tune" / ".venv").symlink_to(sys.prefix)
    local_home = tmp_path / "local-home"
    (local_home / ".ray").mkdir(parents=True)
    (local_home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    ports = {k: free_port() for k in ("gcs", "object_manager", "dashboard", "mlflow")}
    cfg = tmp_path / "cluster.yaml"
    # Ray's session folder holds AF_UNIX sockets (paths of at most 107 bytes): keep it short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="iceaggr-rayup-", dir="/tmp"))
    pg_dir = Path(tempfile.mkdtemp(prefix="iceaggr-pg-", dir="/tmp"))
    cfg.write_text(loopback_config(sshd, ports, ray_tmp, pg_dir))
    inherited = ("RAY_", "MLFLOW_", "AWS_")  # none reaches the test's own commands
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)} | {
        "HOME": str(local_home),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    try:
        _run([ray, "up", "-y", "--no-config-cache", str(cfg)], env, timeout=900)
        nodes = json.loads(
            _run([ray, "list", "nodes", "--address", dashboard, "--format", "json"], env, 120)
        )
        assert [n["state"] for n in nodes] == ["ALIVE"] and nodes[0]["is_head_node"]
        sweep = [
            "python", "tune/lr_sweep.py", "--smoke-test", "--address", "auto",
            "--data", data_uri, "--storage-path", str(sshd.home / "sweeps"),
        ]  # fmt: skip
        # The endpoint per job, as cluster-onprem.yaml shows it (the key pair is the head's).
        runtime_env = json.dumps({"env_vars": {"AWS_ENDPOINT_URL": s3.url}})
        job = _run(
            [ray, "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
             "--runtime-env-json", runtime_env, "--", *sweep],
            env,
            timeout=1500,
        )  # fmt: skip
        assert "Job 'raysubmit_" in job and "succeeded" in job, job[-3000:]
        # The data came from the bucket: the head's data cache (~/.cache/iceaggr/data in the
        # logins' HOME) holds the metadata, the validation file and a training file.
        cache = FileCache(sshd.home / DEFAULT_CACHE_DIR.removeprefix("~/"))
        cached = {p.name.rsplit("-", 1)[-1] for p in cache.entries()}
        assert {META_FILE, "batch_1.parquet", "batch_3.parquet"} <= cached, cached
        # The summary scored the line fit on the validation events it read from the bucket:
        # the line fit of the same events in the folder that was uploaded.
        val_events = SweepOptions.smoke().search.val_events
        fit = line_fit_dataset(small_dataset, max_events=val_events, batch_ids=[3])
        assert f"; line fit {fit['mean_angular_error']:.4f} rad; random" in job, job[-3000:]
        status = _run([ray, "job", "list", "--address", dashboard], env, 120)
        assert "SUCCEEDED" in status, status[-3000:]
        client = MlflowClient(tracking_uri=mlflow_url)
        experiment = client.get_experiment_by_name("iceaggr-lr-sweep")
        assert experiment is not None, f"no sweep experiment on the head's MLflow {mlflow_url}"
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) >= 4  # the smoke table's cells and its search trials
        # The head's MLflow server stored them in the head's PostgreSQL.
        server = subprocess.run(["pgrep", "-af", "mlflow server"], capture_output=True, text=True)
        assert f"postgresql+psycopg2://postgres@/mlflow?host={pg_dir}/socket" in server.stdout
        assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
        # Every finished trial read the dataset through the node cache, and the trials fetched
        # files from the S3 server (the driver's check before them fetched only the metadata).
        finished = [r.data.metrics for r in children if r.info.status == "FINISHED"]
        assert finished and all("data_cache_misses" in m for m in finished), finished
        metrics = [r.data.metrics for r in children]
        misses = sum(m.get("data_cache_misses", 0.0) for m in metrics)
        downloaded = sum(m.get("data_cache_bytes_downloaded", 0.0) for m in metrics)
        assert misses > 0 and downloaded > 0, metrics
        print(
            f"ray up: nodes {[(n['node_ip'], n['state']) for n in nodes]}; job SUCCEEDED; "
            f"MLflow runs on the head: 1 parent + {len(children)} trials "
            f"({sum(r.info.status == 'FAILED' for r in children)} FAILED); data from "
            f"{data_uri}: {misses:.0f} files, {downloaded / 1e6:.1f} MB fetched by the trials"
        )
    finally:
        try:
            _run([ray, "down", "-y", str(cfg)], env, timeout=300)
        finally:
            sshd.stop()
            # `ray down` stops Ray; the MLflow server the head commands started is the user's
            # to keep, so the test stops it (it serves this test's store only).
            subprocess.run(["pkill", "-f", f"host={pg_dir}/"], check=False)
            subprocess.run(
                [sys.executable, "-m", "iceaggr.cli", "postgres", "stop", "--dir", str(pg_dir)],
                check=False,
            )
            shutil.rmtree(pg_dir, ignore_errors=True)
    left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True)
    assert left.stdout == b"", "ray down left Ray processes of the test cluster running"
    shutil.rmtree(ray_tmp, ignore_errors=True)
