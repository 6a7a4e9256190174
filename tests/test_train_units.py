"""Trainer building blocks: schedule, parameter groups, feature caches, metrics log, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lexvla.config import TrainConfig
from lexvla.train.features import ImageFeatureCache, TextFeatureCache, module_fingerprint
from lexvla.train.optim import cosine_with_warmup, create_optimizer, parameter_groups
from lexvla.train.runlog import RunLogger


def test_cosine_with_warmup_values():
    assert cosine_with_warmup(0, 4, 104) == pytest.approx(0.25)
    assert cosine_with_warmup(3, 4, 104) == pytest.approx(1.0)
    assert cosine_with_warmup(4, 4, 104) == pytest.approx(1.0)
    assert cosine_with_warmup(54, 4, 104) == pytest.approx(0.5)
    assert cosine_with_warmup(104, 4, 104) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(500, 4, 104) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(10, 0, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_parameter_groups_exclude_norms_biases_and_temperature(tiny_model):
    cfg = TrainConfig(lr=1e-3, codebook_lr=1e-4, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(tiny_model.trainable_parameters(), cfg)}
    names = {id(p): n for n, p in tiny_model.trainable_parameters().items()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert "logit_scale" in no_decay
    assert all(n.endswith(".bias") or "norm" in n or n == "logit_scale" for n in no_decay)
    assert not any(n.endswith(".bias") or "norm" in n for n in decay)
    assert [names[id(p)] for p in groups["codebook"]["params"]] == ["vision.codebook"]
    assert groups["codebook"]["lr"] == 1e-4 and groups["decay"]["weight_decay"] == 0.1
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(tiny_model.trainable_parameters())
    assert isinstance(create_optimizer(tiny_model.trainable_parameters(), cfg), torch.optim.AdamW)


def test_fused_optimizer_updates_like_the_per_tensor_loop():
    """create_optimizer takes AdamW's fused kernel on the CPU; three steps of it move every
    parameter group (decay, no decay, codebook learning rate) as the reference per-tensor loop does."""
    cfg = TrainConfig(lr=1e-2, codebook_lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    shapes = {"vision.codebook": (7, 5), "adapter.weight": (5, 4), "adapter.bias": (5,)}
    start = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]

    def run(make):
        params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
        optimizer = make(params)
        for step_grads in grads:
            for n, p in params.items():
                p.grad = step_grads[n].clone()
            optimizer.step()
        return optimizer, params

    fused, got = run(lambda params: create_optimizer(params, cfg))
    assert fused.defaults["fused"] is True
    _, want = run(
        lambda params: torch.optim.AdamW(
            parameter_groups(params, cfg), betas=(0.9, 0.98), eps=1e-6, foreach=False
        )
    )
    for name in shapes:
        assert not torch.equal(got[name], start[name]), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_image_feature_cache_computes_each_image_once(tmp_path):
    calls = []

    def compute(pixels):
        calls.append(len(pixels))
        return pixels.mean(dim=(2, 3)).unsqueeze(1).repeat(1, 4, 1)  # (B, 4, 3)

    pixels = torch.randn(3, 3, 8, 8)
    cache = ImageFeatureCache(tmp_path, "fp")
    first = cache.get(pixels, compute)
    again = cache.get(torch.cat([pixels[1:], torch.randn(1, 3, 8, 8)]), compute)
    assert calls == [3, 1]
    torch.testing.assert_close(again[:2], first[1:])
    fresh = ImageFeatureCache(tmp_path, "fp", memory=False)  # from disk only
    torch.testing.assert_close(fresh.get(pixels, compute), first)
    assert calls == [3, 1] and fresh.hits == 3
    assert ImageFeatureCache(tmp_path, "other").get(pixels[:1], compute).shape == (1, 4, 3)
    assert calls == [3, 1, 1]  # another fingerprint never reuses these features


def test_text_feature_cache():
    calls = []

    def compute(captions):
        calls.append(list(captions))
        return torch.tensor([[float(len(c))] for c in captions])

    cache = TextFeatureCache()
    out = cache.get(["ab", "c", "ab"], compute)
    assert out.squeeze(1).tolist() == [2.0, 1.0, 2.0] and calls == [["ab", "c"]]
    cache.get(["c"], compute)
    assert len(calls) == 1


def test_module_fingerprint_changes_with_weights():
    layer = torch.nn.Linear(4, 4)
    before = module_fingerprint(layer, [224])
    assert module_fingerprint(layer, [224]) == before and module_fingerprint(layer, [256]) != before
    with torch.no_grad():
        layer.weight[0, 0] += 1
    assert module_fingerprint(layer, [224]) != before


def test_run_logger_drops_steps_after_resume_point(tmp_path):
    log = RunLogger(tmp_path, 10, progress=False)
    for step in range(1, 6):
        log.step(step, {"loss": 1.0 / step, "samples": 4.0}, log=True)
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # torn line of a killed process
    log = RunLogger(tmp_path, 10, start_step=3, progress=False)
    log.step(4, {"loss": 0.5, "samples": 4.0}, log=True)
    log.close()
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_dataset_fingerprint_follows_file_contents_not_paths_or_times(tmp_path, monkeypatch):
    """The same bytes named from another directory, copied or touched key the same feature cache;
    other bytes or captions do not."""
    import os
    import shutil
    from types import SimpleNamespace

    from lexvla.train.features import dataset_fingerprint

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)

    def key(path: str, caption: str = "a dog") -> str:
        record = SimpleNamespace(key="a", path=path, captions=[caption])
        return dataset_fingerprint(SimpleNamespace(records=[record]))

    first = key("data/a.jpg")
    assert key(str(tmp_path / "data" / "a.jpg")) == first
    os.utime(tmp_path / "data" / "a.jpg", (1, 1))  # touched
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    assert key("data/a.jpg") == key("copy/a.jpg") == first
    assert key("data/a.jpg", "a cat") != first
    (tmp_path / "data" / "a.jpg").write_bytes(b"xy")
    assert key("data/a.jpg") != first


def test_module_fingerprint_does_not_depend_on_the_thread_count():
    # A parallel sum's last bits follow the number of threads; the cache key must not (a run with
    # OMP_NUM_THREADS=1 once missed the features a 2-thread run had cached).
    layer = torch.nn.Linear(2048, 2048)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)))
    threads = torch.get_num_threads()
    try:
        prints = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            prints.add(module_fingerprint(layer))
    finally:
        torch.set_num_threads(threads)
    assert len(prints) == 1
    with torch.no_grad():
        layer.weight[1000, 7] += 1e-3  # one weight, off the strided sample
    assert module_fingerprint(layer) not in prints
