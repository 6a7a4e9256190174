"""Ground-truth semantic masks for PatchDis: COCO instance annotations and VOC palette PNGs.

Every mask is a (H, W) uint8 array at the image's resolution: 0 = background, 1..C = `class_names[1..C]`,
255 = ignore (:data:`IGNORE_INDEX`), with `class_names[0] == "background"`.

COCO (`instances_*.json`): category ids are mapped to contiguous indices 1..C in increasing id order.
Rules, chosen here and applied in this order:

1. crowd regions (`iscrowd=1`) are painted 255 (ignore): they mix many instances;
2. non-crowd instances are painted from the largest area to the smallest, so where instances overlap the
   smaller (usually the nearer / more specific) object is on top;
3. a pixel covered by a non-crowd instance is never ignore, even inside a crowd region.

Polygons are rasterised by pixel centres: pixel (x, y) is inside when (x + ½, y + ½) is inside the
polygon (even-odd rule). A square polygon from 10 to 30 therefore covers exactly 20 × 20 pixels, which
matches COCO's `area`; PIL's `ImageDraw.polygon` fills boundary pixels too (21 × 21) and is not used.
RLE is decoded from uncompressed `counts` lists and from COCO's compressed strings (LEB128-like, see
:func:`rle_from_string`), both column-major.

VOC (`SegmentationClass/*.png`): the palette index is the class (0 background, 1..20, 255 border).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lexvla.data.datasets import _read_json, resolve_images_dir
from lexvla.data.transforms import load_image
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip


# ------------------------------------------------------------------------------ RLE
def rle_from_string(text: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools `rleFrString`) into run lengths.

    Each count is stored in 5-bit groups, least significant first, as chars `48 + group` with bit 0x20
    meaning "more groups follow" and bit 0x10 of the last group the sign; from the third count on the
    value is a difference to the count two places before.
    """
    data = text.encode("ascii") if isinstance(text, str) else text
    counts: list[int] = []
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise LexVLAError("truncated compressed RLE string")
            group = data[pos] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_to_string(counts: Sequence[int]) -> str:
    """Encode run lengths as a COCO compressed RLE string (pycocotools `rleToString`)."""
    out = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            out.append(chr(48 + (group | (0x20 if more else 0))))
    return "".join(out)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a binary (H, W) mask: column-major runs starting with zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Binary (H, W) mask of a COCO RLE (`counts` list or compressed string, `size` = [H, W])."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        counts = rle_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise LexVLAError(
            f"RLE counts sum to {int(counts.sum())}, not {height}x{width}={height * width}: corrupt mask"
        )
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


# ------------------------------------------------------------------------------ polygons
def decode_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Binary (H, W) mask of COCO polygons `[[x1, y1, x2, y2, ...], ...]` (union, pixel centres)."""
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(xy) >= 3:
            mask |= _fill_polygon(xy, height, width)
    return mask


def _fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Even-odd scanline fill sampled at pixel centres."""
    mask = np.zeros((height, width), dtype=bool)
    y_lo = max(int(np.floor(xy[:, 1].min() - 0.5)), 0)
    y_hi = min(int(np.ceil(xy[:, 1].max() - 0.5)), height - 1)
    if y_hi < y_lo:
        return mask
    rows = np.arange(y_lo, y_hi + 1)
    yc = rows[:, None] + 0.5  # (R, 1)
    (x0, y0), (x1, y1) = xy.T, np.roll(xy, -1, axis=0).T
    crosses = (y0 <= yc) != (y1 <= yc)  # (R, E) half-open: a vertex on the scanline counts once
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    xs = np.sort(np.where(crosses, xs, np.inf), axis=1)  # crossings first, +inf padding last
    diff = np.zeros((len(rows), width + 1), dtype=np.int32)
    for k in range(0, xs.shape[1] - 1, 2):
        start, end = xs[:, k], xs[:, k + 1]
        valid = np.isfinite(end)
        if not valid.any():
            break
        # pixel c is inside when start <= c + 0.5 < end
        c0 = np.clip(np.ceil(start[valid] - 0.5), 0, width).astype(np.int64)
        c1 = np.clip(np.ceil(end[valid] - 0.5), 0, width).astype(np.int64)
        r = np.flatnonzero(valid)
        np.add.at(diff, (r, c0), 1)
        np.add.at(diff, (r, c1), -1)
    mask[y_lo : y_hi + 1] = np.cumsum(diff, axis=1)[:, :width] > 0
    return mask


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Binary (H, W) mask of one COCO annotation (polygons or RLE)."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return decode_polygons(seg, height, width)
    if isinstance(seg, dict):
        mask = decode_rle(seg)
        if mask.shape != (height, width):
            raise LexVLAError(
                f"RLE of annotation {ann.get('id')} is {mask.shape}, image is {(height, width)}"
            )
        return mask
    raise LexVLAError(f"annotation {ann.get('id')} has no polygon or RLE segmentation")


# ------------------------------------------------------------------------------ datasets
@dataclass
class MaskSample:
    """An image (by path, decoded on access of `.image`) with its semantic mask (H, W) uint8."""

    key: str
    path: str
    mask: np.ndarray

    @property
    def image(self) -> Image.Image:
        return load_image(self.path)


