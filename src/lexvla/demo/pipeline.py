"""The main job (`lexvla demo`): from a fresh clone to an interpretable search over real images.

Steps (each timed and reported): prepare the offline models; take real COCO images with captions
(`../shared/data/coco-mini` if it is beside the checkout, else the 80 downscaled COCO images bundled with
the package, `lexvla/resources/demo-coco`; it says which); train `small-offline` briefly
on 2 CPU cores (frozen towers, cached features) on all but the held-out images; evaluate retrieval
(untrained vs trained) and PatchDis on the held-out images; draw the sparsity curve; index every image;
run example searches with per-word explanations; look inside a few images; write one self-contained
HTML report. A second run reuses the trained model and the index.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLED_COCO = Path(__file__).resolve().parents[1] / "resources" / "demo-coco"
COCO_CAPTIONS = Path("annotations") / "captions_train2017.json"
EXAMPLE_QUERIES = (
    "a dog playing outside",
    "a red bus on a city street",
    "a plate of food on a table",
)


def find_coco_mini(data_dir: Path | None = None) -> Path | None:
    """`data_dir`, else `../shared/data/coco-mini` beside the repository (or the working directory),
    else the COCO set bundled with the package (:data:`BUNDLED_COCO`); None if none of them is there.
    """
    if data_dir is not None:
        if not (data_dir / "annotations").is_dir():
            raise LexVLAError(
                f"{data_dir} has no annotations/ folder: give a COCO-style data folder"
            )
        return data_dir
    for root in (REPO_ROOT, Path.cwd()):
        candidate = (root / ".." / "shared" / "data" / "coco-mini").resolve()
        if (candidate / COCO_CAPTIONS).is_file():
            return candidate
    return BUNDLED_COCO if (BUNDLED_COCO / COCO_CAPTIONS).is_file() else None


def describe_source(folder: Path) -> str:
    """'demo-coco' (bundled), 'coco-mini' (../shared) or the folder's name (given with --data)."""
    if folder.resolve() == BUNDLED_COCO:
        return "demo-coco"
    return folder.name


@dataclass
class DemoRun:
    """Settings and results of one demo run."""

    out_dir: Path
    data_dir: Path | None
    steps: int = 40
    holdout: int = 16
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def step(self, title: str, fn: Callable[[], Any]) -> Any:
        self.console.rule(f"[bold]{len(self.timings) + 1}. {title}")
        start = time.perf_counter()
        result = fn()
        self.timings[title] = round(time.perf_counter() - start, 1)
        self.console.print(f"  [dim]{self.timings[title]:.1f} s[/dim]")
        return result


def run_demo(
    data_dir: Path | None = None,
    out_dir: Path = Path("demo-output"),
    *,
    steps: int = 40,
    console: Console | None = None,
) -> Path:
    """Run the whole demo; returns the path of the HTML report."""
    from lexvla.demo import report

    run = DemoRun(
        out_dir=Path(out_dir), data_dir=data_dir, steps=steps, console=console or Console()
    )
    run.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run.step("offline models", lambda: _prepare_models(run))
    data = run.step("data", lambda: _data(run))
    model = run.step(
        "training (small-offline, frozen towers, cached features)", lambda: _train(run, data)
    )
    run.step("evaluation on held-out images", lambda: _evaluate(run, model, data))
    engine = run.step("index and example searches", lambda: _index_and_search(run, model, data))
    run.step("looking inside", lambda: _look_inside(run, engine, data))
    run.results["total_seconds"] = round(time.perf_counter() - start, 1)
    path = report.write(run)
    run.console.print(f"\n[bold green]report[/bold green]: {path.resolve()}")
    run.console.print(
        f"open the web app: [bold].venv/bin/lexvla serve --index {run.out_dir / 'index'} "
        f"--model {run.out_dir / 'run'}[/bold]"
    )
    return path


def _prepare_models(run: DemoRun) -> None:
    from lexvla.assets import prepare_assets

    prepare_assets(progress=lambda msg: run.console.print(f"  {msg}"))


