"""Config dataclasses: JSON round trip, strict keys and types, overrides, presets."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lexvla.config import (
    CHOICES,
    RANGES,
    SECTIONS,
    ExperimentConfig,
    LexicalConfig,
    ModelConfig,
    TrainConfig,
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


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("model.lexical.threshold=1", "model.lexical.threshold"),
        ("model.lexical.threshold=-0.01", "model.lexical.threshold"),
        ("loss.penalty_weight=-0.1", "loss.penalty_weight"),
        ("loss.penalty_warmup_steps=-1", "loss.penalty_warmup_steps"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("model.lexical.top_k=0", "model.lexical.top_k"),
        ("train.steps=-1", "train.steps"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
        ("model.text.lora_dropout=1.0", "model.text.lora_dropout"),
        ("eval.recall_ks=[1,0,10]", "eval.recall_ks"),
        ("model.vision.std=[0.2,0,0.2]", "model.vision.std"),
        ("train.lr=NaN", "train.lr"),
        ("model.logit_scale_init=Infinity", "model.logit_scale_init"),
    ],
)
def test_values_outside_their_meaning_are_refused_naming_the_key(override, key):
    with pytest.raises(LexVLAError, match=rf"'{re.escape(key)}' must be"):
        apply_overrides(get_preset("tiny"), [override])
    dotted, _, raw = override.partition("=")
    section, _, name = dotted.rpartition(".")
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = json.loads(raw)
    with pytest.raises(LexVLAError, match=re.escape(key)):
        from_dict(ExperimentConfig, data)


def test_construction_checks_values_too():
    with pytest.raises(LexVLAError, match=r"'train\.lr' must be > 0, got -1"):
        TrainConfig(lr=-1.0)
    with pytest.raises(LexVLAError, match=r"'model\.lexical\.threshold' must be in \[0, 1\)"):
        LexicalConfig(threshold=1.5)
    with pytest.raises(LexVLAError, match=r"'train\.batch_size'"):
        dataclasses.replace(get_preset("tiny").train, batch_size=0)


def test_the_edges_of_each_range_are_accepted():
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            "model.lexical.threshold=0",
            "model.lexical.threshold=0.999",
            "loss.penalty_weight=0",
            "loss.penalty_warmup_steps=0",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.lr=1e-12",
            "train.batch_size=1",
            "model.lexical.top_k=1",
        ],
    )
    assert cfg.model.lexical.threshold == 0.999 and cfg.train.lr == 1e-12


def test_a_checkpoint_config_with_a_bad_value_names_file_and_key(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"lexical": {"top_k": 0}}))
    with pytest.raises(LexVLAError, match=r"model\.json.*'model\.lexical\.top_k' must be >= 1"):
        load_config(ModelConfig, path)


def _nested_config_types(node: object) -> set[type]:
    found = set()
    for value in vars(node).values():
        if dataclasses.is_dataclass(value):
            found |= {type(value)} | _nested_config_types(value)
    return found


def test_every_range_rule_names_a_field_of_its_section():
    assert set(SECTIONS) == _nested_config_types(ExperimentConfig())  # every section is checked
    keys = {f"{s}.{f.name}" for cls, s in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(RANGES) <= keys, set(RANGES) - keys  # no rule for a renamed or removed field


def test_a_string_outside_its_choices_is_refused_with_its_key():
    from lexvla.config import CHOICES, TextConfig

    with pytest.raises(LexVLAError, match=r"'model\.text\.inference_weights' must be one of"):
        TextConfig(inference_weights="int4")
    with pytest.raises(LexVLAError, match=r"model\.text\.inference_weights.*got 'fp32'"):
        apply_overrides(get_preset("tiny"), ["model.text.inference_weights=fp32"])
    for value in CHOICES["model.text.inference_weights"]:
        assert TextConfig(inference_weights=value).inference_weights == value


def _choice_field(key: str) -> tuple[type, str]:
    """(config class, field name) of a dotted CHOICES key."""
    section, name = key.rsplit(".", 1)
    classes = {s: cls for cls, s in SECTIONS.items()}
    return classes[section], name


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_refuses_other_strings_and_takes_its_values(key):
    cls, name = _choice_field(key)
    assert name in {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(LexVLAError, match=rf"'{re.escape(key)}' must be one of .*got 'bogus'"):
        cls(**{name: "bogus"})
    for value in CHOICES[key]:
        assert getattr(cls(**{name: value}), name) == value
