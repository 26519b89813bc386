"""Fixtures and helpers shared by the test modules.

``small_dataset`` is a real synthetic dataset in the Kaggle layout (DESIGN.md section 3), small
enough for the CPU: 1,500 events in three batch files of 500 (the last one validates), written
once per test session.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from iceaggr.data.synth import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
REFERENCE_GEOMETRY = REPO.parent / "shared" / "reference" / "icecube86_sensor_geometry.csv"
"""The real IceCube-86 geometry, next to the checkout in the development workspace only
(never shipped); tests that read it skip without it."""
SMALL_DATASET_EVENTS = 1_500
SMALL_DATASET_FILE_EVENTS = 500


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 synthetic events in ``train/batch_{1,2,3}.parquet`` (500 each), seed 0."""
    out = tmp_path_factory.mktemp("small_dataset") / "data"
    return write_synthetic_dataset(
        out,
        n_events=SMALL_DATASET_EVENTS,
        batch_size=SMALL_DATASET_FILE_EVENTS,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One intra-op thread for the module's tests, restored afterwards.

    The debug model's tensors are tiny, so a second thread buys nothing, and on a shared,
    oversubscribed CPU the threads of one op wait on each other for most of the wall time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_tracking_uri(tmp_path: Path) -> str:
    """The sqlite MLflow store that :func:`lr_sweep_command` writes to, created and migrated.

    A test that polls the store while a sweep subprocess writes it must create the store
    first: MLflow builds and migrates a new sqlite file on first open, and two processes
    doing that at once on the same file can fail with errors such as
    ``AttributeError: dimension_attributes`` from the schema migration.
    """
    from mlflow.tracking import MlflowClient

    uri = _sweep_store_uri(tmp_path)
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def _sweep_store_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def lr_sweep_command(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """``tune/lr_sweep.py --smoke-test`` on ``data``, writing its sweeps and its sqlite MLflow
    store (:func:`sweep_tracking_uri`) under ``tmp_path``; ``extra`` options follow."""
    return [
        sys.executable,
        str(REPO / "tune" / "lr_sweep.py"),
        "--smoke-test",
        "--data",
        str(data),
        "--storage-path",
        str(tmp_path / "sweeps"),
        "--tracking-uri",
        _sweep_store_uri(tmp_path),
        *extra,
    ]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1, started with ``iceaggr mlflow-server``.

    It can be stopped (killed, as a crash would) and started again on the same port and
    store, to test what a tracking-server outage does to training and the sweep.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self, timeout: float = 300.0) -> str:
        import os
        import subprocess
        import time

        from iceaggr_tune.mlflow_runs import MlflowWatch

        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("w")
        cmd = [
            sys.executable,
            "-m",
            "iceaggr.cli",
            "mlflow-server",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if MlflowWatch(self.url).healthy():
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not come up: " + self.log_text())

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob("server-*.log")))

    def stop(self) -> None:
        """Kill the server and every process it started (as a crash or a reboot would)."""
        import os
        import signal

        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow server for the module (tests may stop and restart it)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def scratch_ray_env(home: Path, token: str | None = None) -> Iterator[None]:
    """HOME (where Ray keeps its auth token) and Ray's auth variables for one test module,
    restored afterwards (``ray.init`` exports ``RAY_AUTH_MODE=token`` into the process).
    ``token`` set: token authentication with that token, for clusters started by hand."""
    import os

    keys = ("HOME", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys[1:]:
        os.environ.pop(k, None)
    os.environ["HOME"] = str(home)
    if token is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token
    _refresh_ray_auth()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    """Make this process's Ray re-read its auth settings (it caches them at first use)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local Ray for one test module (3 logical CPUs: two one-worker trials at once
    plus their drivers), with token authentication on and its token in a scratch HOME
    instead of the user's ``~/.ray``. Yields the GCS address (for ``--address``)."""
    import ray

    with scratch_ray_env(tmp_path_factory.mktemp("home")):
        ray.init(num_cpus=3, include_dashboard=True)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


class S3Server:
    """A real S3-compatible server (moto's) on 127.0.0.1 with one bucket, reached the way the
    project reaches any such server: ``AWS_ENDPOINT_URL`` and the standard credential
    variables (moto takes any key)."""

    BUCKET = "iceaggr-test"
    ENV: typing.ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask for an instance profile here
    }

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**self.ENV, "AWS_ENDPOINT_URL": self.url}

    def start(self) -> None:
        import boto3

        self.server.start()
        boto3.client("s3", endpoint_url=self.url, **self._boto_args()).create_bucket(
            Bucket=self.BUCKET
        )

    def _boto_args(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": self.ENV["AWS_DEFAULT_REGION"],
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **self._boto_args())

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy ``folder`` to ``s3://<bucket>/<prefix>`` (as ``aws s3 sync`` would)."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                client.upload_file(str(path), self.BUCKET, key)
        return f"s3://{self.BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.BUCKET, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A local S3-compatible server for the module, its address and test credentials in the
    environment (restored afterwards) so that processes started meanwhile inherit them."""
    import os

    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
