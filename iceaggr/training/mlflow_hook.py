"""The MLflow records of a training run: :class:`MlflowHook`, the trainer's hook that owns the
run's :class:`~iceaggr.tracking.run_logger.RunLogger` (params, input audit, metrics, divergence
and collapse tags, the final status), and the run tags it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from iceaggr.tracking.client import DEFAULT_WAIT_S
from iceaggr.tracking.run_logger import RunLogger
from iceaggr.training.config import ExperimentConfig, to_dict
from iceaggr.training.hooks import Hook

if TYPE_CHECKING:
    from iceaggr.training.guard import DivergenceReport
    from iceaggr.training.results import TrainResult
    from iceaggr.training.trainer import Trainer

# Tags that mark a diverged run (read by the sweep and by people in the MLflow UI).
TAG_DIVERGED = "diverged"
TAG_DIVERGED_AT_STEP = "diverged_at_step"
TAG_DIVERGENCE_REASON = "divergence_reason"
TAG_COLLAPSED = "collapsed"
"""``true`` when the run's last validation had R >= ``train.collapse_resultant`` (one output
direction for every event, :mod:`iceaggr.training.collapse`); ``val_resultant`` is the R itself."""
# The first step a resumed or restarted run trained (its curve continues from there).
TAG_RESUMED_FROM_STEP = "resumed_from_step"

CHECKPOINT_WAIT_S = 30.0
"""At a checkpoint, how long :class:`MlflowHook` waits for the earlier reports to be sent
while the server answers (none of it while the server is down)."""


class MlflowHook(Hook):
    """Logs a training run to MLflow through a :class:`RunLogger` (rank 0 only).

    At the start: the run (made now, or the given ``run_id``), its ``tags`` (plus
    ``resumed_from_step`` for a resumed run), the config and world size as params and the
    input audit's largest magnitudes. Every report's metrics; at a divergence its metrics and
    the ``diverged`` tags. At the end a run this hook made is ended (FAILED when it diverged,
    else FINISHED); a given run is only flushed, blocking, for its owner to end.

    A background thread sends the records (``background``, the default): a report costs the
    training step a spool write, not a round trip to the server. At a checkpoint the hook
    waits until the earlier reports are on the server (usually long done; no wait while the
    server is down), so a trial restarted from that checkpoint on another node finds its
    curve up to there.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        experiment: str = "iceaggr",
        spool_dir: str | Path | None = None,
        wait_s: float = DEFAULT_WAIT_S,
        background: bool = True,
    ) -> None:
        self.tracking_uri, self.run_id, self.tags = tracking_uri, run_id, dict(tags or {})
        self.experiment, self.spool_dir, self.wait_s = experiment, spool_dir, wait_s
        self.background = background
        self.logger: RunLogger | None = None
        self.trainer: Trainer | None = None

    @classmethod
    def for_config(
        cls, cfg: ExperimentConfig, *, run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> MlflowHook:
        """The hook for ``cfg.train``'s tracking URI, experiment, spool folder and wait."""
        tc = cfg.train
        if not tc.mlflow_tracking_uri:
            raise ValueError("train.mlflow_tracking_uri is not set: there is no MLflow to log to")
        spool = Path(tc.mlflow_spool_dir).expanduser() if tc.mlflow_spool_dir else None
        return cls(
            tc.mlflow_tracking_uri,
            run_id=run_id,
            tags=tags,
            experiment=tc.mlflow_experiment,
            spool_dir=spool,
            wait_s=tc.mlflow_wait_s,
        )

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.logger = RunLogger(
            self.tracking_uri,
            run_id=self.run_id,
            experiment=self.experiment,
            run_name=trainer.cfg.name,
            spool_dir=self.spool_dir if self.spool_dir is not None else trainer.checkpoint_dir,
            wait_s=self.wait_s,
            background=self.background,
        )
        tags = dict(self.tags)
        if trainer.start_step > 0:  # a resumed run says from where (its curve continues there)
            tags[TAG_RESUMED_FROM_STEP] = str(trainer.start_step)
        if tags:
            self.logger.set_tags(tags)
        self.logger.log_params({**to_dict(trainer.cfg), "world_size": trainer.world_size})
        audit = trainer.result.input_audit
        self.logger.log_params(
            {f"input_audit.{k}.absmax": f"{v['absmax']:.4g}" for k, v in audit.items()}
        )

    def on_report(self, metrics: dict[str, float], step: int, checkpoint_dir: Path | None) -> None:
        assert self.logger is not None
        if checkpoint_dir is not None:
            self.logger.wait_sent(CHECKPOINT_WAIT_S)
        self.logger.log_metrics(metrics, step)

    def on_diverged(self, report: DivergenceReport, metrics: dict[str, float], step: int) -> None:
        assert self.logger is not None
        self.logger.log_metrics(metrics, step)
        self.logger.set_tags(
            {
                TAG_DIVERGED: "true",
                TAG_DIVERGED_AT_STEP: report.step,
                TAG_DIVERGENCE_REASON: report.summary(),
            }
        )

    def on_end(self, result: TrainResult) -> None:
        assert self.logger is not None and self.trainer is not None
        if result.val_collapse is not None and result.diverged is None:
            self.logger.set_tags({TAG_COLLAPSED: "true" if result.collapsed else "false"})
        if self.run_id is None:  # a run this hook made; otherwise its owner ends it
            self.logger.terminate("FAILED" if result.diverged else "FINISHED")
        else:
            self.logger.flush(block=True)  # the owner ends the run; the records must be there
            self.logger.close()
