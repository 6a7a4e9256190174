"""Untrusted files: a pickle payload planted in any file lexvla reads is refused (never unpickled), and
names from archives or manifests cannot reach outside their directory.

The payload (`helpers.bad_inputs.PickleBomb`) creates a marker directory when unpickled; every test checks the
marker is absent. Where a checksum would refuse the planted file first, the test updates the
checksum too, so the parser itself is what refuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.bad_inputs import PickleBomb, pickle_payload
from helpers.index import no_fsync
from helpers.search import make_image
from lexvla import LexVLA
from lexvla.errors import LexVLAError
from lexvla.index import SparseIndex, build_index, init_shard_dir, iter_shards, write_shard
from lexvla.index._generation import ARRAYS, BLOBS

VOCAB = [f"w{i}" for i in range(16)]


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted pickle was executed"


@pytest.fixture(autouse=True)
def _fast_writes() -> Iterator[None]:
    with no_fsync():
        yield


def _object_array(marker: Path, n: int = 3) -> np.ndarray:
    array = np.empty(n, dtype=object)
    array[:] = [PickleBomb(marker)] * n
    return array


def _npy_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, _object_array(marker), allow_pickle=True)
    return buffer.getvalue()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "vocab.json"])
def test_model_checkpoint_refuses_a_pickle(fresh_tiny_model, tmp_path, marker, name):
    folder = fresh_tiny_model.save_pretrained(tmp_path / "ckpt")
    (folder / name).write_bytes(pickle_payload(marker))
    with pytest.raises(LexVLAError, match=name.replace(".", r"\.")):
        LexVLA.from_pretrained(folder)


def test_torch_save_file_posing_as_safetensors_is_refused(fresh_tiny_model, tmp_path, marker):
    folder = fresh_tiny_model.save_pretrained(tmp_path / "ckpt")
    torch.save({"weights": PickleBomb(marker)}, folder / "model.safetensors")
    with pytest.raises(LexVLAError, match="not a valid safetensors"):
        LexVLA.from_pretrained(folder)


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_state.json"])
def test_training_checkpoint_refuses_a_pickle(fresh_tiny_model, tmp_path, marker, name):
    from lexvla.presets import get_preset
    from lexvla.train.optim import create_optimizer, create_scheduler
    from lexvla.train.state import load_latest, save_checkpoint

    cfg = get_preset("tiny").train
    params = fresh_tiny_model.trainable_parameters()
    optimizer = create_optimizer(params, cfg)
    scheduler = create_scheduler(optimizer, cfg)
    sum(p.sum() for p in params.values()).backward()
    optimizer.step()  # gives the optimizer state tensors
    folder = save_checkpoint(tmp_path, 1, fresh_tiny_model, optimizer, scheduler)
    assert load_latest(tmp_path, fresh_tiny_model, optimizer, scheduler) == 1
    (folder / name).write_bytes(pickle_payload(marker))
    with pytest.raises(LexVLAError, match=name.replace(".", r"\.")):
        load_latest(tmp_path, fresh_tiny_model, optimizer, scheduler)


# ---------------------------------------------------------------------------------- feature cache
def test_feature_cache_discards_planted_files_and_recomputes(tmp_path, marker) -> None:
    from safetensors.torch import save_file

    from lexvla.train.features import ImageFeatureCache

    pixels = torch.rand(3, 3, 8, 8)
    calls: list[int] = []

    def compute(batch: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 4, 5)
        calls.append(len(batch))
        return batch.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 4, 5).clone()

    expected = ImageFeatureCache(tmp_path, "fp").get(pixels, compute)
    files = sorted((tmp_path / "fp").rglob("*.safetensors"))
    assert len(files) == 3 and calls == [3]
    files[0].write_bytes(pickle_payload(marker))  # a pickle
    save_file({"features": torch.zeros(7, 7)}, str(files[1]))  # valid, but the wrong shape
    save_file({"features": torch.zeros(4, 5, dtype=torch.int64)}, str(files[2]))  # not floats
    again = ImageFeatureCache(tmp_path, "fp", memory=False).get(pixels, compute)
    torch.testing.assert_close(again, expected)
    assert calls[0] == 3 and sum(calls[1:]) == 3  # all three recomputed, none twice


# ---------------------------------------------------------------------------------- shards
def _shard_dir(root: Path) -> Path:
    init_shard_dir(root, VOCAB, {"model": "m"})
    meta = [{"key": f"d{i}", "path": f"{i}.png"} for i in range(3)]
    write_shard(root, "s0", [0, 1, 2, 3], [1, 2, 3], [0.5, 1.0, 2.0], meta)
    return root


def _fix_shard_manifest(root: Path, name: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    key = "npz_sha256" if name.endswith(".npz") else "jsonl_sha256"
    manifest["shards"][0][key] = _sha(root / name)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_shard_npz_with_pickled_arrays_is_refused(tmp_path, marker) -> None:
    root = _shard_dir(tmp_path / "lex")
    with open(root / "s0.npz", "wb") as f:
        np.savez(
            f, indptr=_object_array(marker, 4), indices=np.array([1, 2, 3], np.int32),
            values=np.ones(3, np.float16), vocab_size=np.int64(len(VOCAB)),
        )  # fmt: skip
    _fix_shard_manifest(root, "s0.npz")
    with pytest.raises(LexVLAError, match=r"s0\.npz.*pickled"):
        list(iter_shards(root))


@pytest.mark.parametrize("name", ["manifest.json", "vocab.json", "s0.jsonl"])
def test_shard_json_files_with_a_pickle_are_refused(tmp_path, marker, name) -> None:
    root = _shard_dir(tmp_path / "lex")
    (root / name).write_bytes(pickle_payload(marker))
    if name == "s0.jsonl":
        _fix_shard_manifest(root, name)
    with pytest.raises(LexVLAError, match=name.replace(".", r"\.")):
        build_index(root, tmp_path / "index")


# ---------------------------------------------------------------------------------- the index
def _index(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "index"
    build_index(_shard_dir(tmp_path / "lex"), root)
    return root, root / "generations" / (root / "CURRENT").read_text().strip()


def _fix_index_manifest(gen: Path, name: str) -> None:
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["files"][name].update(bytes=(gen / name).stat().st_size, sha256=_sha(gen / name))
    (gen / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", sorted(f"{a}.npy" for a in ARRAYS) + list(BLOBS))
def test_index_files_with_a_pickle_are_refused(tmp_path, marker, name) -> None:
    root, gen = _index(tmp_path)
    payload = _npy_payload(marker) if name.endswith(".npy") else pickle_payload(marker)
    (gen / name).write_bytes(payload)
    _fix_index_manifest(gen, name)
    for verify in (True, False):
        with pytest.raises(LexVLAError, match=name.split(".")[0]):
            index = SparseIndex.open(root, verify=verify)
            index.doc_id("d0")  # keys.json is read on first use


def test_index_manifest_with_a_pickle_is_refused(tmp_path, marker) -> None:
    root, gen = _index(tmp_path)
    (gen / "manifest.json").write_bytes(pickle_payload(marker))
    with pytest.raises(LexVLAError, match=r"manifest\.json"):
        SparseIndex.open(root)


def test_staged_change_with_a_pickle_is_refused(tmp_path, marker) -> None:
    root, _ = _index(tmp_path)
    index = SparseIndex.open(root)
    index.add([0, 1], [4], [1.0], [{"key": "new", "path": "n.png"}])  # staged, not committed
    (staged,) = (root / "pending").iterdir()
    (staged / "indptr.npy").write_bytes(_npy_payload(marker))
    info = json.loads((staged / "info.json").read_text())
    info["files"]["indptr.npy"] = _sha(staged / "indptr.npy")
    (staged / "info.json").write_text(json.dumps(info))
    with pytest.raises(LexVLAError, match=r"indptr\.npy.*pickled"):
        index.commit()


# ---------------------------------------------------------------------------------- path escapes
def test_manifest_paths_cannot_leave_their_directory(tmp_path) -> None:
    root = _shard_dir(tmp_path / "lex")
    outside = tmp_path / "outside"
    for suffix in (".npz", ".jsonl"):  # a complete shard planted next to the directory
        os.link(root / f"s0{suffix}", outside.with_suffix(suffix))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../outside"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LexVLAError, match=r"\.\./outside"):
        list(iter_shards(root))
    with pytest.raises(LexVLAError, match=r"\.\./outside"):
        build_index(root, tmp_path / "index")

    index_root, gen = _index(tmp_path / "second")
    (index_root / "CURRENT").write_text("../../outside\n")
    with pytest.raises(LexVLAError, match="not a generation"):
        SparseIndex.open(index_root)
    (index_root / "CURRENT").write_text(gen.name + "\n")
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["files"]["../../../outside.npz"] = manifest["files"].pop("deleted.npy")
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LexVLAError, match="lists files"):
        SparseIndex.open(index_root)


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    make_image(i, (48, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hostile_tar(path: Path) -> Path:
    """Members that try to leave the archive: `..`, absolute, links; plus two honest samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes = b"", **kind: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for attribute, value in kind.items():
                setattr(info, attribute, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("000.png", _png(0))
        add("000.txt", b"an honest sample")
        add("../escape.png", _png(1))
        add("/tmp/absolute.png", _png(2))
        add("a/../../up.png", _png(3))
        add("link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("hard.png", type=tarfile.LNKTYPE, linkname="000.png")
        add("dev.png", type=tarfile.CHRTYPE)
        add("001.png", _png(4))
        add("001.txt", b"another honest sample")
    return path


def test_archive_members_cannot_escape(tiny_model, tmp_path) -> None:
    from lexvla.data import ShardDataset
    from lexvla.search import encode_corpus

    tar = _hostile_tar(tmp_path / "in" / "hostile.tar")
    before = sorted(p for p in tmp_path.rglob("*"))
    report = encode_corpus(tiny_model, [tar], tmp_path / "out", progress=False)
    keys = sorted(m["key"] for s in iter_shards(tmp_path / "out") for m in s.metadata)
    assert keys == ["hostile/000", "hostile/001"] and report["images"] == 2
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(tmp_path / "out" in [p, *p.parents] for p in created), created
    assert not Path("/tmp/absolute.png").exists() and not (tmp_path / "escape.png").exists()
    samples = ShardDataset(tar, shuffle=False)
    assert [s.key for s in samples] == ["000", "001"]
