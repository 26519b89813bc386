"""MLflow bookkeeping of a sweep: one parent run, one child run per Tune trial.

Ray's ``MLflowLoggerCallback`` writes flat runs with no parent, so the sweep keeps
its own records: the driver makes the parent run, each trial driver finds or
makes its child run (found again by its ``trial_id`` tag on ``--resume``, so no
run is duplicated), and the sweep closes every run it left RUNNING when it
ends, is interrupted or a trial errors. Also here: the MLflow UI links the sweep prints,
:func:`sync_left_over_records` (what dead trial processes could not send), and
:class:`MlflowWatch`, the driver's watch on its tracking server: trials keep training while the
server is down (their records are held and sent later, see :mod:`iceaggr.tracking.run_logger`),
and their warnings land in the trial processes' logs; the watch makes the outage plain in the
sweep's own console too: it asks the server's ``/health`` every few seconds and logs one
warning when the server stops answering, a reminder every few minutes, and one line when it
answers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from iceaggr.tracking.client import (
    DEFAULT_WAIT_S,
    REMIND_EVERY_S,
    PatientClient,
    get_or_create_experiment,
    redact_uri,
)
from iceaggr.tracking.run_logger import sync_spool

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
"""The tag that makes a run a child of another in MLflow (the UI nests it under its parent)."""
TAG_TRIAL_ID = "trial_id"
TAG_SWEEP_PART = "sweep_part"  # "table" or "search"
TAG_SWEEP_NAME = "sweep_name"
TAG_NODE = "node_ip"
TAG_DRIVER_NODE = "driver_node_id"
TAG_WORKER_NODE = "worker_node_id"  # the Ray node of the rank-0 training worker
TAG_IS_PARENT = "is_parent"  # "true" on a sweep's parent run
TAG_ENDED_BY = "ended_by"  # who closed a run its own process left RUNNING
TAG_ERROR = "error"  # the exception that ended a trial
TAG_BEST_LR = "best_lr"  # on the parent run: the search's best learning rate
TAG_BEST_DROPOUT = "best_dropout"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
"""Experiment tag the MLflow 3 UI reads to choose its layout; without it, an experiment
whose runs carry no models opens as a GenAI experiment (traces, judges, prompts)."""
EXPERIMENT_KIND_TRAINING = "custom_model_development"
"""The UI's model-training layout: the runs table with parameter and metric columns."""


def client_for(uri: str, wait_s: float = DEFAULT_WAIT_S) -> PatientClient:
    """A client whose calls wait out a tracking-server outage (with warnings)."""
    return PatientClient(uri, wait_s)


def find_or_create_parent(uri: str, experiment: str, sweep_name: str) -> str:
    """The sweep's parent run (reused when a sweep of this name already has one)."""
    client = client_for(uri)
    exp_id = get_or_create_experiment(client, experiment)
    client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING)
    found = client.search_runs(
        [exp_id],
        filter_string=(f"tags.{TAG_SWEEP_NAME} = '{sweep_name}' and tags.{TAG_IS_PARENT} = 'true'"),
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        exp_id, run_name=sweep_name, tags={TAG_SWEEP_NAME: sweep_name, TAG_IS_PARENT: "true"}
    )
    return run.info.run_id


def find_or_create_child(
    uri: str,
    parent_run_id: str,
    trial_id: str,
    run_name: str,
    tags: dict[str, str],
    wait_s: float = DEFAULT_WAIT_S,
) -> str:
    """The trial's child run; a resumed trial gets its earlier run back (status RUNNING)."""
    client = client_for(uri, wait_s)
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    found = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.`{TAG_PARENT}` = '{parent_run_id}'"
        ),
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        exp_id,
        run_name=run_name,
        tags={TAG_PARENT: parent_run_id, TAG_TRIAL_ID: trial_id, **tags},
    )
    return run.info.run_id


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    client = client_for(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
        max_results=10_000,
    )


DEFAULT_UI = "http://127.0.0.1:5000"
"""Where ``iceaggr mlflow-server`` serves the UI by default (a local store has no UI of its
own)."""
LINK_METRICS = ("val_angle", "val_resultant")
"""The metrics the printed comparison links chart: validation error and collapse."""


