"""The main job (`lexvla demo`): from a fresh clone to an interpretable search over real images.

Steps (each timed and reported): prepare the offline models; take real COCO images with captions
(`../shared/data/coco-mini` if it is beside the checkout, else the 80 downscaled COCO images bundled with
the package, `lexvla/resources/demo-coco`; it says which); train `small-offline` briefly on 2 CPU cores
(frozen towers, cached features) on all but the held-out images, which proves the trainer works; load
the trained head bundled with lexvla (`flickr8k`: `small-offline` trained on Flickr8k, see
`lexvla.models.bundled`); evaluate retrieval and word quality (untrained vs briefly trained vs the
Flickr8k head) and PatchDis (untrained vs the head) on the held-out images; draw the head's sparsity
curve; index every image with the head; run example searches with per-word shares of each score; look
inside a few images; write one self-contained HTML report. Without the bundled head the briefly
trained model stands in for it, and the console and the report say so. A second run reuses the
trained model.
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
HEAD = "flickr8k"  # the bundled checkpoint that evaluates, indexes, searches and looks inside
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
    from lexvla.demo import run_report

    run = DemoRun(
        out_dir=Path(out_dir), data_dir=data_dir, steps=steps, console=console or Console()
    )
    run.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run.step("offline models", lambda: _prepare_models(run))
    data = run.step("data", lambda: _data(run))
    trained = run.step(
        "brief training (small-offline, frozen towers, cached features)", lambda: _train(run, data)
    )
    head = run.step("the bundled Flickr8k head", lambda: _load_head(run, trained))
    run.step("evaluation on held-out images", lambda: _evaluate(run, trained, head, data))
    run.step("index and example searches", lambda: _index_and_search(run, head, data))
    run.step("looking inside", lambda: _look_inside(run, head, data))
    run.results["total_seconds"] = round(time.perf_counter() - start, 1)
    path = run_report.write(run)
    run.console.print(f"\n[bold green]report[/bold green]: {path.resolve()}")
    run.console.print(f"open the web app: [bold]{serve_command(run)}[/bold]")
    return path


def serve_command(run: DemoRun) -> str:
    """The command that serves the demo's index with the model that encoded it."""
    return (
        f".venv/bin/lexvla serve --index {run.out_dir / 'index'} "
        f"--model {run.results['head']['model']}"
    )


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


def _load_head(run: DemoRun, trained: Any) -> Any:
    """The bundled Flickr8k head, or (missing) the briefly trained model, said in console and report."""
    from lexvla.models.bundled import bundled_checkpoint_available, bundled_checkpoint_path
    from lexvla.models.factory import create_model

    folder = bundled_checkpoint_path(HEAD)
    if bundled_checkpoint_available(HEAD):
        model = create_model(HEAD).eval()
        run.results["head"] = {"bundled": True, "model": HEAD, "path": str(folder)}
        run.console.print(
            f"  {HEAD}: {folder}\n  small-offline trained on Flickr8k's training photos; it "
            "evaluates, indexes, searches and looks inside below"
        )
        return model
    note = (
        f"the bundled Flickr8k head is missing ({folder} has no model.safetensors): the briefly "
        "trained model evaluates, indexes, searches and looks inside instead; its words are weak"
    )
    run.console.print(f"  [yellow]{note}[/yellow]")
    run.results["head"] = {
        "bundled": False,
        "model": str(run.out_dir / "run"),
        "path": str(folder),
        "note": note,
    }
    return trained


def _compared(run: DemoRun, trained: Any, head: Any, untrained: Any) -> list[tuple[str, Any]]:
    """(name, model) of the models compared: untrained, briefly trained and the head (if bundled)."""
    models = [("untrained", untrained), ("trained", trained)]
    if run.results["head"]["bundled"]:
        models.append(("head", head))
    return models


def _evaluate(run: DemoRun, trained: Any, head: Any, data: DemoData) -> None:
    from lexvla.eval.retrieval import evaluate_retrieval
    from lexvla.eval.sparsity import sparsity_curve
    from lexvla.models.factory import create_model

    cache = run.out_dir / "cache"
    untrained = create_model("small-offline").eval()
    models = _compared(run, trained, head, untrained)
    run.results["retrieval"], run.results["words"] = {}, {}
    with torch.no_grad():
        for name, model in models:
            r = evaluate_retrieval(model, data.holdout, cache_dir=cache, progress=False)
            run.results["retrieval"][name] = r
            words = _word_quality(model, data, cache)
            run.results["words"][name] = words
            quality = (
                f"caption-word P@10 image {words['image_precision']:.0f}%, "
                f"text {words['text_precision']:.0f}%"
                if "error" not in words
                else words["error"]
            )
            run.console.print(
                f"  {MODEL_LABELS[name]:<16} image→text R@1 {r['image_to_text/R@1']:5.1f}  "
                f"text→image R@1 {r['text_to_image/R@1']:5.1f}  {quality}"
            )
        chance = run.results["retrieval"]["untrained"]["chance"]["text_to_image/R@1"]
        fixed = run.results["words"]["untrained"]
        calibration = (
            f"; one fixed answer for every image ({', '.join(fixed['fixed_answer'][:5])}, …) "
            f"has caption-word P@10 {fixed['fixed_answer_precision']:.0f}%"
            if "error" not in fixed
            else ""
        )
        run.console.print(f"  chance text→image R@1 {chance:.1f}{calibration}")
        curve = sparsity_curve(
            head,
            data.holdout,
            cache_dir=cache,
            plot_path=run.out_dir / "sparsity.png",
            progress=False,
        )
    run.results["sparsity_curve"] = curve
    run.figures["sparsity"] = run.out_dir / "sparsity.png"
    if data.masks is not None:
        shown = "head" if run.results["head"]["bundled"] else "trained"  # the model of the search
        _patchdis(run, [(n, m) for n, m in models if n in ("untrained", shown)], data)


