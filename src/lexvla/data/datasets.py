"""Image-caption datasets from files: COCO caption JSON, Karpathy-split JSON and CSV/TSV tables.

Every format is read into :class:`ImageRecord` rows (one per image, all captions grouped) held by a
map-style :class:`ImageTextDataset`. :func:`detect_format` tells the formats apart and
:func:`create_dataset` builds any of them (plus WebDataset shards and the synthetic dataset) from a
:class:`~lexvla.config.DataConfig` or a path. :func:`split_holdout` keeps the last N images (by sorted
key) out of training, so evaluation runs on images training never saw.

Formats (see :data:`FORMATS`):

- ``coco``: ``annotations/captions_*.json`` (`images[].id/file_name`, `annotations[].image_id/caption`).
- ``karpathy``: ``dataset_coco.json`` / ``dataset_flickr30k.json``
  (`images[].filepath/filename/split/sentences[].raw`); `split` selects "train" (train + restval),
  "val", "test", "restval" or "all".
- ``csv`` / ``tsv``: a header with `filepath` and `caption` columns; rows of one filepath are grouped.
- ``wds``: a directory, glob or brace pattern of `.tar` shards (:mod:`lexvla.data.webdataset`).
- ``synthetic`` / ``synthetic:N``: procedural shapes (:mod:`lexvla.data.synthetic`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lexvla.config import DataConfig
from lexvla.data.sample import LazySample, Sample, SkipCounter, utf8_text
from lexvla.data.transforms import load_image
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

FORMATS = ("coco", "karpathy", "csv", "tsv", "wds", "synthetic")
FORMAT_HELP = (
    "accepted: COCO caption JSON (images + annotations), Karpathy JSON (images[].sentences), "
    ".csv/.tsv with filepath,caption columns, a directory / glob / {brace} pattern of .tar shards, "
    "or synthetic[:N]"
)
KARPATHY_SPLITS = {
    "train": ("train", "restval"),
    "val": ("val",),
    "test": ("test",),
    "restval": ("restval",),
    "all": ("train", "restval", "val", "test"),
}
PATH_COLUMNS = ("filepath", "image", "image_path", "file_name", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")


@dataclass
class ImageRecord:
    """One image of a file-based dataset: where it is and all of its captions."""

    key: str
    path: str
    captions: list[str]


class ImageTextDataset:
    """Map-style dataset of image files with grouped captions.

    Args:
        records: one per image.
        name: shown in messages (usually the annotation file).
        lazy: `__getitem__` returns a :class:`LazySample` (image decoded on first access, may raise
            :class:`LexVLAError`); when False it decodes now and returns None for an unreadable image
            (skipped, counted in `skips`, logged once).
        skips: counter shared with views of this dataset (see :meth:`subset`).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        name: str = "",
        *,
        lazy: bool = False,
        skips: SkipCounter | None = None,
    ) -> None:
        self.records = list(records)
        self.name = name
        self.lazy = lazy
        self.skips = skips if skips is not None else SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        """Key of image `index` without reading the image."""
        return self.records[index].key

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        if self.lazy:
            return LazySample(record.key, record.path, list(record.captions))
        try:
            image = load_image(record.path)
        except LexVLAError as err:
            self.skips.add(record.path, str(err))
            return None
        return Sample(record.key, image, list(record.captions), record.path)

    def __iter__(self) -> Iterator[Sample]:
        """Decoded samples in order; unreadable images are skipped and counted."""
        for index in range(len(self)):
            sample = self[index]
            if isinstance(sample, LazySample):
                try:
                    sample.image  # noqa: B018 - decode now, so iteration never yields a broken image
                except LexVLAError as err:
                    self.skips.add(sample.path, str(err))
                    continue
            if sample is not None:
                yield sample

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def subset(self, indices: Sequence[int]) -> ImageTextDataset:
        """A view of some images (same skip counter)."""
        return ImageTextDataset(
            [self.records[i] for i in indices], self.name, lazy=self.lazy, skips=self.skips
        )

    def __repr__(self) -> str:
        return f"ImageTextDataset({self.name!r}, images={len(self)}, captions={self.num_captions})"


