"""The image zoo (generated here with PIL): every reader either converts an image to upright 8-bit RGB
or skips it, counted and named; never a hang, a crash or a traceback.

Readers: `load_image`, the model's preprocessing, `encode_corpus` (folder and WebDataset tar), the
training datasets (CSV table and tar shards) and the server's upload endpoints.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.bad_inputs import BAD_IMAGES, GOOD_IMAGES, IMAGE_ZOO, write_image_zoo
from lexvla.data import ImageTextDataset, ShardDataset, read_table
from lexvla.data.transforms import ImageProcessor, load_image
from lexvla.errors import LexVLAError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


def _pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)[xy[1], xy[0]]


# What each convertible image must look like (size and a few pixels), computed by hand.
def _check_converted(name: str, image: Image.Image) -> None:
    assert image.mode == "RGB"
    if name in ("png-named.jpg", "jpeg-named.png"):
        assert image.size == (64, 48)
        assert _pixel(image, (5, 5))[0] > 150 and _pixel(image, (60, 5))[2] > 150
    elif name == "cmyk.jpg":  # C=0 M=Y=255 is red, C=M=255 Y=0 is blue
        left, right = _pixel(image, (4, 16)), _pixel(image, (28, 16))
        assert left[0] > 200 and left[1] < 60 and left[2] < 60, left
        assert right[2] > 200 and right[0] < 60 and right[1] < 60, right
    elif name == "gray16.png":  # 16-bit scaled to 8-bit: 32768 -> 128, 65535 -> 255
        assert abs(_pixel(image, (4, 8))[0] - 128) <= 1 and _pixel(image, (28, 8))[0] == 255
    elif name == "palette.png":  # transparent index composited on white
        assert _pixel(image, (4, 8)).tolist() == [255, 255, 255]
        assert _pixel(image, (28, 8)).tolist() == [0, 200, 0]
    elif name == "animated.gif":  # the first frame
        red = _pixel(image, (12, 12))
        assert red[0] > 180 and red[1] < 60 and red[2] < 60, red
    elif name == "exif-rotated.jpg":  # rotated upright: the red left half is now on top
        assert image.size == (20, 40)
        top, bottom = _pixel(image, (10, 5)), _pixel(image, (10, 35))
        assert top[0] > 150 and top[2] < 100 and bottom[2] > 150 and bottom[0] < 100
    elif name == "panorama.png":
        assert image.size == (8000, 2)
    elif name == "grayscale-alpha.png":  # fully transparent black on white
        assert _pixel(image, (3, 3)).tolist() == [255, 255, 255]


@pytest.mark.parametrize("name", sorted(IMAGE_ZOO))
def test_load_image_converts_or_names_the_file(zoo: dict[str, Path], name: str) -> None:
    start = time.perf_counter()
    if name in BAD_IMAGES:
        with pytest.raises(LexVLAError, match=name.replace(".", r"\.")):
            load_image(zoo[name])
        with pytest.raises(LexVLAError):  # bytes too (uploads, tar members)
            load_image(zoo[name].read_bytes())
    else:
        _check_converted(name, load_image(zoo[name]))
        _check_converted(name, load_image(zoo[name].read_bytes()))
    assert time.perf_counter() - start < 10, "decoding must stay fast (no bomb expansion)"


@pytest.mark.parametrize("name", GOOD_IMAGES)
def test_preprocessing_gives_a_finite_square_tensor(zoo: dict[str, Path], name: str) -> None:
    """Any convertible image, even 8000 x 2 or 1 x 1, becomes (1, 3, S, S) quickly and finite."""
    start = time.perf_counter()
    pixels = ImageProcessor(image_size=32, resize_size=36)(zoo[name])
    assert pixels.shape == (1, 3, 32, 32) and bool(pixels.isfinite().all())
    assert time.perf_counter() - start < 5


def test_wide_image_preprocessing_matches_resize_then_crop() -> None:
    """An extreme aspect ratio resizes only the crop's source box (memory stays bounded), with the
    result of resizing the whole image and cropping its centre (the naive reference, here small
    enough to afford)."""
    processor = ImageProcessor(image_size=32, resize_size=36)
    ramp = np.linspace(0, 255, 1200)[None, :, None] * np.ones((24, 1, 3))  # (24, 1200, 3)
    image = Image.fromarray(ramp.astype(np.uint8))
    width, height = round(1200 * 36 / 24), 36  # shorter side to 36: 1800 x 36
    left, top = (width - 32) // 2, (height - 32) // 2
    naive = image.resize((width, height), Image.Resampling.BICUBIC)
    naive = naive.crop((left, top, left + 32, top + 32))
    out = processor.resize_crop(image)
    assert width * height > 16 * 36**2  # the bounded path is the one taken
    assert out.size == (32, 32)
    assert np.abs(np.asarray(out, np.int32) - np.asarray(naive, np.int32)).max() <= 2


def test_encode_corpus_skips_and_counts_bad_images(tiny_model, zoo, tmp_path: Path) -> None:
    from lexvla.index import iter_shards
    from lexvla.search import encode_corpus

    report = encode_corpus(
        tiny_model, zoo["cmyk.jpg"].parent, tmp_path / "out", batch_size=4, progress=False
    )
    failed = {f["key"]: f["error"] for f in report["failed"]}
    assert sorted(failed) == BAD_IMAGES
    for key, error in failed.items():
        assert key in error and "BytesIO" not in error, error
    encoded = [m["key"] for shard in iter_shards(tmp_path / "out") for m in shard.metadata]
    assert sorted(encoded) == GOOD_IMAGES and report["images"] == len(GOOD_IMAGES)
    again = encode_corpus(tiny_model, zoo["cmyk.jpg"].parent, tmp_path / "out", progress=False)
    assert again["images"] == 0 and sorted(f["key"] for f in again["failed"]) == BAD_IMAGES


def _zoo_tar(path: Path, zoo: dict[str, Path]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(sorted(zoo)):
            for member, data in (
                (f"{i:04d}.{name.rsplit('.', 1)[1]}", zoo[name].read_bytes()),
                (f"{i:04d}.txt", f"caption of {name}".encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_training_readers_skip_and_count_bad_images(zoo, tmp_path: Path) -> None:
    table = tmp_path / "captions.csv"
    rows = "".join(f"{p},a caption of {name}\n" for name, p in sorted(zoo.items()))
    table.write_text("filepath,caption\n" + rows)
    dataset = ImageTextDataset(read_table(table))
    samples = list(dataset)
    assert sorted(Path(s.path).name for s in samples) == GOOD_IMAGES
    assert dataset.skips.count == len(BAD_IMAGES)
    lazy = ImageTextDataset(read_table(table), lazy=True)
    assert len(list(lazy)) == len(GOOD_IMAGES) and lazy.skips.count == len(BAD_IMAGES)
    shards = ShardDataset(_zoo_tar(tmp_path / "zoo.tar", zoo), shuffle=False)
    read = list(shards)
    assert sorted(s.captions[0].removeprefix("caption of ") for s in read) == GOOD_IMAGES
    assert shards.skips.count == len(BAD_IMAGES)
    assert all(s.image.mode == "RGB" for s in read)


def test_encode_corpus_reads_the_zoo_from_a_tar(tiny_model, zoo, tmp_path: Path) -> None:
    from lexvla.search import encode_corpus

    tar = _zoo_tar(tmp_path / "zoo.tar", zoo)
    report = encode_corpus(tiny_model, [tar], tmp_path / "out", batch_size=8, progress=False)
    assert report["images"] == len(GOOD_IMAGES) and len(report["failed"]) == len(BAD_IMAGES)


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from helpers.search import build_tiny_index
    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    _, index = build_tiny_index(tiny_model, tmp_path_factory.mktemp("serve"), count=4)
    with TestClient(create_app(SearchEngine.open(index, tiny_model))) as test_client:
        yield test_client


@pytest.mark.parametrize("name", sorted(IMAGE_ZOO))
def test_upload_answers_200_or_a_4xx_naming_the_file(client, zoo, name: str) -> None:
    for url in ("/api/describe", "/api/search/image"):
        files = {"file": (name, zoo[name].read_bytes(), "image/png")}
        response = client.post(url, files=files)
        if name in GOOD_IMAGES:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code in (400, 413, 415), response.text
            assert name in response.json()["error"]
