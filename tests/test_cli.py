"""The CLI: thin commands, clear errors, help with examples."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from lexvla.cli import app
from lexvla.errors import LexVLAError

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
    [
        ["presets"],
        ["encode"],
        ["train"],
        ["demo"],
        ["assets", "prepare"],
        ["assets", "status"],
        ["eval", "retrieval"],
        ["eval", "sparsity"],
        ["eval", "patchdis"],
        ["eval", "discoveries"],
        ["explain"],
        ["encode-corpus"],
        ["index", "build"],
        ["index", "export"],
        ["search"],
        ["serve"],
    ],
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


def _images_with_captions(folder, n=6):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = ["filepath,caption"]
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
        rows.append(f"im{i}.png,a {colours[i % 6]} dog on the grass")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_corpus_index_search_eval_explain_end_to_end(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    csv = _images_with_captions(images)
    corpus, index = tmp_path / "corpus", tmp_path / "index"
    (tmp_path / "with-broken").mkdir()
    (tmp_path / "with-broken" / "broken.png").write_bytes(b"not an image")
    result = runner.invoke(
        app,
        ["encode-corpus", "--model", "tiny", "--images", str(tmp_path / "with-broken"),
         "--out", str(tmp_path / "broken-corpus")],
    )  # fmt: skip
    assert result.exit_code == 0 and "1 images could not be decoded" in result.output, result.output
    result = runner.invoke(
        app, ["encode-corpus", "--model", "tiny", "--images", str(images), "--out", str(corpus)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", "build", "--from", str(corpus), "--out", str(index)])
    assert result.exit_code == 0 and "6 documents" in result.output, result.output
    result = runner.invoke(
        app, ["search", str(index), "--text", "a red dog", "-k", "3", "--explain"]
    )
    assert result.exit_code == 0, result.output
    hits = [line for line in result.output.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(hits) == 3 and all(".png" in line for line in hits)
    # --explain: under each hit its words, contribution = query weight x document weight
    parts = re.findall(r"^\s+(\d+\.\d+) = (\d+\.\d+) x (\d+\.\d+)  \S+", result.output, re.M)
    assert parts and all(abs(float(c) - float(q) * float(d)) < 2e-3 for c, q, d in parts)
    first_word = re.search(r"query words: (\S+)", result.output).group(1)
    dropped = runner.invoke(
        app, ["search", str(index), "--text", "a red dog", "--drop", first_word]
    )
    assert dropped.exit_code == 0 and f"query words: {first_word} " not in dropped.output
    assert " = " not in dropped.output  # no --explain: hits only
    out = tmp_path / "retrieval.json"
    result = runner.invoke(
        app, ["eval", "retrieval", "--model", "tiny", "--data", str(csv), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = __import__("json").loads(out.read_text())
    assert {"image_to_text/R@1", "text_to_image/R@10", "cosine"} <= set(report)
    result = runner.invoke(
        app,
        [
            "explain",
            str(images / "im0.png"),
            "--text",
            "a dog",
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "explain"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "explain" / "index.html").is_file()
    exported = tmp_path / "vectors.jsonl"
    result = runner.invoke(app, ["index", "export", "--index", str(index), "--out", str(exported)])
    assert result.exit_code == 0 and len(exported.read_text().splitlines()) == 6


def test_serve_passes_limits_to_the_server(monkeypatch, tmp_path):
    """`lexvla serve --timeout/--max-upload-mb` reach the server; a non-positive timeout is refused."""
    calls = []
    monkeypatch.setattr("lexvla.serve.app.run", lambda *args, **kwargs: calls.append(kwargs))
    args = ["serve", "--index", str(tmp_path), "--max-upload-mb", "3", "--timeout", "2.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls[0]["timeout"] == 2.5 and calls[0]["max_upload_mb"] == 3
    refused = runner.invoke(app, ["serve", "--index", str(tmp_path), "--timeout", "0"])
    assert isinstance(refused.exception, LexVLAError) and "--timeout" in str(refused.exception)


def test_serve_passes_batching_options_to_the_server(monkeypatch, tmp_path):
    """`--max-batch/--max-wait-ms/--query-cache/--threads/--text-weights` reach the server; bad values
    are refused naming the option."""
    from lexvla.serve.app import BatchingOptions

    calls = []
    monkeypatch.setattr("lexvla.serve.app.run", lambda *args, **kwargs: calls.append(kwargs))
    args = ["serve", "--index", str(tmp_path), "--max-batch", "8", "--max-wait-ms", "5",
            "--query-cache", "0", "--threads", "2", "--text-weights", "auto"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls[0]["batching"] == BatchingOptions(8, 5.0, 0, 2)
    assert calls[0]["text_weights"] == "auto"
    assert runner.invoke(app, ["serve", "--index", str(tmp_path)]).exit_code == 0
    assert calls[1]["batching"] == BatchingOptions() and calls[1]["text_weights"] is None
    refused = runner.invoke(app, ["serve", "--index", str(tmp_path), "--max-batch", "0"])
    assert isinstance(refused.exception, LexVLAError) and "--max-batch" in str(refused.exception)


def test_serve_refuses_unknown_text_weights(tmp_path):
    result = runner.invoke(app, ["serve", "--index", str(tmp_path), "--text-weights", "int3"])
    assert isinstance(result.exception, LexVLAError)
    assert "--text-weights 'int3': use one of float32" in str(result.exception)