class SubsetView:
    """Generic view of a map-style dataset without `subset` (e.g. a user's own dataset)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.skips = getattr(dataset, "skips", SkipCounter())

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return _key_of(self.dataset, self.indices[index])

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            item = self[index]
            if item is not None:
                yield item


def _key_of(dataset: Any, index: int) -> str:
    if hasattr(dataset, "key"):
        return dataset.key(index)
    item = dataset[index]
    return str(getattr(item, "key", index)) if item is not None else f"{index:012d}"


def split_holdout(dataset: Any, n: int) -> tuple[Any, Any]:
    """Split off the last `n` images by sorted key: `(train, holdout)`, deterministic.

    The same files always land in the holdout, whatever their order in the annotation file, so a
    model is evaluated on images its training never saw (e.g. 64 / 16 on coco-mini).
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise LexVLAError(
            "data.holdout needs a map-style dataset (caption JSON, CSV/TSV or synthetic); streaming "
            "shards cannot be split: hold out whole shards instead"
        )
    total = len(dataset)
    if n < 0 or n >= total:
        raise LexVLAError(
            f"holdout of {n} images is impossible with {total} images: choose 0 < holdout < {total}"
        )
    order = sorted(range(total), key=lambda i: _key_of(dataset, i))
    train_idx, hold_idx = sorted(order[: total - n]), sorted(order[total - n :])
    if hasattr(dataset, "subset"):
        return dataset.subset(train_idx), dataset.subset(hold_idx)
    return SubsetView(dataset, train_idx), SubsetView(dataset, hold_idx)


# ------------------------------------------------------------------------------ format detection
def detect_format(path: str | Path) -> str:
    """Name the format of a data path: one of :data:`FORMATS`.

    Raises:
        LexVLAError: the path does not exist or is none of the accepted formats.
    """
    text = str(path)
    if text == "synthetic" or text.startswith("synthetic:"):
        synthetic_size(text)  # validates N
        return "synthetic"
    if any(c in text for c in "*?[{"):
        from lexvla.data.webdataset import expand_shards

        expand_shards(text)  # raises if nothing matches
        return "wds"
    p = Path(text)
    if not p.exists():
        raise LexVLAError(f"data path not found: {p} ({FORMAT_HELP})")
    suffix = p.suffix.lower()
    if p.is_dir():
        if any(p.glob("*.tar")) or any(p.glob("*.tar.gz")) or any(p.glob("*.tgz")):
            return "wds"
        raise LexVLAError(f"{p} is a directory without .tar shards; {FORMAT_HELP}")
    if p.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return "wds"
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".json":
        return _json_format(_read_json(p), p)
    raise LexVLAError(f"unknown data format of {p}; {FORMAT_HELP}")


def synthetic_size(text: str, default: int = 512) -> int:
    """N of `synthetic:N` (`default` for plain `synthetic`)."""
    _, sep, number = text.partition(":")
    if not sep:
        return default
    if not number.isdigit() or int(number) <= 0:
        raise LexVLAError(f"bad synthetic data path {text!r}: write synthetic:N with N > 0")
    return int(number)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise LexVLAError(f"{path} is not valid JSON: {err}") from None


def _json_format(data: Any, path: Path) -> str:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if isinstance(data.get("annotations"), list):
            return "coco"
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
    raise LexVLAError(
        f"{path}: JSON is neither COCO captions (top-level 'images' and 'annotations') nor Karpathy "
        f"splits ('images' with 'sentences'); {FORMAT_HELP}"
    )


