"""The repository stands alone: the COCO demo set bundled in src/lexvla/resources/demo-coco is complete,
consistent, licensed and within its size budget; its annotations match the downscaled originals; the
demo's data step finds it when ../shared is absent; a plain `git clone` runs that step and a README
example. The clone tests are `slow`; the comparison with the full-size coco-mini needs ../shared.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla.data.masks import CocoInstanceMasks, annotation_mask, decode_rle, encode_rle
from lexvla.errors import LexVLAError

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts import make_demo_data as mk  # noqa: E402

BUNDLED = REPO_ROOT / "src" / "lexvla" / "resources" / "demo-coco"
MAX_BYTES = 5_000_000
SMALL_OBJECT = 32 * 32  # COCO calls instances under 32² px "small"; their IoU is boundary-dominated
README_ENCODE = "lexvla encode --image "


def _json(name: str) -> dict:
    return json.loads((BUNDLED / name).read_text(encoding="utf-8"))


def _bundled_files() -> list[Path]:
    return sorted(p for p in BUNDLED.rglob("*") if p.is_file())


def _iou(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts."""
    return int((a & b).sum()), int((a | b).sum())


# ------------------------------------------------------------------------------ the bundled files
def test_every_bundled_image_has_captions_and_its_declared_size():
    captions = _json(mk.CAPTIONS)
    by_image: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    listed = {im["file_name"]: im for im in captions["images"]}
    on_disk = {p.name for p in (BUNDLED / "train2017").glob("*")}
    assert set(listed) == on_disk and len(on_disk) >= 16  # enough for the demo's 16 held out
    for name, im in listed.items():
        assert len(by_image.get(im["id"], [])) >= 1, f"{name} has no caption"
        with Image.open(BUNDLED / "train2017" / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (im["width"], im["height"]), name
            assert max(image.size) <= 320 and not image.getexif(), name


def test_bundled_instances_decode_to_masks_inside_their_images():
    captions, instances = _json(mk.CAPTIONS), _json(mk.INSTANCES)
    assert instances["images"] == captions["images"]
    images = {im["id"]: im for im in instances["images"]}
    assert {a["image_id"] for a in instances["annotations"]} == set(images)  # every image has some
    for ann in instances["annotations"]:
        im = images[ann["image_id"]]
        mask = annotation_mask(ann, im["height"], im["width"])
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
        if ann["area"] >= 4:
            assert mask.any(), f"annotation {ann['id']} decodes to an empty mask"
        rows, cols = np.nonzero(mask)
        if len(rows):  # pixel centres inside the box (1 px of slack for rounding)
            assert cols.min() + 0.5 >= x - 1 and cols.max() + 0.5 <= x + w + 1, ann["id"]
            assert rows.min() + 0.5 >= y - 1 and rows.max() + 0.5 <= y + h + 1, ann["id"]
    masks = CocoInstanceMasks(BUNDLED / mk.INSTANCES)  # the PatchDis reader finds the images
    sample = masks[0]
    assert Path(sample.path).is_file() and sample.mask.shape == sample.image.size[::-1]
    assert (sample.mask > 0).any()


def test_every_bundled_image_has_its_licence_listed():
    table = _json("licences.json")
    licences_md = (BUNDLED / "LICENSES.md").read_text(encoding="utf-8")
    assert table["annotations"]["url"] == "https://creativecommons.org/licenses/by/4.0/"
    assert "CC BY 4.0" in licences_md
    coco = {lic["id"]: lic for lic in _json(mk.INSTANCES)["licenses"]}
    rows = {row["file_name"]: row for row in table["images"]}
    images = _json(mk.CAPTIONS)["images"]
    assert set(rows) == {im["file_name"] for im in images}
    for im in images:
        row = rows[im["file_name"]]
        assert row["licence"]["url"] == coco[im["license"]]["url"]
        assert row["licence"]["url"].startswith("http://creativecommons.org/licenses/")
        assert row["licence"]["name"] and row["flickr_url"] == im["flickr_url"]
        line = next(x for x in licences_md.splitlines() if x.startswith(f"| {im['file_name']} "))
        assert row["licence"]["url"] in line and im["flickr_url"] in line


def test_bundled_set_fits_the_budget_and_ships_in_the_wheel():
    files = _bundled_files()
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"the demo set is {total / 1e6:.2f} MB, over 5 MB"
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lexvla"]
    package = REPO_ROOT / "src" / "lexvla"
    for path in files:  # setuptools globs: '*' does not cross '/'
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), (
            f"{rel} is not package data: add it to [tool.setuptools.package-data]"
        )