def ui_base(tracking_uri: str) -> str:
    """The UI address of a tracking URI: the server itself, or :data:`DEFAULT_UI` for a local
    store (served by ``iceaggr mlflow-server``)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI


def _q(value: Any) -> str:
    """A JSON value as MLflow's UI puts it in a route's query, percent-encoded so a terminal
    keeps the link in one piece."""
    return quote(json.dumps(value, separators=(",", ":")), safe="")


def ui_links(
    base: str, experiment_id: str, parent_run_id: str, search_run_ids: list[str]
) -> dict[str, str]:
    """The MLflow UI pages a user of a sweep needs, by name: ``runs`` (the experiment's runs
    table), ``parent`` (the sweep's parent run: the table, curves and landscape PNGs),
    ``compare`` (the search trials side by side: parameters, metrics, parallel coordinates) and
    ``curves`` (their ``val_angle`` and ``val_resultant`` histories in one chart)."""
    exp = [experiment_id]
    links = {
        "runs": f"{base}/#/experiments/{experiment_id}/runs",
        "parent": f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}",
    }
    if search_run_ids:
        links["compare"] = f"{base}/#/compare-runs?runs={_q(search_run_ids)}&experiments={_q(exp)}"
        links["curves"] = (
            f"{base}/#/metric?runs={_q(search_run_ids)}&metric={_q(LINK_METRICS[0])}"
            f"&experiments={_q(exp)}&plot_metric_keys={_q(list(LINK_METRICS))}"
            "&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear&line_smoothness=1"
            "&show_point=true&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D"
        )
    return links


def sweep_links(uri: str, parent_run_id: str) -> dict[str, str]:
    """:func:`ui_links` of a sweep, read from its MLflow records."""
    client = client_for(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    search = [
        r.info.run_id
        for r in sorted(child_runs(uri, parent_run_id), key=lambda r: r.info.start_time or 0)
        if r.data.tags.get(TAG_SWEEP_PART) == "search"
    ]
    return ui_links(ui_base(uri), exp_id, parent_run_id, search)


LINK_LABELS = {
    "runs": "runs table (expand the parent run to see its trials)",
    "parent": "the sweep's parent run (Artifacts: stability_table.png, loss_curves.png, ...)",
    "compare": "the search's trials compared (parameters, metrics, parallel coordinates)",
    "curves": "the search's val_angle and val_resultant curves in one chart",
}


def format_links(uri: str, links: dict[str, str]) -> str:
    """The MLflow pages to open, with how to serve them for a local store."""
    lines = ["\n## Open in MLflow\n"]
    if not uri.startswith(("http://", "https://")):
        lines.append(
            f"(start the UI first: .venv/bin/iceaggr mlflow-server --backend-store-uri {uri})\n"
        )
    for key, url in links.items():
        lines.append(f"- {LINK_LABELS.get(key, key)}:\n  {url}")
    return "\n".join(lines)


def close_running(uri: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark every child of the parent still RUNNING as ``status``; returns how many."""
    client = client_for(uri)
    n = 0
    for run in child_runs(uri, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
            client.set_tag(run.info.run_id, TAG_ENDED_BY, "sweep cleanup")
            n += 1
    if n:
        log.warning("marked %d MLflow run(s) left RUNNING as %s", n, status)
    return n


def sync_left_over_records(spool_dir: Path, uri: str) -> None:
    """Send records that trial processes which died could not deliver to MLflow."""
    if not spool_dir.exists():
        return
    try:
        sent = sync_spool(spool_dir, uri)
    except Exception as err:
        log.error("could not send MLflow records left in %s: %s", spool_dir, err)
        return
    if sent:
        log.warning(
            "sent MLflow records that ended trial processes had left in %s: %s", spool_dir, sent
        )


class MlflowWatch:
    """Background health checks of an ``http(s)://`` tracking URI (a no-op for other URIs)."""

    def __init__(self, uri: str, every_s: float = 5.0, remind_s: float = REMIND_EVERY_S) -> None:
        self.uri = uri
        self.every_s = every_s
        self.remind_s = remind_s
        self.down_since: float | None = None
        self.outages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def healthy(self) -> bool:
        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status == 200
        except Exception:
            return False

    def start(self) -> None:
        if not self.active or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="mlflow-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        last_remind = 0.0
        while not self._stop.wait(self.every_s):
            ok = self.healthy()
            now = time.monotonic()
            if not ok and self.down_since is None:
                self.down_since = last_remind = now
                self.outages += 1
                log.warning(
                    "MLflow tracking server %s is not answering. Trials keep training; their "
                    "metrics are held (and spooled to disk) and sent once it is back. Restart "
                    "the server with the same backend store to get them.",
                    redact_uri(self.uri),
                )
            elif not ok and now - last_remind >= self.remind_s:
                last_remind = now
                log.warning(
                    "MLflow tracking server %s still down after %.0f s; metrics are held",
                    redact_uri(self.uri),
                    now - (self.down_since or now),
                )
            elif ok and self.down_since is not None:
                log.warning(
                    "MLflow tracking server %s is back after %.0f s; held metrics are being sent",
                    redact_uri(self.uri),
                    now - self.down_since,
                )
                self.down_since = None
