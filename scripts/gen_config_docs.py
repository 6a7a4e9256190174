"""Generate docs/configuration.md from the config dataclasses (fields, types, defaults, comments).

.venv/bin/python scripts/gen_config_docs.py          # rewrite docs/configuration.md
.venv/bin/python scripts/gen_config_docs.py --check  # exit 1 when the file is out of date
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from lexvla import config
from lexvla.presets import list_presets

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
SECTIONS = [
    ("model.vision", config.VisionConfig),
    ("model.text", config.TextConfig),
    ("model.lexical", config.LexicalConfig),
    ("model", config.ModelConfig),
    ("loss", config.LossConfig),
    ("data", config.DataConfig),
    ("train", config.TrainConfig),
    ("eval", config.EvalConfig),
]


def field_comments(cls: type) -> dict[str, str]:
    """Comments on or just above each field line of a dataclass's source."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+(?:=(.*?))?(?:\s+#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "class ", '"""')):
            comments[match.group(1)] = " ".join(
                pending + ([match.group(3)] if match.group(3) else [])
            )
        pending = []
    return comments


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/lexvla/config.py` by `scripts/gen_config_docs.py`; do not edit by hand.",
        "Override any field with `--set key=value` (values are JSON; plain strings need no quotes), e.g.",
        "`lexvla train --preset tiny --set train.steps=40 --set model.lexical.vocab_rule=word-start`.",
        "A value outside its allowed range or values, or a float that is not finite, is refused when the",
        "config is built, naming its key.",
        f"Presets: {', '.join(f'`{p}`' for p in list_presets())} (`lexvla presets`).",
        "",
    ]
    for prefix, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        lines += [
            f"## `{prefix}`",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = json.dumps(default, default=str)
            shown = shown if len(shown) < 60 else shown[:57] + "…"
            type_name = re.sub(
                r"typing\.", "", getattr(hints[f.name], "__name__", str(hints[f.name]))
            )
            meaning = comments.get(f.name, "").replace("|", "\\|")
            allowed = config.RANGES.get(f"{prefix}.{f.name}")
            choices = config.CHOICES.get(f"{prefix}.{f.name}")
            if choices is not None:
                allowed = " \\| ".join(f"`{c}`" for c in choices)
            if allowed is not None:
                meaning = f"{meaning.rstrip('. ')}. Allowed: {allowed}.".lstrip(". ")
            shown = shown.replace("|", "\\|")
            lines.append(f"| `{prefix}.{f.name}` | {type_name} | `{shown}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python scripts/gen_config_docs.py")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
