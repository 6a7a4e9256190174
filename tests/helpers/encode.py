"""The reference corpus and shard checks shared by the crash and full-disk tests of `encode_corpus`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.index import no_fsync
from helpers.search import make_images
from lexvla.index import iter_shards, read_shard_manifest

ENCODE = {"batch_size": 3, "chunk_size": 5, "progress": False, "model_name": "tiny"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """13 images (12 good + 1 broken, in 3 folder chunks) and their uninterrupted encoding."""
    root = tmp_path_factory.mktemp("crash")
    make_images(root / "images", 12)
    with no_fsync():
        from lexvla.search import encode_corpus

        encode_corpus(tiny_model, root / "images", root / "reference", **ENCODE)
    return root / "images", root / "reference"


def assert_same_shards(out: Path, reference: Path) -> None:
    """Same finished shards, vectors, metadata and failures; every file checks against its sha256."""
    got, want = list(iter_shards(out)), list(iter_shards(reference))
    assert sorted(s.name for s in got) == sorted(s.name for s in want)
    by_name = {s.name: s for s in got}
    for ref in want:
        shard = by_name[ref.name]
        for field in ("indptr", "indices", "values"):
            np.testing.assert_array_equal(getattr(shard, field), getattr(ref, field))
        assert shard.metadata == ref.metadata
        failures = [
            json.loads((d / "failed" / f"{ref.name}.json").read_text()) for d in (out, reference)
        ]
        assert failures[0] == failures[1]
    keys = [m["key"] for s in got for m in s.metadata]
    assert len(keys) == len(set(keys)) == 12  # nothing lost, nothing duplicated


def assert_no_half_written_files(out: Path) -> None:
    """Every file under a name a reader may open is complete: the manifest's shards check against
    their sha256; a shard file of an unfinished shard (moved into place before the kill, not yet
    listed, so never read) is still a whole file; other leftovers are hidden *.tmp files."""
    listed = {s.name for s in read_shard_manifest(out).shards}
    list(iter_shards(out))  # checksums of everything listed
    for path in out.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        if path.suffix == ".npz" and path.stem not in listed:
            with np.load(path, allow_pickle=False) as npz:
                assert set(npz.files) == {"indptr", "indices", "values", "vocab_size"}
        elif path.suffix == ".jsonl" and path.stem not in listed:
            assert all(json.loads(line) for line in path.read_text().splitlines())
        elif path.suffix in (".npz", ".jsonl"):
            continue
        elif path.name == "failed":
            for failures in path.iterdir():
                assert failures.name.startswith(".") or isinstance(
                    json.loads(failures.read_text()), list
                )
        else:
            assert path.name in ("manifest.json", "vocab.json", "encode_report.json", ".lock"), path
