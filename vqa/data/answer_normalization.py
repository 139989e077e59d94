"""The official VQA answer normalisation, shared by the metric and the training targets.

Why one module: an answer vocabulary built with one normalisation and scored with another loses
accuracy for no reason (``"2"`` vs ``"two"``, ``"dont"`` vs ``"don't"``), so the evaluator
(``vqa.metrics.vqa_eval``) and the answer vocabulary (``vqa.data.answer_vocab``) both use these
functions, with the same default.

Which script: ``revision`` names the revision of GT-Vision-Lab/VQA's
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` whose text rules apply (``REVISIONS``):

* ``"master-a013f00"`` (the default, ``DEFAULT_REVISION``): master as it stands today, commit
  a013f00 (2021-03, "Fixed processing answers bug"): the official script. Its text rules (this
  module) are those of 2017; what it changed is *which* answers go through them (see
  ``vqa.metrics.vqa_eval``).
* ``"v2.0-a4f1afd"``: master at a4f1afd (2017, "updated for v2.0"), the script from the VQA v2.0
  release until 2021. The side branch ``feature/update_style`` (c4e6a0e, never merged, but the
  one Python 3 port people found) has the same rules.
* ``"beta-07aecec"``: the 2015 beta (07aecec, "updated for Beta v0.9 release"), run under
  Python 3 with only its ``print`` statements converted, which is how its numbers are
  reproduced today.
* ``"beta-07aecec-py2"``: the same 07aecec file as Python 2 runs it (see "Python 2" below).
* ``"vizwiz"``: the VizWiz-VQA evaluation script (its punctuation list is the 2017 one, its
  contraction table the typographic 07aecec one, run on Python 3). Used for VizWiz files.

All of them are reproduced as run on Python 3 except ``beta-07aecec-py2``: the master file itself
still has Python 2 ``print`` statements, and the reference figures this project is checked against
were produced by converting only those and running it under Python 3.

Deprecated names, still accepted with a ``DeprecationWarning`` (``DEPRECATED_REVISIONS``):
``"vqa-py3"`` named the c4e6a0e rules, which are the 2017 ones and not today's script: it is
``"v2.0-a4f1afd"``; ``"vqa-py2-07aecec"`` is ``"beta-07aecec-py2"``.

Rules common to all of them, reimplemented with their quirks because matching the published
numbers matters more than tidy rules:

* ``process_punctuation``: for each mark of the revision's punctuation list, if the mark stands
  next to a space anywhere in the *original* text, or the original text has a digit-comma-digit
  (``1,000``), every copy of the mark is deleted; otherwise every copy becomes a space. Periods
  are then deleted unless a digit follows (the official regex ``(?!<=\\d)(\\.)(?!\\d)`` has a
  mistyped look-behind, so only the look-ahead works), and only the first 32 of them, because
  the script passes ``re.UNICODE`` (= 32) where ``re.sub`` expects ``count``.
* ``process_digit_article``: lower-case, split on white space, map number words ``none``/
  ``zero`` .. ``ten`` to digits, drop the articles ``a an the``, then replace words found in the
  contraction table. Both tables have 120 entries with the same quirks (``somebody'd`` maps to
  ``somebodyd``; the capitalised keys ``Im``, ``Ive``, ``Id've`` never match lower-cased text).

What differs between the 2017 text rules (a4f1afd, unchanged in master a013f00 and in c4e6a0e)
and the 2015 beta 07aecec (everything else is identical, regexes included):

* punctuation list: 2017 has ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (21 marks);
  07aecec has ``; : / ' [ ] " ( ) = + \\ _ > < @ ` , ?`` (19): 2017 added ``{ } - !`` and
  dropped ``:`` and ``'``;
* contraction table: same 120 keys in the same order, but 2017 writes every apostrophe as
  ASCII ``'`` while 07aecec uses the typographic ``’`` in 43 keys and 111 values (``'`` only in
  ``ain't``, ``can't``, ``we've``, ``where's`` ... and two keys).

So ``x-ray``, ``wow!`` and ``{a}`` are split or stripped only by the 2017 rules, ``10:30`` and
``don't`` only by 07aecec, and ``dont`` becomes ``don't`` (2017) or ``don’t`` (07aecec).

Python 2 (``beta-07aecec-py2`` only): Python 2 changes what the 07aecec text rules do. Answers
come from ``json.load`` as ``unicode`` while the script's tables are UTF-8 *byte* strings
(``# coding=utf-8``, no ``u""``):

* a contraction key containing ``’`` (43 of them) never equals a ``unicode`` word, so it never
  applies; keys containing ``'`` cannot be reached either, ``'`` being punctuation there;
* a replacement containing ``’`` is inserted as bytes: if every word of the answer came from a
  table (contractions, numbers), the joined answer is a byte string that equals no ground-truth
  answer; if any other word is present, ``' '.join`` raises ``UnicodeDecodeError`` and the
  script stops. ``official_prediction`` reports both (``None`` / ``Python2TextError``);
* ``re`` without ``re.UNICODE`` (which the script passes as a count, not a flag): ``\\d`` is
  ``[0-9]`` only.

Not modelled: Python 2's ``lower()``/``split()`` follow Unicode 5.2 and simple case mapping
(``"İ".lower()`` is ``"i"`` there); English answers never hit these differences.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from gridfeats.errors import GridfeatsError

MASTER_A013F00 = "master-a013f00"
V2_A4F1AFD = "v2.0-a4f1afd"
BETA_07AECEC = "beta-07aecec"
BETA_07AECEC_PY2 = "beta-07aecec-py2"
VIZWIZ = "vizwiz"
DEFAULT_REVISION = MASTER_A013F00
#: The VQA script revisions, default first.
REVISIONS: Tuple[str, ...] = (MASTER_A013F00, V2_A4F1AFD, BETA_07AECEC, BETA_07AECEC_PY2)
#: Old names -> what they always meant (accepted with a DeprecationWarning).
DEPRECATED_REVISIONS: Dict[str, str] = {"vqa-py3": V2_A4F1AFD, "vqa-py2-07aecec": BETA_07AECEC_PY2}

NUMBER_WORDS: Dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: Tuple[str, ...] = ("a", "an", "the")

# The marks are processed in this order; the result does not depend on it (each mark's test
# looks at the original text), but keeping the scripts' order makes them easy to compare.
PUNCTUATION_2017: Tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
PUNCTUATION_07AECEC: Tuple[str, ...] = (
    ";",
    ":",
    "/",
    "'",
    "[",
    "]",
    '"',
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
)

# The 07aecec table, written out as "key value" pairs, one per line, to keep the apostrophes
# visible and diffable. It mixes ’ (most entries) and ' (ain't, can't, we've, where's ...).
_CONTRACTION_TABLE_07AECEC = """
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

