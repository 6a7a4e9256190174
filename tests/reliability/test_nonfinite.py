"""Non-finite numbers never pass silently: a checkpoint holding NaN or inf is never written and is
refused on load (weights and optimiser state), encoding with a model whose outputs are not finite is an
error rather than an empty answer, and run logs stay strict JSON.

The training side (a non-finite step is skipped; a streak of them stops the run) is tested in
tests/test_train_loop.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.search import make_image
from lexvla import LexVLA, create_model
from lexvla.errors import LexVLAError
from lexvla.train import state as ckpt
from lexvla.train.optim import create_optimizer, create_scheduler
from lexvla.train.runlog import strict_json
from lexvla.train.setup import experiment_config


def _poison(model, name: str = "vision.codebook", value: float = float("nan")) -> None:
    with torch.no_grad():
        model.trainable_parameters()[name].view(-1)[3] = value


def _optimizer(model):
    cfg = experiment_config("tiny").train
    optimizer = create_optimizer(model.trainable_parameters(), cfg)
    return optimizer, create_scheduler(optimizer, cfg)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_model_is_never_written(fresh_tiny_model, tmp_path: Path, value: float) -> None:
    _poison(fresh_tiny_model, value=value)
    with pytest.raises(LexVLAError, match=r"not writing .*NaN or inf values in vision\.codebook"):
        fresh_tiny_model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either
    optimizer, scheduler = _optimizer(fresh_tiny_model)
    with pytest.raises(LexVLAError, match="step_0000003"):
        ckpt.save_checkpoint(tmp_path, 3, fresh_tiny_model, optimizer, scheduler)
    assert ckpt.checkpoint_steps(tmp_path) == []


def _saved_then_poisoned(tmp_path: Path, name: str = "logit_scale") -> Path:
    folder = create_model("tiny").save_pretrained(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"))  # as a diverged older version wrote it
    return folder


def test_loading_a_nonfinite_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = _saved_then_poisoned(tmp_path)
    with pytest.raises(
        LexVLAError, match=r"cannot load .*model\.safetensors: NaN or inf .*logit_scale"
    ):
        LexVLA.from_pretrained(folder)


def test_the_cli_refuses_it_with_one_line_and_status_2(tmp_path: Path) -> None:
    folder = _saved_then_poisoned(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lexvla.cli", "encode", "--model", str(folder), "--text", "a dog"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "NaN or inf" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no words printed


def test_resuming_from_nonfinite_optimizer_state_is_refused(fresh_tiny_model, tmp_path) -> None:
    optimizer, scheduler = _optimizer(fresh_tiny_model)
    params = list(fresh_tiny_model.trainable_parameters().values())
    sum(p.float().sum() for p in params).backward()
    optimizer.step()  # AdamW moments exist now
    folder = ckpt.save_checkpoint(tmp_path, 1, fresh_tiny_model, optimizer, scheduler)
    state = load_file(str(folder / ckpt.OPTIMIZER))
    key = next(k for k in state if k.endswith("::exp_avg_sq"))
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, str(folder / ckpt.OPTIMIZER))
    with pytest.raises(
        LexVLAError, match=r"cannot resume from .*optimizer\.safetensors: NaN or inf"
    ):
        ckpt.load_latest(tmp_path, fresh_tiny_model, *_optimizer(fresh_tiny_model))


def test_encoding_with_nonfinite_outputs_is_an_error(fresh_tiny_model) -> None:
    model = fresh_tiny_model.eval()
    image = make_image(1, (64, 48))
    assert torch.isfinite(model.encode_image([image]).image_weights).all()
    _poison(model, "vision.codebook")
    with torch.no_grad(), pytest.raises(LexVLAError, match="image vectors are not finite"):
        model.encode_image([image])
    lora = next(name for name in model.trainable_parameters() if "lora_A" in name)
    _poison(model, lora)
    with torch.no_grad(), pytest.raises(LexVLAError, match="text vectors are not finite .* 2 of 2"):
        model.encode_text(["a dog", "a cat"])


def test_strict_json_writes_null_for_nonfinite_numbers() -> None:
    record = {
        "loss": float("nan"),
        "grad": [1.0, float("inf"), -float("inf")],
        "t": torch.tensor(2.0),
    }
    text = strict_json(record)
    assert json.loads(text, parse_constant=pytest.fail) == {
        "loss": None,
        "grad": [1.0, None, None],
        "t": 2.0,
    }
