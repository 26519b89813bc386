"""Fixtures shared by the training, probe and CLI tests.

``small_dataset`` is a real synthetic dataset in the Kaggle layout (DESIGN.md section 3), small
enough for the CPU: 1,500 events in three batch files of 500 (the last one validates), written
once per test session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from iceaggr.synth import write_synthetic_dataset

SMALL_DATASET_EVENTS = 1_500
SMALL_DATASET_FILE_EVENTS = 500


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 synthetic events in ``train/batch_{1,2,3}.parquet`` (500 each), seed 0."""
    out = tmp_path_factory.mktemp("small_dataset") / "data"
    return write_synthetic_dataset(
        out,
        n_events=SMALL_DATASET_EVENTS,
        batch_size=SMALL_DATASET_FILE_EVENTS,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One intra-op thread for the module's tests, restored afterwards.

    The debug model's tensors are tiny, so a second thread buys nothing, and on a shared,
    oversubscribed CPU the threads of one op wait on each other for most of the wall time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
