"""MLflow records through a real tracking server that goes away and comes back.

Each test kills a real ``mlflow server`` (the whole process group, as a crash would) while
a :class:`~iceaggr.tracking.RunLogger` is writing, and checks that logging never blocks or
raises meanwhile, that the outage is reported, and that once a server on the same store is
back every metric arrives exactly once: no gaps, no duplicated steps.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mlflow.tracking import MlflowClient

from iceaggr.cli import main as iceaggr_main
from iceaggr.tracking.client import MlflowUnreachable, PatientClient, redact_params, redact_uri
from iceaggr.tracking.run_logger import RunLogger

if TYPE_CHECKING:
    from conftest import MlflowServer

pytestmark = pytest.mark.slow


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_metrics_logged_during_an_outage_arrive_once_the_server_is_back(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    mlog = RunLogger(mlflow_server.url, experiment="outage", run_name="r", spool_dir=spool)
    for step in range(1, 6):
        mlog.log_metrics({"loss": 1.0 / step, "grad_norm": float(step)}, step)
    assert mlog.pending == 0

    mlflow_server.stop()
    caplog.set_level(logging.WARNING, logger="iceaggr.tracking")
    for step in range(6, 11):
        mlog.log_metrics({"loss": 1.0 / step, "grad_norm": float(step)}, step)  # never raises
    mlog.set_tags({"during_outage": "yes"})
    assert mlog.pending == 11  # 5 steps x 2 metrics + 1 tag record, all held
    assert (spool / f"mlflow-spool-{mlog.run_id}.jsonl").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unreachable" in w and "training goes on" in w for w in warnings), warnings

    mlflow_server.start()
    mlog.terminate("FINISHED")
    client = MlflowClient(mlflow_server.url)
    assert _steps(client, mlog.run_id) == list(range(1, 11))
    assert _steps(client, mlog.run_id, "grad_norm") == list(range(1, 11))
    run = client.get_run(mlog.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["during_outage"] == "yes"
    assert not list(spool.glob("*.jsonl")), "the spool is removed once everything is sent"
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_a_background_logger_never_waits_and_loses_nothing_on_a_clean_stop(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """The trainer's logger (a sender thread): a record costs the caller no round trip, not
    even while the server is down; the spool holds what is unsent; terminate sends it all."""
    spool = tmp_path / "spool"
    mlog = RunLogger(
        mlflow_server.url, experiment="bg", run_name="r", spool_dir=spool, background=True
    )
    spool_file = spool / f"mlflow-spool-{mlog.run_id}.jsonl"
    for step in range(1, 4):
        mlog.log_metrics({"loss": 1.0 / step}, step)
    assert mlog.wait_sent(60)
    assert mlog.pending == 0 and not spool_file.exists()
    mlflow_server.stop()
    spent = []
    for step in range(4, 40):
        t0 = time.perf_counter()
        mlog.log_metrics({"loss": 1.0 / step, "grad_norm": 1.0}, step)
        spent.append(time.perf_counter() - t0)
    assert max(spent) < 0.5, spent  # a send attempt against a dead port would show here
    assert not mlog.wait_sent(5)  # the server is down: no wait
    assert mlog.pending == 2 * 36 and spool_file.exists()
    lines = spool_file.read_text().splitlines()
    assert len(lines) == 2 * 36  # everything unsent is on disk for a successor
    mlflow_server.start()
    mlog.terminate("FINISHED")
    client = MlflowClient(mlflow_server.url)
    assert _steps(client, mlog.run_id) == list(range(1, 40))
    assert client.get_run(mlog.run_id).info.status == "FINISHED"
    assert not spool_file.exists()
    assert not mlog._thread.is_alive()


def test_a_restarted_process_sends_what_a_killed_one_held(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A worker killed during an outage: its successor sends the spool, then continues."""
    spool = tmp_path / "spool"
    first = RunLogger(mlflow_server.url, experiment="handoff", run_name="r", spool_dir=spool)
    run_id = first.run_id
    first.log_params({"lr": 1e-3})
    for step in range(1, 4):
        first.log_metrics({"loss": float(step)}, step)
    mlflow_server.stop()
    for step in range(4, 8):
        first.log_metrics({"loss": float(step)}, step)
    del first  # the process dies with 4 steps unsent; only the spool file keeps them

    # The restarted worker resumed from a checkpoint at step 5, so it replays steps 6-7
    # (already in the spool) before going on; it starts while the server is still down.
    second = RunLogger(mlflow_server.url, run_id=run_id, spool_dir=spool)
    assert second.pending == 4
    second.log_params({"lr": 1e-3})
    for step in range(6, 11):
        second.log_metrics({"loss": float(step)}, step)
    mlflow_server.start()
    second.terminate("FINISHED")

    client = MlflowClient(mlflow_server.url)
    assert _steps(client, run_id) == list(range(1, 11))
    assert client.get_run(run_id).data.params == {"lr": "0.001"}


