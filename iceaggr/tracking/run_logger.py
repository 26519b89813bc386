"""The records of one MLflow run, kept in order through a tracking-server outage.

:class:`RunLogger` is what the trainer logs through (:class:`~iceaggr.training.mlflow_hook.
MlflowHook`). Params, tags and metrics go into an ordered queue (and into a JSON-lines spool file
when ``spool_dir`` is given). Without ``background`` a send is tried in the caller at each record
and, while the server is down, at most every ``RETRY_MAX_S`` seconds; with ``background=True`` a
sender thread does the sending, so a slow or absent server costs a training step nothing
(``benchmarks/logging_cost.py`` measures it); the queue is then bounded (``max_pending`` records:
a full queue makes the caller wait). The queue is sent in order once the server is back;
:meth:`RunLogger.terminate` waits for it (up to ``wait_s``). If the process dies first, the next
logger on the same run and spool folder (a restarted Ray Train worker) sends what the spool
holds, or ``iceaggr mlflow-sync`` does (:func:`sync_spool`).

A run written before (a resumed or restarted trial) already holds its curve up to some
step; the logger learns that step from the server at first contact and drops metrics at or
below it, so a metric history has neither gaps nor duplicated steps.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from iceaggr.tracking.client import (
    DEFAULT_WAIT_S,
    REMIND_EVERY_S,
    MlflowUnreachable,
    PatientClient,
    flatten,
    get_or_create_experiment,
    is_unreachable,
    redact_params,
    redact_uri,
    short_error,
)

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on a param value
# The metric every training report carries; its last step marks how far a run was logged.
RESUME_MARKER_METRIC = "loss"

RETRY_MAX_S = 30.0
"""Longest pause between the non-blocking send attempts of a :class:`RunLogger`."""
SPOOL_PREFIX = "mlflow-spool-"
MAX_PENDING = 100_000
"""Unsent records a background :class:`RunLogger` holds before a new record waits for room
(about 10,000 reports of 10 metrics: a long outage)."""


class RunLogger:
    """Writes params, tags, metrics and the final status of one MLflow run."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        run_id: str | None = None,
        experiment: str = "iceaggr",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        spool_dir: str | Path | None = None,
        wait_s: float = DEFAULT_WAIT_S,
        background: bool = False,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.client = PatientClient(tracking_uri, wait_s)
        self.tracking_uri = tracking_uri
        if run_id is None:  # a run of its own: made now (waits for the server if needed)
            exp_id = get_or_create_experiment(self.client, experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
            run_id = run.info.run_id
        self.run_id = run_id
        # Learned from the server at first contact (None: not yet).
        self._logged_upto: int | None = None
        self._params_on_server: set[str] | None = None
        self._queued_upto = -1  # last step of the marker metric in the queue
        self._ops: list[tuple[str, Any]] = []
        # _lock guards _ops, the spool file and the counters; _send_lock makes one sender at
        # a time (the background thread, or a blocking flush in the caller).
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._queued_total = 0  # records ever queued (the spool's included)
        self._sent_total = 0  # records ever taken off the queue after a send
        self.max_pending = int(max_pending)
        self._wake = threading.Event()
        self._closed = False
        self._thread_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._backoff = 1.0
        self._last_remind = 0.0
        self._spool = Path(spool_dir) / f"{SPOOL_PREFIX}{run_id}.jsonl" if spool_dir else None
        if self._spool is not None and self._spool.exists():
            lines = self._spool.read_text().splitlines()
            for line in lines:
                try:
                    kind, payload = json.loads(line)
                except ValueError:  # a line cut short by a killed process
                    continue
                if kind == "metric":
                    payload = tuple(payload)
                    if payload[0] == RESUME_MARKER_METRIC:
                        self._queued_upto = max(self._queued_upto, int(payload[3]))
                self._ops.append((kind, payload))
            self._queued_total = len(self._ops)
            log.info(
                "MLflow run %s: %d queued records from %s", run_id, len(self._ops), self._spool
            )
        if background:
            self._thread = threading.Thread(
                target=self._sender, name=f"mlflow-sender-{run_id[:8]}", daemon=True
            )
            self._thread.start()

    @property
    def pending(self) -> int:
        """Records not yet sent."""
        with self._lock:
            return len(self._ops)

    # ---------------------------------------------------------------- queueing
    def _queue(self, items: list[tuple[str, Any]]) -> None:
        with self._room:
            if self._thread is not None and len(self._ops) >= self.max_pending:
                log.warning(
                    "MLflow run %s: %d records unsent; logging waits for the sender",
                    self.run_id,
                    len(self._ops),
                )
                while len(self._ops) >= self.max_pending and self._thread.is_alive():
                    self._room.wait(1.0)
            self._ops.extend(items)
            self._queued_total += len(items)
            if self._spool is not None:
                self._spool.parent.mkdir(parents=True, exist_ok=True)
                with self._spool.open("a") as f:
                    for item in items:
                        f.write(json.dumps(item) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        flat = redact_params(flatten(params))
        items = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in sorted(flat.items())}
        self._queue([("params", items)])
        self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._queue([("tags", {k: str(v) for k, v in tags.items()})])
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` and try to send (non-finite values are kept as NaN)."""
        if step <= self._queued_upto or (
            self._logged_upto is not None and step <= self._logged_upto
        ):
            return
        ts = int(time.time() * 1000)
        self._queue([("metric", (k, float(v), ts, int(step))) for k, v in metrics.items()])
        if RESUME_MARKER_METRIC in metrics:
            self._queued_upto = int(step)
        self.flush()

    # ---------------------------------------------------------------- sending
    def _send(self) -> None:
        """Send the queue in order; raises on the first failure (the rest stays queued)."""
        from mlflow.entities import Metric, Param, RunTag

        raw = self.client.raw
        if self._logged_upto is None:
            history = raw.get_metric_history(self.run_id, RESUME_MARKER_METRIC)
            self._logged_upto = max((m.step for m in history), default=-1)
        if self._params_on_server is None:
            self._params_on_server = set(raw.get_run(self.run_id).data.params)
        while True:
            with self._lock:  # only a sender removes records: the head stays as read here
                if not self._ops:
                    break
                kind, payload = self._ops[0]
                n = 1
                if kind == "metric":
                    while n < len(self._ops) and self._ops[n][0] == "metric":
                        # Cut chunks between steps only: a step is sent whole or not at all.
                        if n >= 1000 and self._ops[n][1][3] != self._ops[n - 1][1][3]:
                            break
                        n += 1
                    chunk = [p for _, p in self._ops[:n] if int(p[3]) > self._logged_upto]
            if kind == "metric":
                if chunk:
                    raw.log_batch(
                        self.run_id,
                        metrics=[
                            Metric(k, v if math.isfinite(v) else float("nan"), ts, step)
                            for k, v, ts, step in chunk
                        ],
                    )
                    marker = [int(p[3]) for p in chunk if p[0] == RESUME_MARKER_METRIC]
                    if marker:
                        self._logged_upto = max(self._logged_upto, max(marker))
            elif kind == "params":
                # Params are immutable: a resumed run keeps the values it has.
                new = [Param(k, v) for k, v in payload.items() if k not in self._params_on_server]
                for i in range(0, len(new), 100):
                    raw.log_batch(self.run_id, params=new[i : i + 100])
                    self._params_on_server.update(p.key for p in new[i : i + 100])
            elif kind == "tags":
                raw.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
            else:  # pragma: no cover - only the kinds above are queued
                raise ValueError(f"unknown MLflow record kind {kind!r}")
            with self._room:
                del self._ops[:n]
                self._sent_total += n
                self._room.notify_all()

    def flush(self, block: bool = False) -> bool:
        """Send what is queued. Returns False (keeping it) when the server is unreachable.

        Non-blocking by default: while the server is down an attempt is made at most every
        few seconds (backing off to ``RETRY_MAX_S``); with a background sender it only wakes
        the sender and returns False while the server is known to be down. ``block=True``
        waits up to ``wait_s``, retrying as every :class:`PatientClient` call does (with a
        background sender, after its send in progress).
        """
        if self._thread is not None and not block:
            self._wake.set()
            return self._down_since is None
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            raise err
        with self._send_lock:
            return self._flush_now(block)

    def _flush_now(self, block: bool) -> bool:
        if not self.pending and self._logged_upto is not None:
            return True
        now = time.monotonic()
        if not block and self._down_since is not None and now < self._next_try:
            return False
        try:
            if block:
                self.client.call(f"sending the records of run {self.run_id}", self._send)
            else:
                self._send()
        except MlflowUnreachable as err:
            log.error(
                "%s; %d records of run %s are not sent%s",
                err,
                self.pending,
                self.run_id,
                f" (kept in {self._spool}; send them later with `iceaggr mlflow-sync "
                f"{self._spool.parent} --tracking-uri URI`)"
                if self._spool
                else " and are lost",
            )
            return False
        except Exception as err:
            if not is_unreachable(err):
                raise
            self._note_down(err, now)
            return False
        self._note_up()
        return True

    def _note_down(self, err: BaseException, now: float) -> None:
        if self._down_since is None:
            self._down_since = now
            self._backoff = 1.0
            self._last_remind = now
            log.warning(
                "MLflow at %s is unreachable (%s); training goes on and %d records of run %s "
                "are held%s until it is back",
                redact_uri(self.tracking_uri),
                short_error(err),
                len(self._ops),
                self.run_id,
                f" (also in {self._spool})" if self._spool else "",
            )
        elif now - self._last_remind >= REMIND_EVERY_S:
            self._last_remind = now
            log.warning(
                "MLflow at %s still unreachable after %.0f s; %d records of run %s held",
                redact_uri(self.tracking_uri),
                now - self._down_since,
                len(self._ops),
                self.run_id,
            )
        self._next_try = now + self._backoff
        self._backoff = min(RETRY_MAX_S, self._backoff * 2)

    def _sender(self) -> None:
        """The background sender: sends whenever woken, retries while the server is down."""
        while not self._closed:
            down = self._down_since is not None
            self._wake.wait(max(0.05, self._next_try - time.monotonic()) if down else None)
            self._wake.clear()
            if self._closed:
                break
            try:
                with self._send_lock:
                    self._flush_now(block=False)
            except Exception as err:  # not an outage: the caller's next blocking flush raises
                log.error("MLflow run %s: the sender stops on %s", self.run_id, short_error(err))
                self._thread_error = err
                break

    def wait_sent(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until what is queued now has been sent; False if not.

        Returns at once with False while the server is known to be down (the records stay
        queued and spooled); without a background sender it is a blocking :meth:`flush`.
        """
        if self._thread is None:
            return self.flush(block=True)
        with self._lock:
            target = self._queued_total
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._room:
            while self._sent_total < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._down_since is not None or not self._thread.is_alive():
                    return False
                self._room.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        """Stop the background sender (what it holds stays queued and spooled)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.wait_s)

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "MLflow at %s is back after %.0f s; the held records of run %s are sent",
                redact_uri(self.tracking_uri),
                time.monotonic() - self._down_since,
                self.run_id,
            )
            self._down_since = None
        with self._lock:  # a record queued meanwhile keeps the spool
            if self._spool is not None and not self._ops and self._spool.exists():
                self._spool.unlink()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def terminate(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) after sending what is queued."""
        if not self.flush(block=True):
            raise MlflowUnreachable(
                f"MLflow at {redact_uri(self.tracking_uri)} did not take the records of run "
                f"{self.run_id}; the run is left open"
            )
        self.close()
        self.client.set_terminated(self.run_id, status=status)


def sync_spool(spool_dir: str | Path, tracking_uri: str, wait_s: float = 60.0) -> dict[str, int]:
    """Send every spool file under ``spool_dir`` (records a dead process could not send)."""
    sent: dict[str, int] = {}
    for path in sorted(Path(spool_dir).glob(f"{SPOOL_PREFIX}*.jsonl")):
        run_id = path.name[len(SPOOL_PREFIX) : -len(".jsonl")]
        logger = RunLogger(tracking_uri, run_id=run_id, spool_dir=path.parent, wait_s=wait_s)
        n = logger.pending
        if not logger.flush(block=True):
            raise MlflowUnreachable(f"could not send {path} to {redact_uri(tracking_uri)}")
        sent[run_id] = n
    return sent
