"""Tokenizer loading: hub names, local folders, prepared offline models and the built-in tiny tokenizer.

`builtin:tiny-words` is a small word-level tokenizer built deterministically in code from
`resources/tiny_words.txt` (about 3.7k common English and visual words, so most words of real captions
such as COCO's are kept), used by the `tiny` preset and the tests.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import string

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lexvla import assets
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

TINY_TOKENIZER = "builtin:tiny-words"
_TINY_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def tiny_word_list() -> list[str]:
    """The words of the tiny tokenizer, in their fixed order."""
    text = (
        importlib.resources.files("lexvla.resources").joinpath("tiny_words.txt").read_text("utf-8")
    )
    return text.split()


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tokens = list(_TINY_SPECIALS) + list(string.punctuation) + list(string.digits)
    tokens += list(string.ascii_lowercase)
    tokens += [w for w in tiny_word_list() if w not in set(tokens)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The deterministic word-level tokenizer of the `tiny` preset (same ids on every machine)."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by reference: `builtin:tiny-words`, `offline:NAME`, a local folder or a hub name.

    A hub name whose tokenizer has an identical prepared offline copy (the Llama 2 tokenizer) uses the
    copy, so the `paper` preset's vocabulary is computed without a hub.
    """
    if ref == TINY_TOKENIZER:
        return build_tiny_tokenizer()
    offline = assets.offline_tokenizer_for(ref)
    path = offline or assets.resolve_reference(ref)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LexVLAError(
            f"cannot load tokenizer '{ref}': {err}. Give a local folder, a hub name (with hub access), "
            "or an offline model prepared by `lexvla assets prepare`."
        ) from None
