"""Validation during and after training: retrieval and word quality on images training never saw.

With frozen towers the validation images and captions go through the same precomputed feature tables
as the training data (computed once, kept under the cache), so validating costs only the trained heads.
Otherwise the model encodes them from pixels and text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lexvla.config import RECALL_KS
from lexvla.eval.retrieval import (
    Encodings,
    collect_retrieval_data,
    encode_retrieval_data,
    model_operating_point,
    retrieval_metrics,
)
from lexvla.eval.words import word_quality
from lexvla.models.lexvla import LexVLA
from lexvla.train.features import image_feature_table, text_feature_table

TOP_WORDS = 300  # the paper's recall is flat down to about 300 active words


@torch.no_grad()
def validate(
    model: LexVLA,
    holdout: Any,
    *,
    tables_root: Path | None = None,
    dtype: torch.dtype = torch.float16,
    compute: str = "float32",
    batch_size: int = 32,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """Recall@K (`ks`: 1/5/10 by default) at the model's sparsification (and at the top 300 words), and word quality.

    Args:
        model: the model, in eval mode.
        holdout: a map-style dataset of validation images with captions.
        tables_root: where frozen-feature tables live; None encodes from pixels and text.
        dtype: storage dtype of the image feature table.
        compute: precision of the frozen towers when the tables are made (`train.feature_cache_compute`;
            the trainer validates on features made like its training features).
        batch_size: images per forward of the heads.
        ks: the K of recall@K (the run's `eval.recall_ks`).
    """
    if tables_root is not None:
        enc, captions = encodings_from_tables(
            model, holdout, tables_root, dtype, batch_size, compute=compute
        )
    else:
        data = collect_retrieval_data(holdout)
        enc = encode_retrieval_data(model, data, batch_size=batch_size, progress=False)
        captions = data.captions
    return validation_metrics(model, enc, captions, ks)


def validation_metrics(
    model: LexVLA, enc: Encodings, captions: list[str], ks: Sequence[int] = RECALL_KS
) -> dict[str, Any]:
    """What :func:`validate` reports, from encodings already made (dense vectors, caption owners)."""
    point, threshold = model_operating_point(model, None)
    result = retrieval_metrics(enc, point, threshold, ks)
    top = retrieval_metrics(enc, TOP_WORDS, threshold, ks)
    result[f"at_top_{TOP_WORDS}"] = {k: v for k, v in top.items() if "/R@" in k}
    result["words"] = word_quality(
        enc.image_weights,
        enc.text_weights,
        enc.text_to_image,
        captions,
        model.vocab.words,
        threshold=threshold,
    )
    return result


def encodings_from_tables(
    model: LexVLA,
    holdout: Any,
    root: Path,
    dtype: torch.dtype,
    batch_size: int,
    *,
    compute: str = "float32",
) -> tuple[Encodings, list[str]]:
    """Dense encodings of the validation set through its frozen-feature tables; images that could
    not be read are left out with their captions."""
    image_table = image_feature_table(
        model, holdout, root, dtype=dtype, compute=compute, progress=False
    )
    text_table, offsets = text_feature_table(model, holdout, root, compute=compute, progress=False)
    kept = [i for i in range(len(holdout)) if bool(image_table.ok[i])]
    features = image_table.features[kept]
    image_weights = torch.cat(
        [
            model.vision(features[i : i + batch_size].float().to(model.device))[0].float().cpu()
            for i in range(0, len(kept), batch_size)
        ]
    )  # (N_i, V)
    rows: list[int] = []
    owners: list[int] = []
    captions: list[str] = []
    for position, index in enumerate(kept):
        start, stop = int(offsets[index]), int(offsets[index + 1])
        rows.extend(range(start, stop))
        owners.extend([position] * (stop - start))
        captions.extend(holdout[index].captions)
    text_features = text_table.features[rows].to(model.device)
    text_weights: Tensor = model.text(text_features, captions).float().cpu()  # (N_t, V)
    return Encodings(image_weights, text_weights, torch.tensor(owners)), captions
