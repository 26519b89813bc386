"""MLflow records for one training run, robust to a tracking server that goes away.

Three pieces:

* :class:`PatientClient` wraps ``MlflowClient``: a call that cannot reach the server
  (connection refused, timeout, 5xx) is retried every few seconds, with a warning, until
  the server answers or ``wait_s`` runs out. The sweep driver and the trial drivers use it,
  so a restarted or briefly unreachable server delays bookkeeping instead of failing trials.
* :class:`RunLogger` is what the trainer logs through. Params, tags and metrics go into an
  ordered queue (and into a JSON-lines spool file when ``spool_dir`` is given). Without
  ``background`` a send is tried in the caller at each record and, while the server is
  down, at most every ``RETRY_MAX_S`` seconds; with ``background=True`` (the trainer's
  :class:`MlflowHook`) a sender thread does the sending, so a slow or absent server costs a
  training step nothing (``benchmarks/logging_cost.py`` measures it); the queue is then
  bounded (``max_pending`` records: a full queue makes the caller wait). The queue is sent in
  order once the server is back; :meth:`RunLogger.terminate` waits for it (up to
  ``wait_s``). If the process dies first, the next logger on the same run and spool folder
  (a restarted Ray Train worker) sends what the spool holds, or ``iceaggr mlflow-sync``
  does.
* :class:`MlflowHook` is the trainer's hook (:mod:`iceaggr.hooks`) that owns a run's
  :class:`RunLogger`: params, input audit, metrics, divergence tags, the final status.

A run written before (a resumed or restarted trial) already holds its curve up to some
step; the logger learns that step from the server at first contact and drops metrics at or
below it, so a metric history has neither gaps nor duplicated steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iceaggr.training.hooks import Hook

if TYPE_CHECKING:
    from iceaggr.training.config import ExperimentConfig
    from iceaggr.training.train import DivergenceReport, Trainer, TrainResult

log = logging.getLogger(__name__)

# Tags that mark a diverged run (read by the sweep and by people in the MLflow UI).
TAG_DIVERGED = "diverged"
TAG_DIVERGED_AT_STEP = "diverged_at_step"
TAG_DIVERGENCE_REASON = "divergence_reason"
TAG_COLLAPSED = "collapsed"
"""``true`` when the run's last validation had R >= ``train.collapse_resultant`` (one output
direction for every event, :mod:`iceaggr.collapse`); ``val_resultant`` is the R itself."""
TAG_PARENT = "mlflow.parentRunId"
# The first step a resumed or restarted run trained (its curve continues from there).
TAG_RESUMED_FROM_STEP = "resumed_from_step"

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names that mean "this machine only" (a tracking server there is not reachable
from other machines)."""
SQLITE_PREFIX = "sqlite:///"

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on a param value
# The metric every training report carries; its last step marks how far a run was logged.
RESUME_MARKER_METRIC = "loss"

DEFAULT_WAIT_S = 1800.0
"""How long a blocking MLflow call waits for an unreachable server before it gives up."""
RETRY_EVERY_S = 5.0
"""Pause between attempts of a blocking call."""
RETRY_MAX_S = 30.0
"""Longest pause between the non-blocking send attempts of a :class:`RunLogger`."""
REMIND_EVERY_S = 300.0
"""While the server stays down, a reminder is logged this often."""
SPOOL_PREFIX = "mlflow-spool-"
MAX_PENDING = 100_000
"""Unsent records a background :class:`RunLogger` holds before a new record waits for room
(about 10,000 reports of 10 metrics: a long outage)."""
CHECKPOINT_WAIT_S = 30.0
"""At a checkpoint, how long :class:`MlflowHook` waits for the earlier reports to be sent
while the server answers (none of it while the server is down)."""


