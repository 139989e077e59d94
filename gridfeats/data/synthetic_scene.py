"""Random scenes of flat-coloured shapes for the synthetic data set: what is drawn and where.

A scene is sampled and rendered in one pass from a ``numpy.random.Generator``, so the same
generator state always gives the same pixels and the same annotations. Objects are first painted
into a label map (one integer per pixel: which object is on top there, -1 for background) and the
image is then coloured from that map. This makes the annotations exact by construction: an
object's box is the extent of its *visible* pixels (what a Visual Genome annotator would draw),
and its area is its visible pixel count.

Design choices that keep the data learnable and the questions answerable:

* object colours are saturated and far (> 80 RGB units) from every background tone, and backgrounds
  are low-saturation, so a pixel's colour alone says whether it belongs to an object;
* objects may overlap, but none may lose more than ``1 - MIN_VISIBLE_FRACTION`` of its pixels to
  the ones drawn after it, and two objects of one colour never touch (they would read as one
  blob), so counting questions stay well defined;
* "small" and "large" are relative to the image's short side and do not overlap (at most 0.20 vs
  at least 0.30 of it), so size is a real visual attribute, not a coin flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

RGB = Tuple[int, int, int]


@dataclass(frozen=True)
class Word:
    """A drawable concept: its name, the synonyms annotators use for it, and its plural."""

    name: str
    synonyms: Tuple[str, ...] = ()
    plural: str = ""

    @property
    def plural_name(self) -> str:
        return self.plural or self.name + "s"


# The tables below are the single source of the vocabulary files, the json category/attribute
# lists, the questions and the captions. Their order fixes the category and attribute ids.
SHAPES: Tuple[Word, ...] = (
    Word("circle"),
    Word("square"),
    Word("triangle"),
    Word("star"),
    Word("hexagon"),
    Word("cross", ("plus",), "crosses"),
)
COLORS: Tuple[Word, ...] = (
    Word("red"),
    Word("green"),
    Word("blue"),
    Word("yellow"),
    Word("purple", ("violet",)),
    Word("orange"),
)
SIZES: Tuple[Word, ...] = (Word("small", ("little",)), Word("large", ("big",)))

#: Nominal fill colour per colour name; each object jitters it by up to ``COLOR_JITTER`` per
#: channel.
COLOR_RGB: Dict[str, RGB] = {
    "red": (210, 30, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 220, 35),
    "purple": (150, 30, 190),
    "orange": (245, 130, 20),
}
COLOR_JITTER = 8

#: Background base tones (low saturation) and the kinds of texture laid over them.
BACKGROUND_RGB: Dict[str, RGB] = {
    "gray": (128, 128, 128),
    "light gray": (170, 170, 170),
    "dark gray": (85, 85, 85),
    "beige": (175, 165, 140),
    "slate": (105, 115, 130),
}
BACKGROUND_KINDS: Tuple[str, ...] = ("plain", "noisy", "striped", "checkered", "gradient")

#: Object side length as a fraction of the image's short side, per size name.
SIZE_RANGE: Dict[str, Tuple[float, float]] = {"small": (0.14, 0.20), "large": (0.30, 0.42)}
MIN_SIDE_PX = 24  # below this a star or a cross stops looking like one
MIN_VISIBLE_FRACTION = 0.6
MAX_OBJECTS = 6
IMAGE_SIDE_RANGE = (160, 640)
MAX_SHORT_SIDE = 480  # so that landscape and portrait images both stay common
PLACEMENT_ATTEMPTS = 40
EDGE_MARGIN = 2


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``box`` is ``(x0, y0, x1, y1)`` of its visible pixels, x1/y1 exclusive."""

    shape: str
    color: str
    size: str
    box: Tuple[int, int, int, int]
    area: int
    rgb: RGB


@dataclass(frozen=True)
class Scene:
    """Everything the annotation writers need to know about one rendered image."""

    height: int
    width: int
    background_kind: str
    background_tone: str
    objects: Tuple[SceneObject, ...]  # drawing order: later objects are on top
    overlaps: Tuple[Tuple[int, int], ...]  # pairs (i < j): j is drawn over part of i


