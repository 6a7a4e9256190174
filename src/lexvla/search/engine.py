"""`SearchEngine`: a LexVLA model plus a sparse index, with readable, steerable queries.

    engine = SearchEngine.open("runs/coco-index")          # loads the model the index records
    engine = SearchEngine.open(milvus="http://127.0.0.1:19530")   # the same over a Milvus collection
    query = engine.query_from_text("a dog on the beach").drop("beach").boost("dog", 2.0)
    for hit in engine.search(query, k=5):
        print(hit["score"], hit["key"], hit["words"][:3])

Every score is the dot product of the query's words and a document's stored words, so it can be read
word by word (`explain_match`), and the patches of an image that the query selects can be shown
(`grounding`).
"""

from __future__ import annotations

import bisect
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from lexvla.data.transforms import grid_side, load_image
from lexvla.errors import LexVLAError
from lexvla.interpret.grounding import text_patch_scores
from lexvla.interpret.lexicon import OTHER_WORDS, score_contributions
from lexvla.search.corpus import read_document_bytes, utf8_text
from lexvla.search.query import Query

if TYPE_CHECKING:
    from lexvla.index import LexicalIndex
    from lexvla.models.lexvla import LexVLA
    from lexvla.vocab import LexicalVocabulary

logger = logging.getLogger(__name__)

ImageLike = str | Path | bytes | Image.Image
EMPTY_QUERY_MESSAGE = "the query has no words: type a text, upload an image or add words"


