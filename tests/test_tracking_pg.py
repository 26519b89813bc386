"""MLflow on PostgreSQL for real: a PostgreSQL server in a temporary folder, an ``mlflow server``
on it on 127.0.0.1, simulated trials logging through it (``benchmarks/tracking_load.py``'s own
load code), every point read back; then nothing of it is left running.

PostgreSQL comes from Debian's ``postgresql`` package (``.ci/run`` installs it); without it the
tests are skipped with the reason, and under ``CI=true`` that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "benchmarks" / "tracking_load.py"

pytestmark = pytest.mark.slow


def _benchmark() -> ModuleType:
    """benchmarks/tracking_load.py imported as ``tracking_load`` (benchmarks/ is not a package;
    the client processes it spawns import the module by that name, through ``sys.path``)."""
    if str(BENCHMARK.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARK.parent))
    return importlib.import_module("tracking_load")


@pytest.fixture(scope="module")
def load() -> ModuleType:
    from iceaggr.tracking.pgstore import PostgresError, find_bin_dir

    try:
        find_bin_dir()
    except PostgresError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and PostgreSQL is missing: {err}")
        pytest.skip(str(err))
    return _benchmark()


@pytest.fixture(scope="module")
def pg_server(load: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(PostgreSQL URI, MLflow URL): both stopped, the folder removed, at the end."""
    with (
        load.postgres_store() as uri,
        load.mlflow_server(uri, tmp_path_factory.mktemp("mlflow-pg"), workers=2) as url,
    ):
        yield uri, url
    folder = uri.split("host=", 1)[1].split("/socket", 1)[0]
    left = subprocess.run(["pgrep", "-af", folder], capture_output=True, text=True).stdout
    assert not left, f"left running: {left}"
    assert not Path(folder).exists()


def test_postgres_takes_no_network_connections(pg_server: tuple) -> None:
    import sqlalchemy as sa

    uri, _ = pg_server
    assert ":" not in uri.split("://", 1)[1].split("@", 1)[0], "no password in the URI"
    socket_dir = Path(uri.split("host=", 1)[1].split("&", 1)[0])
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    with sa.create_engine(uri).connect() as conn:
        assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == ""
        assert conn.execute(sa.text("SHOW unix_socket_permissions")).scalar() == "0700"


def test_sixteen_trials_log_every_point_to_mlflow_on_postgres(
    load: ModuleType, pg_server: tuple
) -> None:
    _, url = pg_server
    cadence = load.Cadence(interval_s=0.5, metrics=10, params=61, source="test")
    result = load.run_load(url, "postgresql", 16, cadence, duration=5.0, processes=2)
    print(load.format_table([result]))
    assert result.points == 16 * 10 * 10  # 10 batches of 10 metrics per trial
    assert result.errors == 0, result.error_sample
    assert result.points_lost == 0
    assert result.p99_ms is not None and result.calls == 160


def test_quick_benchmark_compares_both_backends(load: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "tracking_load.json"
    assert load.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["results"]] == ["sqlite", "postgresql"]
    for r in data["results"]:
        assert r["calls"] > 0 and r["points"] == r["calls"] * data["cadence"]["metrics"]
        assert r["points_lost"] == 0, r
    assert set(data["knee"]) == {"sqlite", "postgresql"}
