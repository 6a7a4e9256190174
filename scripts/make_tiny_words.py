"""Regenerate src/lexvla/resources/tiny_words.txt, the word list of the `tiny` preset's tokenizer.

Words: the hand-written visual/caption words of scripts/visual_words.txt, then the most frequent
word-start tokens of SmolLM2's byte-level BPE (lowest ids = earliest merges = most frequent), 3,600 of
them. Needs the prepared offline model (`lexvla assets prepare`). The committed list is the output;
tests never run this script.

    .venv/bin/python scripts/make_tiny_words.py
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoTokenizer

from lexvla.assets import resolve_reference

ROOT = Path(__file__).resolve().parents[1]
NUM_BPE_WORDS = 3600


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_reference("offline:smollm2-135m"))
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    bpe = [tok[1:] for tok, _ in by_id if re.fullmatch(r"\u0120[a-z]{2,}", tok)]
    visual = (ROOT / "scripts/visual_words.txt").read_text().split()
    words = list(dict.fromkeys(visual + bpe[:NUM_BPE_WORDS]))
    out = ROOT / "src/lexvla/resources/tiny_words.txt"
    out.write_text("\n".join(words) + "\n", encoding="utf-8")
    print(f"wrote {len(words)} words to {out}")


if __name__ == "__main__":
    main()
