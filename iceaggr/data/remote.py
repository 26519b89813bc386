"""Datasets in object storage: ``s3://bucket/prefix`` (and other URIs pyarrow knows).

:func:`data_path` turns a ``--data`` value into what :class:`iceaggr.data.dataset.KaggleDataset`
walks: a :class:`pathlib.Path` for a folder, a :class:`UriPath` for a URI. A ``UriPath``
answers the few questions the reader asks of a path (``/``, ``name``, ``is_dir``,
``is_file``, ``iterdir``) through a ``pyarrow.fs`` filesystem, and prints as its URI, so
every :class:`~iceaggr.data.dataset.DatasetError` names the object as the user wrote it.

S3 (:func:`s3_filesystem`):

* credentials come only from the AWS SDK's standard chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an EC2 instance profile); nothing here takes a key;
* an S3-compatible server (MinIO, Ceph, a test server) is named by the standard
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` variable, e.g. ``http://10.0.0.5:9000``.
  pyarrow's ``S3FileSystem`` ignores both, so they are passed as ``endpoint_override`` here.

This module never imports Ray; the sweep passes :func:`filesystem_for` to Ray's storage.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Variables naming an S3-compatible endpoint, most specific first (the AWS SDKs' names)."""
_FILESYSTEMS: dict[tuple[str, str | None], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def is_uri(path: str | os.PathLike[str]) -> bool:
    """``s3://...``-style (scheme://), as opposed to a local path."""
    return isinstance(path, str | UriPath) and bool(_URI_RE.match(str(path)))


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment (None: AWS itself)."""
    for name in ENDPOINT_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """An ``S3FileSystem`` with the standard credential chain and ``endpoint`` (default: from
    :data:`ENDPOINT_ENV`) as its ``endpoint_override``."""
    endpoint = endpoint if endpoint is not None else s3_endpoint()
    kwargs: dict[str, object] = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"S3 endpoint {endpoint!r} (from {'/'.join(ENDPOINT_ENV)}) is not an "
                f"http(s)://host[:port] address"
            )
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it (``s3://b/k`` -> ``b/k``).

    One filesystem per scheme and endpoint is kept for the process (creating an S3 client
    costs more than a request)."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "s3":
        key = (scheme, s3_endpoint())
        with _FS_LOCK:
            if key not in _FILESYSTEMS:
                _FILESYSTEMS[key] = s3_filesystem(key[1])
            fs = _FILESYSTEMS[key]
        return fs, uri.split("://", 1)[1].rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


class UriPath:
    """A file or folder in object storage, with the part of :class:`pathlib.Path` the dataset
    reader uses. ``str()`` is the URI."""

    def __init__(self, uri: str) -> None:
        if not is_uri(uri):
            raise ValueError(f"not a URI (scheme://...): {uri!r}")
        self.uri = uri.rstrip("/")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"UriPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> UriPath:
        return UriPath(f"{self.uri}/{name}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return filesystem_for(self.uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs[0]

    @property
    def fs_path(self) -> str:
        """The path inside :attr:`filesystem` (``bucket/key`` for S3)."""
        return self._fs[1]

    def info(self) -> pafs.FileInfo:
        """Type, size and mtime (one HEAD request on S3)."""
        return self.filesystem.get_file_info(self.fs_path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def iterdir(self) -> Iterator[UriPath]:
        """The entries directly under this folder (one listing)."""
        selector = pafs.FileSelector(self.fs_path, recursive=False)
        for info in self.filesystem.get_file_info(selector):
            yield self / info.base_name

    def open_input_file(self) -> pafs.NativeFile:
        """A random-access reader (ranged GETs on S3: a parquet footer costs one or two)."""
        return self.filesystem.open_input_file(self.fs_path)


DataPath = Path | UriPath
"""A dataset folder or file: local, or in object storage."""


def data_path(path: str | os.PathLike[str]) -> Path | UriPath:
    """``--data`` as the reader walks it: a URI stays one, anything else is a folder."""
    if isinstance(path, UriPath):
        return path
    return UriPath(str(path)) if is_uri(path) else Path(path)
