"""A procedural image-caption dataset with per-pixel masks and known ground-truth words.

Each image shows 1-3 solid shapes (:data:`SHAPES`) in named colours (:data:`COLOURS`), small or large,
at distinct positions (left / right / top / bottom / center) on a pale, lightly noisy background.
Geometry keeps shapes apart: every shape fits in an axis-aligned box of half-side 0.145·S around its
(jittered) position and any two positions are ≥ 0.27·S apart along some axis, so shapes never overlap
and every object is fully visible. Shapes are drawn without anti-aliasing: a pixel inside an object's
mask has exactly the object's colour.

Sample `i` is a pure function of `(seed, i)`: the same pixels, captions and masks every time, in any
access order, in any process. Captions (several per image) use varied templates with function words
("a red circle on the left and a small blue square", "there are two shapes: ...").
`words` holds the ground-truth content words: the colour, shape, size and position words of the objects.

Masks (uint8, (S, S)), for PatchDis: `mask` holds class indices into :attr:`SyntheticDataset.class_names`
(index 0 = "background"). Scheme "shape" (default): one class per shape ("circle", "square", ...);
scheme "colour_shape": one class per colour + shape ("red circle", ...). `instances` numbers the
objects 1..n in `objects` order (0 = background).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lexvla.data.sample import Sample, SkipCounter
from lexvla.errors import LexVLAError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 205, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "pink": (240, 110, 180),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.075, "large": 0.13}  # radius / image side
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUNDS = {
    "white": (245, 245, 242),
    "gray": (212, 212, 212),
    "beige": (235, 225, 200),
    "light blue": (205, 222, 240),
}
JITTER = 0.015  # max position jitter / image side
NOISE = 6  # background texture amplitude (grey levels)
MASK_SCHEMES = ("shape", "colour_shape")
NUMBERS = ("zero", "one", "two", "three")


def synthetic_class_names(scheme: str = "shape") -> list[str]:
    """Class names of the masks: index 0 is "background" (PatchDis convention)."""
    if scheme == "shape":
        return ["background", *SHAPES]
    if scheme == "colour_shape":
        return ["background", *(f"{c} {s}" for c in COLOURS for s in SHAPES)]
    raise LexVLAError(f"unknown mask scheme {scheme!r}: choose one of {', '.join(MASK_SCHEMES)}")


@dataclass
class SyntheticObject:
    """One drawn shape: its words and its pixel geometry (centre and radius in pixels)."""

    shape: str
    colour: str
    size: str
    position: str
    center: tuple[float, float]
    radius: float


@dataclass(eq=False)
class SyntheticSample(Sample):
    """A :class:`Sample` with its segmentation: `mask` (class ids), `instances` (1..n) and `objects`."""

    mask: np.ndarray | None = None
    instances: np.ndarray | None = None
    objects: list[SyntheticObject] = field(default_factory=list)


class SyntheticDataset:
    """Map-style synthetic dataset of `size` samples (see the module docstring).

    Args:
        size: number of samples.
        image_size: side S of the square images.
        seed: sample i is a function of (seed, i) only.
        captions_per_image: captions per image (distinct templates, at most 6).
        mask_classes: "shape" or "colour_shape".
        texture: add light noise to the background (False: plain colour).
    """

    def __init__(
        self,
        size: int = 512,
        image_size: int = 224,
        seed: int = 0,
        captions_per_image: int = 5,
        mask_classes: str = "shape",
        texture: bool = True,
        indices: Sequence[int] | None = None,
    ) -> None:
        if size <= 0 or image_size < 32:
            raise LexVLAError(
                f"synthetic dataset needs size > 0 and image_size >= 32 ({size}, {image_size})"
            )
        if not 1 <= captions_per_image <= len(TEMPLATES):
            raise LexVLAError(f"captions_per_image must be in 1..{len(TEMPLATES)}")
        self.size, self.image_size, self.seed = size, image_size, seed
        self.captions_per_image, self.texture = captions_per_image, texture
        self.class_names = synthetic_class_names(mask_classes)
        self.mask_classes = mask_classes
        self.indices = list(range(size)) if indices is None else list(indices)
        self.skips = SkipCounter()  # nothing is ever skipped; present for a uniform interface

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return f"synthetic-{self.indices[index]:06d}"

    def __getitem__(self, index: int) -> SyntheticSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"synthetic index {index} out of range ({len(self)})")
        return self.generate(self.indices[index])

    def __iter__(self) -> Iterator[SyntheticSample]:
        for index in range(len(self)):
            yield self[index]

    def subset(self, indices: Sequence[int]) -> SyntheticDataset:
        """A view of some samples (keys and content unchanged)."""
        view = SyntheticDataset.__new__(SyntheticDataset)
        view.__dict__.update(self.__dict__)
        view.indices = [self.indices[i] for i in indices]
        return view

    def write_shards(self, out_dir: str | Path, shard_size: int = 1000) -> list[Path]:
        """Write this dataset as tar shards (PNG, lossless) for the streaming reader."""
        from lexvla.data.webdataset import write_shards

        return write_shards(iter(self), out_dir, shard_size, image_format="png")

    def generate(self, number: int) -> SyntheticSample:
        """Sample number `number` of the infinite sequence of this seed."""
        rng = np.random.default_rng([self.seed, number])
        objects = _layout(rng, self.image_size)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        image, mask, instances = self._draw(rng, objects, background)
        captions = make_captions(objects, background, rng, self.captions_per_image)
        words = sorted({w for o in objects for w in (o.colour, o.shape, o.size, o.position)})
        return SyntheticSample(
            f"synthetic-{number:06d}", image, captions, "", words, mask, instances, objects
        )

    def _draw(
        self, rng: np.random.Generator, objects: list[SyntheticObject], background: str
    ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        side = self.image_size
        base = np.empty((side, side, 3), dtype=np.int16)
        base[:] = BACKGROUNDS[background]
        if self.texture:
            base += rng.integers(-NOISE, NOISE + 1, size=(side, side, 1), dtype=np.int16)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        mask, instances = Image.new("L", (side, side)), Image.new("L", (side, side))
        layers = [
            (ImageDraw.Draw(image), None),
            (ImageDraw.Draw(mask), 0),
            (ImageDraw.Draw(instances), 1),
        ]
        for number, obj in enumerate(objects, start=1):
            class_id = self.class_names.index(
                obj.shape if self.mask_classes == "shape" else f"{obj.colour} {obj.shape}"
            )
            for draw, kind in layers:
                fill = COLOURS[obj.colour] if kind is None else class_id if kind == 0 else number
                _draw_shape(draw, obj, fill)
        return image, np.asarray(mask).copy(), np.asarray(instances).copy()


def _layout(rng: np.random.Generator, side: int) -> list[SyntheticObject]:
    count = int(rng.integers(1, 4))
    places = [list(POSITIONS)[i] for i in rng.choice(len(POSITIONS), size=count, replace=False)]
    objects = []
    for place in places:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        jitter = rng.uniform(-JITTER, JITTER, size=2)
        fx, fy = POSITIONS[place]
        center = ((fx + jitter[0]) * side, (fy + jitter[1]) * side)
        objects.append(SyntheticObject(shape, colour, size, place, center, SIZES[size] * side))
    return objects


def shape_polygon(
    shape: str, center: tuple[float, float], radius: float
) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape inside the box of half-side `radius` around `center`."""
    cx, cy = center
    if shape == "square":
        h = 0.85 * radius
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)]
    if shape == "triangle":
        return [
            (cx, cy - radius),
            (cx + radius, cy + 0.8 * radius),
            (cx - radius, cy + 0.8 * radius),
        ]
    if shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    raise LexVLAError(f"unknown synthetic shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SyntheticObject, fill: object) -> None:
    if obj.shape == "circle":
        (cx, cy), r = obj.center, obj.radius
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(shape_polygon(obj.shape, obj.center, obj.radius), fill=fill)


# ------------------------------------------------------------------------------ captions
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(obj: SyntheticObject, *, size: bool = True, position: bool = True) -> str:
    """`a small red circle on the left` (size and position optional)."""
    phrase = " ".join([*([obj.size] if size else []), obj.colour, obj.shape])
    return _article(phrase) + (f" {POSITION_PHRASES[obj.position]}" if position else "")


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("x") else "s")


