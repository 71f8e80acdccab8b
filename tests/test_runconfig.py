"""Dataclass configs: YAML/TOML files, dotted overrides, type checks, and the saved copy."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Literal

import pytest

from zimagekit.errors import ZImageKitError
from zimagekit.runconfig import apply_override, config_to_dict, load_config, save_config
from zimagekit.trainer import TrainConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float | None = 1.0
    steps: int = 10
    on: bool = False
    mode: Literal["fp32", "bf16"] = "fp32"
    tags: tuple[str, ...] = ()
    widths: list[int] = field(default_factory=list)


@dataclass
class Cfg:
    optim: Optim = field(default_factory=Optim)
    seed: int = 0
    label: str | None = None


def test_yaml_file_sets_only_what_it_names(tmp_path):
    path = tmp_path / "c.yaml"
    # "3e-4" without a dot is a string to YAML 1.1; it must still read as a number.
    path.write_text("optim:\n  lr: 3e-4\n  betas: [0.8, 0.95]\n  tags: [a, b]\nseed: 5\n")
    cfg = load_config(Cfg, path)
    assert cfg == Cfg(optim=Optim(lr=3e-4, betas=(0.8, 0.95), tags=("a", "b")), seed=5)


def test_toml_file_reads_like_yaml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 7\nlabel = "x"\n[optim]\nlr = 0.5\nmode = "bf16"\nwidths = [1, 2]\n')
    assert load_config(Cfg, path) == Cfg(optim=Optim(lr=0.5, mode="bf16", widths=[1, 2]), seed=7, label="x")


def test_toml_falls_back_to_tomli_where_tomllib_is_missing(tmp_path, monkeypatch):
    import tomllib

    path = tmp_path / "c.toml"
    path.write_text("seed = 3\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", types.SimpleNamespace(load=tomllib.load))
    assert load_config(Cfg, path).seed == 3
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ZImageKitError, match="pip install tomli"):
        load_config(Cfg, path)


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    cfg = load_config(Cfg, path, ["optim.lr=3e-4", "optim.steps=1e3", "optim.on=true", "optim.clip=null",
                                  "optim.betas=[0.5, 0.6]", "seed=2", "seed=4"])
    assert cfg == Cfg(optim=Optim(lr=3e-4, steps=1000, on=True, clip=None, betas=(0.5, 0.6)), seed=4)


def test_text_override_keeps_the_raw_text():
    assert apply_override(Cfg(), "label=007").label == "007"
    assert apply_override(Cfg(), "label=true").label == "true"
    assert apply_override(Cfg(label="x"), "label=null").label is None


def test_a_section_override_takes_a_mapping():
    assert apply_override(Cfg(), "optim={lr: 0.5, steps: 3}").optim == Optim(lr=0.5, steps=3)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["'optim.lrr'", "lr, betas, clip, steps, on, mode, tags, widths"]),
    ("sede=1", ["'sede'", "top level", "optim, seed, label"]),
    ("seed.x=1", ["'seed'", "not a section"]),
    ("optim.steps=abc", ["'optim.steps'", "integer"]),
    ("optim.steps=2.5", ["'optim.steps'", "integer"]),
    ("optim.on=1", ["'optim.on'", "true or false"]),
    ("optim.mode=fp16", ["'optim.mode'", "'fp32', 'bf16'"]),
    ("optim.betas=[0.9]", ["'optim.betas'", "2 values"]),
    ("optim.lr=[1]", ["'optim.lr'", "number"]),
    ("optim.clip=big", ["'optim.clip'", "number or null"]),
    ("optim.widths=[1, x]", ["'optim.widths[1]'", "integer"]),
    ("optim.lr", ["key=value"]),
    ("optim.lr=[", ["'optim.lr'", "YAML"]),
])
def test_bad_overrides_name_the_key_in_one_line(override, words):
    with pytest.raises(ZImageKitError) as info:
        apply_override(Cfg(), override)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("name, text, words", [
    ("c.yaml", "optim:\n  nope: 1\n", ["'optim.nope'", "valid keys under 'optim'"]),
    ("c.yaml", "optim: 3\n", ["'optim'", "mapping"]),
    ("c.yaml", "- a\n- b\n", ["mapping of sections"]),
    ("c.yaml", "optim: [\n", ["not valid YAML"]),
    ("c.toml", "seed = \n", ["not valid TOML"]),
    ("c.json", "{}", [".yaml, .yml or .toml"]),
    ("c.yaml", "label: 2024\n", ["'label'", "quote it"]),
])
def test_bad_files_name_the_problem_in_one_line(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ZImageKitError) as info:
        load_config(Cfg, path)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ZImageKitError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_empty_yaml_file_keeps_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(Cfg, path) == Cfg()


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(TrainConfig, None, ["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "optim.grad_clip=null",
                                          "train.precision=bf16", "sample.prompts=[a red circle, two squares]",
                                          "run.name=007", "mfu_peak_flops=9.89e14"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


def test_train_config_rejects_impossible_values_by_key():
    with pytest.raises(ZImageKitError, match="'optim.lr' must be > 0"):
        load_config(TrainConfig, None, ["optim.lr=-1"])
    with pytest.raises(ZImageKitError, match="'train.grad_accum_steps' must be >= 1"):
        load_config(TrainConfig, None, ["train.grad_accum_steps=0"])
