"""A trial's worker-group start in parts (iceaggr_tune.worker_start), from its timestamps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iceaggr_tune import worker_start


@pytest.fixture
def marks(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, float]]:
    fake: dict[str, float] = {}
    monkeypatch.setattr(worker_start, "MARKS", fake)
    monkeypatch.setattr(worker_start, "process_start_time", lambda: 103.0)
    yield fake


def test_the_parts_add_up_and_nested_imports_count_once(marks: dict[str, float]) -> None:
    # Fit at 100; process at 103; this module imported 110-114 (inside nothing), the backend
    # 115-115.5, the training function's module 116-120 (it holds no second torch import).
    marks |= {
        "backend_import_start": 110.0,
        "backend_import_end": 114.0,
        "backend_start": 115.0,
        "backend_end": 115.5,
        "import_start": 116.0,
        "import_end": 120.0,
    }
    parts = worker_start.start_parts(100.0, 121.0)
    assert parts == {
        "t_ray_schedule_s": 3.0,
        "t_ray_process_s": 7.0,
        "t_ray_imports_s": 8.0,
        "t_ray_dist_init_s": 0.5,
        "t_ray_other_s": pytest.approx(2.5),
    }
    # The training function's module importing this one: the inner import is not counted twice.
    marks |= {"import_start": 109.0, "import_end": 120.0}
    assert worker_start.start_parts(100.0, 121.0)["t_ray_imports_s"] == 11.0


def test_a_process_started_before_the_fit_costs_it_nothing(
    marks: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_start, "process_start_time", lambda: 80.0)
    marks |= {"import_start": 90.0, "import_end": 101.0}  # mostly before the fit at 100
    parts = worker_start.start_parts(100.0, 102.0)
    assert parts["t_ray_schedule_s"] == 0.0 and parts["t_ray_process_s"] == 0.0
    assert parts["t_ray_imports_s"] == 1.0 and parts["t_ray_other_s"] == pytest.approx(1.0)
