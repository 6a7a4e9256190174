"""Test-time flip averaging: does the mirror image's vector, averaged in, make an image's words better?

    python experiments/tries/flip_average.py RUN/model OUT.json

Encodes Flickr8k `val` (1,000 photos) with a trained model twice (the photo and its mirror image) and
measures the image caption-word precision@10 of the plain vector, the mirror's, their mean and their
element-wise max (`lexvla.eval.words`, as `lexvla eval words` does); and, for the plain vectors, which
words of the top-10 are most often wrong.
"""

import json
import sys
import time
from collections import Counter

import torch

from lexvla.eval.retrieval import collect_retrieval_data
from lexvla.eval.runs import load_captioned_data
from lexvla.eval.words import fold_vocabulary, precision_at_k, top_word_ids
from lexvla.models.lexvla import LexVLA
from lexvla.vocab import caption_words

FLICKR8K = "/work/shared/data/flickr8k"


def word_errors(weights, groups, words, truths) -> dict:
    """Of each image's top-10 words: the share right at each rank, and the words most often wrong."""
    right, wrong, by_rank = Counter(), Counter(), [0] * 10
    for truth, row in zip(truths, top_word_ids(weights.float(), groups, len(words), 10).tolist()):
        for rank, group in enumerate(row):
            word = words[group]
            (right if word in truth else wrong)[word] += 1
            by_rank[rank] += word in truth
    return {
        "right_share_by_rank": [round(n / len(truths), 3) for n in by_rank],
        "wrong": wrong.most_common(20),
        "right": right.most_common(20),
        "wrong_total": sum(wrong.values()),
        "slots": 10 * len(truths),
    }


def main(model_dir: str, out: str) -> None:
    model = LexVLA.from_pretrained(model_dir).eval()
    dataset, _ = load_captioned_data(
        f"{FLICKR8K}/annotations/dataset_flickr8k.json", images=f"{FLICKR8K}/images", split="val"
    )
    data = collect_retrieval_data(dataset)
    captions = [[] for _ in data.images]
    for caption, owner in zip(data.captions, data.text_to_image.tolist()):
        captions[owner].append(caption)
    truths = [caption_words(c) for c in captions]
    groups, words = fold_vocabulary(model.vocab.words)
    plain, mirror = [], []
    start = time.time()
    with torch.no_grad():
        for i in range(0, len(data.images), 32):
            pixels = model.preprocess(data.images[i : i + 32])  # (B, 3, S, S)
            plain.append(model.encode_image(pixels).image_weights)
            mirror.append(model.encode_image(pixels.flip(-1)).image_weights)
    P, M = torch.cat(plain), torch.cat(mirror)  # (N, V)
    result = {"model": model_dir, "images": len(P), "seconds": round(time.time() - start, 1)}
    for name, weights in [
        ("plain", P),
        ("mirror", M),
        ("mean", (P + M) / 2),
        ("max", P.maximum(M)),
    ]:
        top = top_word_ids(weights.float(), groups, len(words), 10)  # (N, 10)
        result[f"image_precision/{name}"] = 100 * float(precision_at_k(top, words, truths).mean())
    result["word_errors"] = word_errors(P, groups, words, truths)
    print(json.dumps(result, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
