"""MLflow calls that wait out a tracking server that goes away, and the helpers around them.

:class:`PatientClient` wraps ``MlflowClient``: a call that cannot reach the server (connection
refused, timeout, 5xx) is retried every few seconds, with a warning, until the server answers
or ``wait_s`` runs out. The sweep driver, the trial drivers and every
:class:`~iceaggr.tracking.run_logger.RunLogger` use it, so a restarted or briefly unreachable
server delays bookkeeping instead of failing trials. Also here: tracking URIs (made absolute,
with credentials redacted) and params made safe to record.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names that mean "this machine only" (a tracking server there is not reachable
from other machines)."""
SQLITE_PREFIX = "sqlite:///"

DEFAULT_WAIT_S = 1800.0
"""How long a blocking MLflow call waits for an unreachable server before it gives up."""
RETRY_EVERY_S = 5.0
"""Pause between attempts of a blocking call."""
REMIND_EVERY_S = 300.0
"""While the server stays down, a reminder is logged this often."""


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
                        short_error(err),
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


def short_error(err: BaseException) -> str:
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
