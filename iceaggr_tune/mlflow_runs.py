"""MLflow bookkeeping of a sweep: one parent run, one child run per Tune trial.

Ray's ``MLflowLoggerCallback`` writes flat runs with no parent, so the sweep keeps
its own records: the driver makes the parent run, each trial driver finds or
makes its child run (found again by its ``trial_id`` tag on ``--resume``, so no
run is duplicated), and the sweep closes every run it left RUNNING when it
ends, is interrupted or a trial errors.
"""

from __future__ import annotations

import logging
from typing import Any

from iceaggr.tracking import DEFAULT_WAIT_S, TAG_PARENT, PatientClient, get_or_create_experiment

log = logging.getLogger(__name__)

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
