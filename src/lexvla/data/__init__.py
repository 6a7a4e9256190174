"""Datasets and preprocessing: caption JSON, CSV/TSV, WebDataset shards and a synthetic dataset.

`lexvla.data` never imports `lexvla.models`. Entry points: :func:`create_dataset` (any format, from a
DataConfig or a path), :func:`split_holdout`, the collate functions and the PatchDis mask readers.
"""

from __future__ import annotations

from lexvla.data.datasets import (
    FORMATS,
    ImageRecord,
    ImageTextDataset,
    create_dataset,
    detect_format,
    read_coco_captions,
    read_karpathy,
    read_table,
    split_holdout,
)
from lexvla.data.masks import (
    IGNORE_INDEX,
    VOC_CLASSES,
    CocoInstanceMasks,
    MaskSample,
    VocMasks,
    decode_polygons,
    decode_rle,
    encode_rle,
    read_palette_mask,
    rle_from_string,
    rle_to_string,
)
from lexvla.data.sample import (
    LazySample,
    Sample,
    SampleBatch,
    SkipCounter,
    collate_samples,
    collate_train,
)
from lexvla.data.synthetic import SyntheticDataset, SyntheticSample, synthetic_class_names
from lexvla.data.webdataset import ShardDataset, expand_shards, write_shards

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "CocoInstanceMasks",
    "ImageRecord",
    "ImageTextDataset",
    "LazySample",
    "MaskSample",
    "Sample",
    "SampleBatch",
    "ShardDataset",
    "SkipCounter",
    "SyntheticDataset",
    "SyntheticSample",
    "VocMasks",
    "collate_samples",
    "collate_train",
    "create_dataset",
    "decode_polygons",
    "decode_rle",
    "detect_format",
    "encode_rle",
    "expand_shards",
    "read_coco_captions",
    "read_karpathy",
    "read_palette_mask",
    "read_table",
    "rle_from_string",
    "rle_to_string",
    "split_holdout",
    "synthetic_class_names",
    "write_shards",
]
