"""Physics-based synthetic IceCube events, written in the Kaggle "Neutrinos in Deep Ice" layout.

The real competition data (132M events) cannot be downloaded here, so the project's default
dataset is made by this module. It is a small detector simulation, not noise: the direction of
every event is encoded in the pulses the way IceCube encodes it (Cherenkov timing along a track,
light falling with distance, scattering delays), blurred the way real data is blurred
(scattering, dark noise, cascades, short tracks, coincident muons), with raw feature scales of the
real files (time ~1e4 ns, charge up to thousands of p.e.) so that unnormalized training breaks as
it did on the real data.

Usage::

    from iceaggr.data.synth import write_synthetic_dataset
    write_synthetic_dataset("data/synthetic", n_events=50_000)   # or: iceaggr synth --out ...

    rng = np.random.default_rng(0)                               # one chunk in memory (tests)
    pulses, meta = generate_events(rng, make_geometry(), 1000, first_event_id=0)

The output folder holds ``sensor_geometry.csv`` (from :func:`iceaggr.data.geometry.make_geometry`),
``train_meta.parquet`` and ``train/batch_<k>.parquet`` exactly as described in DESIGN.md
section 3. It is written into a hidden ``.<name>.partial-*`` sibling folder and renamed into place
at the end, so an interrupted run never leaves a folder that looks complete.

Stages, one module each, in the order an event is made
------------------------------------------------------
:mod:`.detector` (the geometry as the simulation sees it), :mod:`.sources` (directions,
energies, tracks and cascades), :mod:`.photons` (expected light and hits at the DOMs),
:mod:`.response` (photoelectrons, pulses, launches, trigger, readout), :mod:`.events` (whole
triggered events, :func:`generate_events`) and :mod:`.writer` (the dataset on disk,
:func:`write_synthetic_dataset`). Names with a leading underscore are shared between the stages
only; this package re-exports the ones its tests check.

Physics (every constant is defined once, in the module of its stage, with its meaning and source)
-------------------------------------------------------------------------------------------------
Directions
    Isotropic: cos(zenith) uniform in [-1, 1], azimuth uniform, like the roughly isotropic
    neutrino directions of the competition's simulation. The label
    ``v = (cos az sin zen, sin az sin zen, cos zen)`` points to where the neutrino came from; every
    particle of the event travels along ``d = -v``.
Topologies
    A share ``NUMU_CC_FRACTION`` of events are nu_mu charged-current: a muon of energy (1 - y) E
    and range ``ln(1 + E b / a) / b`` (ice: a = ``MUON_LOSS_A_GEV_PER_M``, b =
    ``MUON_LOSS_B_PER_M``) plus a hadronic cascade y E at the vertex (y = U^``INELASTICITY_POWER``).
    The muon's line passes the centre within ``IMPACT_RADIUS_M`` and the vertex is uniform along
    it, from one muon range upstream to ``VERTEX_SPAN_BEYOND_M`` beyond the centre, so
    through-going, starting and stopping tracks (finite length) appear in their natural,
    energy-dependent mix. The others are point-like cascades (nu_e / nu_tau CC with all of E
    visible, and neutral-current ones, share ``NC_FRACTION_OF_CASCADES``, with only y E visible)
    uniform in a cylinder (``VERTEX_CYLINDER_*``) slightly larger than the detector. Unrelated
    down-going atmospheric muons arrive at ``COINCIDENT_MUON_RATE_HZ`` (Poisson) at times uniform
    within +-``COINCIDENCE_WINDOW_NS`` of the neutrino; their light is simulated like the
    neutrino's and lands in the event where it falls inside a readout window.
Energy
    A mix of a steep bulk E^-``SPECTRAL_INDEX`` (most events close to the trigger threshold) and a
    share ``HARD_FRACTION`` of a hard E^-``HARD_SPECTRAL_INDEX`` component, between
    ``ENERGY_MIN_GEV`` and ``ENERGY_MAX_GEV``: the tail gives events with thousands to ~1e5
    pulses and pulse charges of thousands of p.e. A muon's light per metre is that of
    ``MUON_MIP_LIGHT_GEV_PER_M`` of cascade energy plus its radiative losses b E (E taken where it
    passes closest to the centre).
Light yield (diffusion approximation)
    With an effective attenuation length lambda (``ICE_LAYERS``: upper ice, the dust layer at
    z ~ -100 m, the clear deep ice; taken at the DOM's depth) a point source of energy E gives a
    DOM at distance r ``PE_PER_GEV_AT_1M * E * exp(-r / lambda) / r`` expected photoelectrons,
    times ``1 + CASCADE_ANISOTROPY * cos(angle to d)`` (cascade light is forward-peaked). A line
    source of epsilon GeV/m gives ``PE_PER_GEV_AT_1M * sqrt(2 pi lambda) * epsilon *
    exp(-r / lambda) / sqrt(r)`` (the large-distance form of the K0 solution of the diffusion
    equation), r = rho / sin(theta_c) being the Cherenkov photon's path from the track at
    distance rho. Where the Cherenkov emission point lies beyond a finite track's end, the light
    comes from the end point, suppressed by ``exp(-offset / ENDPOINT_FALLOFF_M)``. DeepCore DOMs
    have ``DEEPCORE_QE_RATIO`` times the efficiency. Photoelectron counts are Poisson. DOMs
    expecting less than ``MIN_EXPECTED_PE`` from an emitter are skipped (a closed-form search
    per string), which drops ~0.4 expected photoelectrons per event (0.2% of the light), all of
    it far from the event.
Timing
    The unscattered arrival time from a track is ``t0 + s_e / c + r * n_g / c``, with
    s_e = s - rho cot(theta_c) the Cherenkov emission point (``CHERENKOV_ANGLE_DEG``, group index
    ``GROUP_INDEX``); from a cascade ``t0 + r * n_g / c``. Every photon is delayed by scattering
    following the Pandel function, a Gamma distribution of shape r / ``PANDEL_LAMBDA_M`` and rate
    1 / ``PANDEL_TAU_NS`` + (c / n_g) / ``PANDEL_ABSORPTION_M`` (AMANDA, Ahrens et al., NIM A 524
    (2004) 169): delays grow from a few ns near the source to microseconds far away. The PMT adds
    a Gaussian jitter ``PMT_JITTER_NS`` and afterpulses: ``AFTERPULSE_PROBABILITY`` per
    photoelectron, single photoelectrons delayed by ~0.6, 2 or 8 us (``AFTERPULSE_GROUPS``) after
    the DOM's light, so bright DOMs carry late pulses microseconds after their first one.
Pulses and charge
    Photons of a DOM merge into one pulse per digitizer bin counted from the DOM's launch, as the
    pulse unfolding resolves them: ``ATWD_RESOLUTION_NS`` within ``ATWD_WINDOW_NS``, then
    ``FADC_RESOLUTION_NS``. So dim DOMs mostly carry one pulse and bright ones dozens. A DOM with
    more than ``MAX_PHOTONS_PER_DOM`` photoelectrons is simulated with that many macro-photons
    sharing its charge. A photoelectron's charge is Gaussian (``SPE_MEAN_PE``, ``SPE_SIGMA_PE``)
    with an exponential low-charge part (``SPE_LOW_FRACTION``, ``SPE_LOW_MEAN_PE``), summed per
    pulse; pulse charges saturate softly at ``SATURATION_PE`` and are stored in steps of
    ``CHARGE_QUANTUM_PE`` like the Kaggle files (min 0.025 p.e.).
Launches, local coincidence, trigger, readout
    A DOM's pulses belong to launches: its first pulse opens one, and a pulse more than
    ``LAUNCH_WINDOW_NS`` after the latest launch opens the next. A launch is a hard local
    coincidence (HLC, ``auxiliary = False`` for all its pulses) when a DOM up to ``HLC_SPAN_DOMS``
    away on its string launched within ``HLC_WINDOW_NS`` of it; otherwise its pulses are
    soft-local-coincidence ones (``auxiliary = True``), which makes noise and late afterpulses
    auxiliary-heavy. A trigger (IceCube's SMT8) is a run of ``SMT_MULTIPLICITY`` HLC launches
    within ``SMT_WINDOW_NS``. A candidate is kept when the neutrino's own light triggers;
    candidates that fail are dropped, leaving gaps in the event ids as in the real files. Each
    trigger is read out from ``READOUT_PRE_TRIGGER_NS`` before its first HLC launch to
    ``READOUT_POST_TRIGGER_NS`` after its last; overlapping readouts merge, and the event holds
    the readout windows of every trigger of its coincidence window (a coincident muon that
    triggers tens of microseconds away adds a window of its own). Dark noise arrives at
    ``DARK_RATE_HZ`` per DOM, uniformly over the readout windows. Raw times put the event's first
    trigger at ``TRIGGER_TIME_NS`` (the ~1e4 ns offset), so the neutrino's own light starts later
    where a coincident muon triggered first.

Simplifications: strings are vertical lines; the ice is uniform within each layer and isotropic
(no tilt, no anisotropy); the attenuation length is taken at the DOM's depth; the trigger uses
the light before dark noise is added; dark noise is uncorrelated (no bursts).

The constants marked "tuned" were adjusted so that the pulse statistics resemble the real data
(DESIGN.md section 3; ``python benchmarks/fidelity.py`` prints the comparison). On this data the
improved line fit scores ~1.24 rad (real data: ~1.18-1.21). Raw times run from 5,700 ns to a
largest value of ~6-7.5e4 ns in 24,000 events (real: ~5.7e3 to 7.8e4); ~1% of the events, all
with a coincident muon, last beyond 40,000 ns. Generation runs in vectorized rounds of
``_MAX_CANDIDATES_PER_ROUND`` candidate events: 24,000 events in ~5 s on one busy core.
"""

