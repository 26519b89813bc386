"""The options of a sweep (``python tune/lr_sweep.py``), one small dataclass per concern.

:class:`SweepOptions` holds the run-level flags and one dataclass each for the data, the
resources of a trial, MLflow tracking, the stability table, the Optuna search and the early
stopping. The sweep driver reads all of them; each trial gets the ones it needs
(:class:`iceaggr_tune.trial.TrialSettings` holds the same objects). The command line is made
from these classes (:mod:`iceaggr_tune.cli_options`): each field is a flag, the docstring under
it the flag's help, and its default is written here only. :meth:`SweepOptions.smoke` is the
toy-size preset of ``--smoke-test``; :meth:`SweepOptions.changed` takes dotted changes::

    opts = SweepOptions.smoke().changed({"name": "try", "search.trials": 4})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iceaggr.data.cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_GB
from iceaggr.tracking.client import DEFAULT_WAIT_S
from iceaggr.training.probe import PROBE_BATCH_SIZE, PROBE_EVAL_EVENTS, PROBE_LRS, PROBE_STEPS
from iceaggr_tune.cli_options import CLI, ENV, FLAG, METAVAR, OptionError, with_changes

ASHA_REDUCTION_FACTOR = 2
"""At each rung only the best half of the trials recorded so far continue."""


@dataclass(frozen=True)
class ResourcePreset:
    """Defaults that depend on where trials train; an explicit flag always wins."""

    search_trials: int
    search_steps: int
    search_batch_size: int
    report_every: int
    table_seeds: int
    table_models: tuple[str, ...]
    table_hidden_columns: bool


CPU_PRESET = ResourcePreset(
    search_trials=4,
    search_steps=60,
    search_batch_size=64,
    report_every=20,
    table_seeds=1,
    table_models=("original",),
    table_hidden_columns=False,
)
"""Trials on CPUs (the laptop default), sized so that the main job fits ~12 minutes on 2 cores:
4 search trials of 60 steps of 64 events. This project's model (d_model 128, starting from each
event's line fit) is at ~1.210-1.213 rad on the synthetic validation events from step 20 on, on
one core (``benchmarks/rung_fidelity.py --trials 8``: 8 such trials ended at 1.2099-1.2117 rad
after 60 steps, line fit 1.2113 on the same 1,000 events; with ``model.prior_direction=moment``
1.2237-1.2254); the early-stopping rung is at step 40 (2 reports).
The table runs the original table's two columns (the original network before and after
normalization) with one seed: a full-size cell took 144 s of wall (113 s of training on one
core) in an idle ``make sweep`` on a 2-core machine, and this project's two columns are 10 more
cells.
"""
GPU_PRESET = ResourcePreset(
    search_trials=8,
    search_steps=300,
    search_batch_size=256,
    report_every=50,
    table_seeds=3,
    table_models=("original", "iceaggr"),
    table_hidden_columns=True,
)
"""Trials on GPUs: the baseline batch (256), twice the steps, three seeds per table cell and
every column of the table (this project's model beside the original network)."""


def preset_for(use_gpu: bool) -> ResourcePreset:
    return GPU_PRESET if use_gpu else CPU_PRESET


def _require(obj: Any, low: float, *names: str, strict: bool = False) -> None:
    """Each named field of ``obj`` must be >= ``low`` (> ``low`` when ``strict``)."""
    for name in names:
        value = getattr(obj, name)
        if value < low or (strict and value == low):
            raise OptionError(name, f"must be {'>' if strict else '>='} {low:g}, got {value}")


@dataclass(kw_only=True)
class DataOptions:
    """Training data: a Kaggle-layout dataset, made synthetically on first use."""

    path: str = field(default="data/synthetic", metadata={FLAG: "data"})
    """Kaggle-layout dataset folder (synthetic events are made there on first use when it
    holds no dataset), or the dataset in object storage, s3://bucket/prefix (AWS_ENDPOINT_URL
    names an S3-compatible server; credentials from the environment or the instance profile);
    checked before Ray starts, each node then fetches the files its trials read."""
    events: int = 24_000
    """Synthetic events made on first use."""
    events_per_file: int = 8_000
    """Synthetic events per batch file made on first use (the last file validates)."""
    seed: int = field(default=0, metadata={FLAG: "data-seed"})
    """Seed of the synthetic events made on first use."""
    cache_dir: str = field(default=DEFAULT_CACHE_DIR, metadata={FLAG: "data-cache-dir"})
    """With s3:// data: the folder on each node where the dataset's files are kept once
    fetched, shared by the trials on that node."""
    cache_gb: float = field(default=DEFAULT_CACHE_GB, metadata={FLAG: "data-cache-gb"})
    """With s3:// data: size limit of each node's cache folder in GB; least recently used
    files are removed first."""

    def __post_init__(self) -> None:
        _require(self, 1, "events", "events_per_file")
        _require(self, 0, "cache_gb", strict=True)


@dataclass(kw_only=True)
class ResourceOptions:
    """Resources: what each trial books on the Ray cluster."""

    workers_per_trial: int = 1
    """Ray Train workers (data parallel) per trial."""
    cpus_per_worker: float = 1.0
    """CPUs each training worker books."""
    gpus_per_worker: float = 0.0
    """GPUs each training worker books; 0 trains on the CPU, 0.25 runs four one-worker trials
    on each GPU."""
    worker_resources: dict[str, float] = field(
        default_factory=dict, metadata={FLAG: "worker-resource", METAVAR: "NAME=AMOUNT"}
    )
    """Custom Ray resource each training worker needs (repeatable), e.g. trainer=1 to train
    only on nodes started with that resource."""
    max_concurrent: int | None = None
    """Trials at once; default: what the cluster's CPUs, GPUs and custom resources allow."""
    max_failures: int = 1
    """Worker-group restarts of a trial, each from its last checkpoint, before it errors
    (-1: no limit)."""

    def __post_init__(self) -> None:
        _require(self, 1, "workers_per_trial")
        _require(self, 0, "cpus_per_worker", strict=True)
        _require(self, 0, "gpus_per_worker")
        _require(self, -1, "max_failures")
        if self.max_concurrent is not None:
            _require(self, 1, "max_concurrent")
        for name, amount in self.worker_resources.items():
            if not amount > 0:
                raise OptionError("worker_resources", f"{name}={amount}: amount must be > 0")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(kw_only=True)
class TrackingOptions:
    """MLflow tracking: where the sweep's parent run and every trial's run go."""

    uri: str = field(
        default="sqlite:///mlflow.db", metadata={FLAG: "tracking-uri", ENV: "MLFLOW_TRACKING_URI"}
    )
    """MLflow tracking URI; on a cluster an http(s) server every node reaches."""
    experiment: str = "iceaggr-lr-sweep"
    """MLflow experiment name."""
    wait_s: float = field(default=DEFAULT_WAIT_S, metadata={FLAG: "mlflow-wait"})
    """Seconds MLflow bookkeeping waits for an unreachable tracking server; training goes on
    meanwhile and its records are sent when the server is back."""

    def __post_init__(self) -> None:
        _require(self, 0, "wait_s")


@dataclass(kw_only=True)
class TableOptions:
    """Stability table: one trial per learning rate, column (network and normalization) and
    seed."""

    lrs: tuple[float, ...] = field(default=PROBE_LRS, metadata={FLAG: "table-lrs"})
    """Learning rates of the table's rows."""
    steps: int = field(default=PROBE_STEPS, metadata={FLAG: "table-steps"})
    """Training steps per table cell (original: 20)."""
    batch_size: int = field(default=PROBE_BATCH_SIZE, metadata={FLAG: "table-batch-size"})
    """Events per batch of a table cell (original: 256)."""
    models: tuple[str, ...] | None = field(default=None, metadata={FLAG: "table-models"})
    """Networks of the table's columns: the original project's (before/after normalization)
    and this project's (raw inputs shown; normalized in the JSON); default: original on CPUs,
    both on GPUs."""
    hidden_columns: bool | None = field(default=None, metadata={FLAG: "table-hidden-columns"})
    """Also run the columns only the JSON holds (this project's model with normalized inputs);
    default: on GPUs yes, on CPUs no (the CPU main job's time budget)."""
    seeds: int | None = field(default=None, metadata={FLAG: "table-seeds"})
    """Seeds per cell (fresh weights, own batch order; the cell shows the worst); default: 1
    when trials train on CPUs, 3 on GPUs."""
    eval_events: int = field(default=PROBE_EVAL_EVENTS, metadata={FLAG: "table-eval-events"})
    """Held-out events each cell's loss change is measured on (before and after)."""

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise OptionError("lrs", f"need one or more learning rates > 0, got {self.lrs}")
        _require(self, 1, "steps", "batch_size", "eval_events")
        if self.seeds is not None:
            _require(self, 1, "seeds")
        unknown = sorted(set(self.models or ()) - {"original", "iceaggr"})
        if unknown or self.models == ():
            raise OptionError("models", f"choose from original, iceaggr; got {self.models}")


@dataclass(kw_only=True)
class SearchOptions:
    """Optuna search: TPE over learning rate and dropout of the normalized model."""

    trials: int | None = None
    """Optuna trials; default: 4 when trials train on CPUs, 8 on GPUs."""
    steps: int | None = None
    """Training steps per search trial; default: 60 when trials train on CPUs, 300 on
    GPUs."""
    batch_size: int | None = field(default=None, metadata={FLAG: "search-batch-size"})
    """Events per batch of a search step; default: 64 on CPUs, 256 (the baseline's) on GPUs."""
    lr_min: float = 3e-5
    """Lowest learning rate searched (log-uniform)."""
    lr_max: float = 3e-3
    """Highest learning rate searched."""
    dropout_min: float = 0.0
    """Lowest dropout searched (uniform)."""
    dropout_max: float = 0.3
    """Highest dropout searched."""
    val_events: int = 1000
    """Validation events scored at each report of a search trial (early stopping and Optuna
    read them)."""

    def __post_init__(self) -> None:
        _require(self, 1, "val_events")
        _require(
            self, 1, *(n for n in ("trials", "steps", "batch_size") if getattr(self, n) is not None)
        )
        if not 0 < self.lr_min < self.lr_max:
            raise OptionError(
                ("lr_min", "lr_max"), f"need 0 < lr_min < lr_max, got {self.lr_min}, {self.lr_max}"
            )
        if not 0 <= self.dropout_min <= self.dropout_max < 1:
            raise OptionError(
                ("dropout_min", "dropout_max"),
                "need 0 <= dropout_min <= dropout_max < 1, "
                f"got {self.dropout_min}, {self.dropout_max}",
            )


@dataclass(kw_only=True)
class EarlyStopOptions:
    """Reports and early stopping: ASHA's rungs fall on a search trial's reports number
    ``grace_reports * reduction_factor**k``."""

    report_every: int | None = None
    """Steps between reports to Tune (each waits for Ray Train's poll; a search trial's report
    carries a validation and a checkpoint); default: 20 when trials train on CPUs, 50 on
    GPUs."""
    grace_reports: int = 2
    """Reports every search trial makes before early stopping may end it (2: on CPUs step 40).
    Measured with ``benchmarks/rung_fidelity.py`` (8 CPU search trials run to their end, one
    thread, 1,000 held-out events): the Spearman correlation of a trial's value at step 40 with
    its final value is 0.929 in trials of 60 steps (today's CPU preset, starting from the line
    fit; 0.429 at step 20) and was 0.952 with the moment prior; 0.881 in trials of 100 steps
    with the moment prior (0.905 at step 20, 0.167 at step 60, where trials at lr >= 7e-4 pass
    through a bump of up to +0.006 rad, 0.524 at step 80). The trials' final values span only
    ~0.002 rad: the model starts at its prior's level and moves little in 60-100 steps, so any
    rung ranks small differences. (With the old zero start a step-40 rung ranked noise: every
    trial still sat at ~1.58 rad.)"""
    reduction_factor: int = ASHA_REDUCTION_FACTOR
    """At each rung only the best 1/reduction_factor of the trials recorded so far continue."""
    validate_every_report: bool = False
    """Validate at every report (the whole validation curve in MLflow); by default a search
    trial validates only where a decision reads it: at the rungs and at its last step."""

    def __post_init__(self) -> None:
        _require(self, 1, "grace_reports")
        if self.report_every is not None:
            _require(self, 1, "report_every")
        _require(self, 2, "reduction_factor")


@dataclass(kw_only=True)
class SweepOptions:
    """Everything one sweep needs: the run-level flags and one option group per concern."""

    name: str | None = None
    """Sweep name (Tune experiment folder and MLflow parent run); default: the next free
    sweep-N, with --resume the latest sweep."""
    config: str | None = None
    """Base experiment YAML; default: the baseline config (d_model 128, 4+4 layers), with
    --smoke-test the debug config."""
    model_overrides: list[str] = field(
        default_factory=list, metadata={FLAG: "set", METAVAR: "KEY=VALUE"}
    )
    """Override in the base config (repeatable), e.g. --set model.d_model=64; applies to the
    --config file or to the default config."""
    seed: int = 0
    """Training seed of every trial (every table cell starts from the same weights)."""
    address: str | None = field(default=None, metadata={ENV: "RAY_ADDRESS"})
    """Ray cluster to join (auto, ray://...); none starts a local Ray."""
    allow_unauthenticated_ray: bool = False
    """Run on a Ray cluster without token authentication (refused by default)."""
    storage_path: str = "runs/sweeps"
    """Tune/Train results and checkpoints; s3:// or a shared folder on a multi-node cluster."""
    local_dir: str = "runs/sweeps"
    """The driver's own records (sweep.json, tables, Optuna study) when --storage-path is
    remote."""
    run_table: bool = field(default=True, metadata={CLI: False})
    """Run the stability table (--search-only turns it off)."""
    run_search: bool = field(default=True, metadata={CLI: False})
    """Run the Optuna search (--table-only turns it off)."""
    resume: bool = False
    """Continue an interrupted sweep: finished trials are restored, not run again."""
    smoke_test: bool = False
    """The whole path at toy size (a few minutes on 2 CPUs); sets the smoke defaults."""
    data: DataOptions = field(default_factory=DataOptions)
    resources: ResourceOptions = field(default_factory=ResourceOptions)
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    table: TableOptions = field(default_factory=TableOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    early_stop: EarlyStopOptions = field(default_factory=EarlyStopOptions)

    def __post_init__(self) -> None:
        if not (self.run_table or self.run_search):
            raise OptionError(
                ("run_table", "run_search"),
                "nothing to run: both the table and the search are disabled",
            )

    @classmethod
    def smoke(cls) -> SweepOptions:
        """The whole path at toy size (a few minutes on 2 CPUs)."""
        return cls(
            smoke_test=True,
            data=DataOptions(path="data/synthetic-smoke", events=1_500, events_per_file=500),
            # The original network only: the smoke path runs a table trial per cell.
            table=TableOptions(
                lrs=(1e-4, 1e-3), steps=4, batch_size=32, models=("original",), eval_events=64
            ),
            search=SearchOptions(trials=2, steps=6, batch_size=32, val_events=64),
            early_stop=EarlyStopOptions(report_every=3, grace_reports=1),
        )

    def resolved(self) -> SweepOptions:
        """A copy with every resource-dependent default (None) filled in from
        :func:`preset_for` the trials' resources (CPU or GPU)."""
        preset = preset_for(self.resources.use_gpu)
        defaults = {
            "search.trials": preset.search_trials,
            "search.steps": preset.search_steps,
            "search.batch_size": preset.search_batch_size,
            "early_stop.report_every": preset.report_every,
            "table.seeds": preset.table_seeds,
            "table.models": preset.table_models,
            "table.hidden_columns": preset.table_hidden_columns,
        }
        changes = {}
        for key, value in defaults.items():
            group, name = key.split(".")
            if getattr(getattr(self, group), name) is None:
                changes[key] = value
        return self.changed(changes)

    def changed(self, changes: Mapping[str, Any]) -> SweepOptions:
        """A validated copy with ``{"name": "x", "search.trials": 2}``-style changes."""
        return with_changes(self, changes)