def test_a_logger_made_while_the_server_is_down_does_not_fail(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment("late-start")
    run_id = client.create_run(exp).info.run_id
    client.log_metric(run_id, "loss", 0.5, step=1)  # logged before a restart of the trial
    mlflow_server.stop()
    mlog = RunLogger(mlflow_server.url, run_id=run_id, spool_dir=tmp_path)
    mlog.log_params({"model": {"d_model": 64}})
    mlog.log_metrics({"loss": 0.5}, 1)  # replayed step: dropped once the server says so
    mlog.log_metrics({"loss": 0.4}, 2)
    mlflow_server.start()
    assert mlog.flush(block=True)
    assert _steps(client, run_id) == [1, 2]
    assert client.get_run(run_id).data.params == {"model.d_model": "64"}


def test_patient_client_waits_then_names_the_server(mlflow_server: MlflowServer) -> None:
    mlflow_server.stop()
    try:
        client = PatientClient(mlflow_server.url, wait_s=2.0)
        with pytest.raises(MlflowUnreachable, match=f"127.0.0.1:{mlflow_server.port}"):
            client.get_experiment_by_name("anything")
    finally:
        mlflow_server.start()
    # An error that is not an outage is raised at once, not retried.
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as info:
        PatientClient(mlflow_server.url, wait_s=600).get_run("0" * 32)
    assert not isinstance(info.value, MlflowUnreachable)


def test_mlflow_sync_sends_a_spool_left_by_a_dead_process(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool"
    mlog = RunLogger(mlflow_server.url, experiment="sync", run_name="r", spool_dir=spool)
    mlflow_server.stop()
    for step in range(1, 4):
        mlog.log_metrics({"loss": float(step)}, step)
    del mlog
    mlflow_server.start()
    run_id = next(spool.glob("*.jsonl")).stem.removeprefix("mlflow-spool-")
    assert iceaggr_main(["mlflow-sync", str(spool), "--tracking-uri", mlflow_server.url]) == 0
    assert f"run {run_id}: sent 3 records" in capsys.readouterr().out
    assert _steps(MlflowClient(mlflow_server.url), run_id) == [1, 2, 3]
    assert not list(spool.glob("*.jsonl"))


# ---------------------------------------------------------------- security of the server


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add(addr)
    return found


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_mlflow_server_listens_on_loopback_only_by_default(mlflow_server: MlflowServer) -> None:
    assert _listening_addresses(mlflow_server.port) == {"127.0.0.1"}
    ip = _non_loopback_ip()
    if ip is not None:  # the port is closed on the machine's network address
        with pytest.raises(OSError):
            socket.create_connection((ip, mlflow_server.port), timeout=3).close()


def test_params_never_carry_credentials() -> None:
    # Example credentials, assembled at run time so the repository holds no URI with a password.
    alice, bob = "alice:" + "s3cret", "bob:" + "hunter2"
    assert redact_uri(f"http://{alice}@mlflow.internal:5000") == "http://***@mlflow.internal:5000"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    flat = redact_params(
        {
            "train.mlflow_tracking_uri": f"https://{bob}@host/path",
            "aws_secret_access_key": "example-secret-value",
            "ray_auth_token": "abc",
            "train.lr": 1e-3,
        }
    )
    assert flat == {
        "train.mlflow_tracking_uri": "https://***@host/path",
        "aws_secret_access_key": "***",
        "ray_auth_token": "***",
        "train.lr": 1e-3,
    }


_OPEN_STORE = """
import sys, time
from pathlib import Path
from iceaggr.tracking.run_logger import PatientClient
go = Path(sys.argv[2])
Path(f"{go}.{sys.argv[3]}.ready").touch()
while not go.exists():
    time.sleep(0.01)
client = PatientClient(sys.argv[1])
client.create_experiment(sys.argv[3])
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    """The sweep driver and trial workers may open a new sqlite store at the same moment;
    MLflow's schema creation is not safe against that on its own (two plain ``MlflowClient``
    processes on a new file fail with "table ... already exists" most of the time)."""
    script = tmp_path / "open_store.py"
    script.write_text(_OPEN_STORE)
    for round_ in range(2):
        uri = f"sqlite:///{tmp_path / f'mlflow-{round_}.db'}"
        go = tmp_path / f"go-{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), uri, str(go), f"exp-{i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(3)
        ]
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(f"go-{round_}.*.ready"))) < 3:  # all imported MLflow
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
        names = {e.name for e in MlflowClient(tracking_uri=uri).search_experiments()}
        assert names == {"Default", "exp-0", "exp-1", "exp-2"}
