"""The MLflow UI after a smoke sweep, checked end to end in a real headless Chromium.

A real ``mlflow server`` on 127.0.0.1 records one smoke sweep run on a real local Ray (two
learning rates by raw/normalized inputs, one of them diverging, plus a two-trial search). The
Node script ``tests/browser/mlflow_ui.mjs`` then drives Debian's Chromium through Playwright
(``playwright-core``) and checks what a user of the UI sees:

* the runs page lists the parent run and its six trial runs with the parameter columns
  ``lr``, ``dropout``, ``normalize`` and the ``diverged`` tag column, and marks the diverged
  runs with MLflow's failed-status icon (a status search lists exactly them);
* selecting a diverged and finished runs and pressing Compare opens the compare view, whose
  ``loss`` chart renders one curve per run, the diverged one cut short;
* the parent run's artifacts tab previews ``loss_curves.png``, ``stability_table.png`` and
  ``search_landscape.png``.

Every view is saved as a full-page screenshot under ``$ICEAGGR_SCREENSHOT_DIR`` (default
``runs/ui-screenshots/``) for a person to look at. Nothing is skipped: a missing Node, Chromium
or ``playwright-core`` skips the test with the command that installs it, and fails it under
``CI=true`` (where ``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BROWSER_DIR = REPO / "tests" / "browser"
SCRIPT = BROWSER_DIR / "mlflow_ui.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
INSTALL_HINT = "run scripts/install_browser_deps.sh (Debian chromium + npm ci in tests/browser)"
TABLE_LRS = (1e-4, 1e3)  # 1e3 diverges at both input scalings
TRIALS = 2
SCREENSHOTS = (
    "01-runs-list.png",
    "02-runs-list-failed.png",
    "03-compare-runs.png",
    "04-compare-loss-chart.png",
    "05-parent-artifact-loss-curves.png",
    "06-parent-artifact-stability-table.png",
    "07-parent-artifact-search-landscape.png",
    "08-printed-compare-link.png",
    "09-printed-curves-link.png",
)


NODE_MAJOR_MIN = 20


def _missing_browser_deps() -> str | None:
    """What the browser script lacks (Node.js 20+, Chromium, playwright-core), or None."""
    node = shutil.which("node")
    if node is None:
        return f"node is not on PATH: install Node.js {NODE_MAJOR_MIN}+ (apt-get install nodejs)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major = int(version.lstrip("v").split(".")[0] or 0)
    if major < NODE_MAJOR_MIN:
        return f"Node.js {version} is too old: playwright-core needs Node.js {NODE_MAJOR_MIN}+"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (set CHROMIUM_PATH): {INSTALL_HINT}"
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        return f"playwright-core is not installed in {BROWSER_DIR}: {INSTALL_HINT}"
    return None


@pytest.fixture(scope="module")
def node() -> str:
    """The Node binary, once Chromium and playwright-core are there too.

    Without them the test is skipped with the reason, except under ``CI=true``, where a
    missing dependency is a failure (CI installs them, so a skip there would hide a regression).
    """
    missing = _missing_browser_deps()
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the MLflow UI browser test cannot run: {missing}")
        pytest.skip(f"MLflow UI browser test: {missing}")
    return shutil.which("node")  # type: ignore[return-value]


@dataclass
class SweepInUI:
    url: str
    server: Any  # conftest.MlflowServer
    experiment_id: str
    parent_run_id: str
    children: int
    diverged: int
    printed_links: dict[str, str]
    """The UI links as the sweep printed them (``tune/lr_sweep.py``'s summary)."""


@pytest.fixture(scope="module")
def smoke_sweep(mlflow_server, ray_local, tmp_path_factory) -> SweepInUI:
    """One smoke sweep recorded by the server: 4 table trials (2 diverge) and 2 search trials."""
    from mlflow import MlflowClient

    from iceaggr.data.synth import write_synthetic_dataset
    from iceaggr_tune.mlflow_runs import format_links
    from iceaggr_tune.sweep import SweepOptions, run_sweep

    url = mlflow_server.url
    tmp = tmp_path_factory.mktemp("ui-sweep")
    data = tmp / "data"
    write_synthetic_dataset(data, n_events=1_500, batch_size=500, seed=3, progress=False)
    opts = SweepOptions.smoke().changed(
        {
            "data.path": str(data),
            "storage_path": str(tmp / "sweeps"),
            "tracking.uri": url,
            "table.lrs": TABLE_LRS,
            "name": "ui",
            "search.trials": TRIALS,
        }
    )
    result = run_sweep(opts)
    assert not result.interrupted
    printed = format_links(url, result.links)
    links: dict[str, str] = {}
    for line in printed.splitlines():
        link = line.strip()
        if "#/compare-runs?" in link:
            links["compare"] = link
        elif "#/metric?" in link:
            links["curves"] = link
    assert set(links) == {"compare", "curves"}, printed
    experiment = MlflowClient(tracking_uri=url).get_experiment_by_name(opts.tracking.experiment)
    assert experiment is not None, f"no MLflow experiment {opts.tracking.experiment!r} on {url}"
    return SweepInUI(
        url=url,
        server=mlflow_server,
        experiment_id=experiment.experiment_id,
        parent_run_id=result.parent_run_id,
        children=2 * len(TABLE_LRS) + TRIALS,
        diverged=2,  # lr 1e3, raw and normalized
        printed_links=links,
    )


@pytest.fixture
def screenshot_dir() -> Path:
    """Where the views' screenshots go; this test's files from an earlier run are removed."""
    path = Path(os.environ.get("ICEAGGR_SCREENSHOT_DIR") or REPO / "runs" / "ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    for name in (*SCREENSHOTS, "failure.png"):
        (path / name).unlink(missing_ok=True)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_mlflow_ui_shows_sweep_runs_compare_chart_and_artifacts(node, smoke_sweep, screenshot_dir):
    """The browser script's checks all pass, and it leaves a real screenshot of every view.

    The script exits non-zero on the first check that fails; its whole output (which says what
    the page showed instead) and the server log's tail then make up this test's failure.
    """
    cmd = [
        node,
        str(SCRIPT),
        "--base-url",
        smoke_sweep.url,
        "--experiment-id",
        smoke_sweep.experiment_id,
        "--parent-run-id",
        smoke_sweep.parent_run_id,
        "--screenshot-dir",
        str(screenshot_dir),
        "--expect-children",
        str(smoke_sweep.children),
        "--expect-diverged",
        str(smoke_sweep.diverged),
        "--compare-url",
        smoke_sweep.printed_links["compare"],
        "--curves-url",
        smoke_sweep.printed_links["curves"],
    ]
    env = {**os.environ, "CHROMIUM_PATH": str(CHROMIUM)}
    try:
        proc = subprocess.run(
            cmd, cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"browser script timed out after {err.timeout}s\n--- stdout ---\n{err.stdout}\n"
            f"--- stderr ---\n{err.stderr}"
        )
    print(proc.stdout, proc.stderr, sep="\n")
    if proc.returncode != 0:
        server_tail = "\n".join(smoke_sweep.server.log_text().splitlines()[-40:])
        pytest.fail(
            f"browser script failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}\n"
            f"--- mlflow server log (tail) ---\n{server_tail}",
            pytrace=False,
        )

    for name in SCREENSHOTS:
        shot = screenshot_dir / name
        assert shot.exists(), f"the browser script did not save {shot}"
        assert shot.stat().st_size > 20_000, f"{shot} is only {shot.stat().st_size} bytes"
        width, height = _png_size(shot)
        assert width >= 1280 and height >= 720, f"{shot} is {width}x{height}"
        assert str(shot) in proc.stdout, f"the script did not report {shot}"