def test_readme_examples_use_files_of_a_plain_clone():
    """No README example outside its optional ../shared section reads ../shared; the bundled paths
    the README names exist."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    optional = readme.index("## More data: `../shared` (optional)")
    end = readme.index("\n## ", optional + 1)
    examples = (readme[:optional] + readme[end:]).split("```")[1::2]  # fenced code blocks
    assert len(examples) >= 3 and not [e for e in examples if "../shared" in e]
    paths = {
        word.strip("\"'`,()[]\\")
        for word in readme.split()
        if word.strip("\"'`([").startswith("src/lexvla/resources/demo-coco")
    }
    assert len(paths) >= 3
    for path in paths:
        assert (REPO_ROOT / path).exists(), path


# ------------------------------------------------------------------------------ rescaling
def test_rescale_square_polygon_and_rle_rectangle_hand_computed():
    """640x480 -> 320x240: a 100x60 box at (20, 10) becomes 50x30 at (10, 5), exactly."""
    assert mk.scaled_size(640, 480) == (320, 240) and mk.scaled_size(480, 640) == (240, 320)
    assert mk.scaled_size(200, 100) == (200, 100)  # never enlarged
    poly = {"id": 1, "segmentation": [[20, 10, 120, 10, 120, 70, 20, 70]], "bbox": [20, 10, 100, 60],
            "area": 6000.0, "iscrowd": 0}  # fmt: skip
    out = mk.rescale_annotation(poly, (640, 480), (320, 240))
    assert out["segmentation"] == [[10, 5, 60, 5, 60, 35, 10, 35]]
    assert out["bbox"] == [10, 5, 50, 30] and out["area"] == 1500.0
    box = np.zeros((480, 640), dtype=bool)
    box[10:70, 20:120] = True
    crowd = {**poly, "id": 2, "iscrowd": 1, "segmentation": encode_rle(box)}
    rle = mk.rescale_annotation(crowd, (640, 480), (320, 240))["segmentation"]
    expected = np.zeros((240, 320), dtype=bool)
    expected[5:35, 10:60] = True
    assert rle["size"] == [240, 320] and np.array_equal(decode_rle(rle), expected)
    for ann in (out, {**crowd, "segmentation": rle}):
        assert np.array_equal(annotation_mask(ann, 240, 320), expected)


def _match_downscaled(
    pairs: list[tuple[dict, tuple[int, int], dict, tuple[int, int]]],
) -> tuple[list[tuple[float, float]], float, list]:
    """Per instance (rescaled area, IoU) of the rescaled annotation's mask vs the original mask
    downscaled by area averaging; the pixel-weighted IoU of all; instances that vanished."""
    per, inter_sum, union_sum, vanished = [], 0, 0, []
    for old, (w, h), new, (nw, nh) in pairs:
        reference = mk.downscale_mask(annotation_mask(old, h, w), nw, nh)
        inter, union = _iou(reference, annotation_mask(new, nh, nw))
        per.append((new["area"], inter / union if union else 1.0))
        inter_sum, union_sum = inter_sum + inter, union_sum + union
        if new["area"] >= 4 and inter == 0:
            vanished.append(new["id"])
    return per, inter_sum / union_sum, vanished


def _assert_close(per: list[tuple[float, float]], overall: float, vanished: list) -> None:
    large = [iou for area, iou in per if area >= SMALL_OBJECT]
    assert len(large) >= 50 and min(large) > 0.9, sorted(large)[:5]
    assert overall > 0.97 and not vanished, (overall, vanished)


def test_rescaled_annotations_match_the_downscaled_masks():
    """The bundled annotations halved again (320 -> 160 px) against their own masks downscaled."""
    instances = _json(mk.INSTANCES)
    images = {im["id"]: im for im in instances["images"]}
    pairs = []
    for ann in instances["annotations"]:
        im = images[ann["image_id"]]
        old, new = (im["width"], im["height"]), mk.scaled_size(im["width"], im["height"], 160)
        pairs.append((ann, old, mk.rescale_annotation(ann, old, new), new))
    _assert_close(*_match_downscaled(pairs))


@pytest.mark.assets
def test_bundled_annotations_match_coco_mini_downscaled_and_rebuild_identically(coco_mini):
    source = {a["id"]: a for a in json.loads((coco_mini / mk.INSTANCES).read_text())["annotations"]}
    full = {im["id"]: im for im in json.loads((coco_mini / mk.INSTANCES).read_text())["images"]}
    instances = _json(mk.INSTANCES)
    small = {im["id"]: im for im in instances["images"]}
    pairs = [
        (
            source[a["id"]],
            (full[a["image_id"]]["width"], full[a["image_id"]]["height"]),
            a,
            (small[a["image_id"]]["width"], small[a["image_id"]]["height"]),
        )
        for a in instances["annotations"]
    ]
    _assert_close(*_match_downscaled(pairs))
    rebuilt = mk.build(coco_mini, MAX_BYTES)  # the committed folder is the script's output
    assert sorted(rebuilt) == sorted(p.relative_to(BUNDLED).as_posix() for p in _bundled_files())
    for name, data in rebuilt.items():
        if not name.endswith(".jpg"):
            assert (BUNDLED / name).read_bytes() == data, name


# ------------------------------------------------------------------------------ the script
def _write_source(root: Path, names: list[str]) -> Path:
    """A tiny coco-mini lookalike: 640x480 images, two captions each, a polygon and a crowd RLE."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, captions, instances = [], [], []
    for i, name in enumerate(names, start=1):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train2017" / name, quality=95)
        images.append({"id": i, "file_name": name, "width": 640, "height": 480, "license": 4,
                       "flickr_url": f"http://farm1.staticflickr.com/{i}.jpg",
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}"})  # fmt: skip
        captions += [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} {k}"} for k in (0, 1)]
        box = np.zeros((480, 640), dtype=bool)
        box[100:200, 40:300] = True
        instances += [
            {"id": 100 + i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": 6000.0,
             "bbox": [20, 10, 100, 60], "segmentation": [[20, 10, 120, 10, 120, 70, 20, 70]]},
            {"id": 200 + i, "image_id": i, "category_id": 1, "iscrowd": 1, "area": 26000.0,
             "bbox": [40, 100, 260, 100], "segmentation": encode_rle(box)},
        ]  # fmt: skip
    cc_by = "http://creativecommons.org/licenses/by/2.0/"
    licenses = [{"id": 4, "name": "Attribution License", "url": cc_by}]
    common = {"info": {"description": "test"}, "licenses": licenses, "images": images}
    (root / mk.CAPTIONS).write_text(json.dumps({**common, "annotations": captions}))
    categories = [{"id": 1, "name": "box", "supercategory": "shape"}]
    (root / mk.INSTANCES).write_text(
        json.dumps({**common, "annotations": instances, "categories": categories})
    )
    return root


def test_script_keeps_the_longest_prefix_that_fits_reproducibly(tmp_path, capsys):
    source = _write_source(tmp_path / "src", ["c.jpg", "a.jpg", "b.jpg"])
    everything = mk.build(source, 10**9)
    all_bytes = sum(len(b) for b in everything.values())
    budget = all_bytes - 1  # the noise JPEGs are ~100 kB each: exactly two of the three fit
    out = tmp_path / "out"
    assert mk.main(["--source", str(source), "--out", str(out), "--max-mb", str(budget / 1e6)]) == 0
    assert sorted(p.name for p in (out / "train2017").iterdir()) == ["a.jpg", "b.jpg"]
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total <= budget and f"{total / 1e6:.2f} MB in all" in capsys.readouterr().out
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert mk.main(["--source", str(source), "--out", str(out), "--max-mb", str(budget / 1e6)]) == 0
    assert first == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    kept = json.loads((out / mk.INSTANCES).read_bytes())
    assert [im["width"] for im in kept["images"]] == [320, 320]
    assert {a["image_id"] for a in kept["annotations"]} == {im["id"] for im in kept["images"]}
    assert json.loads((out / "licences.json").read_bytes())["images"][0]["licence"]["short"] == (
        "CC BY 2.0"
    )


def test_script_bad_input_exits_2_and_leaves_the_output_alone(tmp_path, capsys):
    out = tmp_path / "out"
    assert mk.main(["--source", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err and not out.exists()
    source = _write_source(tmp_path / "src", ["a.jpg", "b.jpg"])
    assert mk.main(["--source", str(source), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert mk.main(["--source", str(source), "--out", str(out), "--max-mb", "0.001"]) == 2
    assert "--max-mb" in capsys.readouterr().err
    (source / "train2017" / "b.jpg").unlink()
    assert mk.main(["--source", str(source), "--out", str(out)]) == 2
    assert "b.jpg" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders


# ------------------------------------------------------------------------------ the demo's data step
def test_find_coco_mini_prefers_shared_then_the_bundled_set(tmp_path, monkeypatch):
    from lexvla.demo import pipeline

    checkout = tmp_path / "repo"
    checkout.mkdir()
    monkeypatch.setattr(pipeline, "REPO_ROOT", checkout)
    monkeypatch.chdir(checkout)
    assert pipeline.find_coco_mini() == BUNDLED == pipeline.BUNDLED_COCO
    shared = tmp_path / "shared" / "data" / "coco-mini"
    (shared / "annotations").mkdir(parents=True)
    (shared / mk.CAPTIONS).write_text("{}")
    assert pipeline.find_coco_mini() == shared.resolve()
    assert pipeline.find_coco_mini(BUNDLED) == BUNDLED  # --data DIR
    with pytest.raises(LexVLAError, match="annotations/"):
        pipeline.find_coco_mini(tmp_path)


def test_demo_data_step_uses_the_bundled_set_without_shared(tmp_path, monkeypatch):
    from rich.console import Console

    from lexvla.demo import pipeline, run_report

    monkeypatch.setattr(pipeline, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=200)
    run = pipeline.DemoRun(out_dir=tmp_path / "out", data_dir=None, console=console)
    data = pipeline._data(run)
    n = len(_json(mk.CAPTIONS)["images"])
    assert data.source == "demo-coco" and Path(data.images_dir) == BUNDLED / "train2017"
    assert (len(data.train), len(data.holdout), len(data.all_images)) == (n - 16, 16, n)
    assert Path(data.masks) == BUNDLED / mk.INSTANCES
    assert run.results["data"]["source"] == "demo-coco"
    shown = console.export_text()
    assert "demo-coco" in shown and "bundled" in shown
    assert "bundled with lexvla" in run_report._data_line(run.results["data"])


# ------------------------------------------------------------------------------ a plain clone
@pytest.fixture(scope="module")
def plain_clone(tmp_path_factory) -> Path:
    """`git clone` of this checkout's committed HEAD into a folder with no ../shared beside it."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout (or no git): cannot clone the repository")
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    clone = tmp_path_factory.mktemp("standalone") / "lexvla"
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(REPO_ROOT), str(clone)],
        check=True,
        timeout=300,
    )
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head], check=True)
    assert not (clone.parent / "shared").exists()
    return clone


def _run_in(clone: Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def _readme_encode_command(clone: Path) -> list[str]:
    lines = (clone / "README.md").read_text(encoding="utf-8").splitlines()
    line = next(x for x in lines if x.startswith(README_ENCODE)).split("#")[0]
    args = shlex.split(line)
    assert "../shared" not in line and (clone / args[args.index("--image") + 1]).is_file()
    return ["-m", "lexvla.cli", *args[1:]]


def _top_words(stdout: str) -> list[tuple[float, str]]:
    rows = [line.split(None, 1) for line in stdout.strip().splitlines()]
    return [(float(weight), word) for weight, word in rows]


@pytest.mark.slow
def test_plain_clone_runs_the_demo_data_step_and_a_readme_example(plain_clone):
    code = (
        "import json, sys, lexvla\n"
        "from pathlib import Path\n"
        "from lexvla.demo.pipeline import DemoRun, _data\n"
        "run = DemoRun(out_dir=Path(sys.argv[1]), data_dir=None)\n"
        "data = _data(run)\n"
        "print(json.dumps({'lexvla': lexvla.__file__, 'source': data.source, 'images': "
        "data.images_dir, 'train': len(data.train), 'held_out': len(data.holdout), "
        "'masks': str(data.masks)}))\n"
    )
    done = _run_in(plain_clone, ["-c", code, str(plain_clone.parent / "demo-output")])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["lexvla"]).is_relative_to(plain_clone)  # the clone's code, not this one's
    assert found["source"] == "demo-coco" and "synthetic" not in done.stdout
    assert Path(found["images"]) == plain_clone / "src/lexvla/resources/demo-coco/train2017"
    assert found["held_out"] == 16 and found["train"] >= 16 and found["masks"].endswith(".json")
    # the README's image example, with the tiny preset (no prepared models needed)
    done = _run_in(plain_clone, [*_readme_encode_command(plain_clone), "--model", "tiny"])
    assert done.returncode == 0, done.stderr
    words = _top_words(done.stdout)
    assert len(words) == 10 and all(math.isfinite(w) and w >= 0 for w, _ in words)
    assert [w for w, _ in words] == sorted((w for w, _ in words), reverse=True)


@pytest.mark.slow
@pytest.mark.assets
def test_plain_clone_readme_example_with_the_real_models(plain_clone):
    """The README's `lexvla encode --image` line exactly as written (small-offline)."""
    from lexvla.assets import asset_status

    status = asset_status()
    for name in ("dinov2-small", "smollm2-135m"):
        if not status.get(name, {}).get("prepared"):
            pytest.skip(f"offline model '{name}' is not prepared: run `lexvla assets prepare`")
    done = _run_in(plain_clone, _readme_encode_command(plain_clone))
    assert done.returncode == 0, done.stderr
    words = _top_words(done.stdout)
    assert len(words) == 10 and all(math.isfinite(w) and w > 0 for w, _ in words)
