"""``gridfeats vqa train|predict|eval``: the VQA heads (Pythia, MCAN) on stored features.

    gridfeats vqa train --config configs/vqa/mcan-small.yaml --out runs/mcan [--resume] \
        [OVERRIDE ...]
    gridfeats vqa predict --checkpoint runs/mcan --questions val_questions.json --out results.json
    gridfeats vqa eval --annotations ANN --questions QS --results RES [--out METRICS.json]

OVERRIDE: config overrides as ``KEY VALUE`` pairs or ``key=value`` words.
``eval`` needs no model: it scores any results file with the official VQA accuracy and prints
the official script's report (overall, per answer type, per question type).
Under torchrun (``torchrun --nproc_per_node N -m gridfeats vqa train ...``) training is DDP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vqa.data.answer_normalization import DEFAULT_OFFICIAL, OFFICIAL_VERSIONS
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
        "--official",
        choices=OFFICIAL_VERSIONS,
        default=DEFAULT_OFFICIAL,
        help="which revision of the official script to reproduce (default: %(default)s)",
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
        official=args.official,
        allow_missing=args.allow_missing,
    )
    commands.print_vqa_metrics(metrics)
    if args.out:
        commands.write_json(args.out, metrics)
    return 0
