"""The official VQA answer normalisation, shared by the metric and the training targets.

Why one module: an answer vocabulary built with one normalisation and scored with another loses
accuracy for no reason (``"2"`` vs ``"two"``, ``"dont"`` vs ``"don't"``), so the evaluator
(``vqa.metrics.vqa_eval``) and the answer vocabulary (``vqa.data.answer_vocab``) both use these
functions, with the same default.

Which official script: ``official`` names the script whose rules apply (``OFFICIAL_VERSIONS``):

* ``"vqa-py3"`` (the default): ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of
  GT-Vision-Lab/VQA as it is today (commit c4e6a0e), the only revision that runs on Python 3 and
  so the one anybody running the official script now gets.
* ``"vqa-py2-07aecec"``: the same file at commit 07aecec, the Python 2 script released with VQA
  v1.0. Python 2 is part of its behaviour (see "Python 2" below).
* ``"vizwiz"``: the VizWiz-VQA evaluation script (its punctuation list is the ``vqa-py3`` one,
  its contraction table the typographic 07aecec one, run on Python 3). Used for VizWiz files.

Rules common to all of them, reimplemented with their quirks because matching the published
numbers matters more than tidy rules:

* ``process_punctuation``: for each mark of the version's punctuation list, if the mark stands
  next to a space anywhere in the *original* text, or the original text has a digit-comma-digit
  (``1,000``), every copy of the mark is deleted; otherwise every copy becomes a space. Periods
  are then deleted unless a digit follows (the official regex ``(?!<=\\d)(\\.)(?!\\d)`` has a
  mistyped look-behind, so only the look-ahead works), and only the first 32 of them, because
  the script passes ``re.UNICODE`` (= 32) where ``re.sub`` expects ``count``.
* ``process_digit_article``: lower-case, split on white space, map number words ``none``/
  ``zero`` .. ``ten`` to digits, drop the articles ``a an the``, then replace words found in the
  contraction table. Both tables have 120 entries with the same quirks (``somebody'd`` maps to
  ``somebodyd``; the capitalised keys ``Im``, ``Ive``, ``Id've`` never match lower-cased text).

What differs between the two VQA revisions (everything else is identical, regexes included):

* punctuation list: c4e6a0e has ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (21 marks);
  07aecec has ``; : / ' [ ] " ( ) = + \\ _ > < @ ` , ?`` (19): c4e6a0e added ``{ } - !`` and
  dropped ``:`` and ``'``;
* contraction table: same 120 keys in the same order, but c4e6a0e writes every apostrophe as
  ASCII ``'`` while 07aecec uses the typographic ``’`` in 43 keys and 111 values (``'`` only in
  ``ain't``, ``can't``, ``we've``, ``where's`` ... and two keys).

So ``x-ray``, ``wow!`` and ``{a}`` are split or stripped only by ``vqa-py3``, ``10:30`` and
``don't`` only by 07aecec, and ``dont`` becomes ``don't`` (py3) or ``don’t`` (07aecec).

Python 2 (``vqa-py2-07aecec`` only): that script cannot run on Python 3 (``print`` statements),
and Python 2 changes what its text rules do. Answers come from ``json.load`` as ``unicode`` while
the script's tables are UTF-8 *byte* strings (``# coding=utf-8``, no ``u""``):

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
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

VQA_PY3 = "vqa-py3"
VQA_PY2_07AECEC = "vqa-py2-07aecec"
VIZWIZ = "vizwiz"
DEFAULT_OFFICIAL = VQA_PY3
OFFICIAL_VERSIONS: Tuple[str, ...] = (VQA_PY3, VQA_PY2_07AECEC)  # the VQA scripts

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
PUNCTUATION_PY3: Tuple[str, ...] = (
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

# Checked entry by entry against c4e6a0e: its table is the 07aecec one with every ’ (in keys
# and values) written as ', nothing added, removed or reordered.
CONTRACTIONS_PY3: Dict[str, str] = {
    key.replace("’", "'"): value.replace("’", "'") for key, value in CONTRACTIONS_07AECEC.items()
}


@dataclass(frozen=True)
class AnswerRules:
    """The text rules of one official script (see the module docstring for each field's facts)."""

    name: str
    punctuation: Tuple[str, ...]
    contractions: Mapping[str, str]
    python2: bool  # runs on Python 2: byte-string tables, ASCII-only \d, its round()


RULES: Dict[str, AnswerRules] = {
    VQA_PY3: AnswerRules(VQA_PY3, PUNCTUATION_PY3, CONTRACTIONS_PY3, python2=False),
    VQA_PY2_07AECEC: AnswerRules(
        VQA_PY2_07AECEC, PUNCTUATION_07AECEC, CONTRACTIONS_07AECEC, python2=True
    ),
    VIZWIZ: AnswerRules(VIZWIZ, PUNCTUATION_PY3, CONTRACTIONS_07AECEC, python2=False),
}


class Python2TextError(ValueError):
    """The Python 2 script stops on this answer (``UnicodeDecodeError`` in ``' '.join``)."""


def answer_rules(official: str) -> AnswerRules:
    """The rules named ``official``; a clear ``ValueError`` for an unknown name."""
    try:
        return RULES[official]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown official VQA script {official!r}; choose one of {', '.join(map(repr, RULES))}"
        ) from None


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


def process_punctuation(text: str, official: str = DEFAULT_OFFICIAL) -> str:
    """Delete or space out punctuation exactly as the official ``processPunctuation``."""
    rules = answer_rules(official)
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


def process_digit_article(text: str, official: str = DEFAULT_OFFICIAL) -> str:
    """Lower-case, number words to digits, drop articles, apply the contraction table."""
    return " ".join(word for word, _ in _digit_article_words(text, answer_rules(official)))


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: the first step the script applies to predictions."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str, official: str = DEFAULT_OFFICIAL) -> str:
    """The full normalisation the official script applies to a predicted answer, as text.

    Used for training targets too (with the same default as the metric), so that a model learns
    answers in the form they are scored in.
    """
    return process_digit_article(process_punctuation(clean_whitespace(text), official), official)


def official_prediction(text: str, official: str = DEFAULT_OFFICIAL) -> Optional[str]:
    """The predicted answer as the official script compares it with the ground truth.

    ``normalize_answer(text, official)``, except on Python 2 (``vqa-py2-07aecec``) when a table
    inserted a non-ASCII byte string: ``None`` (it equals no ground-truth answer) if every word
    came from a table, ``Python2TextError`` (the script stops) otherwise.
    """
    rules = answer_rules(official)
    words = _digit_article_words(process_punctuation(clean_whitespace(text), official), rules)
    if rules.python2 and any(from_table and not word.isascii() for word, from_table in words):
        if all(from_table for _, from_table in words):
            return None
        raise Python2TextError(
            f"the {official} script stops on the answer {text!r}: under Python 2 it joins the "
            f"byte string of a contraction with unicode words (UnicodeDecodeError)"
        )
    return " ".join(word for word, _ in words)
