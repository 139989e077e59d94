"""VQA-style questions about a synthetic scene, each with ten simulated annotator answers.

Questions are only asked when the scene answers them without ambiguity ("what color is the
circle?" needs exactly one circle), so a model that looks at the image can reach 100%. They are
varied enough that the question alone does not give the answer away: yes/no questions are drawn
with a fair coin for the answer (negatives are mostly "hard": an absent colour-shape pair whose
colour or shape does appear), counts include zero, and colours/shapes are uniform by design.

Ten answers per question imitate VQA v2 annotators: often all agree, sometimes up to four give a
synonym ("violet"), a near miss ("orange" for red, an off-by-one count) or the other yes/no, so the
soft-score and official-accuracy code sees real disagreement. The correct answer always keeps a
majority (at least six of ten), so it is also the ``multiple_choice_answer``.

``question_type`` follows VQA v2's convention of naming the question's leading words ("what color
is the", "how many", "is there a", "is the", "are there", "what"); ``answer_type`` is "yes/no",
"number" or "other" from the kind of answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from gridfeats.data.synthetic_scene import COLORS, SHAPES, SIZES, Scene

ANSWERS_PER_QUESTION = 10
FULL_AGREEMENT_RATE = 0.6  # share of questions where all ten annotators give the same answer
MIN_AGREEING = 6

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
CONFUSABLE: Dict[str, Tuple[str, ...]] = {
    # colours
    "red": ("orange", "pink", "dark red"),
    "green": ("dark green", "yellow"),
    "blue": ("purple", "light blue", "dark blue"),
    "yellow": ("orange", "gold"),
    "purple": ("blue", "pink"),
    "orange": ("red", "yellow"),
    # shapes
    "circle": ("oval", "round"),
    "square": ("rectangle", "box"),
    "triangle": ("pyramid",),
    "star": ("flower",),
    "hexagon": ("octagon", "circle"),
    "cross": ("plus sign", "x"),
    # sizes
    "small": ("medium", "large"),
    "large": ("medium", "small"),
    # yes/no
    "yes": ("no",),
    "no": ("yes",),
}
ANSWER_TYPES = {
    "color": "other",
    "shape": "other",
    "size": "other",
    "number": "number",
    "yes/no": "yes/no",
}

T = TypeVar("T")


@dataclass(frozen=True)
class QuestionAnswer:
    """One question with its VQA v2 annotation fields; ``answers`` are (answer, confidence) x 10."""

    question: str
    question_type: str
    answer_type: str
    answer: str
    answers: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class _Draft:
    question: str
    question_type: str
    kind: str  # a key of ANSWER_TYPES
    answer: str


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return next(word.plural_name for word in SHAPES if word.name == shape)


def _synonyms(name: str) -> Tuple[str, ...]:
    for word in (*SHAPES, *COLORS, *SIZES):
        if word.name == name:
            return word.synonyms
    return ()


def _ask_color(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'what color is the [size] <shape>?' for a shape (or size+shape) that occurs once."""
    options = []
    for obj in scene.objects:
        same_shape = [o for o in scene.objects if o.shape == obj.shape]
        if len(same_shape) == 1:
            options.append((f"what color is the {obj.shape}?", obj.color))
        elif sum(o.size == obj.size for o in same_shape) == 1:
            options.append((f"what color is the {obj.size} {obj.shape}?", obj.color))
    if not options:
        return None
    question, answer = _pick(rng, options)
    return _Draft(question, "what color is the", "color", answer)


def _ask_shape(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'what shape is the [size] <color> object?' for a colour (or size+colour) that occurs once."""
    options = []
    for obj in scene.objects:
        same_color = [o for o in scene.objects if o.color == obj.color]
        if len(same_color) == 1:
            options.append((f"what shape is the {obj.color} object?", obj.shape))
        elif sum(o.size == obj.size for o in same_color) == 1:
            options.append((f"what shape is the {obj.size} {obj.color} object?", obj.shape))
    if not options:
        return None
    question, answer = _pick(rng, options)
    return _Draft(question, "what", "shape", answer)


def _ask_size(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'is the <color> <shape> small or large?' for a colour-shape pair that occurs once."""
    pairs = [(o.color, o.shape) for o in scene.objects]
    options = [o for o in scene.objects if pairs.count((o.color, o.shape)) == 1]
    if not options:
        return None
    obj = _pick(rng, options)
    first, second = ("small", "large") if rng.random() < 0.5 else ("large", "small")
    return _Draft(
        f"is the {obj.color} {obj.shape} {first} or {second}?", "is the", "size", obj.size
    )


def _ask_count(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'how many ...?' about one shape, one colour or all objects; zero is a possible answer."""
    variant = int(rng.integers(3))
    if variant == 0:
        shape = (
            _pick(rng, [w.name for w in SHAPES])
            if rng.random() < 0.3
            else _pick(rng, [o.shape for o in scene.objects])
        )
        count = sum(o.shape == shape for o in scene.objects)
        question = f"how many {_plural(shape)} are there?"
    elif variant == 1:
        color = (
            _pick(rng, [w.name for w in COLORS])
            if rng.random() < 0.3
            else _pick(rng, [o.color for o in scene.objects])
        )
        count = sum(o.color == color for o in scene.objects)
        question = f"how many {color} shapes are there?"
    else:
        count = len(scene.objects)
        question = _pick(
            rng,
            [
                "how many shapes are there?",
                "how many shapes are in the picture?",
                "how many objects are in the image?",
            ],
        )
    return _Draft(question, "how many", "number", str(count))


def _ask_is_there(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'is there a <color> <shape>?', yes on a fair coin; most negatives share colour or shape."""
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        absent = [
            (c.name, s.name) for c in COLORS for s in SHAPES if (c.name, s.name) not in present
        ]
        colors = {c for c, _ in present}
        shapes = {s for _, s in present}
        hard = [(c, s) for c, s in absent if c in colors or s in shapes]
        color, shape = _pick(rng, hard if hard and rng.random() < 0.8 else absent)
        answer = "no"
    article = _article(color)
    question_type = "is there a" if article == "a" else "is there"
    return _Draft(f"is there {article} {color} {shape}?", question_type, "yes/no", answer)


def _ask_is_the(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'is the <shape> <color>?' about a shape that occurs once; fair coin for yes."""
    shapes = [o.shape for o in scene.objects]
    options = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not options:
        return None
    obj = _pick(rng, options)
    if rng.random() < 0.5:
        return _Draft(f"is the {obj.shape} {obj.color}?", "is the", "yes/no", "yes")
    other = _pick(rng, [c.name for c in COLORS if c.name != obj.color])
    return _Draft(f"is the {obj.shape} {other}?", "is the", "yes/no", "no")


def _ask_are_there(scene: Scene, rng: np.random.Generator) -> Optional[_Draft]:
    """'are there any <color> shapes?' / 'are there any <shapes>?'; fair coin for yes."""
    by_color = rng.random() < 0.5
    if by_color:
        names = [c.name for c in COLORS]
        present = {o.color for o in scene.objects}
    else:
        names = [s.name for s in SHAPES]
        present = {o.shape for o in scene.objects}
    want_yes = rng.random() < 0.5
    pool = sorted(present) if want_yes else [n for n in names if n not in present]
    if not pool:
        return None
    name = _pick(rng, pool)
    text = f"are there any {name} shapes?" if by_color else f"are there any {_plural(name)}?"
    return _Draft(text, "are there", "yes/no", "yes" if want_yes else "no")


# (generator, weight): how often each kind of question is tried.
GENERATORS: Tuple[Tuple[Callable[[Scene, np.random.Generator], Optional[_Draft]], int], ...] = (
    (_ask_color, 2),
    (_ask_shape, 2),
    (_ask_count, 2),
    (_ask_is_there, 2),
    (_ask_is_the, 1),
    (_ask_are_there, 1),
    (_ask_size, 1),
)


def _wrong_answers(draft: _Draft) -> List[str]:
    """What a careless or differently-wording annotator might say instead of ``draft.answer``."""
    if draft.kind == "number":
        count = int(draft.answer)
        wrong = [str(count + 1), NUMBER_WORDS[count]]
        if count > 0:
            wrong.append(str(count - 1))
        return wrong
    return [*_synonyms(draft.answer), *CONFUSABLE.get(draft.answer, ())]


def _annotate(draft: _Draft, rng: np.random.Generator) -> Tuple[Tuple[str, str], ...]:
    """Ten (answer, answer_confidence) pairs; the right answer keeps a majority."""
    if rng.random() < FULL_AGREEMENT_RATE:
        agreeing = ANSWERS_PER_QUESTION
    else:
        agreeing = int(rng.integers(MIN_AGREEING, ANSWERS_PER_QUESTION))
    answers = []
    for _ in range(agreeing):
        answers.append((draft.answer, "yes" if rng.random() < 0.9 else "maybe"))
    wrong = _wrong_answers(draft)
    for _ in range(ANSWERS_PER_QUESTION - agreeing):
        answers.append((_pick(rng, wrong), _pick(rng, ("yes", "maybe", "maybe", "no"))))
    order = rng.permutation(ANSWERS_PER_QUESTION)
    return tuple(answers[int(i)] for i in order)


def make_questions(scene: Scene, rng: np.random.Generator, count: int) -> List[QuestionAnswer]:
    """Up to ``count`` distinct questions about ``scene`` with their ten annotator answers each."""
    generators = [gen for gen, _ in GENERATORS]
    weights = np.array([weight for _, weight in GENERATORS], dtype=np.float64)
    weights /= weights.sum()
    drafts: List[_Draft] = []
    asked = set()
    for _ in range(count * 8):
        if len(drafts) == count:
            break
        draft = generators[int(rng.choice(len(generators), p=weights))](scene, rng)
        if draft is None or draft.question in asked:
            continue
        asked.add(draft.question)
        drafts.append(draft)
    return [
        QuestionAnswer(
            d.question, d.question_type, ANSWER_TYPES[d.kind], d.answer, _annotate(d, rng)
        )
        for d in drafts
    ]