def _listing(objects: list[SyntheticObject], rng: np.random.Generator) -> str:
    flags = rng.random((len(objects), 2)) < 0.6
    return _join([describe(o, size=bool(s), position=bool(p)) for o, (s, p) in zip(objects, flags)])


def _t_list(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    return _listing(objects, rng)


def _t_there(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    if len(objects) == 1:
        return f"there is {describe(objects[0], size=bool(rng.random() < 0.5))}"
    return f"there are {NUMBERS[len(objects)]} shapes: {_listing(objects, rng)}"


def _t_count(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.shape] = counts.get(obj.shape, 0) + 1
    parts = [
        _article(shape) if n == 1 else f"{NUMBERS[n]} {_plural(shape)}"
        for shape, n in counts.items()
    ]
    return f"a picture of {_join(parts)} on a {background} background"


def _t_where(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    parts = [f"{POSITION_PHRASES[o.position]} {describe(o, position=False)}" for o in objects]
    return "; ".join(parts)


def _t_image(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    return f"an image showing {_listing(objects, rng)}"


def _t_colour(objects: list[SyntheticObject], background: str, rng: np.random.Generator) -> str:
    parts = [f"the {o.shape} {POSITION_PHRASES[o.position]} is {o.colour}" for o in objects]
    return _join(parts)


TEMPLATES = (_t_list, _t_there, _t_count, _t_where, _t_image, _t_colour)


def make_captions(
    objects: list[SyntheticObject], background: str, rng: np.random.Generator, n: int
) -> list[str]:
    """`n` captions from distinct templates, in a random order."""
    order = rng.permutation(len(TEMPLATES))[:n]
    return [TEMPLATES[int(i)](objects, background, rng) for i in order]
