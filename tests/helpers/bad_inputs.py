"""Generators of bad and unusual inputs for the reliability tests (made here, nothing committed).

`IMAGE_ZOO` maps a file name to (bytes maker, outcome): outcome "ok" means the image must be converted
to upright 8-bit RGB; "error" means it must be refused with a LexVLAError naming the input.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(mode: str, size: tuple[int, int], left: object, right: object) -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)  # type: ignore[arg-type]
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))  # type: ignore[arg-type]
    return image


def scene() -> Image.Image:
    return halves("RGB", (64, 48), (200, 30, 30), (30, 30, 200))


def truncated_png() -> bytes:
    data = encoded(Image.effect_noise((96, 96), 60).convert("RGB"), "PNG")
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = encoded(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG", quality=95)
    return data[: len(data) * 3 // 5]


def bomb_png() -> bytes:
    """10000 x 10000 pixels (above the 8192^2 limit) in a few kB: a 1-bit all-black image."""
    return encoded(Image.new("1", (10_000, 10_000)), "PNG")


def header_bomb_png() -> bytes:
    """A PNG whose header claims 60000 x 60000 pixels over a few bytes of data."""
    data = bytearray(encoded(Image.new("L", (4, 4)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", 60_000, 60_000)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))  # over type + 13 data bytes
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encoded(halves("CMYK", (32, 32), (0, 255, 255, 0), (255, 255, 0, 0)), "JPEG")


def gray16_png() -> bytes:
    pixels = np.full((16, 32), 65535, np.uint16)
    pixels[:, :16] = 32768
    return encoded(Image.fromarray(pixels), "PNG")


def palette_png() -> bytes:
    """Palette image: index 0 (left half) is transparent, index 1 (right half) is green."""
    image = Image.new("P", (32, 16), 0)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.paste(1, (16, 0, 32, 16))
    return encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((220, 0, 0), (0, 220, 0), (0, 0, 220))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 40 x 20 (red left, blue right) with EXIF orientation 6 (display rotated 90° CW)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(scene().resize((40, 20)), "JPEG", exif=exif, quality=95)


def panorama_png() -> bytes:
    """8000 x 2 pixels: legal, but a naive shorter-side resize would make it 1M pixels wide."""
    return encoded(Image.new("RGB", (8000, 2), (10, 120, 10)), "PNG")


IMAGE_ZOO: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero-byte.jpg": (lambda: b"", "error"),
    "truncated.png": (truncated_png, "error"),
    "truncated.jpg": (truncated_jpeg, "error"),
    "not-an-image.png": (lambda: b"hello, I am text pretending to be a PNG\n" * 5, "error"),
    "png-magic-garbage.png": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "error"),
    "bomb.png": (bomb_png, "error"),
    "header-bomb.png": (header_bomb_png, "error"),
    "png-named.jpg": (lambda: encoded(scene(), "PNG"), "ok"),
    "jpeg-named.png": (lambda: encoded(scene(), "JPEG"), "ok"),
    "cmyk.jpg": (cmyk_jpeg, "ok"),
    "gray16.png": (gray16_png, "ok"),
    "palette.png": (palette_png, "ok"),
    "animated.gif": (animated_gif, "ok"),
    "exif-rotated.jpg": (exif_rotated_jpeg, "ok"),
    "panorama.png": (panorama_png, "ok"),
    "one-pixel.png": (lambda: encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok"),
    "grayscale-alpha.png": (lambda: encoded(Image.new("LA", (8, 8), (0, 0)), "PNG"), "ok"),
}
BAD_IMAGES = sorted(n for n, (_, outcome) in IMAGE_ZOO.items() if outcome == "error")
GOOD_IMAGES = sorted(n for n, (_, outcome) in IMAGE_ZOO.items() if outcome == "ok")


def write_image_zoo(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (make, _) in IMAGE_ZOO.items():
        paths[name] = folder / name
        paths[name].write_bytes(make())
    return paths


CAPTION_ZOO: dict[str, str] = {
    "empty": "",
    "whitespace": " \t\n\r\u3000 ",
    "long": "a brown dog runs on the green grass near the sea " * 200,  # 10k characters
    "control": "a\x00dog\x1b[31m on\x7fthe\x85 grass\x07",
    "chinese": "一只狗在草地上奔跑",
    "cyrillic": "собака бежит по траве",
    "arabic": "كلب يركض على العشب",
    "emoji": "🐕 on the 🌱 near the 🌊",
    "zero-width": "a\u200bdog\u202e on the grass\ufeff",
    "lone-surrogate": "a dog \ud800 on the grass",
}
EMPTY_CAPTIONS = ("empty", "whitespace")


class PickleBomb:
    """Unpickling this creates `marker`: proof that a reader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.mkdir, (self.marker,))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"weights": PickleBomb(marker)})
