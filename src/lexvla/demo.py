"""The main job (`lexvla demo`): from a fresh clone to words read off real images and captions.

Prepares the offline models if needed, loads the `small-offline` model (untrained heads: the codebooks
are the LLM's own word rows) and prints the top words of a few real COCO images and captions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from rich.console import Console

from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_coco_mini(data_dir: Path | None = None) -> Path | None:
    """`data_dir`, else `../shared/data/coco-mini` beside the repository (or the working directory)."""
    if data_dir is not None:
        if not (data_dir / "annotations").is_dir():
            raise LexVLAError(
                f"{data_dir} has no annotations/ folder: give a COCO-style data folder"
            )
        return data_dir
    for root in (REPO_ROOT, Path.cwd()):
        candidate = (root / ".." / "shared" / "data" / "coco-mini").resolve()
        if (candidate / "annotations" / "captions_train2017.json").is_file():
            return candidate
    return None


def _coco_examples(folder: Path, n: int) -> list[tuple[Path, str]]:
    data = json.loads((folder / "annotations" / "captions_train2017.json").read_text("utf-8"))
    first_caption: dict[int, str] = {}
    for ann in data["annotations"]:
        first_caption.setdefault(ann["image_id"], ann["caption"].strip())
    images = sorted(data["images"], key=lambda im: im["file_name"])[:n]
    return [(folder / "train2017" / im["file_name"], first_caption[im["id"]]) for im in images]


def run_demo(
    data_dir: Path | None = None,
    out_dir: Path = Path("demo-output"),
    num_images: int = 4,
    console: Console | None = None,
) -> Path:
    """Run the demo and write `out_dir/demo.json`; returns its path."""
    from lexvla.assets import prepare_assets
    from lexvla.models.factory import create_model

    console = console or Console()
    start = time.time()
    console.rule("[bold]1. offline models")
    prepare_assets(progress=lambda msg: console.print(f"  {msg}"))
    folder = find_coco_mini(data_dir)
    if folder is None:
        raise LexVLAError("no ../shared/data/coco-mini beside the repository: pass --data DIR")
    console.rule("[bold]2. the small-offline model (untrained heads)")
    model = create_model("small-offline").eval()
    console.print(f"  vocabulary: {model.vocab_size:,} words; trainable: {model.num_trainable()}")
    report = {"images": [], "captions": []}
    console.rule("[bold]3. top words of real COCO images and captions")
    with torch.inference_mode():
        for path, caption in _coco_examples(folder, num_images):
            image_words = model.top_words(model.encode_image([path]).image_weights, 10)[0]
            text_words = model.top_words(model.encode_text([caption]).text_weights, 10)[0]
            console.print(f"[bold]{path.name}[/bold]: " + ", ".join(w for w, _ in image_words))
            console.print(
                f"  caption: {caption!r}\n  words:   " + ", ".join(w for w, _ in text_words)
            )
            report["images"].append({"path": str(path), "top_words": image_words})
            report["captions"].append({"caption": caption, "top_words": text_words})
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "demo.json"
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    console.print(f"\nwrote {out} in {time.time() - start:.0f} s")
    return out
