"""An IceCube-86-like detector geometry, generated from named constants.

The synthetic data (:mod:`iceaggr.data.synth`) needs DOM positions that look like the real
detector's (spacing, extent, the dense DeepCore centre) without shipping the real file. This module
builds them from the layout rules of IceCube-86:

* 78 standard strings on a triangular lattice with ~125 m spacing, in ten rows of
  6, 7, 8, 9, 10, 10, 9, 8, 7 and 4 strings, numbered row by row as the real strings 1-78 are;
* 8 DeepCore strings (79-86) around the central standard string 36: six at the centres of the
  lattice triangles around it (125 m / sqrt(3) = 72 m away) and two closer in (41 m);
* 60 DOMs per string, DOM 1 at the top. Standard strings: 17 m apart from z = +500 m down to
  z = -503 m. DeepCore strings: a 10-DOM veto section (10 m apart from z = +188 m) above the dust
  layer and 50 DOMs 7 m apart in the clear ice from z = -159 m down to z = -502 m.

Coordinates are metres in the detector frame (origin at the centre of the standard strings, z up)
and ``sensor_id = (string - 1) * 60 + (dom - 1)`` as in the Kaggle ``sensor_geometry.csv``.

Usage::

    from iceaggr.data.geometry import make_geometry
    geo = make_geometry()        # DataFrame: sensor_id, x, y, z (5160 rows)
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DOMS_PER_STRING = 60
"""DOMs on every string (standard and DeepCore)."""
NUM_STANDARD_STRINGS = 78
NUM_DEEPCORE_STRINGS = 8
NUM_STRINGS = NUM_STANDARD_STRINGS + NUM_DEEPCORE_STRINGS
NUM_SENSORS = NUM_STRINGS * DOMS_PER_STRING  # 5160

STRING_SPACING_M = 125.0
"""Distance between neighbouring standard strings (IceCube design spacing)."""
LATTICE_ROTATION_DEG = 9.0
"""Angle of the lattice rows to the x axis (the real rows, e.g. strings 1-6, run ~9 deg off x)."""
ROW_LENGTHS: tuple[int, ...] = (6, 7, 8, 9, 10, 10, 9, 8, 7, 4)
"""Strings per lattice row, row 0 holding strings 1-6 (the real hexagon-like footprint)."""
ROW_START_COLUMNS: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 2, 3, 4, 5)
"""Lattice column of each row's first string: the upper rows are shifted to close the hexagon."""

DEEPCORE_CENTRE_STRING = 36
"""The standard string the DeepCore strings surround."""
DEEPCORE_RING_RADIUS_M = STRING_SPACING_M / np.sqrt(3.0)
"""Six DeepCore strings sit at the centroids of the six lattice triangles around string 36."""
DEEPCORE_RING_ANGLES_DEG: tuple[float, ...] = (90.0, 30.0, -30.0, -90.0, -150.0, 150.0)
"""Angles (relative to the lattice rows) of strings 81-86 on that ring."""
DEEPCORE_INNER_RADIUS_M = 41.0
"""Strings 79 and 80 are closer to string 36 (~41 m in the real detector)."""
DEEPCORE_INNER_ANGLES_DEG: tuple[float, ...] = (240.0, 300.0)

STANDARD_TOP_Z_M = 500.0
"""z of DOM 1 on a standard string (the real tops scatter around +500 m)."""
STANDARD_DOM_SPACING_M = 17.0
"""Vertical DOM spacing on standard strings (real: 17.0 m)."""
DEEPCORE_VETO_DOMS = 10
"""DeepCore DOMs above the dust layer (a veto cap)."""
DEEPCORE_VETO_TOP_Z_M = 188.0
DEEPCORE_VETO_SPACING_M = 10.0
DEEPCORE_DENSE_TOP_Z_M = -159.0
"""First DeepCore DOM below the dust layer (real: -159.8 m)."""
DEEPCORE_DENSE_SPACING_M = 7.0
"""Spacing in the clear deep ice (real: 7 m)."""

