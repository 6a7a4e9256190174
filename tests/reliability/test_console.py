"""A clean console: `lexvla` commands print no third-party deprecation warning, while the library and
the test suite still see them (they are hidden at the CLI's entry only)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lexvla
from lexvla.models._quiet import KNOWN_WARNINGS, hide_known_warnings

CLI = [sys.executable, "-m", "lexvla.cli"]
SOURCE = str(Path(lexvla.__file__).resolve().parents[1])  # this checkout, from any working folder


def _stderr(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the user's defaults
    env["PYTHONPATH"] = os.pathsep.join([SOURCE, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["encode", "--model", "tiny", "--text", "a dog"],
        ["train", "--preset", "tiny", "--out", "run", "--set", "train.steps=2"],
        # LoRA + gradient checkpointing with the default prefix cache (the uncached forward runs)
        ["train", "--preset", "tiny", "--out", "ckpt", "--set", "train.steps=1",
         "--set", "train.grad_checkpointing=true"],
        ["eval", "retrieval", "--model", "tiny", "--data", "synthetic:8"],
    ],
    ids=["encode", "train", "train-grad-checkpointing", "eval-retrieval"],
)  # fmt: skip
def test_commands_print_no_warnings(args: list[str], tmp_path: Path) -> None:
    stderr = _stderr(args, tmp_path)
    assert "Warning" not in stderr and "warnings.warn" not in stderr, stderr[-2000:]
    assert "deprecated" not in stderr.lower(), stderr[-2000:]


def test_importing_lexvla_hides_nothing() -> None:
    import lexvla.cli  # noqa: F401
    import lexvla.models.factory  # noqa: F401

    patterns = [f[1].pattern for f in warnings.filters if f[1] is not None]
    assert not any(message in p for _, message, _ in KNOWN_WARNINGS for p in patterns)


def _raised(message: str, category: type[Warning], module: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_known_warnings()
        warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)
    return [str(w.message) for w in caught]


def test_only_the_known_warnings_are_hidden() -> None:
    assert KNOWN_WARNINGS
    known = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert _raised(known, FutureWarning, "transformers.modeling_utils") == []
    assert _raised("something else", FutureWarning, "transformers.modeling_utils")  # other text
    assert _raised(known, FutureWarning, "lexvla.models.text")  # raised by lexvla itself
    assert _raised(known, UserWarning, "transformers.modeling_utils")  # another category