@dataclass
class DemoData:
    train_path: str
    images_dir: str
    train: Any
    holdout: Any
    all_images: list[Path]
    masks: Any = None  # COCO instance annotations for PatchDis (None for synthetic data)
    source: str = "coco-mini"


def _data(run: DemoRun) -> DemoData:
    from lexvla.data import create_dataset, split_holdout

    folder = find_coco_mini(run.data_dir)
    if folder is None:
        run.console.print(
            "  [yellow]no COCO images (../shared/data/coco-mini, the bundled demo-coco): "
            "using the synthetic dataset[/yellow]"
        )
        dataset = create_dataset("synthetic:256")
        train, holdout = split_holdout(dataset, 64)
        run.results["data"] = {"source": "synthetic", "path": "synthetic:256"}
        return DemoData("synthetic:256", "", train, holdout, [], source="synthetic")
    captions = folder / COCO_CAPTIONS
    images = folder / "train2017"
    dataset = create_dataset(str(captions), images_dir=images)
    train, holdout = split_holdout(dataset, run.holdout)
    source = describe_source(folder)
    run.results["data"] = {
        "source": source,
        "path": str(folder),
        "train_images": len(train),
        "held_out_images": len(holdout),
    }
    note = " (bundled; licences: LICENSES.md there)" if source == "demo-coco" else ""
    run.console.print(
        f"  {source}: {folder}{note}\n  {len(train)} training images, {len(holdout)} held out"
    )
    instances = folder / "annotations" / "instances_train2017.json"
    return DemoData(
        str(captions),
        str(images),
        train,
        holdout,
        sorted(images.glob("*.jpg")),
        masks=instances if instances.is_file() else None,
        source=source,
    )


def _train(run: DemoRun, data: DemoData) -> Any:
    from lexvla.config import to_dict
    from lexvla.models.factory import create_model
    from lexvla.train.loop import fit
    from lexvla.train.setup import experiment_config

    cfg = experiment_config(
        "small-offline",
        data=data.train_path,
        images=Path(data.images_dir) if data.images_dir else None,
        overrides=[
            f"train.steps={run.steps}",
            f"data.holdout={run.holdout}",
            "train.save_every=0",
            "train.log_every=5",
            f"train.warmup_steps={max(1, run.steps // 5)}",
        ],
    )
    run_dir = run.out_dir / "run"
    done = run_dir / "model" / "model.safetensors"
    if done.is_file() and json.loads((run_dir / "config.json").read_text()) == to_dict(cfg):
        run.console.print(f"  reusing the trained model in {run_dir} (same configuration)")
    else:
        state = fit(cfg, run_dir)
        run.console.print(f"  trained {state.step} steps; skipped samples: {state.skipped_samples}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    run.results["training"] = [
        {"step": m["step"], "loss": m["loss"]} for m in metrics if "loss" in m
    ]
    return create_model(run_dir).eval()


def _evaluate(run: DemoRun, model: Any, data: DemoData) -> None:
    from lexvla.eval.retrieval import evaluate_retrieval
    from lexvla.eval.sparsity import sparsity_curve
    from lexvla.models.factory import create_model

    cache = run.out_dir / "cache"
    untrained = create_model("small-offline").eval()
    with torch.no_grad():
        run.results["retrieval_untrained"] = evaluate_retrieval(
            untrained, data.holdout, cache_dir=cache
        )
        run.results["retrieval"] = evaluate_retrieval(model, data.holdout, cache_dir=cache)
        curve = sparsity_curve(
            model, data.holdout, cache_dir=cache, plot_path=run.out_dir / "sparsity.png"
        )
    run.results["sparsity_curve"] = curve
    run.figures["sparsity"] = run.out_dir / "sparsity.png"
    for name in ("retrieval_untrained", "retrieval"):
        r = run.results[name]
        run.console.print(
            f"  {name}: image→text R@1 {r['image_to_text/R@1']:.1f}  "
            f"text→image R@1 {r['text_to_image/R@1']:.1f}  (chance {r['chance']['text_to_image/R@1']:.1f})"
        )
    if data.masks is not None:
        _patchdis(run, model, data)


