"""The sweep driver's watch on its MLflow tracking server.

Trials keep training while the server is down (their records are held and sent later, see
:mod:`iceaggr.tracking`), and their warnings land in the trial processes' logs. The watch
makes the outage plain in the sweep's own console too: it asks the server's ``/health``
every few seconds and logs one warning when the server stops answering, a reminder every
few minutes, and one line when it answers again.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request

from iceaggr.tracking.client import REMIND_EVERY_S, redact_uri

log = logging.getLogger(__name__)


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
