"""Checks that a sweep on a multi-node Ray cluster writes where every node can reach.

On one machine, ``sqlite:///mlflow.db`` and ``runs/sweeps`` are fine. On a cluster, a trial
on a worker node would write its MLflow run into that node's own sqlite file and its
checkpoints onto its own disk, where the driver and the next attempt of the trial never see
them. :func:`check_cluster_storage` fails early, before any trial starts, naming the option
to change.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from iceaggr.data.remote import filesystem_for
from iceaggr.tracking.client import LOOPBACK_HOSTS

log = logging.getLogger(__name__)

REMOTE_TRACKING_SCHEMES = ("http://", "https://", "databricks")
REMOTE_STORAGE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://")


def remote_path(path: str) -> bool:
    """An object-store URI (``s3://...``) rather than a folder."""
    return path.startswith(REMOTE_STORAGE_SCHEMES)


def ray_storage(path: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` as Ray's ``RunConfig`` takes them.

    An ``s3://`` URI becomes ``bucket/prefix`` with an S3 filesystem that uses
    ``AWS_ENDPOINT_URL`` (Ray resolves a URI with pyarrow's ``FileSystem.from_uri``, which
    ignores that variable); anything else is Ray's to resolve (filesystem None)."""
    if path.startswith("s3://"):
        fs, fs_path = filesystem_for(path)
        return fs_path, fs
    return path, None


class ClusterConfigError(ValueError):
    """A sweep option that cannot work on the connected multi-node cluster."""


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _sees_marker(path: str) -> bool:
    return Path(path).is_file()


def nodes_missing_path(marker: Path, nodes: list[dict[str, Any]]) -> list[str]:
    """IPs of the nodes on which ``marker`` is not visible (one tiny task per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_sees_marker)
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(marker))
        for n in nodes
    }
    return [node for node, ref in refs.items() if not ray.get(ref, timeout=120)]


def check_cluster_storage(tracking_uri: str, storage_path: str) -> int:
    """Raise :class:`ClusterConfigError` if a multi-node sweep would write node-locally.

    Returns the number of alive nodes. A single-node Ray needs nothing shared.
    """
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return len(nodes)
    if not tracking_uri.startswith(REMOTE_TRACKING_SCHEMES):
        raise ClusterConfigError(
            f"--tracking-uri {tracking_uri!r} is a store on this machine, but the cluster has "
            f"{len(nodes)} nodes: trials on other nodes would write to their own copy. Point it "
            f"at the MLflow server on the head, e.g. --tracking-uri http://<head-ip>:5000 "
            f"(cluster.yaml starts one on port 5000)."
        )
    from urllib.parse import urlparse

    host = urlparse(tracking_uri).hostname
    machines = {n["NodeManagerAddress"] for n in nodes}
    if host in LOOPBACK_HOSTS and len(machines) > 1:
        raise ClusterConfigError(
            f"--tracking-uri {tracking_uri!r} names this machine's loopback address, but the "
            f"cluster's nodes sit on {len(machines)} machines: a trial on another node would "
            f"look for MLflow on itself. Use the head's private address (on clusters made from "
            f"cluster.yaml, jobs get it as MLFLOW_TRACKING_URI; leave --tracking-uri out)."
        )
    if remote_path(storage_path):
        return len(nodes)
    root = Path(storage_path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".visible-{uuid.uuid4().hex}"
    marker.write_text("written by the sweep driver to check shared storage\n")
    try:
        missing = nodes_missing_path(marker, nodes)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise ClusterConfigError(
            f"--storage-path {str(root)!r} is not visible from node(s) {missing} of this "
            f"{len(nodes)}-node cluster, so their checkpoints and results would be lost. Use "
            f"shared storage: an s3:// (or gs://) URI, or a shared filesystem mounted at the "
            f"same path on every node."
        )
    log.info("storage %s is visible from all %d nodes", root, len(nodes))
    return len(nodes)


def dashboard_url() -> str | None:
    """``http://host:port`` of the connected cluster's dashboard (None: it has none)."""
    from ray._private.worker import global_worker

    node = getattr(global_worker, "node", None)
    url = (getattr(node, "address_info", None) or {}).get("webui_url") if node else None
    return f"http://{url}" if url else None


def rejects_anonymous_requests(url: str) -> bool:
    """True when the dashboard answers a request without the Ray token with 401/403."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=10):
            return False
    except urllib.error.HTTPError as err:
        return err.code in (401, 403)


def check_ray_auth(allow_unauthenticated: bool = False) -> bool | None:
    """Refuse to run on a Ray cluster that accepts anyone: Ray's token authentication.

    Ray without token authentication runs any job that anyone who reaches its ports submits.
    The check asks the cluster's dashboard for ``/api/version`` without the token: a cluster
    with token authentication answers 401. Returns True (enforced), False (not enforced and
    allowed by ``allow_unauthenticated``) or None (no dashboard to ask; a warning is logged).
    """
    url = dashboard_url()
    if url is None:
        log.warning(
            "this Ray cluster has no dashboard, so the sweep cannot check that it enforces "
            "token authentication; make sure it was started with RAY_AUTH_MODE=token"
        )
        return None
    if rejects_anonymous_requests(url):
        return True
    message = (
        f"the Ray cluster at {url} answers requests without a token: its token "
        f"authentication is off, so anyone who reaches its ports can run code on it. Start it "
        f"with RAY_AUTH_MODE=token (cluster.yaml does; run `ray get-auth-token --generate` "
        f"before `ray up`), and export RAY_AUTH_MODE=token where the sweep runs"
    )
    if not allow_unauthenticated:
        raise ClusterConfigError(
            message + ", or pass --allow-unauthenticated-ray on a trusted, isolated network."
        )
    log.warning("%s (allowed by --allow-unauthenticated-ray)", message)
    return False
