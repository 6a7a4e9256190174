"""The CLI: thin commands, clear errors, help with examples."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from lexvla.cli import app

runner = CliRunner()


def test_presets_lists_all():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in ("tiny", "small-offline", "paper"):
        assert name in result.output


def test_encode_text_with_tiny_prints_words_and_weights():
    result = runner.invoke(
        app, ["encode", "--model", "tiny", "--text", "a dog on the grass", "--top", "7"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.strip().splitlines()]
    assert len(rows) == 7
    weights = [float(row[0]) for row in rows]
    assert weights == sorted(weights, reverse=True) and all(0 < w <= 1 for w in weights)


def test_encode_needs_exactly_one_input():
    result = runner.invoke(app, ["encode", "--model", "tiny"])
    assert result.exit_code != 0
    assert "exactly one" in str(result.exception) or "exactly one" in result.output


@pytest.mark.parametrize(
    "command",
    [["presets"], ["encode"], ["train"], ["demo"], ["assets", "prepare"], ["assets", "status"]],
)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert re.search(r"Example", result.output), result.output


def test_main_turns_user_errors_into_one_line(monkeypatch, capsys):
    from lexvla import cli

    monkeypatch.setattr("sys.argv", ["lexvla", "encode", "--model", "no-such-model", "--text", "x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err
