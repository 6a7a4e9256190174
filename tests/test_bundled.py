"""Bundled checkpoints: `create_model("flickr8k")` and every `--model flickr8k` load the checkpoint
folder shipped in lexvla/resources; a missing folder is one clear LexVLAError; the folder is package
data. Tiny checkpoints stand in for the real one except in the `assets` test."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lexvla.errors import LexVLAError
from lexvla.models import bundled

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "src" / "lexvla"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A `tiny` model saved as a checkpoint folder under a fake resources folder."""
    from lexvla import create_model

    resources = tmp_path_factory.mktemp("resources")
    create_model("tiny").save_pretrained(resources / "flickr8k-head")
    return resources


@pytest.fixture
def bundled_tiny(monkeypatch, tiny_checkpoint) -> Path:
    """The registry's resources folder pointed at the tiny checkpoint."""
    monkeypatch.setattr(bundled, "RESOURCES", tiny_checkpoint)
    return tiny_checkpoint / "flickr8k-head"


def test_create_model_loads_the_bundled_checkpoint_by_name(bundled_tiny, tiny_model):
    from lexvla.models.factory import create_model

    model = create_model("flickr8k").eval()
    assert model.vocab.words == tiny_model.vocab.words
    with torch.no_grad():
        text = model.encode_text(["a dog on the grass"]).text_weights
    assert text.shape == (1, len(model.vocab.words)) and torch.isfinite(text).all()
    with pytest.raises(LexVLAError, match="presets only"):
        create_model("flickr8k", overrides=["seed=1"])


def test_a_missing_bundled_checkpoint_says_what_to_do(monkeypatch, tmp_path):
    from lexvla.models.factory import create_model

    monkeypatch.setattr(bundled, "RESOURCES", tmp_path)  # no flickr8k-head folder there
    with pytest.raises(LexVLAError) as error:
        create_model("flickr8k")
    message = str(error.value)
    assert "bundled checkpoint 'flickr8k' is missing" in message
    assert str(tmp_path / "flickr8k-head") in message and "--model RUN" in message
    (tmp_path / "flickr8k-head").mkdir()
    (tmp_path / "flickr8k-head" / "config.json").write_text("{}")
    assert not bundled.bundled_checkpoint_available("flickr8k")
    with pytest.raises(LexVLAError, match="is missing"):
        create_model("flickr8k")


def test_unknown_names_list_the_bundled_checkpoints():
    from lexvla.models.factory import create_model

    with pytest.raises(LexVLAError, match="bundled checkpoint \\(flickr8k\\)"):
        create_model("no-such-model")
    with pytest.raises(LexVLAError, match="unknown bundled checkpoint"):
        bundled.bundled_checkpoint_dir("no-such-model")


def test_cli_model_option_takes_the_bundled_name(bundled_tiny):
    from lexvla.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["encode", "--model", "flickr8k", "--text", "a dog on the grass", "--top", "5"]
    )
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 5
    listed = runner.invoke(app, ["presets"])
    assert listed.exit_code == 0 and "flickr8k" in listed.output


def test_bundled_checkpoint_folders_are_package_data():
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lexvla"]
    for folder, _ in bundled.BUNDLED_CHECKPOINTS.values():
        for name in ("config.json", "model.safetensors", "vocab.json", "README.md"):
            rel = f"resources/{folder}/{name}"  # setuptools globs: '*' does not cross '/'
            assert any(
                fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns
            ), f"{rel} is not package data: add it to [tool.setuptools.package-data]"
    assert bundled.RESOURCES == PACKAGE / "resources"


@pytest.mark.assets
@pytest.mark.slow
def test_the_shipped_flickr8k_head_loads_with_the_offline_backbones(small_offline_model):
    """The real bundled head: same vocabulary as the `small-offline` preset it was trained from."""
    from lexvla.models.factory import create_model

    if not bundled.bundled_checkpoint_available("flickr8k"):
        pytest.skip(f"the bundled head is not in this checkout: {bundled.RESOURCES}/flickr8k-head")
    model = create_model("flickr8k").eval()
    assert model.vocab.words == small_offline_model.vocab.words
    with torch.no_grad():
        text = model.encode_text(["a dog runs on the grass"]).text_weights
    assert torch.isfinite(text).all() and (text > 0).any()
    assert [w for w, _ in model.top_words(text, 50)[0]]
