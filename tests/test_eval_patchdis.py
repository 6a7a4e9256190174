"""PatchDis: perfect-by-construction = 1.0, random ≈ chance, hand-computed mIoU, upsampling, overlays."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.data.transforms import grid_side
from lexvla.errors import LexVLAError
from lexvla.eval import patchdis as P

CLASSES = ["background", "dog", "dining table", "bus"]


def test_upsample_on_pixel_centres():
    grid = torch.tensor([[1, 2], [3, 4]])
    up = P.upsample_labels(grid, (3, 5))
    # rows: y -> floor((y + 0.5) * 2 / 3) = 0, 1, 1; cols: x -> floor((x + 0.5) * 2 / 5) = 0, 0, 1, 1, 1
    assert up.tolist() == [[1, 1, 2, 2, 2], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]
    assert torch.equal(P.upsample_labels(grid.flatten(), (2, 2)), grid)
    with pytest.raises(ValueError):
        grid_side(15)


def test_background_rule_and_ties():
    scores = torch.tensor([[[0.05, 0.02], [0.3, 0.3], [0.1, 0.4]]])  # (1, 3 patches, 2 classes)
    assert P.labels_from_scores(scores, 0.1).tolist() == [[0, 1, 2]]
    assert P.labels_from_scores(scores, 0.0).tolist() == [[1, 1, 2]]
    assert "< 0.1" in P.background_rule(0.1)


def test_relative_background_rule_scales_with_each_image():
    # image 0 best score 0.4, image 1 (the same pattern at a tenth of the scale) best 0.04:
    # relative to its own best, each image gets the same labels; an absolute cut cannot do that
    scores = torch.tensor([[[0.05, 0.02], [0.3, 0.3], [0.1, 0.4]]])
    both = torch.cat([scores, scores / 10])
    assert P.labels_from_scores(both, 0.5, "relative").tolist() == [[0, 1, 2], [0, 1, 2]]
    assert P.labels_from_scores(both, 0.1, "absolute").tolist() == [[0, 1, 2], [0, 0, 0]]
    assert "best patch-class score of its image" in P.background_rule(0.5, "relative")
    with pytest.raises(LexVLAError, match="background rule"):
        P.labels_from_scores(scores, 0.5, "median")


def test_hand_computed_miou():
    # 2x2 patch grid predicted [[1, 2], [0, 1]] upsampled to a 4x4 mask.
    pred = torch.tensor([[1, 2, 0, 1]])
    mask = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 255],
            [0, 0, 1, 1],
            [0, 1, 1, 1],
        ]
    )
    conf = P.patchdis_confusion(pred, [mask], 3)
    # predicted 4x4: [[1,1,2,2],[1,1,2,2],[0,0,1,1],[0,0,1,1]]; the 255 pixel is ignored.
    # class 0: TP 3 (pred 0 at 4 pixels, one is GT 1) -> IoU 3/4
    # class 1: TP 8, pred 1 at 8 pixels, GT 1 at 9 -> IoU 8/9
    # class 2: TP 3, pred 2 at 3 counted pixels, GT 3 -> IoU 1
    out = P.summarize_confusion(conf, ["bg", "a", "b"], 0.1)
    assert out["per_class_iou"] == pytest.approx({"bg": 0.75, "a": 8 / 9, "b": 1.0})
    assert out["mIoU"] == pytest.approx((0.75 + 8 / 9 + 1.0) / 3)
    assert out["mIoU/foreground"] == pytest.approx((8 / 9 + 1.0) / 2)
    assert out["pixel_accuracy"] == pytest.approx(14 / 15)


class PerfectModel:
    """Patch weights one-hot on the word of the ground-truth class; class names one-hot on theirs.

    Word j (j < C) is class j + 1; word C is a filler word that background patches hold.
    """

    def __init__(self, grids: dict[int, torch.Tensor], num_classes: int) -> None:
        self.grids = grids  # image id (red value) -> (P,) labels
        self.vocab_size = num_classes + 1
        self.cfg = SimpleNamespace(lexical=SimpleNamespace(sparsify="none", threshold=0.0, top_k=1))

    def encode_image(self, images, return_patches=False, crop=True):
        assert return_patches and not crop  # PatchDis needs whole images at patch level
        labels = torch.stack([self.grids[im.getpixel((0, 0))[0]] for im in images])  # (B, P)
        words = torch.where(labels == 0, self.vocab_size - 1, labels - 1)
        patches = torch.nn.functional.one_hot(words, self.vocab_size).float()
        return SimpleNamespace(image_weights=patches.amax(1), patch_weights=patches)

    def encode_text(self, texts):
        ids = torch.tensor([CLASSES.index(t) - 1 for t in texts])
        return SimpleNamespace(text_weights=torch.eye(self.vocab_size)[ids])


def _synthetic(n: int, side: int, seed: int):
    """Masks at odd resolutions that are exact pixel-centre upsamplings of a side x side grid."""
    gen = torch.Generator().manual_seed(seed)
    samples, grids = [], {}
    for i in range(n):
        grid = torch.randint(0, len(CLASSES), (side, side), generator=gen)
        h, w = 20 + 3 * i, 31 + 5 * i
        mask = P.upsample_labels(grid, (h, w)).numpy().astype(np.uint8)
        mask[0, 0] = 255  # an ignored pixel
        grids[i] = grid.flatten()
        samples.append((Image.new("RGB", (w, h), (i, 0, 0)), mask))
    return samples, grids


def test_perfect_model_scores_one(tmp_path):
    samples, grids = _synthetic(6, 4, seed=0)
    result = P.evaluate_patchdis(
        PerfectModel(grids, len(CLASSES) - 1),
        samples,
        CLASSES,
        threshold=0.5,
        thresholds=[1.5],
        batch_size=4,
        out_dir=tmp_path,
        progress=False,
    )
    assert result["mIoU"] == pytest.approx(1.0)
    assert result["mIoU/foreground"] == pytest.approx(1.0)
    assert result["grid"] == 4 and result["num_images"] == 6
    assert set(result["per_class_iou"]) == set(CLASSES)
    assert result["sweep"][1]["threshold"] == 1.5 and result["sweep"][1]["mIoU"] < 0.5
    assert len(result["overlays"]) == 6
    overlay = np.asarray(Image.open(result["overlays"][0]))
    assert overlay.std() > 10  # not blank
    assert "0.5" in P.patchdis_table(result)


def test_random_model_is_near_chance():
    num_classes, gen = 5, torch.Generator().manual_seed(0)
    patches = torch.rand(64, 256, 40, generator=gen)  # (B, P, V)
    classes = torch.rand(num_classes, 40, generator=gen)  # (C, V)
    labels = P.patchdis_predict(patches, classes, threshold=0.0)  # never background
    truth = torch.randint(1, num_classes + 1, (64, 16, 16), generator=gen)
    conf = P.patchdis_confusion(labels, list(truth.numpy()), num_classes + 1)
    # Independent labelings: IoU_c = p_c q_c / (p_c + q_c - p_c q_c) from the marginals (1/(2C-1)
    # when both are uniform; random class vectors are not, the longest wins more patches).
    p = conf[1:].sum(1).double() / conf.sum()
    q = conf[:, 1:].sum(0).double() / conf.sum()
    chance = float((p * q / (p + q - p * q)).mean())
    miou = P.summarize_confusion(conf, ["bg"] + list("abcde"), 0.0)["mIoU/foreground"]
    assert abs(miou - chance) < 0.02
    # Exchangeable classes (one-hot class words, i.i.d. patch weights): uniform -> 1 / (2C - 1).
    labels = P.patchdis_predict(patches, torch.eye(num_classes, 40), threshold=0.0)
    conf = P.patchdis_confusion(labels, list(truth.numpy()), num_classes + 1)
    miou = P.summarize_confusion(conf, ["bg"] + list("abcde"), 0.0)["mIoU/foreground"]
    assert abs(miou - 1 / (2 * num_classes - 1)) < 0.02


def test_tiny_model_end_to_end(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        (
            Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)),
            rng.integers(0, 4, (30, 45)),
        )
        for _ in range(3)
    ]
    result = P.evaluate_patchdis(tiny_model, samples, CLASSES, out_dir=tmp_path, progress=False)
    assert 0.0 <= result["mIoU"] <= 1.0
    assert result["threshold"] == 0.5 and result["background"] == "relative"
    absolute = P.evaluate_patchdis(
        tiny_model, samples, CLASSES, progress=False, background="absolute"
    )
    assert absolute["threshold"] == P.DEFAULT_THRESHOLD and absolute["rule"].endswith("0.1")
    assert result["grid"] == tiny_model.cfg.vision.image_size // 14
    assert result["sparsify"].startswith("threshold")


def test_bad_masks_name_the_fix(tiny_model):
    bad = [(Image.new("RGB", (8, 8)), np.full((8, 8), 7))]
    with pytest.raises(LexVLAError, match="class name per label"):
        P.evaluate_patchdis(tiny_model, bad, CLASSES, progress=False)
    with pytest.raises(LexVLAError, match="besides background"):
        P.evaluate_patchdis(tiny_model, bad, ["background"], progress=False)


def test_palette_is_voc():
    colours = P.palette(4)
    assert colours.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


class OracleModel:
    """Knows each image's mask: a patch's weights are one-hot on its majority ground-truth class."""

    def __init__(self, masks: dict[int, np.ndarray], class_names: list[str], side: int) -> None:
        self.masks, self.names, self.side = masks, class_names, side
        self.vocab_size = len(class_names)  # word c-1 = class c; last word = background filler
        self.cfg = SimpleNamespace(lexical=SimpleNamespace(sparsify="none", threshold=0.0, top_k=1))

    def grid(self, mask: np.ndarray) -> torch.Tensor:
        """Majority label of the pixels whose centres fall in each patch (as upsampling assigns)."""
        h, w = mask.shape
        rows = ((2 * np.arange(h) + 1) * self.side) // (2 * h)
        cols = ((2 * np.arange(w) + 1) * self.side) // (2 * w)
        cell = rows[:, None] * self.side + cols[None, :]
        votes = np.zeros((self.side * self.side, 256), dtype=np.int64)
        np.add.at(votes, (cell.ravel(), mask.ravel().astype(np.int64)), 1)
        votes[:, 255] = 0
        return torch.from_numpy(votes.argmax(1))

    def encode_image(self, images, return_patches=False, crop=True):
        labels = torch.stack([self.grid(self.masks[id(im)]) for im in images])  # (B, P)
        words = torch.where(labels == 0, self.vocab_size - 1, labels - 1)
        patches = torch.nn.functional.one_hot(words, self.vocab_size).float()
        return SimpleNamespace(image_weights=patches.amax(1), patch_weights=patches)

    def encode_text(self, texts):
        ids = torch.tensor([self.names.index(t) - 1 for t in texts])
        return SimpleNamespace(text_weights=torch.eye(self.vocab_size)[ids])


def test_synthetic_dataset_oracle():
    synthetic = pytest.importorskip("lexvla.data.synthetic")
    dataset = synthetic.SyntheticDataset(6, image_size=224, seed=1)  # 16 x 16 patches of 14 px
    samples = list(dataset)
    model = OracleModel({id(s.image): s.mask for s in samples}, dataset.class_names, side=16)
    shapes = P.evaluate_patchdis(model, samples, dataset.class_names, threshold=0.5, progress=False)
    # Pixel-level shapes: a patch-level oracle comes close, not to 1 (patch edges cut the shapes).
    assert 0.6 < shapes["mIoU"] < 1.0, shapes["mIoU"]
    # The same masks made patch-aligned (each replaced by its oracle grid): exactly 1.
    for s in samples:
        s.mask = P.upsample_labels(model.grid(s.mask).reshape(16, 16), s.mask.shape).numpy()
        model.masks[id(s.image)] = s.mask
    aligned = P.evaluate_patchdis(
        model, samples, dataset.class_names, threshold=0.5, progress=False
    )
    assert aligned["mIoU"] == pytest.approx(1.0)


def test_load_patchdis_data_formats(tmp_path):
    pytest.importorskip("lexvla.data.masks")
    dataset, names = P.load_patchdis_data("synthetic:3")
    assert names[0] == "background" and len(dataset) == 3
    with pytest.raises(LexVLAError, match="instances"):
        P.load_patchdis_data(tmp_path / "x.txt")


def test_voc_and_coco_files_through_run_patchdis(tiny_model, tmp_path):
    pytest.importorskip("lexvla.data.masks")
    # VOC layout: JPEGImages/<id>.jpg + SegmentationClass/<id>.png (palette index = class, 255 void).
    voc = tmp_path / "VOC"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:20, 10:30], mask[0, :] = 12, 255  # a "dog" and a void row
    Image.new("RGB", (40, 30), (90, 60, 30)).save(voc / "JPEGImages" / "a.jpg")
    png = Image.fromarray(mask, mode="P")
    png.putpalette(P.palette(256).ravel().tolist())
    png.save(voc / "SegmentationClass" / "a.png")
    result = P.run_patchdis(tiny_model, voc, out=tmp_path / "voc.json", progress=False)
    assert result["num_images"] == 1 and set(result["per_class_iou"]) >= {"background", "dog"}
    assert result["pixels"] == 30 * 40 - 40  # the void row is ignored
    # COCO instances: one polygon on one image.
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "coco" / "train2017" / "b.jpg")
    instances = {
        "images": [{"id": 1, "file_name": "b.jpg", "height": 30, "width": 40}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 200.0,
             "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }  # fmt: skip
    (tmp_path / "coco" / "annotations").mkdir()
    path = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps(instances))
    result = P.run_patchdis(tiny_model, path, out=tmp_path / "coco.json", progress=False)
    assert list(result["per_class_iou"]) == ["background", "person", "dog"]
    report = json.loads((tmp_path / "coco.json").read_text())
    assert report["data"]["classes"] == 3 and "background when" in report["settings"]["rule"]
