"""Tests for iceaggr.training.config: YAML <-> dataclasses, overrides, validation, shipped YAMLs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from iceaggr.data.config import DataConfig
from iceaggr.models.model import ModelConfig
from iceaggr.training.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    apply_overrides,
    baseline_config,
    config_from_flat,
    debug_config,
    from_dict,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
BASELINE_DIR = REPO / "experiments" / "baseline_1m"
ICEAGGR_DIR = REPO / "experiments" / "iceaggr_baseline"


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("preset", [debug_config, baseline_config])
def test_yaml_round_trip(tmp_path: Path, preset: Any) -> None:
    cfg = preset("some/data")
    cfg.train.betas = (0.8, 0.95)
    cfg.train.mlflow_tracking_uri = "sqlite:///x.db"
    cfg.data.max_train_events = 1234
    path = write_yaml(tmp_path / "cfg.yaml", to_dict(cfg))
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.train.betas == (0.8, 0.95)  # a list in YAML, a tuple again in the dataclass
    assert isinstance(loaded.train.betas, tuple)
    assert loaded.data.max_train_events == 1234


def test_to_dict_is_plain_yaml() -> None:
    d = to_dict(debug_config())
    assert set(d) == {"name", "data", "model", "train"}
    assert d["train"]["betas"] == [0.9, 0.999]
    # safe_dump refuses Python-only objects such as tuples: the dict must not contain any.
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_partial_yaml_keeps_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lr": 1e-3}})
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.model == ModelConfig()
    assert cfg.data == DataConfig()


def test_empty_yaml_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == ExperimentConfig()


def test_scientific_notation_without_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads "3e-4" (no dot) as a string; the loader must still give a float.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  weight_decay: 1e-5\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(1e-5)


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"trian": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trian'\]") as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"valid keys are {field_names(ExperimentConfig)}" in msg


@pytest.mark.parametrize(
    ("section", "cls", "typo"),
    [
        ("model", ModelConfig, "d_modle"),
        ("train", TrainConfig, "learning_rate"),
        ("data", DataConfig, "max_pulses"),
    ],
)
def test_unknown_section_key_lists_valid_keys(
    tmp_path: Path, section: str, cls: type, typo: str
) -> None:
    path = write_yaml(tmp_path / "c.yaml", {section: {typo: 1}})
    with pytest.raises(ConfigError, match=rf"\.{section}: unknown key\(s\) \['{typo}'\]") as info:
        load_config(path)
    assert f"valid keys are {field_names(cls)}" in str(info.value)


def test_from_dict_rejects_several_unknown_keys_sorted() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) ['aa', 'zz']")):
        from_dict(TrainConfig, {"zz": 1, "aa": 2, "lr": 1e-3}, "train")


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {"train": {"batch_size": "lots"}},
            r"\.train\.batch_size: expected an integer, got 'lots'",
        ),
        ({"train": {"batch_size": 2.5}}, r"\.train\.batch_size: expected an integer, got 2\.5"),
        ({"train": {"batch_size": True}}, r"\.train\.batch_size: expected an integer, got True"),
        ({"train": {"lr": "fast"}}, r"\.train\.lr: expected a number, got 'fast'"),
        ({"train": {"lr": [1, 2]}}, r"\.train\.lr: expected a number"),
        ({"model": {"normalize": "maybe"}}, r"\.model\.normalize: expected true or false"),
        ({"model": {"normalize": 1}}, r"\.model\.normalize: expected true or false, got 1"),
        ({"train": {"loss": "mse"}}, r"\.train\.loss: 'mse' is not one of \['angular', 'vmf'\]"),
        ({"train": {"betas": 0.9}}, r"\.train\.betas: expected a list, got 0\.9"),
        ({"data": {"path": 5}}, r"\.data\.path: expected a string, got 5"),
        ({"data": {"max_train_events": "all"}}, r"\.data\.max_train_events: expected an integer"),
        ({"model": 128}, r"\.model: expected a mapping, got 128"),
        ({"name": ["a"]}, r"\.name: expected a string"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, data: dict[str, Any], pattern: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_optional_int_accepts_null(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"data": {"max_train_events": None}})
    assert load_config(path).data.max_train_events is None


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


# ---------------------------------------------------------------- overrides


def test_apply_overrides_parses_values_as_yaml() -> None:
    data: dict[str, Any] = {"train": {"lr": 3e-4}}
    out = apply_overrides(
        data,
        [
            "train.lr=1e-3",
            "train.batch_size=64",
            "model.normalize=false",
            "train.betas=[0.8, 0.9]",
            "data.path=/data/ice cube",
            "name=x=y",
        ],
    )
    assert out == {
        "train": {"lr": "1e-3", "batch_size": 64, "betas": [0.8, 0.9]},
        "model": {"normalize": False},
        "data": {"path": "/data/ice cube"},
        "name": "x=y",
    }


def test_load_config_with_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", to_dict(debug_config("d")))
    cfg = load_config(
        path, ["train.lr=1e-3", "model.dropout=0.25", "train.loss=vmf", "train.seed=7"]
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.dropout == 0.25
    assert cfg.train.loss == "vmf"
    assert cfg.train.seed == 7
    # everything else as in the file
    assert cfg.model.d_model == debug_config().model.d_model
    assert cfg.train.batch_size == debug_config().train.batch_size


def test_overrides_without_a_file_start_from_the_baseline() -> None:
    cfg = load_config(None, ["train.max_steps=5"])
    assert cfg.train.max_steps == 5
    assert cfg.model == baseline_config().model


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.lr", r"override 'train\.lr' must look like section\.key=value"),
        ("train.lrr=1e-3", r"config\.train: unknown key\(s\) \['lrr'\]"),
        ("name.sub=1", r"override 'name\.sub=1': name is not a section"),
        ("train.batch_size=big", r"config\.train\.batch_size: expected an integer, got 'big'"),
        ("train.lr=-1", r"train\.lr is out of range, got -1\.0"),
    ],
)
def test_bad_overrides(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["name=ok", override] if override.startswith("name.") else [override])


def test_config_from_flat() -> None:
    cfg = config_from_flat({"train.lr": 1e-3, "model.dropout": 0.1}, debug_config("d"))
    assert cfg.train.lr == 1e-3
    assert cfg.model.dropout == 0.1
    assert cfg.data.path == "d"
    with pytest.raises(ConfigError, match="trian is not a config section"):
        config_from_flat({"trian.lr": 1e-3}, debug_config())
    with pytest.raises(ConfigError, match="dropout must be in"):
        config_from_flat({"model.dropout": 1.5}, debug_config())


# ---------------------------------------------------------------- validation of values


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"lr": -1e-3}}, r"train\.lr is out of range, got -0\.001"),
        ({"train": {"lr": 0}}, r"train\.lr is out of range, got 0\.0"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size is out of range, got 0"),
        ({"train": {"grad_clip": 0}}, r"train\.grad_clip is out of range"),
        ({"train": {"min_lr_ratio": 1.5}}, r"train\.min_lr_ratio is out of range, got 1\.5"),
        ({"train": {"betas": [0.9, 1.0]}}, r"train\.betas must be two numbers in \[0, 1\)"),
        ({"train": {"betas": [0.9]}}, r"train\.betas must be two numbers"),
        (
            {"model": {"d_model": 30, "dom_heads": 4}},
            r"d_model must be divisible by dom_heads, got d_model=30, dom_heads=4",
        ),
        (
            {"model": {"d_model": 32, "dom_heads": 4, "event_heads": 3}},
            r"d_model must be divisible by event_heads, got d_model=32, event_heads=3",
        ),
        ({"model": {"dropout": 1.0}}, r"dropout must be in \[0, 1\), got 1\.0"),
        ({"model": {"d_model": 0}}, r"d_model must be >= 1, got 0"),
        ({"data": {"val_files": -1}}, r"data\.val_files must be >= 0, got -1"),
        ({"data": {"max_val_events": 0}}, r"data\.max_val_events must be >= 1, got 0"),
    ],
)
def test_bad_values_are_config_errors(tmp_path: Path, data: dict[str, Any], pattern: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    section = next(iter(data))
    assert f"{path}.{section}" in str(info.value)  # which file and section


def test_config_error_is_a_value_error() -> None:
    # Callers that catch ValueError (e.g. a Ray Tune trial) still see config mistakes.
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- the shipped experiments


@pytest.mark.parametrize(
    ("name", "dropout", "normalize"),
    [("config.yaml", 0.0, False), ("config_fixed.yaml", 0.1, True)],
)
def test_baseline_experiment_yaml(name: str, dropout: float, normalize: bool) -> None:
    cfg = load_config(BASELINE_DIR / name)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert m.arch == "original"  # the network the stability table was measured on
    assert (m.d_model, m.dom_heads, m.event_heads) == (128, 4, 4)
    assert (m.dom_layers, m.event_layers) == (4, 4)
    assert m.dropout == dropout
    assert m.normalize is normalize
    assert (d.max_pulses_per_dom, d.max_doms_per_event) == (512, 2048)
    assert d.max_train_events == 1_000_000
    assert d.val_files == 1
    assert t.batch_size == 256
    assert t.lr == pytest.approx(3e-4)
    assert t.weight_decay == pytest.approx(1e-5)
    assert t.grad_clip == 1.0
    assert t.loss == "angular"
    # The two files differ in exactly the fix: normalization, dropout (and names/paths).
    other = load_config(
        BASELINE_DIR / ("config_fixed.yaml" if normalize is False else "config.yaml")
    )
    assert dataclasses.replace(other.model, dropout=dropout, normalize=normalize) == m
    assert dataclasses.replace(other.train, out_dir=t.out_dir) == t
    assert other.data == d


def test_iceaggr_baseline_yamls_are_our_model_at_the_baseline_size() -> None:
    cfg = load_config(ICEAGGR_DIR / "config.yaml")
    raw = load_config(ICEAGGR_DIR / "config_raw.yaml")
    assert cfg.model.arch == "iceaggr" and cfg.model.normalize is True
    assert cfg.model.dropout == 0.1
    # config_raw.yaml differs in normalization only (and its name and output folder).
    assert dataclasses.replace(raw.model, normalize=True) == cfg.model
    assert raw.model.normalize is False
    assert dataclasses.replace(raw.train, out_dir=cfg.train.out_dir) == cfg.train
    assert raw.data == cfg.data
    # Same sizes, data and optimizer as the original network's fixed run.
    fixed = load_config(BASELINE_DIR / "config_fixed.yaml")
    assert dataclasses.replace(fixed.model, arch="iceaggr") == cfg.model
    assert dataclasses.replace(fixed.train, out_dir=cfg.train.out_dir) == cfg.train
    assert fixed.data == cfg.data


def test_baseline_preset_matches_the_iceaggr_baseline_yaml_architecture() -> None:
    ours = load_config(ICEAGGR_DIR / "config.yaml")
    assert dataclasses.replace(ours.model, dropout=0.0) == baseline_config().model