def read_coco_instance_names(path: str | Path) -> dict[str, set[str]]:
    """Names of the object classes present in each image of a COCO instances file, by file name.

    Crowd regions count (a crowd of people is people in the image). Images without annotations map
    to an empty set; no image file is read.
    """
    path = Path(path)
    if not path.is_file():
        raise LexVLAError(f"COCO instance annotations not found: {path}")
    data = _read_json(path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise LexVLAError(
            f"{path} is not a COCO instances file (needs images, annotations, categories)"
        )
    try:
        category = {c["id"]: str(c["name"]) for c in data["categories"]}
        by_id = {im["id"]: str(im["file_name"]) for im in data["images"]}
        names: dict[str, set[str]] = {name: set() for name in by_id.values()}
        for ann in data["annotations"]:
            if ann["image_id"] in by_id and ann["category_id"] in category:
                names[by_id[ann["image_id"]]].add(category[ann["category_id"]])
    except (KeyError, TypeError) as err:
        raise LexVLAError(f"{path}: malformed COCO instances ({err!r} missing or wrong)") from None
    return names


class CocoInstanceMasks:
    """COCO instance annotations as per-image semantic masks (see the module docstring for the rules).

    Args:
        path: `instances_*.json`.
        images_dir: image folder (default: `../train2017` beside `annotations/`, as COCO ships).
        ignore_crowd: paint crowd regions 255 (False: paint them with their class like the rest).
    """

    def __init__(
        self, path: str | Path, images_dir: str | Path | None = None, ignore_crowd: bool = True
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LexVLAError(f"COCO instance annotations not found: {self.path}")
        data = _read_json(self.path)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise LexVLAError(
                f"{self.path} is not a COCO instances file (needs images, annotations, categories)"
            )
        categories = sorted(data["categories"], key=lambda c: c["id"])
        if len(categories) > 254:
            raise LexVLAError(f"{self.path}: {len(categories)} categories do not fit uint8 masks")
        self.class_names = ["background", *(c["name"] for c in categories)]
        self.category_to_index = {c["id"]: i for i, c in enumerate(categories, start=1)}
        self.ignore_crowd = ignore_crowd
        self.images = sorted(data["images"], key=lambda im: im["file_name"])
        self.annotations: dict[Any, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            self.annotations.setdefault(ann["image_id"], []).append(ann)
        first = self.images[0]["file_name"] if self.images else ""
        self.images_dir = resolve_images_dir(self.path, first, images_dir) if first else Path()

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return self.images[index]["file_name"]

    def semantic_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8 labels of image `index`."""
        info = self.images[index]
        height, width = int(info["height"]), int(info["width"])
        mask = np.zeros((height, width), dtype=np.uint8)
        anns = self.annotations.get(info["id"], [])
        crowd = [a for a in anns if a.get("iscrowd")]
        solid = sorted(
            (a for a in anns if not a.get("iscrowd")), key=lambda a: -float(a.get("area", 0))
        )
        for ann in crowd:
            label = (
                IGNORE_INDEX if self.ignore_crowd else self.category_to_index[ann["category_id"]]
            )
            mask[annotation_mask(ann, height, width)] = label
        for ann in solid:
            mask[annotation_mask(ann, height, width)] = self.category_to_index[ann["category_id"]]
        return mask

    def __getitem__(self, index: int) -> MaskSample:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        name = self.images[index]["file_name"]
        return MaskSample(name, str(self.images_dir / name), self.semantic_mask(index))

    def __iter__(self) -> Iterator[MaskSample]:
        for index in range(len(self)):
            yield self[index]


def read_palette_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices of a palette PNG (the palette index is the class; 255 = ignore)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise LexVLAError(
                    f"mask {path} has mode {image.mode}: expected a palette (P) or grey (L) PNG of "
                    "class indices"
                )
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise LexVLAError(f"mask not found: {path}") from None
    except OSError as err:
        raise LexVLAError(f"cannot read mask {path}: {err}") from None


class VocMasks:
    """PASCAL VOC segmentation: `JPEGImages/<id>.jpg` with `SegmentationClass/<id>.png`.

    Args:
        root: the `VOC2012` folder (or any folder with that layout).
        split: image list `ImageSets/Segmentation/<split>.txt`; if missing, every mask in the folder.
        class_names: names of the palette indices (default: the 21 VOC classes).
    """

    def __init__(
        self, root: str | Path, split: str = "val", class_names: Sequence[str] = VOC_CLASSES
    ) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        masks = self.root / "SegmentationClass"
        if not masks.is_dir():
            raise LexVLAError(f"{masks} not found: give the VOC folder holding SegmentationClass/")
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if listing.is_file():
            self.ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            self.ids = sorted(p.stem for p in masks.glob("*.png"))
        if not self.ids:
            raise LexVLAError(f"no masks in {masks}")

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, index: int) -> str:
        return self.ids[index]

    def __getitem__(self, index: int) -> MaskSample:
        name = self.ids[index]
        mask = read_palette_mask(self.root / "SegmentationClass" / f"{name}.png")
        return MaskSample(name, str(self.root / "JPEGImages" / f"{name}.jpg"), mask)

    def __iter__(self) -> Iterator[MaskSample]:
        for index in range(len(self)):
            yield self[index]
