"""The detector as the simulation sees it: per-string DOM tables and a depth lookup grid.

Built once per geometry (:func:`iceaggr.data.geometry.make_geometry` or a real
``sensor_geometry.csv``) by :func:`_detector`: strings as vertical lines, every DOM's relative
efficiency (DeepCore's higher quantum efficiency), and a grid that finds the DOMs of a string
within a depth range in constant time (the closed-form DOM search of :mod:`.photons`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from iceaggr.data.geometry import DOMS_PER_STRING, NUM_STANDARD_STRINGS

PE_PER_GEV_AT_1M = 1.9
"""(tuned) DOM photoelectrons per GeV of cascade energy at 1 m, before attenuation."""
DEEPCORE_QE_RATIO = 1.35
"""DeepCore high-quantum-efficiency PMTs relative to standard ones."""
_GRID_STEP_M = 2.0  # bin height of the per-string DOM lookup grid (m)


@dataclass(frozen=True)
class _Detector:
    """Sensor tables in the order of a search key: strings ascending, z descending on a string.

    Strings are treated as vertical lines at their mean (x, y) (exact for :func:`make_geometry`,
    within ~1 m for the real detector).
    """

    num_sensors: int
    string: np.ndarray  # (N,) int64 0-based string, by sensor_id
    dom: np.ndarray  # (N,) int64 0-based position on the string, by sensor_id
    string_xy: np.ndarray  # (n_str, 2) float64 m, mean axis of each string
    string_efficiency: np.ndarray  # (n_str,) relative quantum efficiency x PE_PER_GEV_AT_1M
    order: np.ndarray  # (N,) int64 sensor ids sorted by (string, descending z)
    z_sorted: np.ndarray  # (N,) float64 m, z of ``order``
    z_sorted32: np.ndarray  # (N,) float32 m, the same
    string_start: np.ndarray  # (n_str,) int64 position of each string's first DOM in ``order``
    grid_top: float  # m, z of the top of the DOM lookup grid
    grid_step: float  # m, bin height of the grid (less than the smallest DOM spacing)
    above: np.ndarray  # (n_str, n_bins) int64 DOMs of the string above each bin
    bin_z: np.ndarray  # (n_str, n_bins) float64 z of the DOM inside each bin, -inf if none


def _detector(geometry: pd.DataFrame) -> _Detector:
    missing = [c for c in ("sensor_id", "x", "y", "z") if c not in geometry.columns]
    if missing:
        raise ValueError(
            f"geometry is missing column(s) {missing}; pass make_geometry() or a DataFrame with "
            "sensor_id, x, y, z (metres)"
        )
    sid = geometry["sensor_id"].to_numpy(np.int64)
    if not np.array_equal(sid, np.arange(sid.shape[0])):
        raise ValueError("geometry sensor_id must be 0..N-1 in order, as in sensor_geometry.csv")
    xyz = geometry[["x", "y", "z"]].to_numpy(np.float64)
    string = sid // DOMS_PER_STRING
    n_strings = int(string.max()) + 1
    counts = np.bincount(string, minlength=n_strings)
    string_xy = np.stack(
        [np.bincount(string, xyz[:, i], minlength=n_strings) / counts for i in range(2)], axis=1
    )
    deepcore = np.arange(n_strings) >= NUM_STANDARD_STRINGS
    order = np.lexsort((-xyz[:, 2], string))
    z_sorted = xyz[order, 2]
    string_start = np.searchsorted(string[order], np.arange(n_strings))

    # A z grid per string, finer than the DOM spacing so that a bin holds at most one DOM: the
    # DOMs of a string above a height are then found with two lookups instead of a search.
    same_string = string[order][1:] == string[order][:-1]
    min_gap = float(np.min(-np.diff(z_sorted)[same_string])) if same_string.any() else 1.0
    if min_gap <= 0:
        bad = int(string[order][1:][same_string][np.argmin(-np.diff(z_sorted)[same_string])])
        raise ValueError(
            f"geometry has two DOMs at the same z on string {bad + 1} (sensor_id // "
            f"{DOMS_PER_STRING} = {bad}); each string needs distinct DOM depths"
        )
    step = min(_GRID_STEP_M, min_gap / 2)
    top = float(z_sorted.max()) + step
    n_bins = int(np.ceil((top - float(z_sorted.min())) / step)) + 2
    bins = np.floor((top - z_sorted) / step).astype(np.int64)
    dom_in_string = np.arange(sid.shape[0]) - string_start[string[order]]
    above = np.zeros((n_strings, n_bins), dtype=np.int64)
    bin_z = np.full((n_strings, n_bins), -np.inf)
    bin_z[string[order], bins] = z_sorted
    # DOMs strictly above bin b: those whose bin is < b.
    np.add.at(above, (string[order], bins + 1), 1)
    above = np.cumsum(above, axis=1)
    assert np.all(above[string[order], bins] == dom_in_string), "at most one DOM per grid bin"
    return _Detector(
        num_sensors=int(sid.shape[0]),
        string=string,
        dom=sid % DOMS_PER_STRING,
        string_xy=string_xy,
        string_efficiency=PE_PER_GEV_AT_1M * np.where(deepcore, DEEPCORE_QE_RATIO, 1.0),
        order=order,
        z_sorted=z_sorted,
        z_sorted32=z_sorted.astype(np.float32),
        string_start=string_start,
        grid_top=top,
        grid_step=step,
        above=above,
        bin_z=bin_z,
    )


def _doms_above(det: _Detector, st: np.ndarray, z: np.ndarray, inclusive: bool) -> np.ndarray:
    """Number of DOMs on strings ``st`` with z > ``z`` (``>=`` if ``inclusive``)."""
    n_bins = det.above.shape[1]
    b = np.clip(np.floor((det.grid_top - z) / det.grid_step), 0, n_bins - 1).astype(np.int64)
    z_in = det.bin_z[st, b]
    return det.above[st, b] + ((z_in >= z) if inclusive else (z_in > z))