from __future__ import annotations

from iceaggr.data.synth.detector import (
    DEEPCORE_QE_RATIO,
    PE_PER_GEV_AT_1M,
)
from iceaggr.data.synth.detector import (
    _detector as _detector,
)
from iceaggr.data.synth.events import (
    _Chunk as _Chunk,
)
from iceaggr.data.synth.events import (
    _simulate_candidates as _simulate_candidates,
)
from iceaggr.data.synth.events import (
    generate_events,
)
from iceaggr.data.synth.photons import (
    CASCADE_ANISOTROPY,
    CHERENKOV_ANGLE_DEG,
    ENDPOINT_FALLOFF_M,
    GROUP_INDEX,
    ICE_LAYERS,
    MIN_DISTANCE_M,
    MIN_EXPECTED_PE,
    PANDEL_ABSORPTION_M,
    PANDEL_LAMBDA_M,
    PANDEL_TAU_NS,
)
from iceaggr.data.synth.photons import (
    _cascade_hits as _cascade_hits,
)
from iceaggr.data.synth.photons import (
    _Hits as _Hits,
)
from iceaggr.data.synth.photons import (
    _poisson_nonzero as _poisson_nonzero,
)
from iceaggr.data.synth.photons import (
    _track_hits as _track_hits,
)
from iceaggr.data.synth.response import (
    AFTERPULSE_GROUPS,
    AFTERPULSE_PROBABILITY,
    ATWD_RESOLUTION_NS,
    ATWD_WINDOW_NS,
    CHARGE_QUANTUM_PE,
    DARK_RATE_HZ,
    FADC_RESOLUTION_NS,
    HLC_SPAN_DOMS,
    HLC_WINDOW_NS,
    LAUNCH_WINDOW_NS,
    MAX_PHOTONS_PER_DOM,
    PMT_JITTER_NS,
    READOUT_POST_TRIGGER_NS,
    READOUT_PRE_TRIGGER_NS,
    SATURATION_PE,
    SMT_MULTIPLICITY,
    SMT_WINDOW_NS,
    SPE_LOW_FRACTION,
    SPE_LOW_MEAN_PE,
    SPE_MEAN_PE,
    SPE_SIGMA_PE,
    TRIGGER_TIME_NS,
)
from iceaggr.data.synth.response import (
    _hlc_pulses as _hlc_pulses,
)
from iceaggr.data.synth.response import (
    _launch_starts as _launch_starts,
)
from iceaggr.data.synth.response import (
    _merge_photons as _merge_photons,
)
from iceaggr.data.synth.response import (
    _photons as _photons,
)
from iceaggr.data.synth.response import (
    _readout as _readout,
)
from iceaggr.data.synth.response import (
    _smt_trigger as _smt_trigger,
)
from iceaggr.data.synth.response import (
    _sort_key as _sort_key,
)
from iceaggr.data.synth.sources import (
    COINCIDENCE_WINDOW_NS,
    COINCIDENT_MUON_MIN_COS_ZENITH,
    COINCIDENT_MUON_RATE_HZ,
    COINCIDENT_MUON_SPECTRAL_INDEX,
    ENERGY_MAX_GEV,
    ENERGY_MIN_GEV,
    HARD_FRACTION,
    HARD_SPECTRAL_INDEX,
    IMPACT_RADIUS_M,
    INELASTICITY_POWER,
    MUON_LOSS_A_GEV_PER_M,
    MUON_LOSS_B_PER_M,
    MUON_MIP_LIGHT_GEV_PER_M,
    NC_FRACTION_OF_CASCADES,
    NUMU_CC_FRACTION,
    SPECTRAL_INDEX,
    SPEED_OF_LIGHT_M_PER_NS,
    VERTEX_CYLINDER_HALF_HEIGHT_M,
    VERTEX_CYLINDER_RADIUS_M,
    VERTEX_SPAN_BEYOND_M,
)
from iceaggr.data.synth.sources import (
    _sample_coincident_muons as _sample_coincident_muons,
)
from iceaggr.data.synth.sources import (
    _sample_events as _sample_events,
)
from iceaggr.data.synth.sources import (
    _Tracks as _Tracks,
)
from iceaggr.data.synth.writer import (
    CHUNK_EVENTS,
    META_COLUMNS,
    write_synthetic_dataset,
)