class MlflowUnreachable(RuntimeError):
    """The tracking server did not answer within the allowed wait."""


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` made absolute (Ray workers run in other folders)."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return SQLITE_PREFIX + str(Path(uri[len(SQLITE_PREFIX) :]).resolve())
    return uri


@contextlib.contextmanager
def _sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a local sqlite store's file while it is opened.

    MLflow creates and migrates a new sqlite store on first open; two processes doing that
    at once (the sweep driver, trial workers, a second sweep) fail half-way with errors such
    as "table experiments already exists". SQLite's own locks are POSIX record locks, which
    ``flock`` does not touch. An empty file is a valid empty database for SQLite.
    """
    if not uri.startswith(SQLITE_PREFIX) or ":memory:" in uri:
        yield
        return
    path = Path(uri[len(SQLITE_PREFIX) :].split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def redact_uri(uri: str) -> str:
    """A URI with its user and password (before ``@``) replaced by ``***`` (logs, params)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "api_key", "apikey")


def redact_params(flat: dict[str, Any]) -> dict[str, Any]:
    """Params safe to record: URI credentials and secret-looking keys replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if any(w in k.lower() for w in SECRET_WORDS):
            out[k] = "***"
        elif isinstance(v, str):
            out[k] = redact_uri(v)
        else:
            out[k] = v
    return out


def configure_mlflow_http() -> None:
    """Short HTTP retries inside MLflow; the waiting is done here, with warnings.

    MLflow's own default (7 retries, backoff factor 2) stalls one call for minutes while
    the server is down. Values the user set in the environment are kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def is_unreachable(err: BaseException) -> bool:
    """True for errors that mean "the server is not answering now" (worth a retry)."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    try:
        import requests

        if isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        msg = str(err)
        # Connection-level failures, and 5xx answers of a server that is (re)starting.
        return "failed with exception" in msg or "failed with error code 5" in msg
    return False


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


class PatientClient:
    """An ``MlflowClient`` whose calls wait out a server outage (up to ``wait_s``)."""

    def __init__(self, tracking_uri: str, wait_s: float = DEFAULT_WAIT_S) -> None:
        from mlflow.tracking import MlflowClient

        configure_mlflow_http()
        self.tracking_uri = tracking_uri
        self.wait_s = float(wait_s)
        with _sqlite_store_lock(tracking_uri):
            self.raw = MlflowClient(tracking_uri=tracking_uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, attr, *args, **kwargs)

        return call

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        last_warn = None
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as err:
                if not is_unreachable(err):
                    raise
                now = time.monotonic()
                waited = now - start
                if waited >= self.wait_s:
                    raise MlflowUnreachable(
                        f"MLflow at {redact_uri(self.tracking_uri)} did not answer {what} for "
                        f"{waited:.0f} s ({type(err).__name__}: {str(err)[:300]}). Check that "
                        f"the tracking server runs and is reachable from this node."
                    ) from err
                if last_warn is None or now - last_warn >= 60:
                    log.warning(
                        "MLflow at %s is unreachable (%s); %s waits for it, retrying every "
                        "%.0f s for up to %.0f s more",
                        redact_uri(self.tracking_uri),
                        _short(err),
                        what,
                        RETRY_EVERY_S,
                        self.wait_s - waited,
                    )
                    last_warn = now
                time.sleep(min(RETRY_EVERY_S, max(0.0, self.wait_s - waited)))
                continue
            if last_warn is not None:
                log.warning(
                    "MLflow at %s answers again (%s went through after %.0f s)",
                    redact_uri(self.tracking_uri),
                    what,
                    time.monotonic() - start,
                )
            return out


def _short(err: BaseException) -> str:
    msg = str(err)
    if "Connection refused" in msg:
        return "connection refused"
    return f"{type(err).__name__}: {msg[:160]}"


def get_or_create_experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception as err:  # created concurrently by another process
        if is_unreachable(err):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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
                _short(err),
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
                log.error("MLflow run %s: the sender stops on %s", self.run_id, _short(err))
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
        from iceaggr.training.config import to_dict

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
