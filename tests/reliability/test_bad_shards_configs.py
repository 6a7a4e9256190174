"""Malformed caption JSON, CSV tables, tar shards and config files: each is read as far as it is
valid (bad samples skipped and counted), or refused with a LexVLAError that names the file.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.search import make_image
from lexvla.config import ExperimentConfig, ModelConfig, apply_overrides, load_config, to_dict
from lexvla.data import ShardDataset, create_dataset
from lexvla.errors import LexVLAError

DEEP = "[" * 100_000  # deeper than any JSON parser's recursion limit


def _png(i: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image(i, (48, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- caption JSON
COCO_CASES: dict[str, object] = {
    "truncated": '{"images": [{"id": 1, "file_name": "a.png"}], "annot',
    "binary": b"\x80\x04\x95garbage\xff",
    "deeply-nested": DEEP,
    "top-level-list": "[1, 2, 3]",
    "images-not-list": {"images": {"id": 1}, "annotations": []},
    "image-without-id": {"images": [{"file_name": "a.png"}], "annotations": [
        {"image_id": 1, "caption": "a dog"}]},
    "image-without-file": {"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "caption": "a dog"}]},
    "annotation-not-dict": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": ["x"]},
    "annotation-without-image": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [
        {"caption": "a dog"}]},
    "unhashable-id": {"images": [{"id": [1], "file_name": "a.png"}], "annotations": [
        {"image_id": [1], "caption": "a dog"}]},
    "no-captions": {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [
        {"image_id": 1, "caption": "  "}]},
    "karpathy-bad-sentences": {"images": [{"filename": "a.png", "sentences": [1, 2]}]},
    "karpathy-no-filename": {"images": [{"sentences": [{"raw": "a dog"}]}]},
}  # fmt: skip


def _write_case(path: Path, content: object) -> None:
    """Write a case as given: bytes as is, text as is, anything else as JSON."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_malformed_caption_json_names_the_file(tmp_path: Path, case: str) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    content = COCO_CASES[case]
    path = tmp_path / f"{case}.json"
    _write_case(path, content)
    with pytest.raises(LexVLAError, match=path.name.replace(".", r"\.")):
        create_dataset(path, images_dir=tmp_path)


