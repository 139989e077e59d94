"""``gridfeats vqa train|predict|eval``: the VQA heads (Pythia, MCAN) on stored features.

    gridfeats vqa train --config configs/vqa/mcan-small.yaml --out runs/mcan [--resume] \
        [OVERRIDE ...]
    gridfeats vqa predict --checkpoint runs/mcan --questions val_questions.json --out results.json
    gridfeats vqa eval --annotations ANN --questions QS --results RES [--out METRICS.json]
                       [--revision master-a013f00|v2.0-a4f1afd|beta-07aecec|beta-07aecec-py2]

OVERRIDE: config overrides as ``KEY VALUE`` pairs or ``key=value`` words.
``eval`` needs no model: it scores any results file with the official VQA accuracy and prints
the official script's report (overall, per answer type, per question type). By default it
reproduces GT-Vision-Lab/VQA's ``vqaEval.py`` as it stands today (master a013f00, 2021);
``--revision`` picks an older one (``vqa.metrics.vqa_eval`` says what each changes).
Under torchrun (``torchrun --nproc_per_node N -m gridfeats vqa train ...``) training is DDP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from vqa.data.answer_normalization import DEFAULT_REVISION, DEPRECATED_REVISIONS, REVISIONS
from vqa.engine import commands

PROG = "gridfeats vqa"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    commands.add_train_arguments(actions.add_parser("train", help="train a VQA head"))
    predict = actions.add_parser(
        "predict", help="answer questions; writes the official results json"
    )
    commands.add_predict_arguments(predict)
    predict.add_argument("--questions", required=True, help="VQA questions json")
    evaluate = actions.add_parser("eval", help="official VQA accuracy of a results file")
    evaluate.add_argument(
        "--annotations", required=True, help="VQA annotations json (or a VizWiz annotations list)"
    )
    evaluate.add_argument("--questions", help="VQA questions json (checks the pair matches)")
    evaluate.add_argument(
        "--results", required=True, help='results json [{"question_id", "answer"}]'
    )
    evaluate.add_argument("--out", type=Path, help="write the metrics json here")
    evaluate.add_argument(
        "--revision",
        choices=REVISIONS,
        help=f"which revision of the official vqaEval.py to reproduce (default: "
        f"{DEFAULT_REVISION}, GT-Vision-Lab/VQA master today, 2021). v2.0-a4f1afd: the 2017 "
        "VQA v2.0 script (same rules as c4e6a0e on the unmerged feature/update_style branch); "
        "beta-07aecec: the 2015 beta under Python 3; beta-07aecec-py2: the same under Python 2. "
        "VizWiz annotations always use VizWiz's own script",
    )
    evaluate.add_argument(
        "--official",
        choices=tuple(DEPRECATED_REVISIONS),
        help="deprecated spelling of --revision: vqa-py3 means v2.0-a4f1afd (it was never the "
        "current script), vqa-py2-07aecec means beta-07aecec-py2",
    )
    evaluate.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the answered questions instead of refusing a results "
        "file that leaves some out",
    )


@commands.reports_user_errors(PROG)
def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return commands.train(args, "vqa")
    if args.action == "predict":
        task = commands.load_for_inference(args, "vqa")
        results = task.predict(
            task.model, task.questions_dataset(args.questions), batch_size=args.batch_size
        )
        commands.write_json(args.out, results)
        print(f"wrote {len(results)} answers to {args.out}")
        return 0
    from vqa.metrics import evaluate_vqa

    metrics = evaluate_vqa(
        args.annotations,
        args.questions,
        args.results,
        revision=_chosen_revision(args),
        allow_missing=args.allow_missing,
    )
    commands.print_vqa_metrics(metrics)
    if args.out:
        commands.write_json(args.out, metrics)
    return 0


def _chosen_revision(args: argparse.Namespace) -> Optional[str]:
    """``--revision``, or the deprecated ``--official`` mapped with a note (None: the default)."""
    if args.official is None:
        return args.revision
    revision = DEPRECATED_REVISIONS[args.official]
    print(
        f"{PROG}: note: --official {args.official} is deprecated; it names --revision "
        f"{revision} (the official script today is the default, {DEFAULT_REVISION})",
        file=sys.stderr,
    )
    if args.revision is not None and args.revision != revision:
        raise ValueError(
            f"--official {args.official} ({revision}) contradicts --revision {args.revision}"
        )
    return revision
