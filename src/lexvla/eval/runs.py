"""What every `lexvla eval` run shares: read the data, evaluate a model, write the JSON result.

The `run_*` functions of `lexvla.eval` (retrieval, sparsity, discovery, words, patchdis) take a built
model (the CLI turns `--model NAME` into one) and the name to record for it; each brings only its
evaluation and its settings. :func:`run_on_captions` is the whole run on a captioned data path,
:func:`write_result` the JSON result with its provenance (:mod:`lexvla.eval.results`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lexvla.eval.results import model_info, write_report
from lexvla.eval.retrieval import RetrievalData, collect_retrieval_data


def load_captioned_data(
    data: str | Path, *, images: str | Path | None = None, split: str = "test", holdout: int = 0
) -> tuple[Any, dict[str, Any]]:
    """A captioned dataset from a path (any format `lexvla.data` reads) and its report description.

    Args:
        data: caption JSON (COCO or Karpathy), CSV/TSV, tar shards, or `synthetic:N`.
        images: image folder for files with relative paths.
        split: Karpathy split to evaluate (default "test"; ignored by other formats).
        holdout: > 0 keeps only the last `holdout` images, the ones `lexvla train` held out.
    """
    from lexvla.data.datasets import create_dataset, split_holdout

    dataset = create_dataset(str(data), images_dir=images, split=split)
    if holdout > 0:
        dataset = split_holdout(dataset, holdout)[1]
    info = {"path": str(data), "images": str(images) if images else None, "split": split}
    return dataset, {**info, "holdout": holdout}


def write_result(
    out: str | Path | None,
    result: Mapping[str, Any],
    model: torch.nn.Module,
    *,
    model_ref: str | None,
    data: Any,
    settings: Mapping[str, Any],
) -> None:
    """Write `result` to `out` (nothing when None) with the model's reference and fingerprint.

    `model_ref` is the name the user gave the model (`"small-offline"`, a run folder); without one the
    report names the model's class.
    """
    if out is None:
        return
    info = model_info(model, model_ref or type(model).__name__)
    write_report(out, result, model_ref=info, data=data, settings=settings)


def run_on_captions(
    model: torch.nn.Module,
    data: str | Path,
    evaluate: Callable[[RetrievalData], dict[str, Any]],
    settings: Callable[[dict[str, Any]], Mapping[str, Any]],
    *,
    images: str | Path | None = None,
    split: str = "test",
    holdout: int = 0,
    limit: int | None = None,
    out: str | Path | None = None,
    model_ref: str | None = None,
    data_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on a captioned data path and write the result to `out`.

    Args:
        model: the model `evaluate` runs (recorded in the report by reference and fingerprint).
        data, images, split, holdout: as :func:`load_captioned_data`.
        evaluate: the evaluation, from the collected image-caption pairs to the result.
        settings: the report's settings, given the result (some settings are chosen while evaluating).
        limit: evaluate the first `limit` images only.
        out: the JSON result (None: write nothing).
        model_ref: the model's name for the report.
        data_extra: more keys for the report's `data` description.
    """
    dataset, data_info = load_captioned_data(data, images=images, split=split, holdout=holdout)
    pairs = collect_retrieval_data(dataset, limit=limit)
    result = evaluate(pairs)
    if out is not None:
        data_info.update(limit=limit, fingerprint=pairs.fingerprint(), **(data_extra or {}))
        write_result(
            out, result, model, model_ref=model_ref, data=data_info, settings=settings(result)
        )
    return result