MODEL_LABELS = {
    "untrained": "untrained heads",
    "trained": "briefly trained",
    "head": "Flickr8k head",
}


def _word_quality(model: Any, data: DemoData, cache: Path) -> dict[str, Any]:
    """`lexvla.eval.words` on the held-out images and their captions (object recall with masks)."""
    from lexvla.eval.words import evaluate_words

    try:
        return evaluate_words(
            model, data.holdout, instances=data.masks, cache_dir=cache, progress=False
        )
    except LexVLAError as error:  # e.g. captions with no word of the vocabulary
        return {"error": f"word quality not measured: {error}"}


def _patchdis(run: DemoRun, models: list[tuple[str, Any]], data: DemoData) -> None:
    from lexvla.eval.patchdis import evaluate_patchdis, load_patchdis_data

    masks, class_names = load_patchdis_data(data.masks, images=data.images_dir)
    held_out = {Path(getattr(s, "path", "") or "").name for s in _records(data.holdout)}
    samples = [
        masks[i] for i in range(len(masks)) if Path(getattr(masks[i], "path", "")).name in held_out
    ]
    run.results["patchdis"] = {}
    for name, model in models:
        with torch.no_grad():
            result = evaluate_patchdis(
                model,
                samples,
                class_names,
                out_dir=run.out_dir / "patchdis" / name,
                background="relative",
                progress=False,
            )
        run.results["patchdis"][name] = {k: v for k, v in result.items() if k != "overlays"}
        run.figures["patchdis"] = list(result.get("overlays", []))[:4]  # the last model's
        run.console.print(
            f"  PatchDis mIoU {MODEL_LABELS[name]:<16} {result['mIoU']:.3f} on "
            f"{result['num_images']} images"
        )
    run.console.print(f"  ({result['rule']})")


def _records(dataset: Any) -> list[Any]:
    """Dataset items without decoding images where the dataset allows it."""
    return [dataset[i] for i in range(len(dataset))]


def _index_and_search(run: DemoRun, model: Any, data: DemoData) -> Any:
    from lexvla.index import build_index
    from lexvla.interpret.lexicon import merge_pieces
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
    encode_corpus(model, images, corpus, model_name=run.results["head"]["model"], progress=True)
    build_index(corpus, index)
    engine = SearchEngine(model, _open_index(index))
    searches = []
    for text in EXAMPLE_QUERIES:
        query = engine.query_from_text(text)
        hits = engine.search(query, k=3, explain=True)
        for hit in hits:  # the forms of a word as one word, with its share of the hit's score
            hit["shares"] = _merged_shares(hit["words"], hit["score"], model.vocab)
        merged = merge_pieces(torch.from_numpy(query.to_dense()), model.vocab.words)
        query_words = sorted(merged.items(), key=lambda kv: -kv[1])[:8]
        searches.append({"query": text, "query_words": query_words, "hits": hits})
        best = hits[0] if hits else None
        words = _word_shares(
            [(w["word"], w["contribution"]) for w in (best or {}).get("shares", [])[:4]],
            best["score"] if best else 0.0,
        )
        run.console.print(f"  [bold]{text!r}[/bold] → {best['key'] if best else '-'}  ({words})")
    run.results["searches"] = searches
    return engine


def _merged_shares(
    contributions: list[dict[str, Any]], score: float, vocab: Any
) -> list[dict[str, Any]]:
    """A hit's contributions with the forms of a word summed and named as a person reads them
    ("dog" + "dogs" -> dog, `vocab.merge_forms`), largest first, each with its share of the score."""
    parts = [(row["word"], row["contribution"]) for row in contributions]
    return [
        {"word": word, "contribution": total, "share": total / score if score > 0 else 0.0}
        for word, _, total in vocab.merge_forms(parts)
    ]


def _word_shares(contributions: list[tuple[str, float]], score: float) -> str:
    """'dog 12%, grass 7.3%, sky 0.42%': each word's share of the score it contributes to (as many
    digits as it takes for a share above zero to show above zero)."""
    from lexvla.demo.run_report import share_text

    if score <= 0:
        return ", ".join(word for word, _ in contributions)
    return ", ".join(f"{word} {share_text(value / score)}" for word, value in contributions)


def _open_index(path: Path) -> Any:
    from lexvla.index import SparseIndex

    return SparseIndex.open(path)


def _look_inside(run: DemoRun, model: Any, data: DemoData) -> None:
    """Word clouds, grounding heatmap and per-word explanation for two held-out images."""
    from lexvla.interpret.explain import image_report

    pages = []
    for sample in _records(data.holdout)[:2]:
        name = Path(getattr(sample, "path", "") or sample.key).stem
        with torch.no_grad():
            result = image_report(
                model,
                sample.path or sample.image,
                sample.captions[0],
                run.out_dir / "inside" / name,
                model_ref=run.results["head"]["model"],
            )
        pages.append(result)
        top = _word_shares(result.get("contributions", [])[:5], result.get("score", 0.0))
        image_words = ", ".join(word for word, _ in result.get("image_words", [])[:8])
        run.console.print(
            f"  {name}: score {result.get('score', 0):.3f} for {sample.captions[0]!r} ← {top}\n"
            f"    image words: {image_words}"
        )
    run.figures["inside"] = pages
