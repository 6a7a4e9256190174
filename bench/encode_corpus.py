"""Benchmark: `encode-corpus` images/s, float32 against bf16 where the CPU has it natively (issue 15.3).

    .venv/bin/python bench/encode_corpus.py                 # 192 Flickr8k val photos, 2 repeats
    .venv/bin/python bench/encode_corpus.py --images 48 --repeats 1

Same photos, same model, one run: `lexvla.search.encode_corpus` (decode, preprocess, DINOv2-S/14,
adapter, lexical pool, sparsify to 256 words, shard files) end to end, in three arms, round-robin:

- `float32, decode in line`: the reference, as encode-corpus ran before (decode the next batch only
  after the model finished the current one; `prefetched` replaced by a plain iterator);
- `float32`: the library path, the next batch decoded in a background thread;
- `bf16 (auto)`: the same with `--image-dtype auto` (backbone and adapter under bf16 autocast when the
  CPU has AVX512-BF16/AMX; the pool stays float32, its arg-max search in bf16 as configured).

Images/s = photos / wall seconds of one `encode_corpus` call (a fresh output folder each time). The words
of the bf16 arm are compared with the float32 arm's: per image, the share of its top-256 words (the
shard's words, at most 256) that float32 also has; its mean, minimum, and the share of images whose
top-256 set is exactly equal. A stage profile (backbone, adapter, pool per batch of 16, float32 and bf16)
says where the time goes. Photos: Flickr8k `val` from ../shared (not in the repository), else the 80
bundled COCO demo photos.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import Contention, print_table, torch_machine_info, write_json  # noqa: E402
from lexvla.index import iter_shards  # noqa: E402
from lexvla.models.factory import create_model  # noqa: E402
from lexvla.search import encode as encode_module  # noqa: E402
from lexvla.search import encode_corpus  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
DEMO_COCO = ROOT / "src" / "lexvla" / "resources" / "demo-coco" / "images"
TARGET_IMAGES_PER_S = 15.0
TARGET_OVERLAP = 0.99


def photo_files(count: int) -> tuple[list[Path], str]:
    """The first `count` Flickr8k val photos (Karpathy JSON order), else the bundled COCO photos."""
    import json

    annotations = FLICKR / "annotations" / "dataset_flickr8k.json"
    if annotations.exists():
        data = json.loads(annotations.read_text())
        names = [i["filename"] for i in data["images"] if i["split"] == "val"][:count]
        return [FLICKR / "images" / n for n in names], f"Flickr8k val, first {len(names)} photos"
    files = sorted(DEMO_COCO.glob("*.jpg"))[:count]
    return files, f"bundled COCO demo photos, first {len(files)}"


@contextlib.contextmanager
def decode_in_line():
    """encode_corpus with its prefetch thread replaced by a plain iterator (the old path)."""
    real = encode_module.prefetched
    encode_module.prefetched = lambda items, depth=2: iter(items)
    try:
        yield
    finally:
        encode_module.prefetched = real


def encode_once(model, files, dtype: str, in_line: bool, batch: int) -> tuple[float, dict]:
    """(seconds, {image key: word ids}) of one encode_corpus call into a fresh folder."""
    out = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        context = decode_in_line() if in_line else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            encode_corpus(model, files, out, batch_size=batch, progress=False, image_dtype=dtype)
        seconds = time.perf_counter() - start
        words = {}
        for shard in iter_shards(out):
            for row, meta in enumerate(shard.metadata):
                ids = shard.indices[shard.indptr[row] : shard.indptr[row + 1]]
                words[meta["key"]] = set(ids.tolist())
        return seconds, words
    finally:
        shutil.rmtree(out, ignore_errors=True)


def overlap(reference: dict, other: dict) -> dict[str, float]:
    """Per image, |top(other) ∩ top(reference)| / |top(reference)|: mean, min, exact-equal share."""
    shares = [len(other[k] & ref) / max(1, len(ref)) for k, ref in reference.items()]
    equal = [other[k] == ref for k, ref in reference.items()]
    return {
        "mean": float(np.mean(shares)),
        "min": float(np.min(shares)),
        "exactly_equal_share": float(np.mean(equal)),
        "mean_words": float(np.mean([len(r) for r in reference.values()])),
    }


def stage_profile(model, files, batch: int) -> dict[str, dict[str, float]]:
    """Seconds per batch of `batch` photos in each stage, float32 and bf16 autocast (median of 3)."""
    pixels = model.preprocess([str(f) for f in files[:batch]])
    out: dict[str, dict[str, float]] = {}
    for name, autocast in (("float32", False), ("bf16", True)):
        times: dict[str, list[float]] = {"backbone": [], "adapter": [], "pool": []}
        for _ in range(3):
            ctx = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if autocast
                else contextlib.nullcontext()
            )
            with torch.inference_mode():
                t0 = time.perf_counter()
                with ctx:
                    features = model.vision.forward_features(pixels)  # (B, P, Dv)
                    t1 = time.perf_counter()
                    hidden = model.vision.forward_adapter(features)  # (B, P, D)
                    t2 = time.perf_counter()
                model.vision.pooled_logits(hidden)  # (B, V)
                t3 = time.perf_counter()
            for stage, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[stage].append(seconds)
        out[name] = {stage: float(np.median(v)) for stage, v in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="flickr8k", help="model name (default: the bundled head)"
    )
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "encode_corpus.json"))
    args = parser.parse_args()

    machine = torch_machine_info()
    contention = Contention()
    model = create_model(args.model).eval()
    files, source = photo_files(args.images)
    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))  # encode-corpus takes a folder
    for file in files:
        (folder / file.name).symlink_to(file.resolve())
    warm = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    for file in files[: args.batch_size]:
        (warm / file.name).symlink_to(file.resolve())
    arms = {
        "float32, decode in line": ("float32", True),
        "float32": ("float32", False),
        "bf16 (auto)": ("auto", False),
    }
    encode_once(model, warm, "float32", False, args.batch_size)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    words: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, (dtype, in_line) in arms.items():
            took, words[name] = encode_once(model, folder, dtype, in_line, args.batch_size)
            seconds[name].append(took)
            print(f"repeat {repeat + 1}: {name}: {len(files) / took:.1f} images/s", flush=True)
    rows = []
    for name, times in seconds.items():
        rate = len(files) / float(np.median(times))
        rows.append({"arm": name, "images_per_s": rate, "seconds": float(np.median(times))})
    bf16_words = overlap(words["float32"], words["bf16 (auto)"])
    profile = stage_profile(model, files, args.batch_size)
    print_table(rows, ["arm", "images_per_s", "seconds"])
    print(f"bf16 top-256 overlap with float32: {bf16_words}")
    print(f"stage seconds per batch of {args.batch_size}: {profile}")
    best = rows[-1]["images_per_s"]
    report = {
        "benchmark": "encode-corpus images/s, float32 vs bf16 (bench/encode_corpus.py)",
        "machine": machine,
        "contention": contention.report(),
        "inputs": {
            "model": args.model,
            "photos": source,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "vocab_size": model.vocab.size,
            "max_words": model.cfg.lexical.index_max_words,
            "bf16_native": encode_module_native(),
        },
        "method": __doc__,
        "results": {
            "arms": rows,
            "times_s": seconds,
            "bf16_top256_overlap": bf16_words,
            "stage_seconds_per_batch": profile,
        },
        "targets": {
            "images_per_s>=15": best >= TARGET_IMAGES_PER_S,
            "top256_overlap>=0.99": bf16_words["mean"] >= TARGET_OVERLAP,
        },
    }
    print(f"wrote {write_json(args.out, report)}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(warm, ignore_errors=True)


def encode_module_native() -> bool:
    from lexvla.layers.lexical import native_bf16_matmul

    return native_bf16_matmul(torch.device("cpu"))


if __name__ == "__main__":
    main()
