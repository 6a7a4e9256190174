"""Config dataclasses: JSON round trip, strict keys and types, overrides, presets."""

from __future__ import annotations

import json

import pytest

from lexvla.config import (
    ExperimentConfig,
    ModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
    to_json,
)
from lexvla.errors import LexVLAError
from lexvla.presets import get_preset, list_presets


@pytest.mark.parametrize("name", list(list_presets()))
def test_every_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    again = from_dict(ExperimentConfig, json.loads(to_json(cfg)))
    assert again == cfg


def test_presets_are_fresh_objects():
    a = get_preset("tiny")
    a.train.steps = 999
    a.model.vision.arch["hidden_size"] = 7
    assert get_preset("tiny").train.steps != 999
    assert get_preset("tiny").model.vision.arch["hidden_size"] == 32


def test_unknown_key_is_rejected_with_its_dotted_name():
    data = to_dict(ExperimentConfig())
    data["model"]["vision"]["backbon"] = "x"
    with pytest.raises(LexVLAError, match=r"model\.vision\.backbon"):
        from_dict(ExperimentConfig, data)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("steps", "ten", "train.steps': expected int"),
        ("steps", 1.5, "expected int"),
        ("steps", True, "expected int"),
        ("lr", "fast", "expected float"),
        ("grad_checkpointing", 1, "expected bool"),
    ],
)
def test_wrong_types_are_rejected(key, value, match):
    data = {"train": {key: value}}
    with pytest.raises(LexVLAError, match=match):
        from_dict(ExperimentConfig, data)


def test_ints_widen_to_float_and_lists_to_tuples():
    cfg = from_dict(ExperimentConfig, {"train": {"lr": 1}, "eval": {"recall_ks": [1, 2]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.eval.recall_ks == (1, 2)


def test_overrides_parse_json_and_fall_back_to_strings():
    cfg = apply_overrides(
        get_preset("tiny"),
        ["train.steps=40", "data.path=/some/file.json", "eval.recall_ks=[1,5]", "train.lr=3e-4"],
    )
    assert cfg.train.steps == 40
    assert cfg.data.path == "/some/file.json"
    assert cfg.eval.recall_ks == (1, 5)
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("bad", ["train.stepz=3", "trian.steps=3", "nonsense", "=3"])
def test_bad_overrides_name_the_problem(bad):
    with pytest.raises(LexVLAError):
        apply_overrides(get_preset("tiny"), [bad])


def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(LexVLAError, match="not found"):
        load_config(ModelConfig, missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LexVLAError, match="broken.json"):
        load_config(ModelConfig, broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"vision": {"image_size": "big"}}))
    with pytest.raises(LexVLAError, match=r"wrong.json.*vision.image_size"):
        load_config(ModelConfig, wrong)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(LexVLAError, match="tiny"):
        get_preset("huge")


def test_configuration_reference_is_up_to_date():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
