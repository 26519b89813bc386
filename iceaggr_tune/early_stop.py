"""Asynchronous successive halving (ASHA) decided inside the trials.

Tune's ``ASHAScheduler`` stops a trial by killing its actor. With Ray Train V2 the killed
trial's ``TrainController`` never removes its worker placement group (ray-project/ray#54305),
and on a small cluster the next trials then wait forever for resources (seen here: two
trials stopped, every later trial stuck in "worker group startup timed out").

Here the same rule runs in a small named actor, :class:`RungBoard`: at each rung (a report
number ``grace * rf**k``) a trial records its metric and is told to stop when it is not in the
best ``1/rf`` of the values recorded at that rung so far. A trial told to stop ends its
training loop itself, reports ``stopped_early = 1`` and returns, so Ray Train shuts its worker
group down and frees the resources like any finished trial. All ranks of a trial ask with the
same ``(trial_id, report)`` key and get the same (cached) answer.
"""

from __future__ import annotations

import math
from typing import Any

BOARD_NAMESPACE = "iceaggr"


def rung_reports(grace: int, reduction_factor: int, max_reports: int) -> list[int]:
    """The report numbers where ASHA decides: ``grace * reduction_factor**k`` before the last
    report (``max_reports``; a trial that gets there has finished)."""
    rungs, r = [], grace
    while r < max_reports:
        rungs.append(r)
        r *= reduction_factor
    return rungs


class RungBoard:
    """ASHA rungs for one sweep (``mode`` "min": lower metric is better)."""

    def __init__(self, grace: int, reduction_factor: int, max_reports: int) -> None:
        if grace < 1 or reduction_factor < 2:
            raise ValueError(
                f"need grace >= 1 and reduction_factor >= 2, got {grace}, {reduction_factor}"
            )
        self.rungs = rung_reports(grace, reduction_factor, max_reports)
        self.rf = reduction_factor
        self.recorded: dict[int, list[float]] = {r: [] for r in self.rungs}
        self.decisions: dict[tuple[str, int], bool] = {}

    def should_stop(self, trial_id: str, report: int, value: float) -> bool:
        key = (trial_id, report)
        if key in self.decisions:
            return self.decisions[key]
        stop = False
        if report in self.recorded:
            values = self.recorded[report]
            if not math.isfinite(value):
                stop = True
            elif values:
                k = max(1, len(values) // self.rf)  # the best 1/rf so far may continue
                cutoff = sorted(values)[k - 1]
                stop = value > cutoff
            if math.isfinite(value):
                values.append(value)
        self.decisions[key] = stop
        return stop

    def summary(self) -> dict[str, Any]:
        return {"rungs": self.rungs, "recorded": {str(k): v for k, v in self.recorded.items()}}


def create_board(name: str, grace: int, reduction_factor: int, max_reports: int) -> Any:
    """Start (or find) the sweep's named board actor on the connected Ray cluster."""
    import ray

    actor = ray.remote(num_cpus=0)(RungBoard)
    return actor.options(
        name=name, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote(grace, reduction_factor, max_reports)


def get_board(name: str) -> Any:
    import ray

    return ray.get_actor(name, namespace=BOARD_NAMESPACE)