def _patchdis(run: DemoRun, model: Any, data: DemoData) -> None:
    from lexvla.eval.patchdis import evaluate_patchdis, load_patchdis_data

    masks, class_names = load_patchdis_data(data.masks, images=data.images_dir)
    held_out = {Path(getattr(s, "path", "") or "").name for s in _records(data.holdout)}
    samples = [
        masks[i] for i in range(len(masks)) if Path(getattr(masks[i], "path", "")).name in held_out
    ]
    with torch.no_grad():
        result = evaluate_patchdis(model, samples, class_names, out_dir=run.out_dir / "patchdis")
    run.results["patchdis"] = {k: v for k, v in result.items() if k != "overlays"}
    run.figures["patchdis"] = list(result.get("overlays", []))[:4]
    run.console.print(
        f"  PatchDis mIoU {result['mIoU']:.3f} on {result['num_images']} images ({result['rule']})"
    )


def _records(dataset: Any) -> list[Any]:
    """Dataset items without decoding images where the dataset allows it."""
    return [dataset[i] for i in range(len(dataset))]


def _index_and_search(run: DemoRun, model: Any, data: DemoData) -> Any:
    from lexvla.index import build_index
    from lexvla.search.encode import encode_corpus
    from lexvla.search.engine import SearchEngine

    corpus, index = run.out_dir / "corpus", run.out_dir / "index"
    images = data.images_dir or None
    if images is None:
        run.console.print(
            "  (no image folder with synthetic data: searching the held-out samples only)"
        )
        return None
    for stale in (corpus, index):  # vectors of an earlier demo run's model
        shutil.rmtree(stale, ignore_errors=True)
    encode_corpus(model, images, corpus, model_name=str(run.out_dir / "run"), progress=True)
    build_index(corpus, index)
    engine = SearchEngine(model, _open_index(index))
    searches = []
    for text in EXAMPLE_QUERIES:
        query = engine.query_from_text(text)
        hits = engine.search(query, k=3, explain=True)
        searches.append({"query": text, "query_words": query.top(8), "hits": hits})
        best = hits[0] if hits else None
        words = _word_shares(
            [(w["word"], w["contribution"]) for w in (best or {}).get("words", [])[:4]],
            best["score"] if best else 0.0,
        )
        run.console.print(f"  [bold]{text!r}[/bold] → {best['key'] if best else '-'}  ({words})")
    run.results["searches"] = searches
    return engine


def _word_shares(contributions: list[tuple[str, float]], score: float) -> str:
    """'dog 12%, grass 7%': each word's share of the score it contributes to."""
    if score <= 0:
        return ", ".join(word for word, _ in contributions)
    return ", ".join(f"{word} {100 * value / score:.0f}%" for word, value in contributions)


def _open_index(path: Path) -> Any:
    from lexvla.index import SparseIndex

    return SparseIndex.open(path)


def _look_inside(run: DemoRun, engine: Any, data: DemoData) -> None:
    """Word clouds, grounding heatmap and per-word explanation for two held-out images."""
    from lexvla.interpret.explain import explain

    model = engine.model if engine is not None else None
    if model is None:
        from lexvla.models.factory import create_model

        model = create_model(run.out_dir / "run").eval()
    pages = []
    for sample in _records(data.holdout)[:2]:
        name = Path(getattr(sample, "path", "") or sample.key).stem
        with torch.no_grad():
            result = explain(
                model,
                sample.path or sample.image,
                sample.captions[0],
                run.out_dir / "inside" / name,
                model_ref="demo run",
            )
        pages.append(result)
        top = _word_shares(result.get("contributions", [])[:5], result.get("score", 0.0))
        run.console.print(
            f"  {name}: score {result.get('score', 0):.3f} for {sample.captions[0]!r} ← {top}"
        )
    run.figures["inside"] = pages