class SearchEngine:
    """Model + index. Build with :meth:`open`.

    Args:
        model: the LexVLA model whose vocabulary the index uses.
        index: an opened :class:`lexvla.index.LexicalIndex` (a `SparseIndex` or a `MilvusIndex`).
        max_query_words: words kept in a query made from a text or an image (heaviest first, after
            the model's sparsification); 0 keeps all.
    """

    def __init__(self, model: LexVLA, index: LexicalIndex, *, max_query_words: int = 256) -> None:
        self.model = model.eval()
        self.index = index
        self.vocab = model.vocab
        self.max_query_words = max_query_words
        self._lock = threading.Lock()  # one model forward at a time (2 cores; torch threads inside)
        self._sorted_words = sorted(self.vocab.words)
        _check_same_vocabulary(self.vocab.words, index)

    @classmethod
    def open(
        cls,
        index_path: str | Path | None = None,
        model: LexVLA | str | None = None,
        *,
        milvus: str | None = None,
        collection: str = "lexvla",
        **kwargs: Any,
    ) -> SearchEngine:
        """Open an index and the model that encodes queries for it.

        Args:
            index_path: a folder written by `lexvla index build --out`.
            model: a model, or a preset / run / checkpoint name; None loads the model the index
                records.
            milvus: instead of `index_path`, a Milvus URI (a server or a Milvus Lite `.db` file)
                holding `collection` (`lexvla index build --milvus`).
        """
        if (index_path is None) == (milvus is None):
            raise LexVLAError("give exactly one index: its folder, or a Milvus URI (--milvus URI)")
        if milvus is None:
            from lexvla.index import SparseIndex

            index: LexicalIndex = SparseIndex.open(index_path)
            model = _load_model(model, index.model_ref, f"the index {index_path}")
        else:
            from lexvla.index.milvus import MilvusIndex

            info = MilvusIndex.describe(milvus, collection=collection)
            model = _load_model(model, info["model"], f"Milvus collection {collection!r}")
            index = MilvusIndex.open(milvus, model.vocab.words, collection=collection)
        return cls(model, index, **kwargs)

    def __len__(self) -> int:
        """Active (searchable) documents."""
        return len(self.index)

    @property
    def num_docs(self) -> int:
        """Document ids are 0..num_docs-1 (deleted documents keep their id until compaction)."""
        return self.index.num_docs

    def info(self) -> dict[str, Any]:
        """Index size, vocabulary size and the model reference, for display."""
        return {
            "documents": len(self.index),
            "vocab_size": self.vocab.size,
            "model": dict(self.index.model_ref or {}),
            "max_query_words": self.max_query_words,
        }

    # ------------------------------------------------------------------------------ queries
    def query_from_text(self, text: str) -> Query:
        """Encode a text with the model's text branch into a query (sparsified, top words kept)."""
        return self.queries_from_texts([text])[0]

    def queries_from_texts(self, texts: list[str]) -> list[Query]:
        """Encode several texts in one forward of the text branch: one query per text, in order.
        On the float32 inference path each is bit for bit its `query_from_text` (the text tower is
        batch-invariant there: tests/test_batch_invariance.py); elsewhere within float rounding."""
        texts = [query_text(text) for text in texts]
        with (
            self._lock,
            torch.no_grad(),
        ):  # no_grad, not inference_mode: model caches stay trainable
            weights = self.model.encode_text(texts).text_weights
        return [self._to_query(weights[i : i + 1], f"text: {text}") for i, text in enumerate(texts)]

    def query_from_image(self, image: ImageLike) -> Query:
        """Encode an image (path, bytes or PIL) into a query (sparsified, top words kept)."""
        name = Path(image).name if isinstance(image, str | Path) else "uploaded image"
        picture = load_image(image)
        with (
            self._lock,
            torch.no_grad(),
        ):
            weights = self.model.encode_image([picture]).image_weights
        return self._to_query(weights, f"image: {name}")

    def query_from_words(self, words: dict[str, float], source: str = "words") -> Query:
        """An explicit word -> weight query (unknown words raise LexVLAError with a hint)."""
        return Query(words, self.vocab, source)

    def _to_query(self, weights: torch.Tensor, source: str) -> Query:
        sparse = self.model.sparsify(weights.float(), max_words=self.max_query_words)[0]
        return Query.from_vector(sparse.cpu().numpy(), self.vocab, source)

    def complete(self, prefix: str, limit: int = 10) -> list[str]:
        """Vocabulary words starting with `prefix` (shortest first), for autocomplete."""
        prefix = prefix.strip().lower()
        if not prefix:
            return []
        found: list[str] = []
        for start in (prefix, "##" + prefix.lstrip("#")):
            lo = bisect.bisect_left(self._sorted_words, start)
            hi = bisect.bisect_left(self._sorted_words, start + "\U0010ffff")
            found.extend(w for w in self._sorted_words[lo:hi] if w not in found)
        found.sort(key=lambda w: (w.startswith("##") and not prefix.startswith("#"), len(w), w))
        return found[: max(limit, 0)]

    # ------------------------------------------------------------------------------ search
    def search(self, query: Query, k: int = 10, *, explain: bool = True) -> list[dict[str, Any]]:
        """The `k` best documents: `{"doc", "key", "score", "words", "metadata"}`, best first.

        `words` lists the per-word contributions (`{"word", "contribution"}`, largest first) when
        `explain`. An empty query returns no hit (and logs why).
        """
        if query.is_empty:
            logger.info(EMPTY_QUERY_MESSAGE)
            return []
        if k < 1:
            raise LexVLAError(f"k must be >= 1, got {k}")
        indices, values = query.to_arrays()
        hits = self.index.search(indices, values, k, explain=explain)
        return [_hit_dict(hit, self.vocab) for hit in hits]

    def explain_match(self, query: Query, doc: int, k: int = 10) -> dict[str, Any]:
        """Why `doc` matches `query`: the per-word products, the k largest plus the remainder.

        Returns:
            `{"doc", "key", "score", "words": [{"word", "query_weight", "doc_weight",
            "contribution"}], "remainder", "shared_words", "doc_words": [{"word", "weight"}],
            "missing": [query words the document lacks]}`; the contributions and remainder sum
            to the score.
        """
        doc_ids, doc_values = self.document_vector(doc)
        words = self.vocab.words
        stored = torch.zeros(self.vocab.size)
        stored[torch.from_numpy(doc_ids)] = torch.from_numpy(doc_values)
        q = torch.from_numpy(query.to_dense())
        parts = score_contributions(stored, q, words, k)  # k largest, then ("(other words)", rest)
        remainder = parts.pop()[1] if parts and parts[-1][0] == OTHER_WORDS else 0.0
        rows = []
        for word, contribution in parts:
            i = self.vocab.index_of(word)
            rows.append(
                {
                    "word": word,
                    "query_weight": float(q[i]),
                    "doc_weight": float(stored[i]),
                    "contribution": contribution,
                }
            )
        doc_order = np.argsort(-doc_values, kind="stable")[:40]
        present = {words[i] for i in doc_ids}
        return {
            "doc": int(doc),
            "key": self.document(doc).get("key", str(doc)),
            "score": sum(r["contribution"] for r in rows) + remainder,
            "words": rows,
            "remainder": remainder,
            "shared_words": int(((q > 0) & (stored > 0)).sum()),
            "doc_words": [
                {"word": words[doc_ids[i]], "weight": float(doc_values[i])} for i in doc_order
            ],
            "missing": [w for w, _ in query.top(50) if w not in present][:10],
        }

    # ------------------------------------------------------------------------------ documents
    def document(self, doc: int) -> dict[str, Any]:
        """The stored metadata of a document id (LexVLAError when the id is not in the index)."""
        self.check_doc(doc)
        return dict(self.index.document(int(doc)))

    def document_vector(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored sparse vector of a document: (word ids int, weights float32)."""
        self.check_doc(doc)
        ids, values = self.index.vector(int(doc))
        return np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float32)

    def document_image(self, doc: int) -> Image.Image:
        """The image of a document, read from where the corpus recorded it (never from a request)."""
        return load_image(read_document_bytes(self.document(doc)))

    def check_doc(self, doc: int) -> None:
        """Raise LexVLAError unless `doc` is the id of an active document of the index."""
        if isinstance(doc, bool) or not isinstance(doc, int | np.integer):
            raise LexVLAError(f"document id must be an integer, got {doc!r}")
        if not 0 <= int(doc) < self.num_docs or self.index.is_deleted(int(doc)):
            raise LexVLAError(
                f"document {doc} is not in the index (ids are 0..{self.num_docs - 1})"
            )

    # ------------------------------------------------------------------------------ looking inside
    def grounding(
        self, query: Query, image: ImageLike | None = None, *, doc: int | None = None
    ) -> dict[str, Any]:
        """Patch scores of an image for a query: `patch_weights · query` on the patch grid.

        The whole image is resized to the model's square input (no crop), so the grid covers the
        full picture and can be laid over it.

        Returns:
            `{"rows", "cols", "scores": rows x cols floats, "max", "words": rows x cols of the query
            word that contributes most to each patch ("" where none)}`.
        """
        picture = self.document_image(doc) if doc is not None else load_image(image)
        patches = self._patch_weights(picture)  # (P, V)
        q = torch.from_numpy(query.to_dense())
        scores = text_patch_scores(patches, q)  # (P,)
        best = (patches * q).argmax(-1)  # the query word each patch matches most
        rows = cols = grid_side(patches.shape[0])
        words = [self.vocab.words[int(b)] if float(s) > 0 else "" for b, s in zip(best, scores)]
        return {
            "rows": rows,
            "cols": cols,
            "scores": scores.view(rows, cols).tolist(),
            "max": float(scores.max()) if scores.numel() else 0.0,
            "words": [words[r * cols : (r + 1) * cols] for r in range(rows)],
        }

    def describe_image(self, image: ImageLike, k: int = 25, per_patch: int = 3) -> dict[str, Any]:
        """Image-level top words and each patch's top words (for the page's upload section)."""
        picture = load_image(image)
        with (
            self._lock,
            torch.no_grad(),
        ):
            out = self.model.encode_image([picture], return_patches=True, crop=False)
        image_words = self.model.top_words(out.image_weights.float(), k, merge_pieces=True)[0]
        patches = out.patch_weights[0].float()  # (P, V)
        rows = cols = grid_side(patches.shape[0])
        per = self.model.top_words(patches, per_patch, merge_pieces=True)
        grid = [
            [[{"word": w, "weight": v} for w, v in per[r * cols + c]] for c in range(cols)]
            for r in range(rows)
        ]
        return {
            "words": [{"word": w, "weight": v} for w, v in image_words],
            "rows": rows,
            "cols": cols,
            "patches": grid,
        }

    def _patch_weights(self, picture: Image.Image) -> torch.Tensor:
        with (
            self._lock,
            torch.no_grad(),
        ):
            out = self.model.encode_image([picture], return_patches=True, crop=False)
        return out.patch_weights[0].float().cpu()


def query_text(text: str) -> str:
    """The text a query encodes: stripped, UTF-8-safe; an empty one is refused (LexVLAError)."""
    if not isinstance(text, str) or not text.strip():
        raise LexVLAError("the text query is empty: type a few words describing the image")
    return utf8_text(text).strip()  # a JSON "\\ud800" escape is no text a tokenizer takes


def _hit_dict(hit: Any, vocab: LexicalVocabulary) -> dict[str, Any]:
    """A hit as a dict; its per-word contributions merged over the forms of one word ("dog" and
    "dogs" are one row, their products summed): `word` is the form that contributes most (a
    vocabulary word, so it can steer a query), `group` the word as a person reads it."""
    metadata = dict(getattr(hit, "metadata", None) or {})
    contributions = [
        {"word": form, "group": group, "contribution": total}
        for group, form, total in vocab.merge_forms(getattr(hit, "words", None) or [])
    ]
    return {
        "doc": int(hit.doc),
        "key": str(getattr(hit, "key", None) or metadata.get("key", hit.doc)),
        "score": float(hit.score),
        "words": contributions,
        "metadata": metadata,
    }


def _load_model(model: LexVLA | str | Path | None, model_ref: dict[str, Any], where: str) -> LexVLA:
    """`model` (a model or a name), or else the model the index records."""
    from lexvla.models.factory import create_model

    if model is None:
        model = (model_ref or {}).get("name")
        if not model:
            raise LexVLAError(
                f"{where} does not record which model encoded it: pass "
                "the model explicitly (--model PRESET|RUN|CHECKPOINT)"
            )
    return create_model(model) if isinstance(model, str | Path) else model


def _check_same_vocabulary(words: tuple[str, ...], index: LexicalIndex) -> None:
    index_words = list(index.vocab)
    if index_words != list(words):
        raise LexVLAError(
            f"the index was built with a different vocabulary ({len(index_words)} words) than "
            f"the model's ({len(words)} words): open it with the model that encoded the corpus"
        )