@dataclass(frozen=True)
class _Spec:
    """An object before placement: what it is and its drawn mask (bool, side x side)."""

    shape: str
    color: str
    size: str
    rgb: RGB
    mask: np.ndarray


@dataclass(frozen=True)
class _Placed:
    spec: _Spec
    x0: int
    y0: int

    @property
    def mask(self) -> np.ndarray:
        return self.spec.mask


def sample_image_size(rng: np.random.Generator) -> Tuple[int, int]:
    """``(height, width)``: landscape, portrait or square, each side in ``IMAGE_SIDE_RANGE``."""
    low, high = IMAGE_SIDE_RANGE
    short = int(rng.integers(low, MAX_SHORT_SIDE + 1))
    long = int(min(high, round(short * rng.uniform(1.0, 1.8))))
    if rng.random() < 0.5:
        return long, short  # portrait
    return short, long


def shape_mask(shape: str, side: int, angle: float) -> np.ndarray:
    """Draw one filled shape into a ``side x side`` boolean mask (rotation in radians)."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    centre = (side - 1) / 2.0
    radius = side / 2.0

    def polygon(radii: List[float], start: float) -> List[Tuple[float, float]]:
        count = len(radii)
        return [
            (
                centre + r * math.cos(start + 2 * math.pi * k / count),
                centre + r * math.sin(start + 2 * math.pi * k / count),
            )
            for k, r in enumerate(radii)
        ]

    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, side - 1, side - 1), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([radius] * 3, -math.pi / 2 + angle), fill=255)
    elif shape == "star":
        draw.polygon(polygon([radius, radius * 0.45] * 5, -math.pi / 2 + angle), fill=255)
    elif shape == "hexagon":
        draw.polygon(polygon([radius] * 6, angle), fill=255)
    elif shape == "cross":
        arm = side / 3.0
        draw.rectangle((round(arm), 0, round(2 * arm) - 1, side - 1), fill=255)
        draw.rectangle((0, round(arm), side - 1, round(2 * arm) - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 0


def _sample_object(rng: np.random.Generator, short_side: int) -> _Spec:
    shape = SHAPES[int(rng.integers(len(SHAPES)))].name
    color = COLORS[int(rng.integers(len(COLORS)))].name
    size = SIZES[int(rng.integers(len(SIZES)))].name
    low, high = SIZE_RANGE[size]
    side = max(MIN_SIDE_PX, int(round(short_side * rng.uniform(low, high))))
    angle = float(rng.uniform(-0.3, 0.3)) if shape in ("triangle", "star", "hexagon") else 0.0
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    r, g, b = (int(v) for v in np.clip(np.array(COLOR_RGB[color]) + jitter, 0, 255))
    return _Spec(shape, color, size, (r, g, b), shape_mask(shape, side, angle))


def _candidate_corner(
    rng: np.random.Generator, height: int, width: int, side: int, placed: List[_Placed]
) -> Optional[Tuple[int, int]]:
    """Top-left corner for a new object; often next to an earlier one so that overlaps occur."""
    max_x, max_y = width - side - EDGE_MARGIN, height - side - EDGE_MARGIN
    if max_x < EDGE_MARGIN or max_y < EDGE_MARGIN:
        return None
    if placed and rng.random() < 0.4:
        anchor = placed[int(rng.integers(len(placed)))]
        reach = (anchor.mask.shape[0] + side) / 2.0
        cx = anchor.x0 + anchor.mask.shape[1] / 2.0 + rng.uniform(-reach, reach)
        cy = anchor.y0 + anchor.mask.shape[0] / 2.0 + rng.uniform(-reach, reach)
        x0, y0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
        return min(max(x0, EDGE_MARGIN), max_x), min(max(y0, EDGE_MARGIN), max_y)
    return int(rng.integers(EDGE_MARGIN, max_x + 1)), int(rng.integers(EDGE_MARGIN, max_y + 1))


def _touches_same_color(
    labels: np.ndarray, placed: List[_Placed], color: str, x0: int, y0: int, side: int
) -> bool:
    """Whether a same-coloured object lies in the new square plus a gap (they would merge)."""
    gap = EDGE_MARGIN + 1
    window = labels[max(0, y0 - gap) : y0 + side + gap, max(0, x0 - gap) : x0 + side + gap]
    present = np.unique(window[window >= 0])
    return any(placed[int(i)].spec.color == color for i in present)


def _place_objects(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, List[_Placed]]:
    """Paint 1..MAX_OBJECTS objects into a label map, rejecting positions that hide too much."""
    labels = np.full((height, width), -1, dtype=np.int8)
    placed: List[_Placed] = []
    full_area: List[int] = []
    visible_area: List[int] = []
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(wanted):
        spec = _sample_object(rng, min(height, width))
        mask, side = spec.mask, spec.mask.shape[0]
        for _attempt in range(PLACEMENT_ATTEMPTS):
            corner = _candidate_corner(rng, height, width, side, placed)
            if corner is None:
                break
            x0, y0 = corner
            if _touches_same_color(labels, placed, spec.color, x0, y0, side):
                continue
            covered = labels[y0 : y0 + side, x0 : x0 + side][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(placed))
            if all(
                visible_area[i] - lost[i] >= MIN_VISIBLE_FRACTION * full_area[i]
                for i in range(len(placed))
            ):
                for i in range(len(placed)):
                    visible_area[i] -= int(lost[i])
                labels[y0 : y0 + side, x0 : x0 + side][mask] = len(placed)
                placed.append(_Placed(spec, x0, y0))
                full_area.append(int(mask.sum()))
                visible_area.append(int(mask.sum()))
                break
    return labels, placed


def render_background(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, str, str]:
    """A low-saturation background: returns ``(float32 HxWx3 image, kind, tone name)``."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    tone = sorted(BACKGROUND_RGB)[int(rng.integers(len(BACKGROUND_RGB)))]
    base = np.array(BACKGROUND_RGB[tone], dtype=np.float32)
    yy = np.arange(height, dtype=np.float32)[:, None]  # broadcast against xx to a full grid
    xx = np.arange(width, dtype=np.float32)[None, :]
    if kind == "plain":
        light = np.zeros((height, width), np.float32)
    elif kind == "noisy":
        light = rng.normal(0.0, 9.0, size=(height, width)).astype(np.float32)
    elif kind == "striped":
        period = float(rng.integers(10, 33))
        direction = [xx, yy, xx + yy][int(rng.integers(3))]
        light = np.where((direction // (period / 2)) % 2 == 0, 14.0, -14.0).astype(np.float32)
    elif kind == "checkered":
        cell = int(rng.integers(12, 41))
        light = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 14.0, -14.0).astype(np.float32)
    else:  # gradient
        theta = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(theta) + yy * math.sin(theta)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        light = (ramp * 40.0 - 20.0).astype(np.float32)
    light = np.broadcast_to(light, (height, width))
    image = base[None, None, :] + light[:, :, None]
    if kind != "plain":  # a little colour noise so that textures look photographed, not drawn
        image += rng.normal(0.0, 3.0, size=(height, width, 3)).astype(np.float32)
    return image, kind, tone


def _overlapping_pairs(placed: List[_Placed]) -> Tuple[Tuple[int, int], ...]:
    pairs = []
    for i, a in enumerate(placed):
        for j in range(i + 1, len(placed)):
            b = placed[j]
            x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
            x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
            y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
            if x0 >= x1 or y0 >= y1:
                continue
            part_a = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
            part_b = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
            if np.any(part_a & part_b):
                pairs.append((i, j))
    return tuple(pairs)


def render_scene(rng: np.random.Generator) -> Tuple[Scene, np.ndarray]:
    """Sample and draw one scene; returns its description and an HxWx3 uint8 RGB image."""
    height, width = sample_image_size(rng)
    background, kind, tone = render_background(rng, height, width)
    labels, placed = _place_objects(rng, height, width)
    image = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    objects = []
    for index, item in enumerate(placed):
        spec = item.spec
        visible = labels == index
        image[visible] = spec.rgb
        ys = np.flatnonzero(visible.any(axis=1))
        xs = np.flatnonzero(visible.any(axis=0))
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        objects.append(
            SceneObject(spec.shape, spec.color, spec.size, box, int(visible.sum()), spec.rgb)
        )
    scene = Scene(height, width, kind, tone, tuple(objects), _overlapping_pairs(placed))
    return scene, image
