"""Shared fixtures. Tests never reach a model hub: HF offline mode is forced for the whole session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = (REPO_ROOT / ".." / "shared" / "data" / "coco-mini").resolve()


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` preset model (random towers, fixed seed), built once per session. Do not mutate."""
    from lexvla import create_model

    return create_model("tiny").eval()


@pytest.fixture
def fresh_tiny_model():
    """A `tiny` model the test may train or modify."""
    from lexvla import create_model

    return create_model("tiny")


def _require_asset(name: str) -> str:
    from lexvla.assets import asset_status

    info = asset_status().get(name, {})
    if not info.get("prepared"):
        pytest.skip(
            f"offline model '{name}' is not prepared: run `lexvla assets prepare` (make test does)"
        )
    return str(info["path"])


@pytest.fixture(scope="session")
def small_offline_model():
    """The real `small-offline` model (DINOv2-S + SmolLM2-135M), built once per session."""
    _require_asset("dinov2-small")
    _require_asset("smollm2-135m")
    from lexvla import create_model

    return create_model("small-offline").eval()


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    return _require_asset("llama2-tokenizer")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(
            f"real images not available: {COCO_MINI} is missing (../shared beside the checkout)"
        )
    return COCO_MINI