COORDINATE_DECIMALS = 2
"""Positions are rounded to 1 cm, as in the Kaggle file."""


def _lattice_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The two lattice basis vectors (m): along a row, and to the next row (120 deg apart)."""
    phi = np.deg2rad(LATTICE_ROTATION_DEG)
    a = STRING_SPACING_M * np.array([np.cos(phi), np.sin(phi)])
    b = STRING_SPACING_M * np.array([np.cos(phi + 2 * np.pi / 3), np.sin(phi + 2 * np.pi / 3)])
    return a, b


def string_positions() -> np.ndarray:
    """(86, 2) float64: x, y (m) of strings 1..86 (row ``i`` is string ``i + 1``)."""
    a, b = _lattice_vectors()
    rows = [
        np.array([(start + k) * a + row * b for k in range(length)])
        for row, (start, length) in enumerate(zip(ROW_START_COLUMNS, ROW_LENGTHS, strict=True))
    ]
    standard = np.concatenate(rows)  # (78, 2)
    if standard.shape[0] != NUM_STANDARD_STRINGS:  # a broken constant, not user input
        raise RuntimeError(f"ROW_LENGTHS sums to {standard.shape[0]}, not {NUM_STANDARD_STRINGS}")
    standard -= standard.mean(axis=0)  # origin at the centre of the standard strings

    centre = standard[DEEPCORE_CENTRE_STRING - 1]
    phi = LATTICE_ROTATION_DEG

    def ring(radius: float, angles: tuple[float, ...]) -> np.ndarray:
        ang = np.deg2rad(phi + np.asarray(angles))
        return centre + radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)

    deepcore = np.concatenate(
        [
            ring(DEEPCORE_INNER_RADIUS_M, DEEPCORE_INNER_ANGLES_DEG),  # strings 79, 80
            ring(DEEPCORE_RING_RADIUS_M, DEEPCORE_RING_ANGLES_DEG),  # strings 81-86
        ]
    )
    return np.concatenate([standard, deepcore])  # (86, 2)


def dom_depths() -> np.ndarray:
    """(86, 60) float64: z (m) of DOMs 1..60 on strings 1..86, DOM 1 at the top."""
    k = np.arange(DOMS_PER_STRING, dtype=np.float64)
    standard = STANDARD_TOP_Z_M - STANDARD_DOM_SPACING_M * k
    dense = np.arange(DOMS_PER_STRING - DEEPCORE_VETO_DOMS, dtype=np.float64)
    deepcore = np.concatenate(
        [
            DEEPCORE_VETO_TOP_Z_M - DEEPCORE_VETO_SPACING_M * np.arange(DEEPCORE_VETO_DOMS),
            DEEPCORE_DENSE_TOP_Z_M - DEEPCORE_DENSE_SPACING_M * dense,
        ]
    )
    return np.concatenate(
        [
            np.tile(standard, (NUM_STANDARD_STRINGS, 1)),
            np.tile(deepcore, (NUM_DEEPCORE_STRINGS, 1)),
        ]
    )


def make_geometry() -> pd.DataFrame:
    """The IceCube-86-like geometry as the Kaggle ``sensor_geometry.csv`` table.

    Returns:
        DataFrame with 5160 rows and columns ``sensor_id`` (int64, 0..5159) and ``x``, ``y``,
        ``z`` (float64, metres), ordered by ``sensor_id = (string - 1) * 60 + (dom - 1)``.
    """
    xy = string_positions()  # (86, 2)
    z = dom_depths()  # (86, 60)
    xy_per_dom = np.repeat(xy, DOMS_PER_STRING, axis=0)  # (5160, 2)
    geo = pd.DataFrame(
        {
            "sensor_id": np.arange(NUM_SENSORS, dtype=np.int64),
            "x": np.round(xy_per_dom[:, 0], COORDINATE_DECIMALS),
            "y": np.round(xy_per_dom[:, 1], COORDINATE_DECIMALS),
            "z": np.round(z.reshape(-1), COORDINATE_DECIMALS),
        }
    )
    return geo
