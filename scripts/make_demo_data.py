"""Build the demo set bundled with the package, src/lexvla/resources/demo-coco/, from coco-mini.

coco-mini (`../shared/data/coco-mini`: 80 COCO train2017 images, one per category, with their captions
and instance annotations) is reduced so that it can live inside the repository and the wheel:

- images: downscaled (Lanczos) so that the longest side is at most 320 px, re-encoded as baseline
  JPEG (quality 90) without metadata, on the pixel grid the annotations use (EXIF is not applied);
- `annotations/captions_train2017.json`, `annotations/instances_train2017.json`: restricted to those
  images; `width`/`height` are the new size; polygons and boxes are scaled by (new width / width,
  new height / height) and rounded to 0.01 px as COCO does; `area` is scaled by both factors; RLE masks
  (crowd regions) are decoded, downscaled by area averaging (a pixel is in when at least half of it was)
  and stored again as uncompressed RLE of the new size;
- `LICENSES.md` and `licences.json`: for every image its Flickr licence (name, URL), its `flickr_url`
  and `coco_url`, and the COCO annotation licence (CC BY 4.0).

Everything together must stay within `--max-mb` (5 MB = 5,000,000 bytes); if all images do not fit,
the longest prefix of the images sorted by file name that fits is kept. The output folder is replaced
atomically. The committed folder is this script's output:

    PYTHONPATH=src .venv/bin/python scripts/make_demo_data.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lexvla._atomic import atomic_dir
from lexvla.data.masks import decode_rle, encode_rle
from lexvla.errors import LexVLAError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "coco-mini"
DEFAULT_OUT = ROOT / "src" / "lexvla" / "resources" / "demo-coco"
MAX_SIDE = 320
JPEG_QUALITY = 90
MAX_MB = 5.0
CAPTIONS = "annotations/captions_train2017.json"
INSTANCES = "annotations/instances_train2017.json"
IMAGES = "train2017"
ANNOTATION_LICENCE = {
    "name": "Creative Commons Attribution 4.0 International (CC BY 4.0)",
    "url": "https://creativecommons.org/licenses/by/4.0/",
    "holder": "COCO Consortium",
}


# ------------------------------------------------------------------------------ geometry
def scaled_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) with the longest side at most `max_side`, aspect kept (never enlarged)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Binary mask resized to (height, width) by area averaging: a pixel is in when >= half was."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX)) >= 128


def rescale_annotation(
    ann: dict[str, Any], old_size: tuple[int, int], new_size: tuple[int, int]
) -> dict[str, Any]:
    """A COCO instance annotation moved from an image of `old_size` to `new_size` (width, height)."""
    (w, h), (nw, nh) = old_size, new_size
    sx, sy = nw / w, nh / h
    out = dict(ann)
    x, y, bw, bh = ann["bbox"]
    out["bbox"] = [round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)]
    out["area"] = round(float(ann["area"]) * sx * sy, 2)
    seg = ann["segmentation"]
    if isinstance(seg, list):
        out["segmentation"] = [
            [round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in seg
        ]
    elif isinstance(seg, dict):
        out["segmentation"] = encode_rle(downscale_mask(decode_rle(seg), nw, nh))
    else:
        raise LexVLAError(f"annotation {ann.get('id')} has no polygon or RLE segmentation")
    return out


def reencode(path: Path, size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """The image at `path` resized to `size` (width, height) as JPEG bytes without metadata."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    except FileNotFoundError:
        raise LexVLAError(f"image not found: {path}") from None
    except OSError as err:
        raise LexVLAError(f"cannot read image {path}: {err}") from None
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ the set
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LexVLAError(f"{path} not found: give --source, a coco-mini folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LexVLAError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise LexVLAError(f"{path} is not a COCO annotation file (needs images and annotations)")
    return data


def restrict(data: dict[str, Any], images: list[dict[str, Any]], rescale: bool) -> dict[str, Any]:
    """`data` with only `images` (already resized entries); instance annotations rescaled."""
    old = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    new = {im["id"]: (im["width"], im["height"]) for im in images}
    annotations = [a for a in data["annotations"] if a["image_id"] in new]
    if rescale:
        annotations = [
            rescale_annotation(a, old[a["image_id"]], new[a["image_id"]]) for a in annotations
        ]
    info = {**data.get("info", {}), "description": "COCO 2017 (lexvla demo subset, <= 320 px)"}
    return {**data, "info": info, "images": images, "annotations": annotations}


def short_name(url: str) -> str:
    """'CC BY-NC-SA 2.0' for a Creative Commons URL; `url` is required to be one."""
    found = re.search(r"creativecommons\.org/licenses/([a-z-]+)/(\d+\.\d+)", url)
    if found is None:
        raise LexVLAError(f"licence {url} is not a Creative Commons licence: review it by hand")
    return f"CC {found[1].upper()} {found[2]}"


def licence_table(
    images: list[dict[str, Any]], licences: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The content of licences.json: the annotation licence and every image's Flickr licence."""
    rows = []
    for im in images:
        if im.get("license") not in licences:
            raise LexVLAError(f"image {im['file_name']} names no licence of the licenses table")
        licence = licences[im["license"]]
        rows.append(
            {
                "file_name": im["file_name"],
                "licence": {
                    "id": licence["id"],
                    "name": licence["name"],
                    "short": short_name(licence["url"]),
                    "url": licence["url"],
                },
                "flickr_url": im["flickr_url"],
                "coco_url": im["coco_url"],
            }
        )
    return {"annotations": ANNOTATION_LICENCE, "images": rows}


def licences_markdown(table: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for row in table["images"]:
        key = f"[{row['licence']['short']}]({row['licence']['url']}) ({row['licence']['name']})"
        counts[key] = counts.get(key, 0) + 1
    lines = [
        "# demo-coco: licences",
        "",
        f"{len(table['images'])} images of COCO train2017 (from coco-mini: one image per COCO category) "
        f"with their captions and instance annotations, made by `scripts/make_demo_data.py`.",
        "",
        "Changes: every image was downscaled to at most 320 px on its longest side and re-encoded as "
        "JPEG; the annotations were restricted to these images and their coordinates rescaled.",
        "",
        f"- Annotations (`annotations/*.json`): {ANNOTATION_LICENCE['name']}, "
        f"{ANNOTATION_LICENCE['url']}, by the {ANNOTATION_LICENCE['holder']} (https://cocodataset.org).",
        "- Images (`train2017/*.jpg`): each under the Flickr licence its author chose, listed below "
        "per image as COCO records it (`license` field and `licenses` table of the annotation "
        "files). COCO does not name the authors; `flickr_url` identifies the original photo (COCO's "
        "own copies are Flickr's 640 px renditions, `coco_url`). Several licences are NonCommercial "
        "(no commercial use) or NoDerivs (no adaptations): respect each image's terms.",
        "",
        "| licence | images |",
        "|---|---|",
        *(f"| {name} | {n} |" for name, n in sorted(counts.items())),
        "",
        "| image | licence | Flickr photo | COCO image |",
        "|---|---|---|---|",
    ]
    for row in table["images"]:
        lic = row["licence"]
        lines.append(
            f"| {row['file_name']} | [{lic['short']}]({lic['url']}) | {row['flickr_url']} | "
            f"{row['coco_url']} |"
        )
    return "\n".join(lines) + "\n"


def encode_images(
    source: Path, images: list[dict[str, Any]], max_side: int = MAX_SIDE
) -> list[tuple[dict[str, Any], bytes]]:
    """(entry with the new width/height, JPEG bytes) of every image entry, in the given order."""
    out = []
    for im in images:
        size = scaled_size(im["width"], im["height"], max_side)
        data = reencode(source / IMAGES / im["file_name"], size)
        out.append(({**im, "width": size[0], "height": size[1]}, data))
    return out


def assemble(
    captions: dict[str, Any], instances: dict[str, Any], encoded: list[tuple[dict[str, Any], bytes]]
) -> dict[str, bytes]:
    """Every output file (relative path -> bytes) of the encoded images."""
    resized = [im for im, _ in encoded]
    files = {f"{IMAGES}/{im['file_name']}": data for im, data in encoded}
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    files[CAPTIONS] = json.dumps(restrict(captions, resized, False), **compact).encode()
    files[INSTANCES] = json.dumps(restrict(instances, resized, True), **compact).encode()
    licences = {lic["id"]: lic for lic in instances.get("licenses", [])}
    table = licence_table(resized, licences)
    files["licences.json"] = (json.dumps(table, indent=1, ensure_ascii=False) + "\n").encode()
    files["LICENSES.md"] = licences_markdown(table).encode()
    return files


def build(source: Path, max_bytes: int, max_side: int = MAX_SIDE) -> dict[str, bytes]:
    """The files of the longest prefix (by file name) of the captioned images within `max_bytes`."""
    captions, instances = read_json(source / CAPTIONS), read_json(source / INSTANCES)
    try:
        images = sorted(captions["images"], key=lambda im: im["file_name"])
        encoded = encode_images(source, images, max_side)
        for count in range(len(encoded), 0, -1):
            files = assemble(captions, instances, encoded[:count])
            if sum(len(b) for b in files.values()) <= max_bytes:
                return files
    except (KeyError, TypeError) as err:
        raise LexVLAError(f"{source}: malformed COCO annotations ({err!r})") from None
    raise LexVLAError(f"not even one image fits in {max_bytes} bytes: raise --max-mb")


def write(files: dict[str, bytes], out: Path) -> None:
    """Replace folder `out` by `files` atomically."""
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="coco-mini folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help="size budget, 1 MB = 1e6 B")
    args = parser.parse_args(argv)
    try:
        if not (args.source / CAPTIONS).is_file():
            raise LexVLAError(
                f"{args.source / CAPTIONS} not found: give --source, a coco-mini folder "
                "(annotations/ and train2017/)"
            )
        files = build(args.source, int(args.max_mb * 1_000_000))
        write(files, args.out)
    except LexVLAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = sum(name.startswith(IMAGES) for name in files)
    total = sum(len(b) for b in files.values())
    image_bytes = sum(len(b) for n, b in files.items() if n.startswith(IMAGES))
    print(
        f"wrote {args.out}: {images} images ({image_bytes / 1e6:.2f} MB), "
        f"{total / 1e6:.2f} MB in all (budget {args.max_mb:.2f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