CONTRACTIONS_07AECEC: Dict[str, str] = dict(
    line.split(" ") for line in _CONTRACTION_TABLE_07AECEC.strip().splitlines()
)

# Checked entry by entry against a4f1afd (and a013f00, c4e6a0e, whose tables are the same): the
# 07aecec table with every ’ (in keys and values) written as ', nothing added, removed or
# reordered.
CONTRACTIONS_2017: Dict[str, str] = {
    key.replace("’", "'"): value.replace("’", "'") for key, value in CONTRACTIONS_07AECEC.items()
}


@dataclass(frozen=True)
class AnswerRules:
    """The text rules of one script revision (see the module docstring for each field's facts)."""

    name: str
    punctuation: Tuple[str, ...]
    contractions: Mapping[str, str]
    python2: bool  # runs on Python 2: byte-string tables, ASCII-only \d, its round()


RULES: Dict[str, AnswerRules] = {
    MASTER_A013F00: AnswerRules(MASTER_A013F00, PUNCTUATION_2017, CONTRACTIONS_2017, python2=False),
    V2_A4F1AFD: AnswerRules(V2_A4F1AFD, PUNCTUATION_2017, CONTRACTIONS_2017, python2=False),
    BETA_07AECEC: AnswerRules(
        BETA_07AECEC, PUNCTUATION_07AECEC, CONTRACTIONS_07AECEC, python2=False
    ),
    BETA_07AECEC_PY2: AnswerRules(
        BETA_07AECEC_PY2, PUNCTUATION_07AECEC, CONTRACTIONS_07AECEC, python2=True
    ),
    VIZWIZ: AnswerRules(VIZWIZ, PUNCTUATION_2017, CONTRACTIONS_07AECEC, python2=False),
}


class Python2TextError(GridfeatsError, ValueError):
    """The Python 2 script stops on this answer (``UnicodeDecodeError`` in ``' '.join``)."""


