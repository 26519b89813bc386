"""Optuna through Tune when not every report of a trial carries the metric.

A search trial validates only where a decision reads the result (the early-stopping rungs and
its last step, :func:`iceaggr_tune.search.search_config`); its other reports carry the training
loss and a checkpoint but no ``val_angle``. Tune's ``OptunaSearch`` reads the metric from every
result and Tune's controller rejects a result without it, so :class:`ValidatedOptunaSearch`
passes on only the results that hold the metric, and :func:`sparse_metric_reports` lets Tune
accept the others while the search runs (``TUNE_DISABLE_STRICT_METRIC_CHECKING``, restored
afterwards).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.tune.search.optuna import OptunaSearch

STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


class ValidatedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna only the results that carry the metric (a trial's
    completion with its last validated value is unchanged)."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


@contextmanager
def sparse_metric_reports() -> Iterator[None]:
    """Tune accepts results without the searcher's metric inside this block."""
    before = os.environ.get(STRICT_METRIC_ENV)
    os.environ[STRICT_METRIC_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STRICT_METRIC_ENV, None)
        else:
            os.environ[STRICT_METRIC_ENV] = before
