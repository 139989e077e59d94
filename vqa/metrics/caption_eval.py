"""COCO caption metrics through ``pycocoevalcap``: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE.

Why through the toolkit rather than a reimplementation: METEOR and the PTB tokenizer are Java
programs, and published numbers come from exactly these jars; a Python approximation would not
reproduce them. This module only prepares the inputs the way ``pycocoevalcap.eval.COCOEvalCap``
does (every caption PTB-tokenised, lower-cased, punctuation tokens removed; the images scored are
those of the results) and turns the toolkit's asserts into clear errors.

* The toolkit's "CIDEr" is CIDEr-D (Gaussian length penalty, clipped counts, sigma 6) with
  document frequencies from the evaluated references; the key stays ``"CIDEr"`` as in papers.
* SPICE needs Stanford CoreNLP 3.6.0, which ``pycocoevalcap`` downloads on first use. Nothing may
  be downloaded here, so SPICE runs only if its jars are already installed next to the toolkit
  (``spice/lib/stanford-corenlp-3.6.0*.jar``); otherwise it is skipped and a warning says so.
  It is never attempted when absent, so it can never hang on a download.
* Java (``java`` on PATH) is needed for PTB tokenisation and METEOR; its absence is an error that
  says so.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional

from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys

log = logging.getLogger(__name__)

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class CaptionEvalError(DataFormatError):
    """Results or annotations that cannot be scored (unknown images, duplicates, no Java...)."""


def _toolkit_dir() -> Path:
    try:  # pycocoevalcap is a namespace package: locate it through one of its modules
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise CaptionEvalError(
            "caption metrics need pycocoevalcap: pip install "
            "'gridfeats[vqa]' (or pip install pycocoevalcap)"
        ) from None
    return Path(ptbtokenizer.__file__).resolve().parent.parent


def spice_available() -> Optional[str]:
    """None when SPICE can run offline, else the reason it cannot (for the skip message)."""
    if shutil.which("java") is None:
        return "java is not on PATH"
    lib = _toolkit_dir() / "spice" / "lib"
    missing = [jar for jar in SPICE_CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP models are not installed ({', '.join(missing)} missing in "
            f"{lib}); pycocoevalcap would download them, which is not possible offline"
        )
    return None


def _references(annotations: Any) -> Dict[Hashable, List[Dict[str, str]]]:
    if not isinstance(annotations, Mapping) or not isinstance(annotations.get("annotations"), list):
        raise CaptionEvalError(
            "caption annotations must be a COCO captions JSON object with an 'annotations' list"
        )
    references: Dict[Hashable, List[Dict[str, str]]] = {}
    for position, entry in enumerate(annotations["annotations"]):
        require_keys(entry, ("image_id", "caption"), f"caption annotation #{position}")
        references.setdefault(entry["image_id"], []).append({"caption": str(entry["caption"])})
    return references


def _candidates(
    results: Any, references: Mapping[Hashable, Any]
) -> Dict[Hashable, List[Dict[str, str]]]:
    if not isinstance(results, list) or not results:
        raise CaptionEvalError(
            "caption results must be a non-empty JSON list of {'image_id', 'caption'} objects"
        )
    candidates: Dict[Hashable, List[Dict[str, str]]] = {}
    for position, entry in enumerate(results):
        require_keys(entry, ("image_id", "caption"), f"caption result #{position}")
        if not isinstance(entry["caption"], str):
            raise CaptionEvalError(f"caption result #{position}: 'caption' must be a string")
        image_id = entry["image_id"]
        if image_id not in references:
            raise CaptionEvalError(
                f"caption result #{position}: image_id {image_id!r} has no "
                f"reference captions in the annotations"
            )
        if image_id in candidates:
            raise CaptionEvalError(
                f"caption results give image_id {image_id!r} more than one "
                f"caption; the metrics score exactly one per image"
            )
        candidates[image_id] = [{"caption": entry["caption"]}]
    return candidates


def evaluate_captions(
    annotations_json: JsonSource, results: JsonSource, use_spice: Optional[bool] = None
) -> Dict[str, float]:
    """Corpus-level caption metrics of ``results`` against COCO-format references.

    ``annotations_json``: COCO captions (path or dict with ``"annotations": [{"image_id",
    "caption"}]``); ``results``: ``[{"image_id", "caption"}]`` (path or list), one per image;
    the images scored are those of the results, as in ``COCOEvalCap``. Returns
    ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` (fractions, not percentages) plus
    ``"SPICE"`` when it runs. ``use_spice``: None = when available (else a logged warning),
    True = required (``CaptionEvalError`` if unavailable), False = never.
    """
    references = _references(read_json(annotations_json, "caption annotations"))
    candidates = _candidates(read_json(results, "caption results"), references)
    _toolkit_dir()  # a clear error if pycocoevalcap is missing
    if shutil.which("java") is None:
        raise CaptionEvalError(
            "caption metrics need Java for PTB tokenisation and METEOR: "
            "install a JRE (java not found on PATH)"
        )
    spice_reason = spice_available() if use_spice is not False else "disabled"
    if use_spice is True and spice_reason is not None:
        raise CaptionEvalError(f"SPICE was requested but cannot run: {spice_reason}")
    if use_spice is None and spice_reason is not None:
        log.warning("SPICE skipped: %s", spice_reason)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One tokenizer run (one JVM start) for references and candidates together.
    combined = {("ref", image_id): references[image_id] for image_id in candidates}
    combined.update({("res", image_id): caption for image_id, caption in candidates.items()})
    tokenized = PTBTokenizer().tokenize(combined)
    gts = {image_id: tokenized[("ref", image_id)] for image_id in candidates}
    res = {image_id: tokenized[("res", image_id)] for image_id in candidates}

    scores: Dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"Bleu_{n}"] = float(value)
    # The Meteor object owns a Java process; it is stopped when the object is freed (CPython
    # frees it at once, as nothing else refers to it).
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice_reason is None:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores
