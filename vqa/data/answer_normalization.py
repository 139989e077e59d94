"""The official VQA answer normalisation, shared by the metric and the training targets.

Why one module: an answer vocabulary built with one normalisation and scored with another loses
accuracy for no reason (``"2"`` vs ``"two"``, ``"dont"`` vs ``"don’t"``), so the evaluator
(``vqa.metrics.vqa_eval``) and the answer vocabulary (``vqa.data.answer_vocab``) both use these
functions.

The rules are those of ``vqaEval.py`` in GT-Vision-Lab/VQA (PythonEvaluationTools, the Python
evaluation code released with VQA v1.0, commit 07aecec), reimplemented here with all their quirks, because
matching the published numbers matters more than tidy rules:

* ``process_punctuation``: for each mark of ``PUNCTUATION``, if the mark stands next to a space
  anywhere in the *original* text, or the original text has a digit-comma-digit (``1,000``), every
  copy of the mark is deleted; otherwise every copy becomes a space. Periods are then deleted
  unless a digit follows (the official regex ``(?!<=\\d)(\\.)(?!\\d)`` has a mistyped look-behind,
  so only the look-ahead works), and only the first 32 of them, because the script passes
  ``re.UNICODE`` (= 32) where ``re.sub`` expects ``count``.
* ``process_digit_article``: lower-case, split on white space, map number words ``none``/``zero``
  .. ``ten`` to digits, drop the articles ``a an the``, then replace words found in the fixed
  contraction table. The table maps to a typographic apostrophe ``’`` in most entries and to
  ``'`` in a few (``ain't``, ``we've``, ``where's`` ...); it is kept exactly, mixture included.
  Its capitalised keys (``Im``, ``Ive``) can never match lower-cased text; kept anyway.

Later revisions of the official repository (and the EvalAI server code) changed the punctuation
list (added ``{ } - !``, dropped ``: '``) and made the contraction table plain ``'``; these
differences only touch answers that contain those characters.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

# Order matters: marks are processed one after another on the progressively edited text.
PUNCTUATION: Tuple[str, ...] = (
    ";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?",
)

NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: Tuple[str, ...] = ("a", "an", "the")

# Written out as "key value" pairs, one per line, to keep the apostrophes visible and diffable.
_CONTRACTION_TABLE = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn’t’ve
couldnt’ve couldn’t’ve
didnt didn’t
doesnt doesn’t
dont don’t
hadnt hadn’t
hadnt’ve hadn’t’ve
hadn'tve hadn’t’ve
hasnt hasn’t
havent haven’t
hed he’d
hed’ve he’d’ve
he’dve he’d’ve
hes he’s
howd how’d
howll how’ll
hows how’s
Id’ve I’d’ve
I’dve I’d’ve
Im I’m
Ive I’ve
isnt isn’t
itd it’d
itd’ve it’d’ve
it’dve it’d’ve
itll it’ll
let’s let’s
maam ma’am
mightnt mightn’t
mightnt’ve mightn’t’ve
mightn’tve mightn’t’ve
mightve might’ve
mustnt mustn’t
mustve must’ve
neednt needn’t
notve not’ve
oclock o’clock
oughtnt oughtn’t
ow’s’at ’ow’s’at
’ows’at ’ow’s’at
’ow’sat ’ow’s’at
shant shan’t
shed’ve she’d’ve
she’dve she’d’ve
she’s she’s
shouldve should’ve
shouldnt shouldn’t
shouldnt’ve shouldn’t’ve
shouldn’tve shouldn’t’ve
somebody’d somebodyd
somebodyd’ve somebody’d’ve
somebody’dve somebody’d’ve
somebodyll somebody’ll
somebodys somebody’s
someoned someone’d
someoned’ve someone’d’ve
someone’dve someone’d’ve
someonell someone’ll
someones someone’s
somethingd something’d
somethingd’ve something’d’ve
something’dve something’d’ve
somethingll something’ll
thats that’s
thered there’d
thered’ve there’d’ve
there’dve there’d’ve
therere there’re
theres there’s
theyd they’d
theyd’ve they’d’ve
they’dve they’d’ve
theyll they’ll
theyre they’re
theyve they’ve
twas ’twas
wasnt wasn’t
wed’ve we’d’ve
we’dve we’d’ve
weve we've
werent weren’t
whatll what’ll
whatre what’re
whats what’s
whatve what’ve
whens when’s
whered where’d
wheres where's
whereve where’ve
whod who’d
whod’ve who’d’ve
who’dve who’d’ve
wholl who’ll
whos who’s
whove who've
whyll why’ll
whyre why’re
whys why’s
wont won’t
wouldve would’ve
wouldnt wouldn’t
wouldnt’ve wouldn’t’ve
wouldn’tve wouldn’t’ve
yall y’all
yall’ll y’all’ll
y’allll y’all’ll
yall’d’ve y’all’d’ve
y’alld’ve y’all’d’ve
y’all’dve y’all’d’ve
youd you’d
youd’ve you’d’ve
you’dve you’d’ve
youll you’ll
youre you’re
youve you’ve
"""

CONTRACTIONS: Dict[str, str] = dict(
    line.split(" ") for line in _CONTRACTION_TABLE.strip().splitlines())

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern, look-behind typo included: "(?!<=\d)" is a look-ahead that always passes.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # 32: the value the official script passes as ``count``


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation exactly as the official ``processPunctuation``."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, drop articles, apply the contraction table."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: the first step the script applies to predictions."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full normalisation the official script applies to a predicted answer.

    Used for training targets too, so that a model learns answers in the form they are scored in.
    """
    return process_digit_article(process_punctuation(clean_whitespace(text)))
