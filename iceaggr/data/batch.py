"""The model-ready batch: pulses grouped by DOM, DOMs grouped by event.

A :class:`DomBatch` is what the loader yields and what the model consumes. It is
"packed" (varlen): no DOM is padded to the longest DOM and no event to the
largest event. Pulses of one DOM are contiguous and time-ordered; DOMs of one
event are contiguous. ``cu_*`` arrays are cumulative offsets in the style of
varlen attention kernels (``cu_seqlens``): DOM ``d`` owns pulses
``cu_pulses[d]:cu_pulses[d + 1]`` and event ``e`` owns DOMs
``cu_doms[e]:cu_doms[e + 1]``.

Features are *raw* (the units of the Kaggle files): normalization is the
model's job, behind its ``normalize`` switch, so both columns of the stability
table can be run from the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Column order of ``DomBatch.pulses``.
PULSE_FEATURES: tuple[str, ...] = ("time", "charge", "auxiliary")


@dataclass
class DomBatch:
    """A packed batch of ``B`` events, ``D`` hit DOMs and ``P`` pulses."""

    pulses: torch.Tensor
    """(P, 3) float32: raw time (ns), charge (p.e.), auxiliary (0/1), see PULSE_FEATURES."""
    cu_pulses: torch.Tensor
    """(D + 1,) int64: pulse offsets per DOM; ``cu_pulses[0] == 0``, ``cu_pulses[-1] == P``."""
    dom_xyz: torch.Tensor
    """(D, 3) float32: DOM position in metres (detector frame, z up)."""
    sensor_id: torch.Tensor
    """(D,) int64: the DOM's ``sensor_id`` in ``sensor_geometry.csv``."""
    cu_doms: torch.Tensor
    """(B + 1,) int64: DOM offsets per event; ``cu_doms[0] == 0``, ``cu_doms[-1] == D``."""
    event_id: torch.Tensor
    """(B,) int64: Kaggle ``event_id``."""
    direction: torch.Tensor | None = None
    """(B, 3) float32 unit ``(cos az sin zen, sin az sin zen, cos zen)``; None for test data."""
    n_pulses_raw: torch.Tensor | None = None
    """(B,) int64: pulses the event had before truncation (for bookkeeping)."""
    line_fit: torch.Tensor | None = None
    """(B, 3) float32 unit vector: where the event came from by the improved line fit of all
    its pulses, before truncation (:mod:`iceaggr.data.linefit`, the baseline); made by the
    loader, None in batches made otherwise."""

    @property
    def num_events(self) -> int:
        return int(self.cu_doms.numel() - 1)

    @property
    def num_doms(self) -> int:
        return int(self.cu_pulses.numel() - 1)

    @property
    def num_pulses(self) -> int:
        return int(self.pulses.shape[0])

    def dom_lengths(self) -> torch.Tensor:
        """(D,) int64 pulses per DOM."""
        return self.cu_pulses[1:] - self.cu_pulses[:-1]

    def event_lengths(self) -> torch.Tensor:
        """(B,) int64 DOMs per event."""
        return self.cu_doms[1:] - self.cu_doms[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DomBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = None if value is None else value.to(device, non_blocking=non_blocking)
        return DomBatch(**moved)

    def pin_memory(self) -> DomBatch:
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = None if value is None else value.pin_memory()
        return DomBatch(**pinned)
