"""A dataset in object storage: the reader, the preflight check and the per-node file cache,
against a real S3-compatible server on 127.0.0.1 (moto's, started by the ``s3_server``
fixture), reached through ``AWS_ENDPOINT_URL`` as a MinIO or Ceph server would be.

Every bad-input case breaks a real copy of a small synthetic dataset, uploads it, and checks
that the error for the ``s3://`` dataset is the error for the same folder on disk with the
folder replaced by the URI.

Run: ``.venv/bin/python -m pytest tests/test_s3.py -q``
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import S3Server

from iceaggr.data.cache import FileCache
from iceaggr.data.dataset import META_FILE, DatasetError, KaggleDataset
from iceaggr.data.remote import UriPath, is_uri, s3_filesystem
from iceaggr.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "data"
    return write_synthetic_dataset(out, 900, batch_size=300, seed=3, progress=False)


@pytest.fixture(scope="module")
def clean_uri(s3_server: S3Server, clean: Path) -> str:
    return s3_server.upload(clean, "clean")


def test_uri_detection_and_endpoint(s3_server: S3Server) -> None:
    assert is_uri("s3://bucket/x") and not is_uri("data/synthetic") and not is_uri("/abs/path")
    # The bucket exists on the test server only: AWS_ENDPOINT_URL was used.
    assert UriPath(f"s3://{s3_server.BUCKET}").is_dir()
    with pytest.raises(ValueError, match="not an http"):
        s3_filesystem("ftp://host:21")


def test_s3_dataset_reads_like_the_folder(clean: Path, clean_uri: str, tmp_path: Path) -> None:
    local = KaggleDataset(clean)
    remote = KaggleDataset(clean_uri, cache=FileCache(tmp_path / "cache"))
    assert remote.batch_ids == local.batch_ids == [1, 2, 3]
    np.testing.assert_array_equal(remote.geometry, local.geometry)
    assert remote.preflight() == local.preflight()
    stats = remote.cache.stats  # type: ignore[union-attr]
    assert stats.misses == 1  # the metadata only: preflight reads footers, not files
    a, b = local.read_batch(2), remote.read_batch(2)
    assert str(b.path) == f"{clean_uri}/train/batch_2.parquet"
    for name in ("sensor_id", "time", "charge", "auxiliary", "event_id", "azimuth"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert stats.misses == 2
    assert stats.bytes_downloaded == sum(
        (clean / p).stat().st_size for p in (META_FILE, "train/batch_2.parquet")
    )
    remote.read_batch(2)
    again = KaggleDataset(clean_uri, cache=FileCache(tmp_path / "cache"))  # another trial
    again.read_batch(2)
    assert stats.misses == 2 and again.cache.stats.misses == 0  # type: ignore[union-attr]
    assert again.cache.stats.metrics()["data_cache_hits"] == 2  # type: ignore[union-attr]


def test_line_fit_reads_s3_through_the_cache(
    s3_server: S3Server, clean: Path, clean_uri: str, tmp_path: Path
) -> None:
    from iceaggr.data.linefit import line_fit_dataset

    cache = FileCache(tmp_path / "cache")
    remote = line_fit_dataset(clean_uri, max_events=100, batch_ids=[3], cache=cache)
    local = line_fit_dataset(clean, max_events=100, batch_ids=[3])
    assert {k: v for k, v in remote.items() if k != "events_per_s"} == {
        k: v for k, v in local.items() if k != "events_per_s"
    }
    cached = {p.name.rsplit("-", 1)[-1] for p in cache.entries()}
    assert cached == {META_FILE, "batch_3.parquet"} and cache.stats.misses == 2
    missing = f"s3://{s3_server.BUCKET}/nothing-here"
    with pytest.raises(FileNotFoundError, match=f"{missing}/sensor_geometry.csv not found.*aws s3"):
        line_fit_dataset(missing, cache=cache)


def _drop(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def _cut_footer(root: Path) -> None:
    path = root / "train" / "batch_2.parquet"
    path.write_bytes(path.read_bytes()[:-100])


def _sensor_as_int32(root: Path) -> None:
    path = root / "train" / "batch_3.parquet"
    df = pd.read_parquet(path)
    df["sensor_id"] = df["sensor_id"].astype("int32")
    df.to_parquet(path)


def _meta_rows_cut(root: Path) -> None:
    meta = pd.read_parquet(root / META_FILE)
    meta[meta.batch_id != 2].to_parquet(root / META_FILE, index=False)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_drop(META_FILE), "missing file"),
        (_drop("sensor_geometry.csv"), "missing file"),
        (lambda root: shutil.rmtree(root / "train"), "missing folder"),
        (_cut_footer, "not a readable parquet file"),
        (_sensor_as_int32, "column 'sensor_id' has dtype int32, expected int16"),
        (_meta_rows_cut, "no rows with batch_id == 2"),
    ],
    ids=["no-meta", "no-geometry", "no-train-folder", "cut-footer", "wrong-dtype", "meta-rows"],
)
def test_bad_s3_dataset_errors_like_the_folder(
    s3_server: S3Server,
    clean: Path,
    tmp_path: Path,
    breakage: Callable[[Path], None],
    expected: str,
) -> None:
    data = Path(shutil.copytree(clean, tmp_path / "data"))
    breakage(data)
    uri = s3_server.upload(data, f"bad-{uuid.uuid4().hex[:8]}")

    def error(root: Path | str) -> str:
        with pytest.raises(DatasetError) as info:
            cache = FileCache(tmp_path / "cache") if is_uri(root) else None
            KaggleDataset(root, cache=cache).preflight()
        return str(info.value)

    local, remote = error(data), error(uri)
    assert expected in local
    assert remote == local.replace(str(data), uri)
    assert uri in remote


def test_missing_s3_dataset_says_how_to_upload(s3_server: S3Server, tmp_path: Path) -> None:
    uri = f"s3://{s3_server.BUCKET}/nothing-here"
    with pytest.raises(DatasetError, match=f"{uri}: dataset folder does not exist.*aws s3 sync"):
        KaggleDataset(uri, cache=FileCache(tmp_path / "cache"))


# ------------------------------------------------------------------ the cache


@pytest.fixture(scope="module")
def big_object(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A 24 MB object (long enough that two simultaneous downloads would overlap) and its
    sha256."""
    path = tmp_path_factory.mktemp("big") / "batch_1.parquet"
    path.write_bytes(np.random.default_rng(0).bytes(24 << 20))
    s3_server.client().upload_file(str(path), s3_server.BUCKET, "big/train/batch_1.parquet")
    return f"s3://{s3_server.BUCKET}/big/train/batch_1.parquet", _sha(path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _race(uri: str, cache_dir: str, barrier, out) -> None:
    cache = FileCache(cache_dir)
    barrier.wait()
    with cache.local_copy(UriPath(uri)) as path:
        out.put((cache.stats.misses, cache.stats.hits, _sha(path)))


def test_two_processes_racing_for_a_file_download_it_once(
    big_object: tuple[str, str], tmp_path: Path
) -> None:
    uri, sha = big_object
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(uri, str(tmp_path), barrier, out)) for _ in "ab"]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted((m, h) for m, h, _ in results) == [(0, 1), (1, 0)]  # one download, one hit
    assert [s for _, _, s in results] == [sha, sha]
    assert len(FileCache(tmp_path).entries()) == 1
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]