__all__ = [
    "AFTERPULSE_GROUPS",
    "AFTERPULSE_PROBABILITY",
    "ATWD_RESOLUTION_NS",
    "ATWD_WINDOW_NS",
    "CASCADE_ANISOTROPY",
    "CHARGE_QUANTUM_PE",
    "CHERENKOV_ANGLE_DEG",
    "CHUNK_EVENTS",
    "COINCIDENCE_WINDOW_NS",
    "COINCIDENT_MUON_MIN_COS_ZENITH",
    "COINCIDENT_MUON_RATE_HZ",
    "COINCIDENT_MUON_SPECTRAL_INDEX",
    "DARK_RATE_HZ",
    "DEEPCORE_QE_RATIO",
    "ENDPOINT_FALLOFF_M",
    "ENERGY_MAX_GEV",
    "ENERGY_MIN_GEV",
    "FADC_RESOLUTION_NS",
    "GROUP_INDEX",
    "HARD_FRACTION",
    "HARD_SPECTRAL_INDEX",
    "HLC_SPAN_DOMS",
    "HLC_WINDOW_NS",
    "ICE_LAYERS",
    "IMPACT_RADIUS_M",
    "INELASTICITY_POWER",
    "LAUNCH_WINDOW_NS",
    "MAX_PHOTONS_PER_DOM",
    "META_COLUMNS",
    "MIN_DISTANCE_M",
    "MIN_EXPECTED_PE",
    "MUON_LOSS_A_GEV_PER_M",
    "MUON_LOSS_B_PER_M",
    "MUON_MIP_LIGHT_GEV_PER_M",
    "NC_FRACTION_OF_CASCADES",
    "NUMU_CC_FRACTION",
    "PANDEL_ABSORPTION_M",
    "PANDEL_LAMBDA_M",
    "PANDEL_TAU_NS",
    "PE_PER_GEV_AT_1M",
    "PMT_JITTER_NS",
    "READOUT_POST_TRIGGER_NS",
    "READOUT_PRE_TRIGGER_NS",
    "SATURATION_PE",
    "SMT_MULTIPLICITY",
    "SMT_WINDOW_NS",
    "SPECTRAL_INDEX",
    "SPEED_OF_LIGHT_M_PER_NS",
    "SPE_LOW_FRACTION",
    "SPE_LOW_MEAN_PE",
    "SPE_MEAN_PE",
    "SPE_SIGMA_PE",
    "TRIGGER_TIME_NS",
    "VERTEX_CYLINDER_HALF_HEIGHT_M",
    "VERTEX_CYLINDER_RADIUS_M",
    "VERTEX_SPAN_BEYOND_M",
    "generate_events",
    "write_synthetic_dataset",
]