# ------------------------------------------------------------------------------ readers
def resolve_images_dir(
    annotation: Path, first_file: str, images_dir: str | Path | None, extra: Sequence[Path] = ()
) -> Path:
    """The folder holding the images named in `annotation`.

    Given `images_dir` is used as is. Otherwise candidates are tried in order: `extra`, then for
    `annotations/captions_train2017.json` the sibling `train2017/` (COCO layout), then the annotation's
    folder and its parent; the first holding `first_file` wins.
    """
    if images_dir:
        folder = Path(images_dir)
        if not folder.is_dir():
            raise LexVLAError(f"image folder not found: {folder} (given for {annotation})")
        return folder
    stem_split = annotation.stem.split("_")[-1]  # captions_train2017 -> train2017
    here = annotation.resolve().parent
    candidates = [*extra, here.parent / stem_split, here / stem_split, here, here.parent]
    for folder in candidates:
        if (folder / first_file).is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise LexVLAError(
        f"cannot find the images of {annotation} (looked for {first_file} in {tried}): "
        "give the image folder (data.images / --images)"
    )


def read_coco_captions(
    path: str | Path, images_dir: str | Path | None = None, data: Any = None
) -> list[ImageRecord]:
    """COCO caption JSON -> one record per image (captions in file order; images without any dropped)."""
    path = Path(path)
    data = _read_json(path) if data is None else data
    captions: dict[Any, list[str]] = {}
    with _malformed(path, "annotations"):
        for ann in data["annotations"]:
            text = utf8_text(str(ann.get("caption", "")).strip())
            if text:
                captions.setdefault(ann["image_id"], []).append(text)
    with _malformed(path, "images"):
        images = [im for im in data["images"] if im["id"] in captions]
        names = [str(im["file_name"]) for im in images]
    if not images:
        hint = (
            " (it looks like an instances file: use lexvla.data.CocoInstanceMasks for PatchDis)"
            if "categories" in data
            else ""
        )
        raise LexVLAError(f"{path} has no image with a caption{hint}")
    if len(images) < len(data["images"]):
        logger.info(
            "%s: %d images without captions ignored", path, len(data["images"]) - len(images)
        )
    folder = resolve_images_dir(path, names[0], images_dir)
    return [
        ImageRecord(name, str(folder / name), captions[im["id"]]) for name, im in zip(names, images)
    ]


