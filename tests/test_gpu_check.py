"""benchmarks/gpu_check.py at toy size on the CPU: the GPU machine's one command keeps working."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path: Path) -> None:
    # Its own local Ray (token auth on, the token in a scratch HOME), never a test's cluster.
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(tmp_path / "home")
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"]
    cmd += ["--out-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_check_cpu.json").read_text())
    assert not doc["skipped"], doc["skipped"]
    ours = doc["throughput"]["ours"]
    measured = {(r["precision"], r["attention"]) for r in ours["rows"]}
    assert {("fp32", "packed"), ("bf16", "packed")} <= measured
    assert [r["precision"] for r in doc["throughput"]["original"]] == ["fp32", "bf16"]
    assert all(r["events_per_s"] > 0 for r in doc["throughput"]["original"])
    for row in doc["agreement"]:
        # Same weights and batch: the first step's losses differ only by bf16 rounding.
        assert row["first_step_abs_diff"] < 0.05, row
        assert all(math.isfinite(x) for x in row["loss_fp32"] + row["loss_bf16"])
    runs = doc["sweep"]
    # --quick: the smoke table at one learning rate (the original network raw and normalized).
    assert len(runs["table"]["summary"]["table"]) == 2
    assert len(runs["search"]["summary"]["search_trials"]) == 2
    for part in ("table", "search"):
        assert runs[part]["returncode"] == 0, runs[part]["log_tail"]
        summary = runs[part]["summary"]
        over = summary["overhead"][part]
        assert over["trials"] >= 1 and over["peak_memory_mb"] > 0
        assert summary["part_seconds"][part] > 0
        assert over["t_ray_imports_s"] >= 0 and over["t_ray_other_s"] >= 0
    md = (tmp_path / "out" / "gpu_check_cpu.md").read_text()
    assert "bf16 vs fp32" in md and "| table | 0 |" in md and "| search | 0 |" in md
