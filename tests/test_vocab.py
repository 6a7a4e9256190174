"""Lexical vocabulary rules on SentencePiece, byte-level and word-level vocabularies."""

from __future__ import annotations

import pytest

from lexvla.errors import LexVLAError
from lexvla.vocab import LexicalVocabulary, detect_marker

SP = {
    "<unk>": 0,
    "<s>": 1,
    "▁the": 2,
    "room": 3,
    "▁a": 4,
    "▁Dog": 5,
    "▁dog": 6,
    "s": 7,
    "▁42": 8,
    "ing": 9,
    "▁café": 10,
}
BL = {"<|endoftext|>": 0, "Ġthe": 1, "room": 2, "Ġroom": 3, "Ġx": 4, "ĠCat": 5, "ab": 6}


def test_marker_detection():
    assert detect_marker(SP) == "▁"
    assert detect_marker(BL) == "Ġ"
    assert detect_marker({"dog": 0, "cat": 1}) == ""


def test_pieces_rule_sentencepiece():
    vocab = LexicalVocabulary.from_token_map(SP, "pieces")
    assert vocab.token_ids == (2, 3, 6, 9)
    assert vocab.words == ("the", "##room", "dog", "##ing")


def test_word_start_rule_sentencepiece():
    vocab = LexicalVocabulary.from_token_map(SP, "word-start")
    assert vocab.words == ("the", "dog")


def test_pieces_rule_byte_level_keeps_word_and_continuation_apart():
    vocab = LexicalVocabulary.from_token_map(BL, "pieces")
    assert dict(zip(vocab.words, vocab.token_ids)) == {"the": 1, "##room": 2, "room": 3, "##ab": 6}


def test_word_level_tokens_all_start_words():
    vocab = LexicalVocabulary.from_token_map({"<pad>": 0, "dog": 1, "a": 2, "cat": 3, ",": 4})
    assert vocab.words == ("dog", "cat")


def test_round_trip_fingerprint_and_lookup(tmp_path):
    vocab = LexicalVocabulary.from_token_map(SP)
    vocab.save(tmp_path / "vocab.json")
    again = LexicalVocabulary.load(tmp_path / "vocab.json")
    assert again == vocab and again.fingerprint() == vocab.fingerprint()
    assert vocab.index_of("dog") == 2
    with pytest.raises(LexVLAError, match="not in the lexical vocabulary"):
        vocab.index_of("zebra")


def test_unknown_rule():
    with pytest.raises(LexVLAError, match="word-start"):
        LexicalVocabulary.from_token_map(SP, "letters")


@pytest.mark.assets
def test_llama2_vocabulary_size(llama2_tokenizer_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_path)
    assert len(tokenizer) == 32000
    vocab = LexicalVocabulary.from_tokenizer(tokenizer, "pieces")
    assert vocab.size == 17182
    assert "dog" in vocab.words and "##ing" in vocab.words


@pytest.mark.assets
def test_smollm2_vocabulary_sizes(small_offline_model):
    tokenizer = small_offline_model.tokenizer
    assert LexicalVocabulary.from_tokenizer(tokenizer, "pieces").size == 33116
    assert LexicalVocabulary.from_tokenizer(tokenizer, "word-start").size == 21504
