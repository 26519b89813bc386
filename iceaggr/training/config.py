"""Typed, validated experiment configuration, read from YAML.

An experiment YAML has three sections, ``data``, ``model`` and ``train``, each
mapping onto a dataclass; an unknown key fails with the list of valid ones, so a
typo fails before a GPU is booked::

    cfg = load_config("experiments/baseline_1m/config_fixed.yaml", ["train.lr=1e-3"])

Presets are plain functions: :func:`debug_config` (tiny, for tests) and
:func:`baseline_config` (this project's model at the size and optimizer of the original
experiment; the original network itself is ``experiments/baseline_1m/*.yaml``, ``model.arch:
original``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from iceaggr.data.config import DataConfig
from iceaggr.models.losses import LossKind
from iceaggr.models.model import ModelConfig, baseline_model_config, debug_model_config
from iceaggr.tracking.client import DEFAULT_WAIT_S
from iceaggr.training.collapse import COLLAPSE_RESULTANT


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 256
    """Events per optimizer step (per data-parallel rank)."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 1e-5
    """AdamW decoupled weight decay, applied to matrices only."""
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (the pre-clip norm is recorded)."""
    max_steps: int = 1000
    """Optimizer steps in the run."""
    warmup_steps: int = 100
    """Linear warm-up from 0, then cosine decay to ``min_lr_ratio * lr``."""
    min_lr_ratio: float = 0.1
    loss: LossKind = "angular"
    """``angular``: mean angular distance (the stability table's); ``vmf``: von Mises-Fisher NLL."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``..."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    log_every: int = 10
    """Steps between metric reports (each report may sync the host with the device)."""
    eval_every: int = 200
    """Steps between validation passes (0: only at the end)."""
    eval_steps: tuple[int, ...] = ()
    """Further steps to validate at, besides the multiples of ``eval_every`` and the last step
    (the sweep's search validates at its early-stopping rungs only)."""
    checkpoint_every: int = 200
    """Steps between checkpoints, plus one at the end (0: no checkpoints)."""
    out_dir: str = "runs/train"
    """Checkpoints and reports go here."""
    grad_norm_warn: float = 100.0
    """A stability-table cell whose loss fell is ⚠️ when the largest pre-clip gradient norm of
    a single parameter exceeded this. The original diagnosis saw ~110 on the raw first layer at
    lr 3e-4 (its ⚠️ row) and 4.3e8 at 1e-3, against ~1 with normalized inputs."""
    collapse_resultant: float = COLLAPSE_RESULTANT
    """A run whose last validation has a mean resultant length R of its unit predictions at
    or above this is *collapsed* (one direction for every event;
    :mod:`iceaggr.training.collapse`): MLflow tag ``collapsed=true``. Why 0.9: see
    :data:`iceaggr.training.collapse.COLLAPSE_RESULTANT`."""
    input_audit_batches: int = 2
    """Batches whose model inputs are audited before training."""
    input_audit_threshold: float = 100.0
    """A model input larger than this in magnitude was not normalized: warn loudly."""
    mlflow_tracking_uri: str | None = None
    """Log params and metric histories to MLflow when set (e.g. ``sqlite:///mlflow.db``)."""
    mlflow_experiment: str = "iceaggr"
    mlflow_spool_dir: str | None = None
    """Records MLflow could not take yet are also written here (default: the checkpoint folder);
    a shared folder lets a restarted worker on another node send them."""
    mlflow_wait_s: float = DEFAULT_WAIT_S
    """How long the end of a run waits for an unreachable MLflow server before giving up."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.eval_steps = tuple(int(s) for s in self.eval_steps)
        checks = {
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "max_steps": self.max_steps >= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "log_every": self.log_every >= 1,
            "eval_every": self.eval_every >= 0,
            "eval_steps": all(s >= 1 for s in self.eval_steps),
            "checkpoint_every": self.checkpoint_every >= 0,
            "mlflow_wait_s": self.mlflow_wait_s >= 0,
            "collapse_resultant": 0 < self.collapse_resultant <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train.{name} is out of range, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.arch == "original" and self.train.loss == "vmf":
            raise ValueError(
                "train.loss 'vmf' needs a predicted concentration kappa, and model.arch "
                "'original' has no kappa head (the original network predicts a direction only); "
                "use train.loss: angular with it, or model.arch: iceaggr"
            )


def debug_config(data_path: str = "data/synthetic") -> ExperimentConfig:
    """Tiny model and short run shared by the tests."""
    return ExperimentConfig(
        name="debug",
        data=DataConfig(path=data_path, max_val_events=256, prefetch=0),
        model=debug_model_config(),
        train=TrainConfig(
            batch_size=32,
            max_steps=20,
            warmup_steps=2,
            log_every=5,
            eval_every=10,
            checkpoint_every=10,
            device="cpu",
        ),
    )


def baseline_config(data_path: str = "data/synthetic") -> ExperimentConfig:
    """IceAggrModel at the original baseline's size and optimizer: d_model 128, 4+4 layers,
    batch 256, AdamW 3e-4, clip 1.0 (``experiments/iceaggr_baseline/config.yaml``, dropout 0)."""
    return ExperimentConfig(
        name="baseline_1m", data=DataConfig(path=data_path), model=baseline_model_config()
    )


# ---------------------------------------------------------------- dict / YAML conversion


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "3e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys fail with the valid ones listed."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {valid}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict of a config dataclass (tuples become lists)."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [fix(x) for x in v]
        return v

    return fix(out)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (or the baseline when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping with data/model/train sections")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return from_dict(ExperimentConfig, data, str(path) if path else "config")


def config_from_flat(flat: dict[str, Any], base: ExperimentConfig) -> ExperimentConfig:
    """``base`` updated with ``{"train.lr": 1e-3, "model.dropout": 0.1}``-style keys, validated."""
    data = to_dict(base)
    for dotted, value in flat.items():
        keys = dotted.split(".")
        node = data
        for k in keys[:-1]:
            if k not in node or not isinstance(node[k], dict):
                raise ConfigError(f"{dotted}: {k} is not a config section")
            node = node[k]
        node[keys[-1]] = value
    return from_dict(ExperimentConfig, data, "config")
