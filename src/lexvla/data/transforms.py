"""Image loading and preprocessing that match the vision tower, without torchvision.

`load_image` turns any file PIL can read into an upright RGB image (EXIF rotation applied; grayscale,
palette, RGBA, CMYK and 16-bit converted) or raises :class:`LexVLAError` naming the file.
`ImageProcessor` resizes (bicubic, shorter side), centre-crops and normalises with the backbone's mean/std,
as the DINOv2 processor does.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from lexvla.errors import LexVLAError

# Refuse decompression bombs explicitly instead of PIL's warning: 8k x 8k is far above any photo we need.
MAX_IMAGE_PIXELS = 8192 * 8192
# Above this many resize_size^2 areas (aspect ratio > 16), only the centre crop's box is resized.
MAX_RESIZE_AREA = 16


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image (path, bytes or PIL image) as upright 8-bit RGB.

    Raises:
        LexVLAError: the file is missing, empty, truncated, not an image, or too large to decode safely.
    """
    name = (
        "<bytes>" if isinstance(source, bytes) else str(getattr(source, "filename", "") or source)
    )
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            if not data:
                raise LexVLAError(f"image {name} is empty (0 bytes)")
            with warnings.catch_warnings():  # PIL's warning threshold is above our own limit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise LexVLAError(
                    f"image {name} is {image.width}x{image.height} pixels, above the limit of "
                    f"{MAX_IMAGE_PIXELS}: downscale it first"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except LexVLAError:
        raise
    except FileNotFoundError:
        raise LexVLAError(f"image not found: {name}") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise LexVLAError(
            f"cannot decode image {name}: {err}. Is it a complete image file?"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        span = max(float(array.max() - array.min()), 1e-12)
        array = ((array - array.min()) / span * 255.0).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Resize (shorter side), centre-crop and normalise images into a (B, 3, S, S) float tensor.

    With `resize_size == image_size` and `crop=False`, the whole image is resized to S x S (used by
    PatchDis, where every pixel must map to a patch).
    """

    def __init__(
        self,
        image_size: int = 224,
        resize_size: int = 256,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.image_size = image_size
        self.resize_size = resize_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def resize_crop(self, image: Image.Image, *, crop: bool = True) -> Image.Image:
        """The geometric part: bicubic resize and centre crop to `image_size` (or squash when not crop)."""
        side = self.image_size
        if not crop:
            return image.resize((side, side), Image.Resampling.BICUBIC)
        scale = self.resize_size / min(image.size)
        width = max(side, round(image.width * scale))
        height = max(side, round(image.height * scale))
        left, top = (width - side) // 2, (height - side) // 2
        if width * height > MAX_RESIZE_AREA * self.resize_size**2:
            # An extreme aspect ratio (a 8000 x 2 strip would become 1M pixels wide): resize only
            # the source box that the crop keeps, so memory stays bounded.
            sx, sy = width / image.width, height / image.height
            box = (left / sx, top / sy, (left + side) / sx, (top + side) / sy)
            return image.resize((side, side), Image.Resampling.BICUBIC, box=box)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        return image.crop((left, top, left + side, top + side))

    def to_tensor(self, image: Image.Image) -> Tensor:
        """(3, S, S) normalised tensor of an image already at the target size."""
        array = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def __call__(
        self, images: Sequence[Image.Image | str | Path] | Image.Image, *, crop: bool = True
    ) -> Tensor:
        """Preprocess one image or a list of images (PIL or paths) into (B, 3, S, S)."""
        if isinstance(images, Image.Image | str | Path):
            images = [images]
        tensors = [self.to_tensor(self.resize_crop(load_image(im), crop=crop)) for im in images]
        if not tensors:
            raise LexVLAError("no images given to the image processor")
        return torch.stack(tensors)


def grid_side(num_patches: int) -> int:
    """g for the vision tower's P = g × g patches (raises ValueError for a non-square count)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side
