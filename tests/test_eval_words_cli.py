"""`lexvla eval words` on awkward data: a clear message or a counted skip, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from lexvla.cli import app
from lexvla.errors import LexVLAError

runner = CliRunner()
CAPTIONS = {
    1: ["a dog on the grass", "a brown dog runs"],
    2: ["a red car on a road", "a car parked"],
    3: [],  # an image without captions
}


def _coco(tmp_path: Path, captions: dict[int, list[str]]) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for image_id in captions:
        Image.new("RGB", (32, 32), (40 * image_id, 90, 160)).save(images / f"{image_id}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in captions],
        "annotations": [
            {"id": 10 * i + n, "image_id": i, "caption": c}
            for i, caps in captions.items()
            for n, c in enumerate(caps)
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    return path


def _instances(tmp_path: Path) -> Path:
    data = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "width": 32, "height": 32},
            {"id": 99, "file_name": "99.jpg", "width": 32, "height": 32},  # not in the captions
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [0, 0, 8, 8], "area": 64,
             "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]], "iscrowd": 0},
            {"id": 2, "image_id": 99, "category_id": 3, "bbox": [0, 0, 8, 8], "area": 64,
             "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]], "iscrowd": 0},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _words(tmp_path: Path, data: Path, *extra: str):
    out = tmp_path / "words.json"
    args = ["eval", "words", "--model", "tiny", "--data", str(data)]
    args += ["--images", str(tmp_path / "images"), "--out", str(out), *extra]
    return runner.invoke(app, args), out


def test_images_without_captions_and_unmatched_instances_are_counted(tmp_path):
    result, out = _words(
        tmp_path, _coco(tmp_path, CAPTIONS), "--instances", str(_instances(tmp_path))
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = json.loads(out.read_text())
    assert report["num_images"] == 2  # the image without captions is not measured
    assert report["instances_unmatched"] == 1  # 99.jpg is not in the captions
    assert report["images_with_objects"] == 1
    assert 0.0 <= report["image_precision"] <= 100.0


def test_captions_with_no_vocabulary_word_get_one_clear_line(tmp_path):
    german = {1: ["Ein Hund läuft.", "Zwei Hunde."], 2: ["Ein rotes Auto.", "Ein Wagen."]}
    result, out = _words(tmp_path, _coco(tmp_path, german))
    # `lexvla.cli.main` prints a LexVLAError as one line and exits with status 2 (test_cli.py)
    assert isinstance(result.exception, LexVLAError), result.output
    assert "no caption word is in the model's vocabulary" in str(result.exception)
    assert not out.exists()


def test_missing_instances_file_is_named(tmp_path):
    result, _ = _words(
        tmp_path, _coco(tmp_path, CAPTIONS), "--instances", str(tmp_path / "nope.json")
    )
    assert isinstance(result.exception, LexVLAError), result.output
    assert "nope.json" in str(result.exception)