def resolve_revision(revision: str, known: Tuple[str, ...] = tuple(RULES)) -> str:
    """The canonical name of ``revision``: a deprecated alias warns and is mapped to what it
    always meant; an unknown name is a ``ValueError`` that lists the valid ones."""
    if isinstance(revision, str) and revision in DEPRECATED_REVISIONS:
        canonical = DEPRECATED_REVISIONS[revision]
        warnings.warn(
            f"VQA script revision {revision!r} is deprecated; it names {canonical!r} "
            f"(the official script today is {DEFAULT_REVISION!r}, the default)",
            DeprecationWarning,
            stacklevel=3,
        )
        revision = canonical
    if not isinstance(revision, str) or revision not in known:
        raise ValueError(
            f"unknown VQA script revision {revision!r}; choose one of {', '.join(map(repr, known))}"
        )
    return revision


def answer_rules(revision: str) -> AnswerRules:
    """The text rules of ``revision`` (a deprecated alias warns; an unknown name is a
    ``ValueError``)."""
    return RULES[resolve_revision(revision)]


# \d is Unicode-aware on Python 3 and [0-9] on Python 2 (no re.UNICODE flag): index by python2.
_DIGIT_COMMA_DIGIT = {
    python2: re.compile(r"(\d)(,)(\d)", re.ASCII if python2 else 0) for python2 in (False, True)
}
# The official pattern, look-behind typo included: "(?!<=\d)" is a look-ahead that always passes.
_PERIOD_NOT_BEFORE_DIGIT = {
    python2: re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII if python2 else 0)
    for python2 in (False, True)
}
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # 32: the value the official script passes as ``count``


def process_punctuation(text: str, revision: str = DEFAULT_REVISION) -> str:
    """Delete or space out punctuation exactly as the official ``processPunctuation``."""
    rules = answer_rules(revision)
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT[rules.python2].search(text) is not None
    for mark in rules.punctuation:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT[rules.python2].sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _digit_article_words(text: str, rules: AnswerRules) -> List[Tuple[str, bool]]:
    """``processDigitArticle``'s words, each with "came from a table" (bytes on Python 2)."""
    words = []
    for word in text.lower().split():
        if word in NUMBER_WORDS:
            words.append((NUMBER_WORDS[word], True))
        elif word not in ARTICLES:
            words.append((word, False))
    out = []
    for word, from_table in words:
        # Python 2: a unicode word equals a byte-string key only when both are ASCII.
        reachable = word.isascii() or not rules.python2
        if reachable and word in rules.contractions:
            out.append((rules.contractions[word], True))
        else:
            out.append((word, from_table))
    return out


def process_digit_article(text: str, revision: str = DEFAULT_REVISION) -> str:
    """Lower-case, number words to digits, drop articles, apply the contraction table."""
    return " ".join(word for word, _ in _digit_article_words(text, answer_rules(revision)))


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: the first step every revision applies to the
    prediction (and master a013f00 to the ground-truth answers too)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str, revision: str = DEFAULT_REVISION) -> str:
    """The full text normalisation of a revision: whitespace, punctuation, digits and articles.

    The form the scripts compare a prediction in whenever they process it (master a013f00: when
    the ten answers differ; the older revisions: always), and the form training targets use
    (same default as the metric), so that a model learns answers as they are scored.
    """
    return process_digit_article(process_punctuation(clean_whitespace(text), revision), revision)


def official_prediction(text: str, revision: str = DEFAULT_REVISION) -> Optional[str]:
    """A processed prediction as the script compares it with the ground truth.

    ``normalize_answer(text, revision)``, except on Python 2 (``beta-07aecec-py2``) when a table
    inserted a non-ASCII byte string: ``None`` (it equals no ground-truth answer) if every word
    came from a table, ``Python2TextError`` (the script stops) otherwise.
    """
    rules = answer_rules(revision)
    words = _digit_article_words(process_punctuation(clean_whitespace(text), revision), rules)
    if rules.python2 and any(from_table and not word.isascii() for word, from_table in words):
        if all(from_table for _, from_table in words):
            return None
        raise Python2TextError(
            f"the {revision} script stops on the answer {text!r}: under Python 2 it joins the "
            f"byte string of a contraction with unicode words (UnicodeDecodeError)"
        )
    return " ".join(word for word, _ in words)
