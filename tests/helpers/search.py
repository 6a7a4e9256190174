"""Synthetic images and a tiny encoded corpus for the search, serve, reliability and e2e tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = [
    ("sky", (120, 170, 220)),
    ("grass", (90, 150, 80)),
    ("sand", (220, 200, 150)),
    ("dusk", (200, 120, 90)),
    ("sea", (40, 100, 140)),
    ("snow", (235, 235, 240)),
    ("forest", (40, 80, 50)),
    ("clay", (170, 90, 60)),
    ("stone", (130, 130, 125)),
    ("night", (30, 35, 60)),
]


def make_image(index: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small, calm synthetic scene: a two-colour background with a shape whose place varies."""
    name, top = COLORS[index % len(COLORS)]
    bottom = COLORS[(index * 3 + 1) % len(COLORS)][1]
    width, height = size
    image = Image.new("RGB", size, top)
    draw = ImageDraw.Draw(image)
    horizon = height // 2 + (index % 3 - 1) * height // 8
    draw.rectangle((0, horizon, width, height), fill=bottom)
    x = (index * 37) % (width - 50) + 10
    shape = (x, horizon - 30, x + 40, horizon + 10)
    colour = COLORS[(index + 5) % len(COLORS)][1]
    (draw.ellipse if index % 2 else draw.rectangle)(shape, fill=colour)
    return image


def make_images(folder: Path, count: int = 10, *, broken: bool = True) -> list[Path]:
    """`count` PNG/JPEG files in `folder` (one in a subfolder), plus one undecodable file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        sub = folder / "more" if i == count - 1 else folder
        sub.mkdir(exist_ok=True)
        path = sub / f"{i:02d}-{COLORS[i % len(COLORS)][0]}.{'jpg' if i % 2 else 'png'}"
        make_image(i).save(path)
        paths.append(path)
    if broken:
        (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return paths


def build_tiny_index(model, root: Path, count: int = 10) -> tuple[Path, Path]:
    """Images -> shards -> index with the tiny model; returns (shard dir, index dir)."""
    from lexvla.index import build_index
    from lexvla.search import encode_corpus

    images = root / "images"
    make_images(images, count)
    shards = root / "lex_emb"
    encode_corpus(
        model, images, shards, chunk_size=4, batch_size=4, progress=False, model_name="tiny"
    )
    index = root / "index"
    build_index(shards, index)
    return shards, index


def stored_matrix(shards: Path, vocab_size: int) -> tuple[np.ndarray, list[str]]:
    """All stored vectors as a dense (N, V) float32 matrix (float16 values, as stored), and keys."""
    from lexvla.index import iter_shards

    rows, keys = [], []
    for shard in iter_shards(shards):
        for r in range(shard.num_rows):
            dense = np.zeros(vocab_size, np.float32)
            lo, hi = shard.indptr[r], shard.indptr[r + 1]
            dense[shard.indices[lo:hi]] = shard.values[lo:hi].astype(np.float32)
            rows.append(dense)
            keys.append(shard.metadata[r]["key"])
    return np.stack(rows), keys


def brute_force(engine, shards: Path, query) -> list[tuple[str, float]]:
    matrix, keys = stored_matrix(shards, engine.vocab.size)
    scores = matrix.astype(np.float64) @ query.to_dense().astype(np.float64)
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], i))
    return [(keys[i], float(scores[i])) for i in order if scores[i] > 0]