# ---------------------------------------------------------------------------------- CSV tables
CSV_CASES: dict[str, bytes] = {
    "no-header": b"a.png,a dog\n",
    "wrong-columns": b"image_url,text_en\nx,y\n",
    "binary": b"\xff\xfe\x00\x01\x80" * 50,
    "field-too-large": b"filepath,caption\na.png," + b"w" * 200_000 + b"\n",
    "only-empty-captions": b"filepath,caption\na.png,   \nb.png,\n",
    "empty-file": b"",
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_malformed_tables_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.csv"
    path.write_bytes(CSV_CASES[case])
    with pytest.raises(LexVLAError, match=path.name.replace(".", r"\.")):
        create_dataset(path, images_dir=tmp_path)


def test_a_table_with_some_bad_rows_keeps_the_good_ones(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    path = tmp_path / "t.csv"
    path.write_text('filepath,caption\na.png,a dog\n,no file\nb.png,\n"a.png","two\nlines"\n')
    dataset = create_dataset(path, images_dir=tmp_path, lazy=False)
    assert [(r.key, r.captions) for r in dataset.records] == [("a.png", ["a dog", "two\nlines"])]


# ---------------------------------------------------------------------------------- tar shards
def _tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _good_members(count: int) -> list[tuple[str, bytes]]:
    return [m for i in range(count) for m in ((f"{i:03d}.png", _png(i)), (f"{i:03d}.txt", b"x"))]


def _truncated(where: str) -> Callable[[], bytes]:
    """The 4-sample tar cut 100 bytes into the third sample's image data, or into its header."""

    def make() -> bytes:
        data = _tar_bytes(_good_members(4))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.getmember("002.png")
        return data[: (member.offset_data if where == "data" else member.offset) + 100]

    return make


def _bad_gzip() -> bytes:
    data = bytearray(gzip.compress(_tar_bytes(_good_members(4))))
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)
    return bytes(data)


# name -> (bytes, training samples, training skips, corpus images, corpus failures); for damaged
# archives the counts of samples and images are the most that may be read (those before the damage)
TAR_CASES: dict[str, tuple[Callable[[], bytes], int, int, int, int]] = {
    "zero-byte.tar": (lambda: b"", 0, 1, 0, 1),
    "garbage.tar": (lambda: b"this is not a tar archive " * 40, 0, 1, 0, 1),
    "truncated-in-data.tar": (_truncated("data"), 2, 1, 2, 1),
    "truncated-in-header.tar": (_truncated("header"), 2, 1, 2, 1),
    "bad-gzip.tar.gz": (_bad_gzip, 2, 1, 2, 1),
    "captions-only.tar": (
        lambda: _tar_bytes([("000.txt", b"a dog"), ("001.txt", b"a cat")]), 0, 2, 0, 2
    ),
    "deep-json.tar": (  # no caption: the training sample is skipped, the corpus image encoded
        lambda: _tar_bytes([("000.png", _png()), ("000.json", DEEP.encode())]), 0, 1, 1, 0
    ),
    "json-not-object.tar": (
        lambda: _tar_bytes([("000.png", _png()), ("000.json", b"[1, 2]"), ("000.txt", b"a")]),
        1, 0, 1, 0,
    ),
}  # fmt: skip
DAMAGED = ("truncated-in-data.tar", "truncated-in-header.tar", "bad-gzip.tar.gz")


@pytest.mark.parametrize("name", sorted(TAR_CASES))
def test_training_reader_keeps_what_is_valid_and_counts_the_rest(tmp_path: Path, name: str):
    make, good, skipped, _, _ = TAR_CASES[name]
    path = tmp_path / name
    path.write_bytes(make())
    dataset = ShardDataset(path, shuffle=False)
    samples = list(dataset)
    assert dataset.skips.count == skipped, dataset.skips.reasons
    # Damaged archives: at most the samples wholly before the damage (the one in progress at a
    # header cut cannot be known complete and is dropped); the others: exactly the valid ones.
    assert len(samples) <= good and (len(samples) == good or name in DAMAGED), len(samples)


@pytest.mark.parametrize("name", sorted(TAR_CASES))
def test_encode_corpus_records_a_damaged_tar_as_a_failure(tiny_model, tmp_path: Path, name: str):
    from lexvla.index import iter_shards
    from lexvla.search import encode_corpus

    make, _, _, good, failures = TAR_CASES[name]
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    bad.write_bytes(make())
    fine = tmp_path / "in" / "fine.tar"
    fine.write_bytes(_tar_bytes(_good_members(3)))
    report = encode_corpus(tiny_model, [bad, fine], tmp_path / "out", progress=False)
    keys = [m["key"] for s in iter_shards(tmp_path / "out") for m in s.metadata]
    assert len(keys) == len(set(keys)) and sum(k.startswith("fine/") for k in keys) == 3
    assert len(report["failed"]) == failures
    assert report["images"] <= 3 + good and (report["images"] == 3 + good or name in DAMAGED)
    assert all(f["error"] for f in report["failed"])
    again = encode_corpus(tiny_model, [bad, fine], tmp_path / "out", progress=False)
    assert again["images"] == 0 and len(again["failed"]) == len(report["failed"])


# ---------------------------------------------------------------------------------- config files
def _config_with(path: tuple[str, ...], value: object) -> dict:
    data = to_dict(ExperimentConfig())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


CONFIG_CASES: dict[str, object] = {
    "int-as-string": _config_with(("train", "steps"), "40"),
    "int-as-float": _config_with(("train", "steps"), 40.5),
    "bool-as-int": _config_with(("model", "vision", "freeze"), 1),
    "float-as-bool": _config_with(("train", "lr"), True),
    "dict-as-list": _config_with(("model", "vision", "arch"), [1, 2]),
    "section-as-string": _config_with(("model",), "tiny"),
    "tuple-wrong-length": _config_with(("model", "vision", "mean"), [0.5]),
    "null-for-int": _config_with(("train", "steps"), None),
    "unknown-key": _config_with(("train", "stepz"), 1),
    "top-level-list": [1, 2],
    "not-json": "{train: steps=4}",
    "deeply-nested": DEEP,
    "binary": b"\x80\x04\x95pickle?",
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_files_name_the_file(tmp_path: Path, case: str) -> None:
    content = CONFIG_CASES[case]
    path = tmp_path / f"{case}.json"
    _write_case(path, content)
    with pytest.raises(LexVLAError, match=path.name.replace(".", r"\.")):
        load_config(ExperimentConfig, path)


def test_a_directory_or_missing_config_names_it(tmp_path: Path) -> None:
    with pytest.raises(LexVLAError, match="cannot read the config file"):
        load_config(ExperimentConfig, tmp_path)
    with pytest.raises(LexVLAError, match="not found"):
        load_config(ModelConfig, tmp_path / "nope.json")


@pytest.mark.parametrize(
    "override",
    ["train.steps=ten", "train.steps=1.5", "model.vision=3", "train=[]", "nokey=1", "=1", "x",
     "train.steps.deeper=1", "model.vision.mean=[1]", "train.lr=" + "[" * 50_000],
)  # fmt: skip
def test_bad_overrides_are_clear_errors(override: str) -> None:
    with pytest.raises(LexVLAError):
        apply_overrides(ExperimentConfig(), [override])


def test_cli_prints_the_config_error_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(CONFIG_CASES["int-as-string"]))
    done = subprocess.run(
        [sys.executable, "-m", "lexvla.cli", "train", "--config", str(bad), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "train.steps" in done.stderr + done.stdout and "bad.json" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------- file names
def test_undecodable_file_names_are_failures_and_resume_works(tiny_model, tmp_path: Path) -> None:
    """A file or member name that is not UTF-8 cannot be written to the metadata: it is listed as a
    failure (named with "?"), the rest is encoded, and a second run resumes without complaint."""
    import os

    from lexvla.index import iter_shards
    from lexvla.search import encode_corpus

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png(1))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:  # latin-1 name
        f.write(_png(2))
    tar = tmp_path / "named.tar"
    tar.write_bytes(_tar_bytes([("caf\udce9.png", _png(3)), ("ok.png", _png(4))]))
    for run, source in enumerate((folder, [tar])):
        out = tmp_path / f"out-{run}"
        report = encode_corpus(tiny_model, source, out, progress=False)
        assert report["images"] == 1 and len(report["failed"]) == 1, report
        assert "not valid UTF-8" in report["failed"][0]["error"]
        assert "caf?" in report["failed"][0]["key"]
        keys = [m["key"] for s in iter_shards(out) for m in s.metadata]
        assert len(keys) == 1 and all(k.encode("utf-8") for k in keys)
        again = encode_corpus(tiny_model, source, out, progress=False)
        assert again["images"] == 0 and len(again["failed"]) == 1
