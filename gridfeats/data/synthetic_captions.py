"""COCO-style captions for a synthetic scene: several true sentences in different styles.

Each template describes the scene from a different angle (every object with its size, counts per
shape, a spatial relation, the colours present, the background), the way five COCO annotators
each mention different things. All of them are true of the image, so captioning metrics reward a
model for what it sees; none of them is the same sentence twice for one image.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np

from gridfeats.data.synthetic_scene import SHAPES, Scene, SceneObject

CAPTIONS_PER_IMAGE = 5
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: SceneObject, with_size: bool) -> str:
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    return f"{_article(words)} {words}"


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(number: int, singular: str, plural: str) -> str:
    return f"{_article(singular)} {singular}" if number == 1 else f"{NUMBER_WORDS[number]} {plural}"


def _plural(shape: str) -> str:
    return next(word.plural_name for word in SHAPES if word.name == shape)


def _background(scene: Scene) -> str:
    tone, kind = scene.background_tone, scene.background_kind
    words = {
        "plain": f"plain {tone}",
        "noisy": f"noisy {tone}",
        "striped": f"{tone} striped",
        "checkered": f"{tone} checkered",
        "gradient": f"shaded {tone}",
    }[kind]
    return f"{_article(words)} {words} background"


def _centre(obj: SceneObject) -> Tuple[float, float]:
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def _where(scene: Scene, obj: SceneObject) -> str:
    """Where in the image an object sits, in thirds ("in the top left corner of the image")."""
    cx, cy = _centre(obj)
    column = ("left", "center", "right")[min(2, int(3 * cx / scene.width))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / scene.height))]
    if row == "middle" and column == "center":
        return "in the middle of the image"
    if row == "middle":
        return f"on the {column} side of the image"
    if column == "center":
        return f"at the {row} of the image"
    return f"in the {row} {column} corner of the image"


def _grouped(scene: Scene, with_size: bool) -> str:
    """All objects, identical descriptions counted together: "two red circles and a blue star"."""
    groups: List[Tuple[str, ...]] = []
    for obj in scene.objects:
        key = (obj.size, obj.color, obj.shape) if with_size else (obj.color, obj.shape)
        groups.append(key)
    parts = []
    for key in dict.fromkeys(groups):  # first-appearance order
        adjectives = " ".join(key[:-1])
        parts.append(
            _count(groups.count(key), f"{adjectives} {key[-1]}", f"{adjectives} {_plural(key[-1])}")
        )
    return _join(parts)


def _every_object(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_grouped(scene, with_size=True)} on {_background(scene)}"


def _object_list(scene: Scene, rng: np.random.Generator) -> str:
    return f"a picture of {_grouped(scene, with_size=False)}"


def _counts_by_shape(scene: Scene, rng: np.random.Generator) -> str:
    number = len(scene.objects)
    shapes = list(dict.fromkeys(o.shape for o in scene.objects))
    if number == 1:
        return f"there is only one shape in the image, {_describe(scene.objects[0], False)}"
    if len(shapes) == 1:
        return f"there are {NUMBER_WORDS[number]} {_plural(shapes[0])} in the image"
    parts = [_count(sum(o.shape == s for o in scene.objects), s, _plural(s)) for s in shapes]
    return f"there are {NUMBER_WORDS[number]} shapes in the image: {_join(parts)}"


def _relation(scene: Scene, rng: np.random.Generator) -> str:
    """One spatial fact: an overlap if any, else left/right/above/below, else position."""
    objects = scene.objects
    if len(objects) == 1:
        return f"{_describe(objects[0], True)} {_where(scene, objects[0])}"
    if scene.overlaps:
        below, above = scene.overlaps[int(rng.integers(len(scene.overlaps)))]
        return (
            f"{_describe(objects[above], False)} partly covering {_describe(objects[below], False)}"
        )
    first, second = (objects[int(i)] for i in rng.choice(len(objects), size=2, replace=False))
    (ax, ay), (bx, by) = _centre(first), _centre(second)
    if abs(ax - bx) >= abs(ay - by):
        relation = "to the left of" if ax < bx else "to the right of"
    else:
        relation = "above" if ay < by else "below"
    return f"{_describe(first, False)} {relation} {_describe(second, False)}"


def _colors(scene: Scene, rng: np.random.Generator) -> str:
    colors = list(dict.fromkeys(o.color for o in scene.objects))
    if len(colors) == 1:
        shapes = _count(len(scene.objects), f"{colors[0]} shape", f"{colors[0]} shapes")
        return f"{shapes} on {_background(scene)}"
    return f"{_join(colors)} shapes on {_background(scene)}"


def _largest(scene: Scene, rng: np.random.Generator) -> str:
    largest = max(scene.objects, key=lambda o: o.area)
    if len(scene.objects) == 1:
        return f"a simple picture of a single {largest.color} {largest.shape}"
    return f"some geometric shapes including {_describe(largest, False)}"


def _total(scene: Scene, rng: np.random.Generator) -> str:
    number = len(scene.objects)
    noun = "colorful shape" if number == 1 else "colorful shapes"
    return f"an image of {NUMBER_WORDS[number]} {noun}"


def _background_first(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_background(scene)} with {_count(len(scene.objects), 'shape', 'shapes')} on it"


TEMPLATES: Tuple[Callable[[Scene, np.random.Generator], str], ...] = (
    _every_object,
    _object_list,
    _counts_by_shape,
    _relation,
    _colors,
    _largest,
    _total,
    _background_first,
)


def make_captions(
    scene: Scene, rng: np.random.Generator, count: int = CAPTIONS_PER_IMAGE
) -> List[str]:
    """``count`` different captions of ``scene``, from templates picked in a random order."""
    if not 1 <= count <= len(TEMPLATES):
        raise ValueError(f"captions per image must be in 1..{len(TEMPLATES)}, got {count}")
    if not scene.objects:
        raise ValueError("cannot caption a scene without objects")
    captions: List[str] = []
    for index in rng.permutation(len(TEMPLATES)):
        caption = TEMPLATES[int(index)](scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    raise RuntimeError(f"only {len(captions)} distinct captions for a scene; templates overlap")
