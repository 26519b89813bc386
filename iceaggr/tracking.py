"""MLflow records for one training run, robust to a tracking server that goes away.

The trainer logs through :class:`RunLogger`, which wraps ``MlflowClient`` with an
explicit run id (no global ``mlflow.start_run`` state, so several runs can be
written from one process and a Ray worker can write to a run its driver made).

Metrics are buffered and flushed with ``log_batch``. When the server cannot be
reached the logger warns once, keeps the metrics in memory (and in a JSON-lines
spool file when ``spool_dir`` is given) and sends them, in step order, once the
server answers again, so a server outage loses nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Tags that mark a diverged run (read by the sweep and by people in the MLflow UI).
TAG_DIVERGED = "diverged"
TAG_DIVERGED_AT_STEP = "diverged_at_step"
TAG_DIVERGENCE_REASON = "divergence_reason"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on a param value
# The metric every training report carries; its last step marks how far a run was logged.
RESUME_MARKER_METRIC = "loss"


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` made absolute (Ray workers run in other folders)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def get_or_create_experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """Writes params, metrics and the final status of one MLflow run."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        run_id: str | None = None,
        experiment: str = "iceaggr",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        if run_id is None:
            exp_id = get_or_create_experiment(self.client, experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
            run_id = run.info.run_id
        self.run_id = run_id
        # A run written before (a resumed or restarted trial) already holds the curve up to
        # some step; steps up to it are not logged again, so the history has no duplicates.
        self._logged_upto = max(
            (m.step for m in self.client.get_metric_history(run_id, RESUME_MARKER_METRIC)),
            default=-1,
        )
        self._pending: list[tuple[str, float, int, int]] = []
        self._warned = False
        self._spool = Path(spool_dir) / f"mlflow-spool-{run_id}.jsonl" if spool_dir else None
        if self._spool is not None and self._spool.exists():
            for line in self._spool.read_text().splitlines():
                k, v, ts, step = json.loads(line)
                self._pending.append((k, v, ts, step))

    # ---------------------------------------------------------------- params, tags
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(flat.items())]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # resuming: params are immutable
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    # ---------------------------------------------------------------- metrics
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (non-finite values are kept: MLflow stores NaN)."""
        if step <= self._logged_upto:
            return
        ts = int(time.time() * 1000)
        new = [(k, float(v), ts, int(step)) for k, v in metrics.items()]
        self._pending.extend(new)
        if self._spool is not None:
            self._spool.parent.mkdir(parents=True, exist_ok=True)
            with self._spool.open("a") as f:
                for item in new:
                    f.write(json.dumps(item) + "\n")
        self.flush()

    def flush(self) -> bool:
        """Send queued metrics; returns False (and keeps them) when the server is unreachable."""
        from mlflow.entities import Metric

        if not self._pending:
            return True
        try:
            for i in range(0, len(self._pending), 500):
                chunk = self._pending[i : i + 500]
                metrics = [
                    Metric(k, v if math.isfinite(v) else float("nan"), ts, step)
                    for k, v, ts, step in chunk
                ]
                self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # connection refused, 5xx, timeouts...
            if not self._warned:
                log.warning(
                    "MLflow at %s is unreachable (%s); keeping %d metric values and retrying "
                    "at the next report. Nothing is lost while this process lives%s.",
                    self.tracking_uri,
                    type(err).__name__,
                    len(self._pending),
                    f" (spooled to {self._spool})" if self._spool else "",
                )
                self._warned = True
            return False
        if self._warned:
            log.warning("MLflow at %s is back; sent the queued metrics.", self.tracking_uri)
            self._warned = False
        self._pending.clear()
        if self._spool is not None and self._spool.exists():
            self._spool.unlink()
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def terminate(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) after sending what is queued."""
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