def test_a_partial_download_is_never_used(big_object: tuple[str, str], tmp_path: Path) -> None:
    uri, sha = big_object
    cache = FileCache(tmp_path)
    name = cache.entry_name(uri, UriPath(uri).info())
    # What a download killed half-way leaves: the first half under a temporary name.
    whole = UriPath(uri).filesystem.open_input_file(UriPath(uri).fs_path).read()
    (tmp_path / f"{name}.part-999-dead").write_bytes(whole[: len(whole) // 2])
    with cache.local_copy(UriPath(uri)) as path:
        assert _sha(path) == sha
    assert cache.stats.misses == 1
    # A cached copy cut off on disk (full disk, a crash of the machine) is fetched again.
    path.write_bytes(whole[:1000])
    with cache.local_copy(UriPath(uri)) as again:
        assert again == path and _sha(again) == sha
    assert (cache.stats.misses, cache.stats.hits) == (2, 0)


def test_least_recently_used_files_are_evicted(clean_uri: str, tmp_path: Path) -> None:
    files = [UriPath(f"{clean_uri}/train/batch_{k}.parquet") for k in (1, 2, 3)]
    sizes = [f.info().size for f in files]
    cache = FileCache(tmp_path, max_gb=(sizes[0] + sizes[2]) / 1e9)  # room for those two
    cache.fetch(files[0])
    cache.fetch(files[1])
    cache.fetch(files[0])  # batch_1 used again: batch_2 is now the least recently used
    used = {f.name: f.stat().st_mtime_ns for f in cache.entries()}
    newest = max(used, key=used.__getitem__)
    assert newest.endswith("batch_1.parquet") and len(set(used.values())) == 2, used
    cache.fetch(files[2])
    kept = sorted(p.name.rsplit("-", 1)[-1] for p in cache.entries())
    assert kept == ["batch_1.parquet", "batch_3.parquet"]
    assert cache.stats.evictions == 1 and cache.size_bytes() <= cache.max_bytes
    with pytest.raises(ValueError, match="must be > 0 GB"):
        FileCache(tmp_path, max_gb=0)


# ------------------------------------------------------------------ a sweep on s3://


def _print_summary(opts, result) -> None:
    """The sweep's summary as ``tune/lr_sweep.py`` prints it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lr_sweep", Path(__file__).resolve().parents[1] / "tune" / "lr_sweep.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.print_result(opts, result)


@pytest.mark.slow
def test_smoke_sweep_reads_and_writes_s3(
    s3_server: S3Server,
    ray_local: str,
    clean: Path,
    clean_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--data s3://...`` and ``--storage-path s3://...`` on a real local Ray: the data is
    checked before Ray starts, the trials read it through the node cache (counted in their
    MLflow runs), Tune and Train write their results and checkpoints to the bucket, and the
    summary scores the line fit on the validation events read through the same cache."""
    from mlflow.tracking import MlflowClient

    from iceaggr.data.linefit import line_fit_dataset
    from iceaggr_tune.mlflow_runs import child_runs
    from iceaggr_tune.summary import RANDOM_GUESS_RAD
    from iceaggr_tune.sweep import SweepOptions, run_sweep

    cache_dir = tmp_path / "node-cache"
    storage = f"s3://{s3_server.BUCKET}/sweeps"
    opts = SweepOptions.smoke().changed(
        {
            "name": "s3",
            "data.path": clean_uri,
            "data.cache_dir": str(cache_dir),
            "storage_path": storage,
            "local_dir": str(tmp_path / "local"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "run_table": False,  # the search trial's path is the table's, plus checkpoints
            "search.trials": 1,
        }
    )
    result = run_sweep(opts)
    assert not result.interrupted
    assert result.best is not None and 0 < result.best["val_angle"] < 3.2
    keys = s3_server.keys("sweeps/s3/")
    assert any(k.startswith("sweeps/s3/search/") for k in keys)
    assert any(k.startswith("sweeps/s3/train/") and "checkpoint" in k for k in keys), keys
    # The node cache: the metadata and the files the trial read: the validation file
    # (batch_3) and the one training file its 6 steps of 32 events reach (of 300 each).
    cached = {p.name.rsplit("-", 1)[-1] for p in FileCache(cache_dir).entries()}
    assert {META_FILE, "batch_3.parquet"} <= cached and len(cached) == 3, cached
    client = MlflowClient(tracking_uri=opts.tracking.uri)
    runs = child_runs(opts.tracking.uri, result.parent_run_id)
    assert len(runs) == 1
    for r in runs:
        m = r.data.metrics
        assert m["data_cache_misses"] + m["data_cache_hits"] >= 2, m  # metadata + a batch file
        assert m["data_cache_bytes_downloaded"] >= 0
        assert client.get_metric_history(r.info.run_id, "data_cache_hits")
    # One node: all trials share the cache, so the files were downloaded once in all.
    downloaded = sum(r.data.metrics["data_cache_bytes_downloaded"] for r in runs)
    assert downloaded <= sum(p.stat().st_size for p in FileCache(cache_dir).entries())
    # The line fit on the trials' validation events (the first val_events of batch_3), read
    # from the bucket, is the line fit of the same events in the folder that was uploaded.
    local_fit = line_fit_dataset(clean, max_events=opts.search.val_events, batch_ids=[3])
    assert result.references == {
        "line fit": local_fit["mean_angular_error"],
        "random": RANDOM_GUESS_RAD,
    }
    _print_summary(opts, result)
    summary = capsys.readouterr().out
    assert f"; line fit {local_fit['mean_angular_error']:.4f} rad; random 1.5708 rad" in summary