@contextlib.contextmanager
def _malformed(path: Path, part: str) -> Iterator[None]:
    """Turn a missing field or a wrong type in a caption file's `part` into a LexVLAError naming it."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as err:
        raise LexVLAError(
            f"{path}: malformed {part} entry ({type(err).__name__}: {err}); {FORMAT_HELP}"
        ) from None


def read_karpathy(
    path: str | Path, images_dir: str | Path | None = None, split: str = "train", data: Any = None
) -> list[ImageRecord]:
    """Karpathy-split JSON -> records of `split` ("train" = train + restval, "val", "test", "all")."""
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise LexVLAError(
            f"unknown Karpathy split {split!r} for {path}: choose one of {', '.join(KARPATHY_SPLITS)}"
        )
    data = _read_json(path) if data is None else data
    wanted = KARPATHY_SPLITS[split]
    with _malformed(path, "images"):
        images = [im for im in data["images"] if im.get("split", "train") in wanted]
        return _karpathy_records(path, images, images_dir, split, data)


def _karpathy_records(
    path: Path, images: list[Any], images_dir: str | Path | None, split: str, data: Any
) -> list[ImageRecord]:
    if not images:
        found = sorted({str(im.get("split")) for im in data["images"]})
        raise LexVLAError(f"{path} has no image in split {split!r} (splits present: {found})")

    def relpath(im: dict[str, Any]) -> str:
        return str(Path(im.get("filepath", "")) / im["filename"])

    extra = [path.resolve().parent / "images", path.resolve().parent / "flickr30k-images"]
    folder = resolve_images_dir(path, relpath(images[0]), images_dir, extra)
    records = []
    for im in images:
        texts = [utf8_text(str(s.get("raw", "")).strip()) for s in im.get("sentences", [])]
        texts = [t for t in texts if t]
        if texts:
            records.append(ImageRecord(relpath(im), str(folder / relpath(im)), texts))
    return records


def read_table(
    path: str | Path, images_dir: str | Path | None = None, delimiter: str | None = None
) -> list[ImageRecord]:
    """CSV (`,`) or TSV (tab) with `filepath` and `caption` columns; one record per distinct filepath.

    Relative paths are taken against `images_dir`, else against the table's folder.
    """
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    base = Path(images_dir) if images_dir else path.resolve().parent
    grouped: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            path_col, caption_col = _table_columns(reader.fieldnames, path)
            for row in reader:
                file, text = (row.get(path_col) or "").strip(), (row.get(caption_col) or "").strip()
                if file and text:
                    grouped.setdefault(file, []).append(text)
        except (csv.Error, UnicodeDecodeError) as err:  # a field over the size limit, binary data
            raise LexVLAError(
                f"{path} line {reader.line_num}: not a readable table ({err}); {FORMAT_HELP}"
            ) from None
    if not grouped:
        raise LexVLAError(f"{path} has no row with both a file path and a caption")
    return [ImageRecord(f, str(base / f), texts) for f, texts in grouped.items()]


def _table_columns(fieldnames: Sequence[str] | None, path: Path) -> tuple[str, str]:
    names = {name.strip().lower(): name for name in fieldnames or []}
    path_col = next((names[c] for c in PATH_COLUMNS if c in names), None)
    caption_col = next((names[c] for c in CAPTION_COLUMNS if c in names), None)
    if path_col is None or caption_col is None:
        raise LexVLAError(
            f"{path} needs a header with 'filepath' and 'caption' columns (found: "
            f"{', '.join(fieldnames or []) or 'nothing'})"
        )
    return path_col, caption_col


# ------------------------------------------------------------------------------ factory
def create_dataset(
    cfg: DataConfig | str | Path,
    *,
    images_dir: str | Path | None = None,
    split: str | None = None,
    lazy: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
) -> Any:
    """Build the dataset a DataConfig (or a bare path) describes, whatever its format.

    Args:
        cfg: a DataConfig (path, images, split, synthetic_size) or a data path.
        images_dir: image folder; overrides `cfg.images`.
        split: Karpathy split; overrides `cfg.split` (default "train").
        lazy: file datasets return :class:`LazySample` (decoded on access); False: decoded, None if broken.
        rank, world_size: shard split of streaming data (default: torch.distributed if initialised).
        seed: shard shuffling of streaming data; seed of the synthetic dataset.

    Returns:
        :class:`ImageTextDataset`, :class:`~lexvla.data.synthetic.SyntheticDataset` (map-style) or
        :class:`~lexvla.data.webdataset.ShardDataset` (iterable).
    """
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig(path=str(cfg))
    if not cfg.path:
        raise LexVLAError(f"no training data given: set data.path ({FORMAT_HELP})")
    images = images_dir or cfg.images or None
    fmt = detect_format(cfg.path)
    if fmt == "synthetic":
        from lexvla.data.synthetic import SyntheticDataset

        return SyntheticDataset(synthetic_size(cfg.path, cfg.synthetic_size), seed=seed)
    if fmt == "wds":
        from lexvla.data.webdataset import ShardDataset

        return ShardDataset(cfg.path, rank=rank, world_size=world_size, seed=seed)
    path = Path(cfg.path)
    if fmt in ("csv", "tsv"):
        records = read_table(path, images, "\t" if fmt == "tsv" else ",")
    else:
        data = _read_json(path)
        if fmt == "coco":
            records = read_coco_captions(path, images, data=data)
        else:
            records = read_karpathy(path, images, split or cfg.split, data=data)
    dataset = ImageTextDataset(records, str(path), lazy=lazy)
    logger.info("%s (%s): %d images, %d captions", path, fmt, len(dataset), dataset.num_captions)
    return dataset
