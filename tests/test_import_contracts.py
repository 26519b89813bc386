"""The import contracts of pyproject.toml ([tool.importlinter], run by ``make lint``): they hold
on the tree, and they catch a data module that imports the training layer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages and the pyproject.toml under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(dest: Path) -> Path:
    for package in ("iceaggr", "iceaggr_tune"):
        shutil.copytree(
            REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_contracts_hold_on_the_tree(tmp_path: Path) -> None:
    run = lint_imports(copy_tree(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", run.stdout), run.stdout


def test_a_data_module_importing_training_breaks_the_layers(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    batch = root / "iceaggr" / "data" / "batch.py"
    batch.write_text(batch.read_text() + "\nfrom iceaggr.training import hooks  # noqa: E402\n")
    run = lint_imports(root)
    assert run.returncode != 0
    assert "iceaggr layers: cli > training > models | tracking > data BROKEN" in run.stdout
    assert "iceaggr.data.batch -> iceaggr.training.hooks" in run.stdout, run.stdout
