"""Word tokenisation of questions and captions (one rule for both).

MCAN's rule (MILVLG/mcan-vqa ``proc_ques``): lower-case, delete the marks
``. , ' ! ? " ( ) * # : ;``, turn ``-`` and ``/`` into spaces, split on white space. Captions use
the same function, so the two vocabularies of the project tokenise alike; for captions this
matches the usual COCO preprocessing (lower-case words, no punctuation) except that other symbols
(``&``, ``$``) survive as their own characters inside words.
"""

from __future__ import annotations

import re
from typing import List

_DELETED_MARKS = re.compile(r"[.,'!?\"()*#:;]")
_SEPARATORS = re.compile(r"[-/]")


def tokenize(text: str) -> List[str]:
    """``"What's on the left-hand side?"`` -> ``["whats", "on", "the", "left", "hand", "side"]``."""
    return _SEPARATORS.sub(" ", _DELETED_MARKS.sub("", text.lower())).split()
